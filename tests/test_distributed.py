"""Two processes on localhost (JAX's distributed runtime on CPU) give the one-process experiment."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from jaxprobe.studies.norms_probing.experiment import ExperimentConfig, run_experiment
from jaxprobe.features.store import FeatureStore

CONFIG = """[experiment]
model = "tiny"
norms = "binder"
max_concepts = 12
text_sites = ["text_encoder.text_model.encoder.layers.*"]
unet_sites = ["unet.mid_block"]
num_inference_steps = 2
batch_size = 2
chunk_size = 3
outer_cv = 3
inner_cv = 3
n_permutations = 5
n_bootstrap = 10
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_share_extraction_and_probes_and_match_one_process(tmp_path):
    config = tmp_path / "config.toml"
    config.write_text(CONFIG + f'cache = "{tmp_path / "cache"}"\nout = "{tmp_path / "two"}"\n')
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}   # this process's XLA flags: equal results need the same compiler
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, "-m", "jaxprobe.cli", "--coordinator", f"localhost:{port}",
                               "--num-processes", "2", "--process-id", str(i), "run", str(config)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    outputs = [p.communicate(timeout=900)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n-----\n".join(outputs)
    assert "process 1: my share of features and probes is done" in outputs[1]
    assert "report:" in outputs[0] and "report:" not in outputs[1]

    entries = FeatureStore(tmp_path / "cache").list()
    assert {e.kind for e in entries} == {"text", "sampling"}
    assert all(e.chunks_present == e.chunks_total == 4 for e in entries)  # 12 prompts / 3, half from each

    one = ExperimentConfig.from_toml(config, out=str(tmp_path / "one"), cache=str(tmp_path / "cache-one"))
    run_experiment(one, progress=False, log=lambda _: None)
    two_table = pd.read_parquet(tmp_path / "two" / "probes.parquet")
    one_table = pd.read_parquet(tmp_path / "one" / "probes.parquet")
    assert list(two_table["feature_set"]) == list(one_table["feature_set"])
    for column in ("score", "r2", "alpha", "ci_low", "ci_high", "p", "q"):
        np.testing.assert_allclose(two_table[column], one_table[column], atol=1e-5, err_msg=column)
    assert not Path(tmp_path / "two" / ".probe-parts").exists()

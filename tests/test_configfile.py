"""One TOML reader and writer for every study's config: round trips, the shared [model]/[sampling]/[run]
tables, errors that name the key."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from jaxprobe.errors import InputError
from jaxprobe.features.settings import ModelSettings, RunSettings, SamplingSettings
from jaxprobe.probes.linear import ProbeConfig
from jaxprobe.runtime.configfile import config_from_toml, config_to_toml
from jaxprobe.studies.decoding_diffusion import directions
from jaxprobe.studies.norms_probing.experiment import QUICK_LOOK, ExperimentConfig
from jaxprobe.studies.revelio.classify import ClassifyConfig, ConvHeadConfig

EXPERIMENT = dataclasses.replace(ExperimentConfig.from_toml(QUICK_LOOK), model="sd15-random", seeds=(3, 1), scheduler="ddim",
                                 max_concepts=7, inner_cv="loo", templates=('say "{concept}"\n', "é {concept}"),
                                 chunk_size=8, force=True)
CLASSIFY = ClassifyConfig(data="images/", timesteps=(10, 25), classifiers=("conv",), image_size=64,
                          linear=ProbeConfig(l2=1e-5, max_steps=5), conv=ConvHeadConfig(width=16, epochs=2),
                          dtype="bfloat16", batch_size=4, cache="somewhere/cache")


def configs() -> list:
    example = directions.DirectionsConfig.example()
    return [EXPERIMENT, ExperimentConfig(), CLASSIFY,
            example, dataclasses.replace(example, seeds=(5,), whiten=True, chunk_size=16, guidance_scale=3.0,
                                         families={**example.families, "age": ("child", "adult", "elder")})]


@pytest.mark.parametrize("config", configs(), ids=lambda c: type(c).__name__)
def test_every_config_reads_back_what_it_writes(config, tmp_path):
    path = tmp_path / "config.toml"
    path.write_text(config.to_toml())
    assert type(config).from_toml(path) == config


def _flat_form(config) -> str:
    """The config with every field in its own table: the layout of config files before the sections."""
    return config_to_toml(config, config.TABLE)


@pytest.mark.parametrize("config", configs(), ids=lambda c: type(c).__name__)
def test_the_section_form_and_the_flat_form_are_one_config(config, tmp_path):
    sections, flat = config.to_toml(), _flat_form(config)
    assert "[model]" in sections and "[run]" in sections and "[model]" not in flat
    for name, text in (("sections.toml", sections), ("flat.toml", flat)):
        (tmp_path / name).write_text(text)
        assert type(config).from_toml(tmp_path / name) == config
    # and at the top level, without the config's own table
    top = flat.replace(f"[{config.TABLE}]\n", "").replace(f"[{config.TABLE}.", "[")
    (tmp_path / "top.toml").write_text(top)
    assert type(config).from_toml(tmp_path / "top.toml") == config


def test_views_of_the_shared_settings():
    assert EXPERIMENT.model_settings == ModelSettings("sd15-random", "float32", "ddim")
    assert EXPERIMENT.sampling == SamplingSettings(10, 7.5, (3, 1))
    assert EXPERIMENT.run == RunSettings(16, 8, "jaxprobe-runs/cache", True)
    example = directions.DirectionsConfig.example()
    assert example.sampling == SamplingSettings(10, 7.5, (0, 1, 2, 3)) and example.run.chunk_size == 64
    assert CLASSIFY.model_settings == ModelSettings("tiny", "bfloat16", None)
    assert CLASSIFY.run == RunSettings(batch_size=4, cache="somewhere/cache") and CLASSIFY.sampling is None


def test_the_bundled_example_and_older_files_read_as_before(tmp_path):
    example = directions.DirectionsConfig.example()
    assert example.model == "tiny" and example.num_inference_steps == 10 and example.n_bootstrap == 500
    assert example.families["age"] == ("young person", "old person") and example.seeds == (0, 1, 2, 3)
    (tmp_path / "prompts").mkdir()
    (tmp_path / "study.toml").write_text(
        '[directions]\nseeds = [0]\nimages = "captions.csv"\nassociations = [["a", "b"]]\n'
        '[directions.families]\na = ["x"]\nb = ["y", "z"]\n[directions.prompt_files]\nx = "prompts/x.txt"\n')
    config = directions.DirectionsConfig.from_toml(tmp_path / "study.toml")
    assert config.images == str(tmp_path / "captions.csv")
    assert config.prompt_files == {"x": str(tmp_path / "prompts" / "x.txt")}
    assert config.associations == (("a", "b"),) and config.seeds == (0,)
    (tmp_path / "experiment.toml").write_text('model = "sd15-random"\nseeds = [2]\nnum_inference_steps = 4\n')
    assert ExperimentConfig.from_toml(tmp_path / "experiment.toml", num_inference_steps=6) == ExperimentConfig(
        model="sd15-random", seeds=(2,), num_inference_steps=6)


def test_one_shared_table_serves_several_studies(tmp_path):
    path = tmp_path / "studies.toml"
    path.write_text('[model]\nmodel = "sd15-random"\ndtype = "bfloat16"\n[run]\ncache = "shared"\n'
                    '[experiment]\nmax_concepts = 3\n[classify]\ndata = "pets"\n')
    experiment, classify = ExperimentConfig.from_toml(path), ClassifyConfig.from_toml(path)
    assert experiment.model == classify.model == "sd15-random" and experiment.cache == classify.cache == "shared"
    assert experiment.max_concepts == 3 and classify.data == "pets" and classify.dtype == "bfloat16"
    assert ExperimentConfig.from_mapping({"sampling": {"seeds": [4]}, "model": "tiny"}).seeds == (4,)


@pytest.mark.parametrize("text, message", [
    ('[experiment]\nnum_inference_steps = 3\n[sampling]\nnum_inference_steps = 4\n',
     r"num_inference_steps is set twice, to 3 in \[experiment\] and to 4 in \[sampling\]"),
    ('model = "tiny"\nseeds = [1]\n[sampling]\nseeds = [2]\n', "seeds is set twice"),
    ('[experiment]\n[sampling]\nnum_steps = 4\n',
     (r"unknown setting\(s\) \['num_steps'\] in \[sampling\]; ExperimentConfig takes \['guidance_scale', "
      r"'num_inference_steps', 'seeds'\]")),
    ('[experiment]\nnum_inference_step = 2\n', r"unknown setting.*known: \[.*'num_inference_steps'"),
])
def test_bad_files_say_which_key(text, message, tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(InputError, match=message):
        ExperimentConfig.from_toml(path)
    path.write_text('[experiment]\nnum_inference_steps = 4\n[sampling]\nnum_inference_steps = 4\n')
    assert ExperimentConfig.from_toml(path).num_inference_steps == 4   # twice, but the same value


def test_a_study_refuses_shared_settings_it_does_not_use(tmp_path):
    path = tmp_path / "classify.toml"
    for extra, message in (("[sampling]\nseeds = [1]\n", r"in \[sampling\]; ClassifyConfig takes none"),
                           ("[model]\nscheduler = 'ddim'\n", r"ClassifyConfig takes \['dtype', 'model'\]"),
                           ("[classify.conv]\nwidht = 3\n", r"\['widht'\] in \[classify.conv\]; known: .*'width'")):
        path.write_text('[classify]\ndata = "x"\n' + extra)
        with pytest.raises(InputError, match=message):
            ClassifyConfig.from_toml(path)


@dataclasses.dataclass(frozen=True)
class Inner:
    rate: float = 0.5


@dataclasses.dataclass(frozen=True)
class Outer:
    name: str = "a"
    pairs: tuple[tuple[int, int], ...] = ((1, 2),)
    table: dict = dataclasses.field(default_factory=dict)
    inner: Inner = Inner()
    maybe: int | None = None


def test_the_writer_handles_any_frozen_dataclass(tmp_path):
    value = Outer(name="b\\c", pairs=((3, 4), (5, 6)), table={"two words": [1.5]}, inner=Inner(np.float64(0.25)))
    path = tmp_path / "outer.toml"
    path.write_text(config_to_toml(value, "outer"))
    assert "maybe" not in path.read_text()
    assert config_from_toml(Outer, path, "outer") == value

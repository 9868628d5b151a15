"""Under faults: kill -9 mid-extraction, damaged and stray files, a full disk, device out-of-memory."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import jax
import numpy as np
import pytest
from typer.testing import CliRunner

import jaxprobe
from jaxprobe.cli import app
from jaxprobe.errors import JaxprobeError, StoreError
from jaxprobe.features.extract import cached_capture
from jaxprobe.runtime.batching import run_batched
from jaxprobe.features.store import CHECK_SUFFIX, FeatureStore

PROMPTS = [f"a photo of a {c}" for c in ("cat", "dog", "car", "cup", "hat", "pen", "box", "owl", "fig", "jar")]
SITES = ["text_encoder.text_model.encoder.layers.3", "unet.mid_block", "latents"]
OPTIONS = {"reduce": "mean", "num_inference_steps": 2, "guidance_scale": 7.5, "seed": 0, "batch_size": 2}


def _extract_command(prompts: Path, cache: Path, out: Path) -> list[str]:
    sites = [arg for site in SITES for arg in ("-s", site)]
    return [sys.executable, "-m", "jaxprobe.cli", "extract", "-m", "tiny", "-p", str(prompts), *sites,
            "--steps", "2", "--batch-size", "1", "--chunk-size", "1", "--cache", str(cache), "-o", str(out)]


def _finished_chunks(cache: Path) -> dict[Path, int]:
    """Chunks whose checksum verifies, with their modification times (a rewrite changes them)."""
    return {path: path.stat().st_mtime_ns for path in FeatureStore(cache).verify().ok}


def _committed(cache: Path) -> int:
    return sum(len(list(d.glob(f"*{CHECK_SUFFIX}"))) for d in cache.glob("*/chunks"))


def test_kill_9_at_random_moments_then_rerun_gives_the_uninterrupted_features(tmp_path):
    """Trial 0 dies while starting up; the others a random instant after their next commit (mid-batch,
    mid-write or between commits). Finished chunks are never rewritten; the result is bit-identical."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    cache, out = tmp_path / "cache", tmp_path / "out"
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}   # this process's XLA flags: equal results need the same compiler
    rng = np.random.default_rng(0)
    survivors: dict[Path, int] = {}
    interrupted = 0
    for trial in range(3):
        proc = subprocess.Popen(_extract_command(prompts, cache, out), env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        if trial == 0:
            time.sleep(float(rng.uniform(0.5, 3.0)))
        else:
            deadline = time.monotonic() + 600
            while proc.poll() is None and time.monotonic() < deadline and _committed(cache) <= len(survivors):
                time.sleep(0.005)
            time.sleep(float(rng.uniform(0, 0.03)))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        finished = _finished_chunks(cache)
        assert all(finished.get(path) == mtime for path, mtime in survivors.items()), \
            f"trial {trial}: a finished chunk was rewritten instead of reused"
        interrupted += 0 < len(finished) < len(PROMPTS)
        survivors = finished
    assert interrupted, "no kill landed mid-extraction"

    done = subprocess.run(_extract_command(prompts, cache, out), env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert all(path.stat().st_mtime_ns == mtime for path, mtime in survivors.items())
    assert len(FeatureStore(cache).verify().ok) == len(PROMPTS)

    reference = cached_capture(jaxprobe.load("tiny"), PROMPTS, SITES, cache=tmp_path / "clean", chunk_size=1,
                               progress=False, **{**OPTIONS, "batch_size": 1})
    for site in SITES:
        np.testing.assert_array_equal(np.load(out / f"{site}.npy"), reference[site], err_msg=site)


def _counting_extractor(calls: list):
    def extract(part: slice, bar) -> dict[str, np.ndarray]:
        calls.append(part.start)
        bar.advance(part.stop - part.start)
        return {"site": np.arange(part.start, part.stop, dtype=np.float32)[:, None] * np.ones((1, 3), np.float32)}
    return extract


def test_a_full_disk_leaves_nothing_half_written_and_finished_chunks_intact(tmp_path, monkeypatch):
    store = FeatureStore(tmp_path)
    calls: list = []
    real_fdopen = os.fdopen
    writes = {"n": 0}

    class FillsUp:
        """A file that takes half the bytes of the third chunk, then reports ENOSPC."""

        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, data):
            if writes["n"] == 4:  # chunk, checksum, chunk, checksum, then the third chunk
                self.f.write(data[: len(data) // 2])
                raise OSError(errno.ENOSPC, "No space left on device")
            writes["n"] += 1
            return self.f.write(data)

        def __getattr__(self, name):
            return getattr(self.f, name)

    monkeypatch.setattr("jaxprobe.runtime.files.os.fdopen", lambda fd, mode: FillsUp(real_fdopen(fd, mode)))
    store.entry({"k": 1}, 6, chunk_size=2)
    writes["n"] = 0  # the manifest is written: count chunk files only
    with pytest.raises(StoreError, match="no space left.*free disk space"):
        store.compute({"k": 1}, 6, _counting_extractor(calls), chunk_size=2)
    leftovers = [p.name for p in tmp_path.rglob("*") if p.is_file() and p.name != "manifest.json"]
    assert sorted(leftovers) == sorted(["000000-000002.safetensors", "000000-000002.sha256",
                                        "000002-000004.safetensors", "000002-000004.sha256"])
    monkeypatch.undo()
    calls.clear()
    again = store.compute({"k": 1}, 6, _counting_extractor(calls), chunk_size=2)
    assert calls == [4]
    np.testing.assert_array_equal(again["site"][:, 0], np.arange(6))


def test_store_ls_verify_gc(tmp_path):
    runner = CliRunner()
    store = FeatureStore(tmp_path)
    store.compute({"kind": "text", "sites": ["a"]}, 6, _counting_extractor([]), chunk_size=2)
    entry_dir = next(p for p in tmp_path.iterdir() if p.is_dir())
    chunks = sorted((entry_dir / "chunks").glob("*.safetensors"))
    flipped = bytearray(chunks[0].read_bytes())
    flipped[-1] ^= 0xFF
    chunks[0].write_bytes(bytes(flipped))
    (entry_dir / "chunks" / ".000002-000004.safetensors.abc.tmp").write_bytes(b"half")
    broken = tmp_path / "0123456789abcdef01234567"
    broken.mkdir()
    (broken / "manifest.json").write_text("{not json")

    listed = runner.invoke(app, ["store", "ls", str(tmp_path)])
    header, *rows = listed.output.splitlines()
    assert listed.exit_code == 0 and header.split()[:4] == ["key", "kind", "prompts", "chunks"]
    assert [row.split()[1:4] for row in rows] == [["text", "6", "3/3"]]
    checked = runner.invoke(app, ["store", "verify", str(tmp_path)])
    assert checked.exit_code == 1
    assert "2 chunk(s) ok, 1 damaged, 1 stray file(s), 1 broken" in checked.output

    kept = runner.invoke(app, ["store", "gc", str(tmp_path)])  # all of it is fresh: a writer may be at work
    assert kept.exit_code == 0 and "0 path(s) removed" in kept.output
    old = time.time() - 7200
    for path in (chunks[0], entry_dir / "chunks" / ".000002-000004.safetensors.abc.tmp", broken):
        os.utime(path, (old, old))
    dry = runner.invoke(app, ["store", "gc", str(tmp_path), "--dry-run"])
    assert "3 path(s) to remove" in dry.output and chunks[0].exists()
    removed = runner.invoke(app, ["store", "gc", str(tmp_path)])
    assert "3 path(s) removed" in removed.output
    assert FeatureStore(tmp_path).verify().clean and not chunks[0].exists() and not broken.exists()
    calls: list = []
    store.compute({"kind": "text", "sites": ["a"]}, 6, _counting_extractor(calls), chunk_size=2)
    assert calls == [0]  # only the removed chunk is recomputed

    os.utime(entry_dir / "manifest.json", (old - 86400 * 30,) * 2)
    runner.invoke(app, ["store", "gc", str(tmp_path), "--older-than", "7"])
    assert not entry_dir.exists()


def _oom_error() -> Exception:
    return jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 1.00GiB.")


def test_out_of_memory_halves_the_batch_and_says_so():
    seen = []

    def run(batch):
        seen.append(len(batch))
        if len(batch) > 2:
            raise _oom_error()
        return {"site": batch * 2}

    x = np.arange(7, dtype=np.float32)[:, None]
    with pytest.warns(RuntimeWarning, match="out of memory at batch size") as record:
        out = run_batched(run, x, batch_size=8)
    assert [str(w.message).split(" (")[0] for w in record] == [
        "device out of memory at batch size 8; retrying with batch size 4",
        "device out of memory at batch size 4; retrying with batch size 2"]
    np.testing.assert_array_equal(out["site"], x * 2)
    assert seen[:3] == [8, 4, 2] and set(seen[2:]) == {2}

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(JaxprobeError, match="out of memory even at batch size 1.*fewer sites"):
            run_batched(lambda batch: (_ for _ in ()).throw(_oom_error()), x, batch_size=4)
    with pytest.raises(jax.errors.JaxRuntimeError, match="INVALID_ARGUMENT"):  # other errors are not retried
        run_batched(lambda batch: (_ for _ in ()).throw(jax.errors.JaxRuntimeError("INVALID_ARGUMENT: x")), x, 4)


class _FailsOnCopy:
    """A device output whose copy to the host runs out of memory (what an async OOM looks like)."""

    def __array__(self, dtype=None, copy=None):
        raise _oom_error()


def test_out_of_memory_on_the_copy_back_reruns_that_batch_once():
    """With one batch in flight the OOM of batch k surfaces after batch k+1 was dispatched: the rows of
    batch k must be computed again, exactly once, and nothing of a failed attempt kept."""
    failed = []

    def run(batch):
        if len(batch) == 4 and float(batch[0, 0]) == 4.0 and not failed:
            failed.append(True)
            return {"site": _FailsOnCopy()}
        return {"site": batch * 2}

    x = np.arange(10, dtype=np.float32)[:, None]
    with pytest.warns(RuntimeWarning, match="out of memory at batch size 4"):
        out = run_batched(run, x, batch_size=4)
    assert failed == [True]
    np.testing.assert_array_equal(out["site"], x * 2)


def test_store_verify_names_the_gc_command_that_removes_what_it_reports(tmp_path):
    """Issue 20, item 8: verify used to say `store gc` removes the damage while gc's grace period kept it."""
    runner = CliRunner()
    store = FeatureStore(tmp_path)
    store.compute({"kind": "text", "sites": ["a"]}, 4, _counting_extractor([]), chunk_size=2)
    chunk = sorted(tmp_path.glob("*/chunks/*.safetensors"))[0]
    chunk.write_bytes(chunk.read_bytes()[:-1])
    checked = runner.invoke(app, ["store", "verify", str(tmp_path)])
    assert checked.exit_code == 1 and f"jaxprobe store gc {tmp_path} --now" in checked.output
    removed = runner.invoke(app, ["store", "gc", str(tmp_path), "--now"])
    assert removed.exit_code == 0 and "1 path(s) removed" in removed.output
    assert runner.invoke(app, ["store", "verify", str(tmp_path)]).exit_code == 0


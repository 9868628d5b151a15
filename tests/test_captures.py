"""Captures: a read-only {site: array} Mapping that describes its capture and splits into feature sets
(the sweep's names, for a Captures and a plain mapping alike). No model: small arrays only."""

import io
import pickle
from collections.abc import Mapping
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

import jaxprobe
from jaxprobe.errors import InputError, SiteError
from jaxprobe.captures import Captures, FeatureSet, feature_sets
from jaxprobe.models.families import FAMILIES

N, T = 24, 3
TEXT, MID, LATENTS = "text_encoder.text_model.final_layer_norm", "unet.mid_block", "latents"


def _arrays(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {TEXT: rng.standard_normal((N, 8)).astype(np.float32),
            MID: rng.standard_normal((N, T, 6)).astype(np.float32),
            LATENTS: rng.standard_normal((N, T, 4)).astype(np.float32)}


def _captures(arrays: dict[str, np.ndarray] | None = None) -> Captures:
    arrays = _arrays() if arrays is None else arrays
    return Captures.from_arrays(arrays, timesteps=np.array([901, 501, 101]), steps=[0, 4, 8],
                                reductions={"text_encoder.*": "eos", "*": "mean"},
                                prompts=[f"a photo of thing {i}" for i in range(N)], seed=3, prompt_offset=5,
                                options={"num_inference_steps": 10, "guidance_scale": 7.5})


def test_captures_is_a_mapping_of_the_arrays_without_a_mutation_api():
    arrays = _arrays()
    feats = _captures(arrays)
    assert jaxprobe.Captures is Captures
    assert isinstance(feats, Mapping) and len(feats) == 3
    assert list(feats) == [TEXT, MID, LATENTS] and set(feats) == set(arrays)
    assert MID in feats and "unet.nope" not in feats and feats.get("unet.nope") is None
    for site, value in feats.items():
        np.testing.assert_array_equal(value, arrays[site])
        assert value is arrays[site]  # the arrays given, not copies
    assert feats == arrays and arrays == feats and dict(feats) == arrays
    assert feats.to_dict().keys() == arrays.keys() and type(feats.to_dict()) is dict
    assert feats != {**arrays, MID: arrays[MID] + 1} and feats != {TEXT: arrays[TEXT]}
    with pytest.raises(SiteError, match="they hold text_encoder") as missing:
        feats["unet.nope"]
    assert isinstance(missing.value, KeyError)
    with pytest.raises(AttributeError, match="immutable"):
        feats.seed = 4
    with pytest.raises(TypeError):
        feats[MID] = arrays[MID]
    buffer = io.BytesIO()
    np.savez(buffer, **feats)
    buffer.seek(0)
    with np.load(buffer) as saved:
        assert saved.files == list(feats) and all(np.array_equal(saved[s], feats[s]) for s in feats)


def test_captures_know_how_they_were_captured():
    feats = _captures()
    np.testing.assert_array_equal(feats.timesteps, [901, 501, 101])
    np.testing.assert_array_equal(feats.steps, [0, 4, 8])
    assert dict(feats.reductions) == {TEXT: "eos", MID: "mean", LATENTS: "mean"}
    assert feats.prompts[1] == "a photo of thing 1" and len(feats.prompts) == N
    assert (feats.seed, feats.prompt_offset, feats.n_rows, feats.n_steps) == (3, 5, N, T)
    assert dict(feats.options) == {"num_inference_steps": 10, "guidance_scale": 7.5}
    assert feats.stepped == (MID, LATENTS)
    with pytest.raises(TypeError):
        feats.options["seed"] = 1  # the description is read-only too
    text_only = Captures.from_arrays({TEXT: _arrays()[TEXT]}, reductions="eos")
    assert text_only.timesteps is None and text_only.steps is None and text_only.stepped == ()
    assert text_only.prompts == () and text_only.seed is None and text_only.n_steps is None


def test_construction_checks_the_description_against_the_arrays():
    arrays = _arrays()
    with pytest.raises(InputError, match="one row per prompt"):
        Captures.from_arrays({TEXT: arrays[TEXT], MID: arrays[MID][:3]})
    with pytest.raises(InputError, match="one prompt per row"):
        Captures.from_arrays(arrays, prompts=["only one"])
    with pytest.raises(InputError, match="one training timestep per kept step"):
        Captures.from_arrays(arrays, timesteps=[1, 2], steps=[0, 1, 2])
    with pytest.raises(InputError, match="one entry per kept step"):
        Captures.from_arrays(arrays, steps=[0, 1, 2, 3], stepped=[MID])


def test_feature_sets_are_named_as_the_sweep_names_them():
    """The names, sites and `timestep` column values probe_sweep has always written (test_probes_sweep
    asserts them too): "site" with -1, "site@i" with i for the i-th entry on the step axis."""
    arrays = {"text_encoder.layers.11": np.ones((N, 5)), MID: np.zeros((N, 2, 4))}
    expected = (["text_encoder.layers.11", f"{MID}@0", f"{MID}@1"], ["text_encoder.layers.11", MID, MID], [-1, 0, 1])
    for features in (arrays, Captures.from_arrays(arrays), Captures.from_arrays(arrays, steps=[10, 40])):
        sets = feature_sets(features)
        assert all(isinstance(s, FeatureSet) for s in sets)
        assert ([s.name for s in sets], [s.site for s in sets], [s.step for s in sets]) == expected
        np.testing.assert_array_equal(sets[2].array, arrays[MID][:, 1])
        assert np.shares_memory(sets[2].array, arrays[MID]) and sets[0].array.shape == (N, 5)
    stacked = feature_sets(np.zeros((2, N, 4)))                      # an (F, n, d) array: sites "0", "1"
    assert [s.name for s in stacked] == ["0", "1"] and [s.step for s in stacked] == [-1, -1]
    # a Captures also gives each set its training timestep and sampler step
    feats = _captures()
    sets = feats.feature_sets()
    assert [s.name for s in sets] == [TEXT, *[f"{MID}@{i}" for i in range(T)], *[f"{LATENTS}@{i}" for i in range(T)]]
    assert [s.timestep for s in sets[:3]] == [None, 901, 501] and [s.sampler_step for s in sets[:3]] == [None, 0, 4]
    assert [s.name for s in feats.feature_sets(["unet.*"])] == [f"{MID}@{i}" for i in range(T)]
    assert [s.name for s in feature_sets(_arrays(), [LATENTS])] == [f"{LATENTS}@{i}" for i in range(T)]
    assert "unet.mid_block@2" in repr(sets[3]) and "timestep=101" in repr(sets[3])
    with pytest.raises(InputError, match="no feature set matches"):
        feats.feature_sets(["vae.*"])
    with pytest.raises(InputError, match="no feature set matches"):
        feature_sets(_arrays(), ["vae.*"])


def test_sites_without_a_step_axis_are_not_split():
    """A text site kept per token, (n, tokens, d), is no step axis in a Captures (a plain mapping keeps
    the old rule: every 3-D array is (n, steps, d)); maps are refused with the fix in the message."""
    tokens = np.zeros((N, 7, 4))
    assert [s.name for s in feature_sets({TEXT: tokens})][:2] == [f"{TEXT}@0", f"{TEXT}@1"]
    feats = Captures.from_arrays({TEXT: tokens, MID: np.zeros((N, 7, 4))}, reductions="none")
    assert feats.stepped == (MID,)
    with pytest.raises(InputError, match="no step axis.*reduce='eos'"):
        feats.feature_sets()
    assert [s.name for s in feature_sets(dict(feats))][:2] == [f"{TEXT}@0", f"{TEXT}@1"]
    maps = Captures.from_arrays({MID: np.zeros((N, T, 2, 2, 4))}, steps=[0, 1, 2])
    with pytest.raises(InputError, match="holds maps.*reduce='mean'"):
        maps.feature_sets()
    single = Captures.from_arrays({MID: np.zeros((N, 2, 2, 4))}, stepped=())   # one timestep, unreduced
    assert single.stepped == () and single.n_steps is None


def test_subset_keeps_sites_and_steps_with_their_description():
    feats = _captures()
    unet = feats.subset(sites="unet.*")
    assert list(unet) == [MID] and dict(unet.reductions) == {MID: "mean"}
    assert unet.prompts == feats.prompts and unet.seed == 3 and unet.steps.tolist() == [0, 4, 8]
    assert list(feats.subset(sites=[LATENTS, TEXT])) == [TEXT, LATENTS]    # site order, not the order asked
    late = feats.subset(steps=[8, 0])
    assert late.steps.tolist() == [8, 0] and late.timesteps.tolist() == [101, 901]
    np.testing.assert_array_equal(late[MID], feats[MID][:, [2, 0]])
    np.testing.assert_array_equal(late[TEXT], feats[TEXT])               # no step axis: kept whole
    assert [s.name for s in late.feature_sets([MID])] == [f"{MID}@0", f"{MID}@1"]   # as a capture of those steps
    assert [s.timestep for s in late.feature_sets([MID])] == [101, 901]
    middle = feats.subset(steps=[4, 8])
    assert np.shares_memory(middle[MID], feats[MID])                    # consecutive steps: a view
    assert feats.subset() == feats
    with pytest.raises(InputError, match="not distinct entries"):
        feats.subset(steps=[1])
    with pytest.raises(InputError, match="not distinct entries"):
        feats.subset(steps=[0, 0])
    with pytest.raises(InputError, match="no step axis"):
        feats.subset(sites=[TEXT]).subset(steps=[0])
    with pytest.raises(InputError, match="no feature set matches"):
        feats.subset(sites=["vae.*"])
    averaged = feats.replace(arrays={MID: feats[MID][:4]}, prompts=())
    assert averaged.stepped == (MID,) and averaged.n_rows == 4 and averaged.steps.tolist() == [0, 4, 8]


def test_repr_shows_sites_shapes_prompts_and_steps():
    text = repr(_captures())
    assert text.startswith(f"Captures({N} prompts, 3 steps [0 4 8] (timesteps [901 501 101]), seed 3")
    assert f"{MID}                            (24, 3, 6)  float32  mean  per step" in text and "eos" in text and "per step" in text and len(text.splitlines()) == 5
    many = Captures.from_arrays({MID: np.zeros((2, 20, 3))}, steps=range(20))
    assert "[0 1 2 ... 18 19]" in repr(many) and "2 rows" in repr(many)


def test_pickling_round_trip_keeps_arrays_and_description():
    feats = _captures()
    back = pickle.loads(pickle.dumps(feats))
    assert isinstance(back, Captures) and back == feats and back == dict(feats)
    assert back.prompts == feats.prompts and back.stepped == feats.stepped and dict(back.options) == dict(feats.options)
    with pytest.raises(ValueError, match="read-only"):
        back.timesteps[0] = 0
    assert back != feats.replace(seed=4) and back != feats.replace(prompts=())


def test_probe_sweep_gives_the_same_table_for_captures_and_the_plain_dict():
    from jaxprobe.probes import probe_sweep

    arrays = _arrays()
    rng = np.random.default_rng(1)
    targets = pd.DataFrame({"a": arrays[TEXT][:, 0] + rng.normal(size=N) * 0.1, "b": rng.normal(size=N)})
    options = dict(alphas=[0.1, 10.0], outer_cv=3, inner_cv=2)
    plain = probe_sweep(arrays, targets, **options)
    captured = probe_sweep(_captures(arrays), targets, **options)
    pd.testing.assert_frame_equal(captured, plain)
    assert list(plain.feature_set.unique()) == [TEXT, *[f"{MID}@{i}" for i in range(T)],
                                                *[f"{LATENTS}@{i}" for i in range(T)]]


def test_the_sae_trainer_reads_captures_as_it_reads_the_dict():
    from jaxprobe.sae.inspect import _manifest_prompts
    from jaxprobe.sae.train import as_source

    plain, captured = as_source(_arrays(), sites=["unet.*"]), as_source(_captures(), sites=["unet.*"])
    assert captured.names == plain.names == [f"{MID}@{i}" for i in range(T)]
    assert captured.dims == plain.dims and captured.n == plain.n == N
    for name, value in captured.read(0).items():
        np.testing.assert_array_equal(value, plain.read(0)[name])
    assert _manifest_prompts(_captures())[:1] == ["a photo of thing 0"]


class _FakePipe:
    """What cached_capture needs of a Pipeline, with no model: the components' shapes the capture planner
    reads, a scheduler, site selection, a capture."""

    source, dtype, components = "fake", None, {}
    text_encoder = tokenizer = object()
    text_encoders = {"text_encoder": text_encoder}
    vae = image_encoder = pipeline_options = None
    family = FAMILIES["stable-diffusion"]
    unet = SimpleNamespace(name="unet", config=SimpleNamespace(sample_size=8, block_out_channels=(4, 8), in_channels=4,
                                                               addition_embed_type=None))

    def __init__(self):
        from jaxprobe.models.schedulers import SchedulerConfig

        self.scheduler, self.calls = SchedulerConfig("ddim"), []

    def select(self, sites):
        return list(sites)

    def capture(self, prompts, sites, *, batch_size, prompt_offset, timesteps="all", num_inference_steps=50,
                seed=0, reduce="mean", **options):
        self.calls.append(prompt_offset)
        rows = np.arange(prompt_offset, prompt_offset + len(prompts), dtype=np.float32)[:, None]
        kept = num_inference_steps if isinstance(timesteps, str) else len(timesteps)
        return {s: rows + np.zeros((1, 5)) if s.startswith("text_encoder.") else rows[:, None] + np.zeros((1, kept, 3))
                for s in sites}


def test_cached_capture_returns_captures_described_by_the_call(tmp_path):
    from jaxprobe.features.extract import cached_capture
    from jaxprobe.pipeline.sampling import sampling_timesteps

    pipe, prompts = _FakePipe(), [f"prompt {i}" for i in range(5)]
    options = dict(num_inference_steps=6, timesteps=[0, -1], seed=2, reduce={"text_encoder.*": "eos", "*": "max"})
    feats = cached_capture(pipe, prompts, [TEXT, MID], cache=tmp_path, chunk_size=2, progress=False, **options)
    again = cached_capture(pipe, prompts, [TEXT, MID], cache=tmp_path, chunk_size=2, progress=False, **options)
    assert pipe.calls == [0, 2, 4] and isinstance(again, Captures) and again == feats   # the second read the store
    assert feats[MID].shape == (5, 2, 3) and feats.stepped == (MID,) and feats.prompts == tuple(prompts)
    assert feats.steps.tolist() == [0, 5] and feats.timesteps.tolist() == sampling_timesteps(pipe, 6)[[0, 5]].tolist()
    assert dict(feats.reductions) == {TEXT: "eos", MID: "max"} and (feats.seed, feats.prompt_offset) == (2, 0)
    assert feats.options["num_inference_steps"] == 6 and "seed" not in feats.options
    assert [s.name for s in feats.feature_sets()] == [TEXT, f"{MID}@0", f"{MID}@1"]
    text = cached_capture(pipe, prompts, [TEXT], cache=tmp_path, chunk_size=2, progress=False, reduce="eos")
    assert text.timesteps is None and text.seed is None and dict(text.reductions) == {TEXT: "eos"}

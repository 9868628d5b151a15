"""TopK SAEs: exact TopK, unit-norm decoder, planted-dictionary recovery, exact resume, inspection, CLI."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from jaxprobe.cli import app
from jaxprobe.errors import InputError
from jaxprobe.sae import SAEConfig, inspect_saes, latent_table, load_saes, train_saes
from jaxprobe.sae.model import (dense_code, init_stack, loss_fn, make_train_step, pre_activations, remove_parallel,
                                top_k)
from jaxprobe.sae.train import ArraySource
from jaxprobe.features.store import FeatureStore

N, D, ATOMS, ACTIVE = 4096, 24, 48, 3


@pytest.fixture(scope="module")
def planted():
    """x = sparse nonnegative codes @ a unit-norm dictionary + an offset; two feature sets share the rows."""
    rng = np.random.default_rng(0)
    atoms = rng.standard_normal((ATOMS, D))
    atoms /= np.linalg.norm(atoms, axis=1, keepdims=True)
    codes = np.zeros((N, ATOMS))
    chosen = np.argsort(rng.random((N, ATOMS)), axis=1)[:, :ACTIVE]
    np.put_along_axis(codes, chosen, rng.uniform(1.0, 2.0, (N, ACTIVE)), axis=1)
    x = (codes @ atoms + 3.0).astype(np.float32)
    # "site" is (n, T=2, d): two feature sets, the second the same data scaled (an independent SAE learns it)
    return {"site": np.stack([x, 5.0 * x], axis=1)}, atoms, codes


CONFIG = SAEConfig(k=ACTIVE, expansion=4, batch_size=512, steps=800, learning_rate=5e-3, warmup_steps=50,
                   log_every=100, checkpoint_every=0)


@pytest.fixture(scope="module")
def trained(planted):
    return train_saes(planted[0], CONFIG)


def test_topk_code_is_exact_and_decoders_agree():
    config = SAEConfig(k=5, expansion=3, decoder="dense")
    state = jax.tree.map(lambda a: a[0], init_stack(jax.random.key(1), jnp.zeros((1, 8)), jnp.ones(1), config))
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.standard_normal((16, 8)), jnp.float32)
    pre = np.asarray(pre_activations(state.params, x))
    values, indices = top_k(jnp.asarray(pre), 5)
    expected = np.sort(pre, axis=1)[:, ::-1][:, :5]
    np.testing.assert_array_equal(np.asarray(indices), np.argsort(-pre, axis=1)[:, :5])
    np.testing.assert_array_equal(np.asarray(values), np.maximum(expected, 0))
    # Wide rows take two stages (top k per chunk, then of the candidates): the same values, indices, gradient.
    wide = rng.standard_normal((6, 64)).astype(np.float32)
    wide[:, [9, 40]] = 0.5                                                                        # a tie
    chunked = jax.jit(lambda p, c: (top_k(p, 5, chunk=c), jax.grad(lambda q: top_k(q, 5, chunk=c)[0].sum())(p)),
                      static_argnums=1)
    for a, b in zip(jax.tree.leaves(chunked(wide, 16)), jax.tree.leaves(chunked(wide, 64))):
        np.testing.assert_array_equal(a, b)
    code = np.asarray(dense_code(values, indices, pre.shape[1]))
    assert ((code != 0).sum(1) <= 5).all() and (code >= 0).all()
    np.testing.assert_array_equal(np.sort(code, axis=1)[:, ::-1][:, :5], np.maximum(expected, 0))
    # The sparse (gather) decoder is the same function as the dense one, gradients included.
    dead = jnp.arange(pre.shape[1]) % 2 == 0
    grads = {}
    for decoder in ("dense", "sparse"):
        cfg = SAEConfig(k=5, expansion=3, aux_k=4, decoder=decoder)
        grads[decoder] = jax.jit(jax.grad(lambda p, c=cfg: loss_fn(p, x, dead, c)[0]))(state.params)
    for name in grads["dense"]:
        np.testing.assert_allclose(grads["dense"][name], grads["sparse"][name], rtol=1e-5, atol=1e-6)
    # A stack run 2 SAEs at a time (lax.map) takes the same step as all at once (vmap).
    xs = jnp.asarray(rng.standard_normal((3, 16, 8)), jnp.float32)
    stepped = [make_train_step(SAEConfig(k=5, expansion=3, warmup_steps=0, saes_at_once=c))(
        init_stack(jax.random.key(1), xs.mean(1), jnp.ones(3), config), xs)[0].params["W_dec"] for c in (0, 2)]
    np.testing.assert_allclose(stepped[0], stepped[1], atol=1e-6)


def test_decoder_rows_stay_unit_norm_and_move_along_the_sphere(trained):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((20, 6))
    w /= np.linalg.norm(w, axis=1, keepdims=True)
    g = remove_parallel(rng.standard_normal((20, 6)), w)
    np.testing.assert_allclose(jnp.sum(g * w, axis=1), 0, atol=1e-6)
    np.testing.assert_allclose(jnp.linalg.norm(trained.stacks[D].params["W_dec"], axis=-1), 1.0, atol=1e-6)


def test_recovers_the_planted_dictionary(planted, trained):
    _, atoms, _ = planted
    for name in ("site@0", "site@1"):
        w_dec = np.asarray(trained.state(name).params["W_dec"])
        cosine = atoms @ (w_dec / np.linalg.norm(w_dec, axis=1, keepdims=True)).T
        found = cosine.max(axis=1) >= 0.9
        assert found.mean() >= 0.9, f"{name}: {found.sum()} of {ATOMS} atoms found"
    last = trained.history[trained.history["step"] == CONFIG.steps]
    assert (last["explained_variance"] > 0.9).all() and (last["l0"] <= ACTIVE).all()


def test_resume_after_a_stop_takes_the_same_steps_as_a_straight_run(planted, tmp_path):
    """Streamed from a FeatureStore entry in chunks, stopped and resumed = in memory, straight through."""
    features = {"site": planted[0]["site"][:640]}
    config = SAEConfig(k=3, expansion=2, batch_size=96, steps=14, learning_rate=3e-3, warmup_steps=4, log_every=3,
                       checkpoint_every=5, aux_k=2, dead_tokens=200)
    straight = train_saes(ArraySource(features, chunk_rows=64), config)
    entry = FeatureStore(tmp_path / "store").entry({"test": "sae"}, 640, chunk_size=64)
    for part in entry.chunk_slices():
        entry.write_chunk(part, {"site": features["site"][part]})
    stopped = train_saes(entry, config, out=tmp_path / "run", stop_after=7)
    assert stopped.step == 7 and load_saes(tmp_path / "run").step == 7
    resumed = train_saes(entry.root, config, out=tmp_path / "run")
    assert resumed.step == 14
    for a, b in zip(jax.tree.leaves(straight.stacks), jax.tree.leaves(resumed.stacks)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)
    pd.testing.assert_frame_equal(straight.history, resumed.history)
    np.testing.assert_allclose(jnp.linalg.norm(resumed.stacks[D].params["W_dec"], axis=-1), 1.0, atol=1e-6)
    with pytest.raises(InputError, match="other settings"):
        train_saes(entry, SAEConfig(**{**config.__dict__, "k": 2}), out=tmp_path / "run")


def test_latent_table_matches_a_brute_force_pass(planted, trained, tmp_path):
    features, _, codes = planted
    # Inputs that use atom 0 name concepts thing0-19, the others thing20-39; attribute "atom0" says which.
    concept = np.where(codes[:, 0] > 0, np.arange(N) % 20, 20 + np.arange(N) % 20)
    prompts = [f"a photo of a thing{c}" for c in concept]

    class Norms:  # the fields latent_table reads
        concepts = tuple(f"thing{i}" for i in range(40))
        attributes = ("atom0", "noise")
        values = np.column_stack([np.arange(40) < 20, np.random.default_rng(1).random(40)]).astype(float)
        metadata = pd.DataFrame({"category": [f"cat{i % 4}" for i in range(40)]}, index=list(concepts))

    table = latent_table(trained, features, labels=prompts, norms=Norms(), top_n=5)
    x = features["site"][:, 0]
    values, indices = trained.encode("site@0", x)
    dense = np.zeros((N, trained.state("site@0").params["W_dec"].shape[0]))
    np.put_along_axis(dense, indices, values, axis=1)
    rows = table[table["feature_set"] == "site@0"].set_index("latent")
    np.testing.assert_allclose(rows["mean_activation"], dense.mean(0), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(rows["frequency"], (dense > 0).mean(0))
    live = np.flatnonzero((dense > 0).sum(0) >= 5)
    for latent in live[:10]:
        np.testing.assert_allclose(rows.loc[latent, "top_activations"], np.sort(dense[:, latent])[::-1][:5], rtol=1e-4)
        assert rows.loc[latent, "top_labels"][0] == prompts[rows.loc[latent, "top_rows"][0]]
        r = [np.corrcoef(dense[:, latent], Norms.values[concept, j])[0, 1] for j in range(2)]
        assert rows.loc[latent, "best_attribute"] == Norms.attributes[int(np.argmax(np.abs(r)))]
        np.testing.assert_allclose(rows.loc[latent, "best_r"], r[int(np.argmax(np.abs(r)))], rtol=1e-3)
        top_categories = [f"cat{concept[row] % 4}" for row in rows.loc[latent, "top_rows"]]
        assert rows.loc[latent, "purity"] == max(top_categories.count(c) for c in top_categories) / 5
    best = rows["best_r"].abs().idxmax()  # the latent that learnt atom 0
    assert rows.loc[best, "best_attribute"] == "atom0" and rows.loc[best, "best_r"] > 0.7
    images = np.random.default_rng(0).random((N, 8, 8, 3)).astype(np.float32)
    page = inspect_saes(trained, features, tmp_path / "inspect", images=images, labels=prompts, max_latents=3)
    text = page.read_text()
    assert text.count("data:image/png;base64") >= 3 + 2 and "site@1" in text and "<details" in text
    assert len(pd.read_parquet(tmp_path / "inspect" / "latents.parquet")) == len(table)


def test_cli_sae_train_and_inspect(planted, tmp_path):
    feats = tmp_path / "feats"
    feats.mkdir()
    np.save(feats / "unet.mid_block.npy", planted[0]["site"][:300])
    np.save(feats / "text_encoder.layers.1.npy", planted[0]["site"][:300, 0, :8])
    loaded = {"source": "tiny", "dtype": "float32", "loras": [{"file": "a.safetensors", "scale": 0.5,
                                                               "sha256": "c0ffee"}]}   # as `jaxprobe extract` writes
    (feats / "manifest.json").write_text(json.dumps({"model": "tiny", "loaded": loaded,
                                                     "prompts": [f"prompt {i}" for i in range(300)]}))
    runner = CliRunner()
    # The settings of the resume test: the same compiled programs
    common = ["--k", "3", "--expansion", "2", "--batch-size", "96", "--warmup", "4", "--lr", "3e-3", "--aux-k", "2",
              "--dead-tokens", "200", "--checkpoint-every", "5"]
    result = runner.invoke(app, ["sae", "train", "-f", str(feats), "-o", str(tmp_path / "sae"), "--steps", "6", *common])
    assert result.exit_code == 0, result.output
    metrics = pd.read_csv(tmp_path / "sae" / "metrics.csv")
    assert set(metrics["feature_set"]) == {"unet.mid_block@0", "unet.mid_block@1", "text_encoder.layers.1"}
    assert (tmp_path / "sae" / "loss_curves.png").stat().st_size > 1000
    result = runner.invoke(app, ["sae", "train", "-f", str(feats), "-o", str(tmp_path / "sae"), "--steps", "8", *common])
    assert result.exit_code == 0 and "for 8 steps" in result.output
    result = runner.invoke(app, ["sae", "inspect", str(tmp_path / "sae"), "-f", str(feats), "--top-n", "3"])
    assert result.exit_code == 0, result.output
    page = (tmp_path / "sae" / "inspect" / "sae_report.html").read_text()
    assert "prompt " in page and "Random weights." in page  # the model came from the manifest via the checkpoint
    assert load_saes(tmp_path / "sae").model == "tiny" and (tmp_path / "sae" / "loss_curves_per_sae.png").is_file()
    assert load_saes(tmp_path / "sae").loaded == loaded and "c0ffee" in page   # what was loaded, kept and shown
    result = runner.invoke(app, ["sae", "train", "-f", str(feats), "-o", str(tmp_path / "x"), "--k", "99", *common[2:]])
    assert result.exit_code == 2 and "error:" in result.output and "lower k" in result.output, result.output


def test_a_latent_is_named_only_from_enough_rated_inputs(planted, trained):
    """13 of 4096 inputs name a rated concept: no latent gets an attribute or a category, the page says why,
    and features from a random-weights model get the caveat."""
    import dataclasses

    from jaxprobe.sae import sae_page
    from jaxprobe.sae.inspect import MIN_RATED

    features, _, _ = planted
    prompts = [f"a photo of a thing{i}" if i < 13 else f"input {i}" for i in range(N)]

    class Norms:
        concepts = tuple(f"thing{i}" for i in range(13))
        attributes = ("size", "colour")
        values = np.random.default_rng(2).random((13, 2))
        metadata = pd.DataFrame({"category": ["a", "b"] * 6 + ["a"]}, index=list(concepts))

    table = latent_table(trained, features, labels=prompts, norms=Norms(), top_n=5)
    assert 13 < MIN_RATED and table["best_attribute"].isna().all() and table["top_category"].isna().all()
    assert (table["n_rated"] == 13).all() and (table["n_categorised"] == 13).all()
    random_saes = dataclasses.replace(trained, model="tiny", random_weights=True)
    text = sae_page(table, saes=random_saes, settings={"model": "tiny"})
    assert "too few rated inputs (13)" in text and "Random weights." in text and "<th>model</th>" in text
    assert "<td class='left'>size</td>" not in text and "<td class='left'>colour</td>" not in text
    # the same inputs named once the minimum is lowered to what they have
    named = latent_table(trained, features, labels=prompts, norms=Norms(), top_n=5, min_rated=13)
    assert named["best_attribute"].notna().any() and "Random weights." not in sae_page(named, saes=trained)
    assert trained.dead_window == N  # dead_tokens (1e6) capped at one pass over the data


def test_features_provenance_reads_the_model_where_the_features_record_it(tmp_path):
    from jaxprobe.sae.train import features_provenance

    entry = FeatureStore(tmp_path / "store").entry({"kind": "text", "model": {"source": "sd15-random"}}, 4,
                                                   chunk_size=2)
    assert features_provenance(entry) == {"model": "sd15-random", "random_weights": True, "loaded": None}
    folder = tmp_path / "feats"
    folder.mkdir()
    (folder / "manifest.json").write_text(json.dumps({"model": "org/real-model", "random_weights": False}))
    assert features_provenance(folder) == {"model": "org/real-model", "random_weights": False, "loaded": None}
    assert features_provenance({"site": np.zeros((2, 3))}) == {"model": None, "random_weights": False, "loaded": None}
    # a store entry keys on the model's fingerprint, which holds the load's provenance
    record = {"source": "org/real-model", "dtype": "float32", "revision": "abc1234"}
    fingerprinted = FeatureStore(tmp_path / "store").entry(
        {"kind": "text", "model": {"source": "org/real-model", "provenance": record}}, 4, chunk_size=2)
    assert features_provenance(fingerprinted)["loaded"] == record

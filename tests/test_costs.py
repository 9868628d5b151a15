"""The cost model's arithmetic: exact storage, linear time, perfect data parallelism."""

from jaxprobe.probes.costs import Rates, Sweep, predict


def test_things_sweep_storage_and_scaling():
    sweep = Sweep(n_concepts=1854, n_templates=4, steps=50, n_targets=66)
    assert sweep.n_prompts == 7416 and sweep.evaluations == 51  # PNDM: one more UNet call than steps
    assert sweep.feature_bytes == 4 * 7416 * (51 * 8320 + 14 * 768)
    assert len(sweep.feature_sets) == 9 * 51 + 14
    rates = Rates("dev", unet_ms_per_prompt_evaluation=2.0, probe_ms_per_set_overhead=10.0)
    one, eight = predict(sweep, rates, 1), predict(sweep, rates, 8)
    assert one.extraction_s == 7416 * 51 * 2.0 / 1e3 and one.probing_s == len(sweep.feature_sets) * 10.0 / 1e3
    assert abs(eight.total_s * 8 - one.total_s) < 1e-9

"""The paired quality bench (bench/quality.py, paired.py, needle_trace.py) on a tiny random Llama."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

import needle_trace  # noqa: E402
import paired  # noqa: E402
import quality  # noqa: E402

from proxyprefill.kernels import ProxyAttnConfig, reference  # noqa: E402
from proxyprefill.workers import profiles  # noqa: E402


def _encode(text: str) -> list[int]:
    return list(text.encode("utf-8"))


def test_paired_counts_and_interval():
    dense = [True] * 40 + [False] * 10
    variant = [True] * 37 + [False] * 3 + [True] * 2 + [False] * 8
    c = paired.compare_paired(dense, variant)
    assert (c.n, c.lost, c.gained, c.reference_successes, c.variant_successes) == (50, 3, 2, 40, 39)
    assert math.isclose(c.difference, -0.02)
    assert -1.0 <= c.difference_low < c.difference < c.difference_high <= 1.0
    assert c.difference_low < 0 < c.difference_high  # 3 lost vs 2 gained: not significant
    assert math.isclose(c.mcnemar_p, 1.0)


def test_paired_interval_excludes_zero_for_a_clear_loss():
    dense = [True] * 50
    variant = [True] * 35 + [False] * 15
    c = paired.compare_paired(dense, variant)
    assert c.lost == 15 and c.gained == 0
    assert c.difference_high < 0
    assert math.isclose(c.mcnemar_p, 2 / 2**15)


def test_paired_interval_without_discordant_pairs_still_has_width():
    c = paired.compare_paired([True] * 20, [True] * 20)
    assert c.difference == 0 and c.difference_low < -0.05 and c.difference_high > 0.05  # 20 agreements
    assert math.isclose(c.difference_low, -c.difference_high)
    assert c.mcnemar_p == 1.0
    with pytest.raises(ValueError, match="length"):
        paired.compare_paired([True], [True, False])


def test_paired_interval_is_antisymmetric():
    a = [True] * 30 + [False] * 5 + [True] * 4 + [False] * 11
    b = [True] * 30 + [True] * 5 + [False] * 4 + [False] * 11
    ab, ba = paired.compare_paired(a, b), paired.compare_paired(b, a)
    assert math.isclose(ab.difference_low, -ba.difference_high, abs_tol=1e-12)
    assert math.isclose(ab.difference_high, -ba.difference_low, abs_tol=1e-12)


def test_wilson_interval_matches_the_closed_form():
    low, high = paired.wilson_interval(0, 10)
    assert low == 0.0 and math.isclose(high, 0.2775, abs_tol=1e-4)  # the textbook 0/10 bound
    low, high = paired.wilson_interval(5, 10)
    assert math.isclose(low, 1 - high, abs_tol=1e-12)


def test_parse_variant_names_the_bad_field():
    base = ProxyAttnConfig()
    v = quality.parse_variant("g:proxy_groups=kv,gamma=0.9", 2, base)
    assert v.config.proxy_groups == 2 and v.config.gamma == 0.9 and v.attention == "proxy"
    assert quality.parse_variant("dense", 2, base).attention == "dense"
    with pytest.raises(ValueError, match="gama"):
        quality.parse_variant("x:gama=0.9", 2, base)
    with pytest.raises(ValueError, match="min_budget_tokens"):
        quality.parse_variant("x:min_budget_tokens=lots", 2, base)
    with pytest.raises(ValueError, match="gamma"):
        quality.parse_variant("x:gamma=1.5", 2, base)


def _profile(info, settings: profiles.ProfileSettings) -> profiles.Profile:
    """A calibrated profile of `info`'s model holding `settings` (figures made up: the bench only
    reads the settings and describes the rest)."""
    layers = info.num_layers
    config = settings.config
    dense = profiles.Measurement(
        "dense",
        "dense",
        config,
        (),
        (profiles.TextDelta("t", 64, 2.0, 0.0),),
        0.0,
        (0.0,) * layers,
        1.0,
        (1.0,) * layers,
    )
    chosen = None
    if settings.attention == "proxy":
        texts = (profiles.TextDelta("t", 64, 2.01, 0.01),)
        chosen = profiles.Measurement(
            "chosen",
            "proxy",
            config,
            settings.layer_gammas,
            texts,
            0.4,
            (0.4,) * layers,
            0.9,
            (0.9,) * layers,
        )
    return profiles.Profile(
        model_id=info.model_id,
        model_fingerprint=profiles.model_fingerprint(info),
        settings=settings,
        proxy_met_target=chosen is not None,
        dense=dense,
        chosen=chosen,
        candidates=() if chosen is None else (chosen,),
        calibration=profiles.CalibrationParameters(),
        texts=(profiles.TextSource("t", "made up", "0" * 64, 64),),
    )


class _Info:
    model_id, num_layers, num_kv_heads, architecture = "tiny", 2, 2, "llama"
    num_heads, head_dim, vocab_size, max_position_embeddings, rope_theta, rope_scaling = (
        4,
        16,
        256,
        2048,
        1e4,
        None,
    )


def test_profile_variants_run_the_profiles_settings_with_changes_on_top():
    base = ProxyAttnConfig()
    config = ProxyAttnConfig(block_size=64, proxy_groups=2, gamma=0.95, dense_below_tokens=0)
    profile = _profile(_Info, profiles.ProfileSettings("proxy", config, layer_gammas=(0.95, 0.8)))
    served = quality.parse_variant("profile:profile", 2, base, profile)
    assert (served.attention, served.config, served.layer_gammas) == ("proxy", config, (0.95, 0.8))
    assert served.prefill_config == (config, config.replace(gamma=0.8))
    coarse = quality.parse_variant("coarse:profile,estimator=meanpool", 2, base, profile)
    assert coarse.config == config.replace(estimator="meanpool") and coarse.layer_gammas == (0.95, 0.8)
    assert coarse.factor == "profile,estimator"
    plain = quality.parse_variant("plain:estimator=meanpool", 2, base, profile)  # not from the profile
    assert plain.config == base.replace(estimator="meanpool") and plain.prefill_config is plain.config
    with pytest.raises(ValueError, match="--profile"):
        quality.parse_variant("p:profile", 2, base, None)
    with pytest.raises(ValueError, match="per layer"):
        quality.parse_variant("p:profile,gamma=0.9", 2, base, profile)
    dense_profile = _profile(_Info, profiles.ProfileSettings("dense", config))
    assert quality.parse_variant("p:profile", 2, base, dense_profile).attention == "dense"
    with pytest.raises(ValueError, match="keeps dense attention"):
        quality.parse_variant("p:profile,estimator=meanpool", 2, base, dense_profile)


def _report_with(lost: int, gained: int, delta_nll: float, variant_seconds=(0.5, 0.4, 0.6)) -> dict:
    """A dense and one variant on 50 prompts of one length, dense right on 49."""
    dense_exact = [True] * 49 + [False]
    variant_exact = list(dense_exact)
    for i in range(lost):
        variant_exact[i] = False
    if gained:
        variant_exact[-1] = True

    def variant(name, exact, nll, seconds):
        samples = [
            {"length": 1024, "seed": i, "exact": e, "seconds": 1.0, "attention_seconds": 0.5}
            for i, e in enumerate(exact)
        ]
        return {
            "name": name,
            "attention": "dense" if name == "dense" else "proxy",
            "sparsity": {"1024": {"overall": 0.0 if name == "dense" else 0.6}},
            "recall": {},
            "nll": {"a": {"nll": 2.0 + nll}, "b": {"nll": 3.0}},
            "prefill_seconds": {"1024": list(seconds)},
            "samples": samples,
        }

    dense = variant("dense", dense_exact, 0.0, (1.0, 1.1, 0.9))
    other = variant("sparse", variant_exact, delta_nll, variant_seconds)
    report = {"variants": [dense, other], "profile": None}
    for v in report["variants"]:
        v["against_dense"] = quality.compare_with_dense(v, dense)
    return report


def test_the_quality_bound_and_the_speedup_per_length():
    report = _report_with(lost=0, gained=0, delta_nll=0.01)
    entry = report["variants"][1]["against_dense"]["per_length"]["1024"]
    assert entry["prefill_seconds"] == {"median": 0.5, "min": 0.4, "max": 0.6}
    assert math.isclose(entry["prefill_speedup"], 2.0)
    assert quality.meets_quality_bound(report["variants"][1], "1024")
    # 1 of 49 dense successes lost is 2.04% > 2%; dense -2.0 points would still pass the EM rule
    assert not quality.meets_quality_bound(
        _report_with(lost=1, gained=0, delta_nll=0.0)["variants"][1], "1024"
    )
    # a loss made up by a gain keeps EM but not the lost share
    assert not quality.meets_quality_bound(
        _report_with(lost=1, gained=1, delta_nll=0.0)["variants"][1], "1024"
    )
    assert not quality.meets_quality_bound(
        _report_with(lost=0, gained=0, delta_nll=0.021)["variants"][1], "1024"
    )
    text = quality.targets_table(report)
    assert "| sparse | 1024 | 0.600 | 0 / 49 | +0.0 | +0.0100 | yes | 0.500 [0.400, 0.600] | 2.00x |" in text
    assert "| dense | 1024 | 0.000 | — | — | — | — | 1.000 [0.900, 1.100] | 1.00x |" in text


def _trace_inputs(needle_block: int, strength: float):
    """q/k of one chunk whose last query block reads key block `needle_block` hard in head 0."""
    torch.manual_seed(0)
    q, k = torch.randn(1, 4, 128, 16) * 0.1, torch.randn(1, 2, 256, 16) * 0.1
    direction = torch.zeros(16)
    direction[0] = strength
    q[0, 0, -16:] += direction
    k[0, 0, needle_block * 16 : needle_block * 16 + 16] += direction
    return q, k


def test_trace_reports_a_budget_drop_and_a_kept_needle():
    config = ProxyAttnConfig(block_size=16, stride=4, gamma=0.3, min_budget_tokens=16, dense_below_tokens=0)
    q, k = _trace_inputs(needle_block=5, strength=6.0)
    scores = reference.estimate_block_scores(q, k, config, 128)
    budgets = reference.head_budgets(q, k, config, 128)
    index = reference.build_block_mask(scores, budgets, config, 128)
    stats = type("Stats", (), {"index": index})()
    trace = needle_trace.NeedleTrace(config, needle_block=5, last_position=255, scale=0.25)
    trace(0, q, k, k, stats, 128)
    summary = trace.summary()
    reader = next(h for h in trace.heads if h.head == 0)
    assert reader.needle_share > 0.5 and reader.kept and reader.reason == ""
    # a one-block budget that must also hold the local and sink blocks: force a drop
    tight = config.replace(sink_blocks=0, local_blocks=1, gamma=0.01)
    forced = torch.ones_like(budgets)
    index = reference.build_block_mask(
        reference.estimate_block_scores(q, k, tight, 128), forced * 0, tight, 128
    )
    trace = needle_trace.NeedleTrace(tight, needle_block=5, last_position=255, scale=0.25)
    trace(0, q, k, k, type("Stats", (), {"index": index})(), 128)
    dropped = [h for h in trace.heads if not h.kept]
    assert dropped and all(h.reason in needle_trace.REASONS for h in dropped)
    assert summary["readers"] >= 1
    # an observer call for an earlier chunk, or a dense chunk, records nothing
    trace = needle_trace.NeedleTrace(config, needle_block=5, last_position=999, scale=0.25)
    trace(0, q, k, k, stats, 128)
    trace(0, q, k, k, None, 128)
    assert trace.heads == []


def test_trace_budgets_follow_the_layers_gamma():
    config = ProxyAttnConfig(block_size=16, stride=4, gamma=0.99, min_budget_tokens=16, dense_below_tokens=0)
    q, k = _trace_inputs(needle_block=5, strength=2.0)
    stats = type(
        "Stats",
        (),
        {
            "index": reference.build_block_mask(
                reference.estimate_block_scores(q, k, config, 128),
                reference.head_budgets(q, k, config, 128),
                config,
                128,
            )
        },
    )()
    trace = needle_trace.NeedleTrace(config, 5, 255, 0.25, min_share=0.0, layer_gammas=(0.99, 0.3))
    trace(0, q, k, k, stats, 128)
    trace(1, q, k, k, stats, 128)
    budget = {layer: max(h.budget_blocks for h in trace.heads if h.layer == layer) for layer in (0, 1)}
    assert budget[1] < budget[0]  # the same q and k: only the gamma differs


def test_needle_token_span_points_at_the_value():
    prompt = "intro text. The special number for calm-anchor is 1234567. more text"
    start, end = needle_trace.needle_token_span(
        prompt, "The special number for calm-anchor is 1234567.", "1234567", _encode
    )
    assert bytes(_encode(prompt)[start:end]).decode() == "1234567"


@pytest.fixture(scope="module")
def tiny_engine():
    transformers = pytest.importorskip("transformers")
    from proxyprefill.workers.engine import PrefillEngine

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=2048,
    )
    model = transformers.LlamaForCausalLM(config).eval()
    return PrefillEngine.from_model(model, model_id="tiny-llama")


@pytest.mark.slow
def test_quality_bench_end_to_end(tiny_engine, tmp_path, capsys):
    out = tmp_path / "quality.json"
    argv = ["--lengths", "768", "896", "--samples", "1", "--nll-length", "256", "--chunk-size", "256"]
    argv += ["--base", "block_size=16,min_budget_tokens=32,dense_below_tokens=0,gamma=0.5"]
    argv += ["--variants", "proxy:", "g-kv:proxy_groups=kv"]
    argv += ["--recall-samples", "1", "--timing-repeats", "0", "--out", str(out)]
    report = quality.main(argv, engine=tiny_engine, encode=_encode)
    saved = json.loads(out.read_text())
    assert saved["complete"] and [v["name"] for v in saved["variants"]] == ["dense", "proxy", "g-kv"]
    dense, proxy, per_kv = report["variants"]
    assert per_kv["config"]["proxy_groups"] == 2
    for length in ("768", "896"):
        r = dense["against_dense"]["per_length"][length]["retrieval"]
        assert r["n"] == 1 and r["lost"] == 0 and r["gained"] == 0
        assert dense["sparsity"][length]["overall"] == 0.0
        for variant in (proxy, per_kv):
            entry = variant["against_dense"]["per_length"][length]
            assert entry["retrieval"]["n"] == 1
            drops = entry["needle_drops"]
            assert sum(drops["dropped_by_layer"].values()) == drops["dropped_heads"]
            assert variant["sparsity"][length]["overall"] > 0.1
            assert 0.0 < variant["recall"][length]["overall"] < 1.0
            assert len(variant["recall"][length]["per_layer"]) == 2
            assert entry["needle_drops"]["reader_heads"] >= entry["needle_drops"]["dropped_heads"]
            assert entry["seconds_per_sample"] > 0
    assert all(d == 0.0 for d in dense["against_dense"]["nll_delta"].values())
    assert all(d != 0.0 for d in proxy["against_dense"]["nll_delta"].values())
    assert "| g-kv | 896 |" in quality.table(report)
    assert proxy["prefill_seconds"] == {}  # --timing-repeats 0
    assert all("prefill_seconds" not in e for e in proxy["against_dense"]["per_length"].values())


@pytest.mark.slow
def test_quality_bench_runs_a_calibrated_profile(tiny_engine, tmp_path, capsys):
    config = ProxyAttnConfig(block_size=16, min_budget_tokens=32, dense_below_tokens=0, proxy_groups=2)
    settings = profiles.ProfileSettings("proxy", config, layer_gammas=(0.9, 0.3))
    path = _profile(tiny_engine.model_info, settings).save(tmp_path / "tiny.json")
    out = tmp_path / "quality.json"
    argv = ["--lengths", "768", "--samples", "2", "--nll-length", "256", "--chunk-size", "256"]
    argv += ["--base", "block_size=16,dense_below_tokens=0", "--timing-repeats", "2", "--profile", str(path)]
    argv += ["--variants", "served:profile", "coarse:profile,estimator=meanpool", "--out", str(out)]
    report = quality.main(argv, engine=tiny_engine, encode=_encode)
    dense, served, coarse = report["variants"]
    assert report["profile"]["name"] == profiles.Profile.load(path).name
    assert list(report["profile"]["settings"]["layer_gammas"]) == [0.9, 0.3]
    assert served["layer_gammas"] == [0.9, 0.3] and served["config"]["proxy_groups"] == 2
    assert coarse["config"]["estimator"] == "meanpool" and coarse["layer_gammas"] == [0.9, 0.3]
    # per-layer gammas reach the prefill: layer 1 (gamma 0.3) skips more than layer 0 (0.9)
    per_layer = served["sparsity"]["768"]["per_layer"]
    assert per_layer[1] > per_layer[0]
    for variant in (dense, served, coarse):
        assert len(variant["prefill_seconds"]["768"]) == 2
        assert variant["against_dense"]["per_length"]["768"]["prefill_speedup"] > 0
    printed = capsys.readouterr().out
    assert report["profile"]["description"] in printed and "| served | 768 |" in printed
    # the summary of the saved file prints the same targets table
    summarized = quality.main(["--summarize", str(out)])
    assert quality.targets_table(summarized) == quality.targets_table(report)
    with pytest.raises(SystemExit, match="--profile"):
        quality.main([*argv[:-2], "--profile", str(tmp_path / "missing.json"), "--out", str(out)])

"""`proxyprefill calibrate` on the embedded SmolLM2, briefly (512 tokens a text, one candidate): it
writes a profile for that model which the engine then loads, and whose choice is backed by the
figures it records."""

import pytest

from proxyprefill import cli
from proxyprefill.workers.engine import PrefillEngine
from proxyprefill.workers.model import DEFAULT_MODEL_ID
from proxyprefill.workers.profiles import Profile

pytestmark = pytest.mark.slow


def test_calibrate_smollm2_writes_a_profile_the_engine_loads(tmp_path, capsys):
    out = tmp_path / "smollm2.json"
    # two runs (dense, one candidate): about a minute of CPU at 512 tokens a text
    argv = ["calibrate", "--out", str(out), "--device", "cpu", "--tokens", "512", "--chunk-size", "256"]
    argv += ["--block-size", "64", "--gammas", "0.95", "--min-budget-tokens", "128", "--proxy-groups", "3"]
    argv += ["--no-per-layer-gamma"]
    assert cli.main(argv) == 0
    printed = capsys.readouterr()
    assert "[1/<=" in printed.err and "dense" in printed.err  # progress, one line per run
    assert f"wrote {out}" in printed.out

    profile = Profile.load(out)
    assert profile.model_id == DEFAULT_MODEL_ID
    assert profile.calibration.tokens == 512 and [t.tokens for t in profile.texts] == [512] * len(
        profile.texts
    )
    target = profile.calibration.target_delta_nll
    if profile.proxy_met_target:
        assert profile.settings.attention == "proxy" and profile.chosen.meets(target)
        assert profile.chosen.sparsity > 0
    else:
        assert profile.settings.attention == "dense"
        assert not any(m.meets(target) and m.sparsity > 0 for m in profile.candidates)

    engine = PrefillEngine.from_pretrained(None, device="cpu", profile=out)
    assert engine.profile == profile
    result = engine.prefill(list(range(1, 300)), chunk_size=256)
    assert result.profile == profile.name


def test_calibrate_refuses_more_tokens_than_its_texts_hold_without_a_traceback(tmp_path, capsys):
    argv = ["calibrate", "--out", str(tmp_path / "p.json"), "--device", "cpu", "--tokens", "1048576"]
    argv += ["--chunk-size", "1024", "--block-size", "64"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "--tokens 1048576" in err and "lower tokens" in err and "Traceback" not in err
    assert not (tmp_path / "p.json").exists()

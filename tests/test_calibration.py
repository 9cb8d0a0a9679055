"""Calibrated profiles (workers/profiles.py) and the calibration (workers/calibration.py) on a tiny
random Llama: the file round-trips, the engine loads it by default and runs its per-layer
settings, explicit request settings override it, a profile for another model is refused, and a
calibration finishes in seconds with the same result twice."""

import dataclasses
import json

import pytest
import torch
from _support import save_tiny_llama

from proxyprefill.kernels import ProxyAttnConfig
from proxyprefill.workers import calibration, corpus, profiles
from proxyprefill.workers.engine import PrefillEngine, PrefillError
from proxyprefill.workers.profiles import (
    CalibrationParameters,
    Measurement,
    Profile,
    ProfileError,
    ProfileSettings,
    TextDelta,
)

BLOCK = 32
PROMPT = [(7 * i + 3) % 256 for i in range(512)]  # 16 blocks of 32: room for sparsity


def _small_params(**changes) -> CalibrationParameters:
    values = dict(
        tokens=256,
        chunk_size=128,
        block_size=BLOCK,
        gammas=(0.5, 0.9, 0.99),
        min_budget_tokens=(64,),
        dense_below_tokens=0,
    )
    values.update(changes)
    return CalibrationParameters(**values)


def _bytes(text: str) -> list[int]:
    return list(text.encode())  # the tiny model's vocabulary is 256: one token per byte


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny model's matrices are too small to share: on a busy 2-core machine a second torch
    thread made the calibration 15x slower (1.3 s against 21 s)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "tiny-llama"
    save_tiny_llama(path, num_layers=2)
    return path


@pytest.fixture(scope="module")
def engine(tiny_dir):
    return PrefillEngine.from_pretrained(tiny_dir, device="cpu", profile="none")


@pytest.fixture(scope="module")
def calibrated(engine):
    texts = calibration.calibration_texts(_bytes, 256)
    return calibration.calibrate(engine, texts, _small_params())


def _profile_with(engine, settings: ProfileSettings, calibrated: Profile) -> Profile:
    return dataclasses.replace(calibrated, settings=settings, model_id=engine.model_info.model_id)


def _per_layer_settings() -> ProfileSettings:
    config = ProxyAttnConfig(block_size=BLOCK, min_budget_tokens=64, dense_below_tokens=0, proxy_groups=2)
    return ProfileSettings("proxy", config, layer_gammas=(1.0, 0.3))


# the calibration -------------------------------------------------------------------------------
def test_calibration_is_deterministic_and_picks_the_sparsest_candidate_that_meets_the_target(
    engine, calibrated
):
    texts = calibration.calibration_texts(_bytes, 256)
    lines = []
    again = calibration.calibrate(engine, texts, _small_params(), progress=lines.append)
    assert dataclasses.replace(again, created_utc="") == dataclasses.replace(calibrated, created_utc="")
    assert again.name == calibrated.name
    assert len(lines) == len(again.candidates) + 1  # progress: the dense run, then every candidate

    target = calibrated.calibration.target_delta_nll
    passing = [m for m in calibrated.candidates if m.sparsity > 0 and m.meets(target)]
    assert calibrated.proxy_met_target == bool(passing)
    if passing:
        chosen = calibrated.chosen
        assert chosen.sparsity == max(m.sparsity for m in passing)
        assert calibrated.settings.attention == "proxy"
        assert calibrated.settings.layer_gammas == chosen.layer_gammas
        assert calibrated.settings.config == chosen.config.replace(dense_below_tokens=0)
    assert calibrated.dense.sparsity == 0 and calibrated.dense.recall == 1.0
    assert [t.name for t in calibrated.texts] == [t.text for t in calibrated.dense.texts]
    assert all(len(m.layer_recall) == engine.model_info.num_layers for m in calibrated.candidates)


def test_nothing_meeting_the_target_keeps_dense_and_says_so(engine, monkeypatch):
    def measure(self, name, attention, config, layer_gammas=()):
        sparse = attention == "proxy"
        delta = 0.05 if sparse else 0.0  # every sparse candidate misses a 0.02 target
        texts = (TextDelta("a", 10, 2.0 + delta, delta),)
        return Measurement(
            name, attention, config, tuple(layer_gammas), texts, 0.4 * sparse, (0.4, 0.4), 0.9, (0.9, 0.9)
        )

    monkeypatch.setattr(calibration._Runner, "measure", measure)
    texts = calibration.calibration_texts(_bytes, 256)
    profile = calibration.calibrate(engine, texts, _small_params(), progress=lambda line: None)
    assert profile.settings.attention == "dense" and profile.chosen is None
    assert not profile.proxy_met_target
    assert len(profile.candidates) == 2  # one per proxy-group count: its largest gamma missed, so it stopped
    assert "dense attention" in calibration.describe(profile)


def test_per_layer_gammas_take_the_smallest_gamma_reaching_the_recall_floor():
    def run(gamma, recalls):
        texts = (TextDelta("a", 10, 2.0, 0.0),)
        mean = sum(recalls) / len(recalls)
        return Measurement(
            f"g{gamma}", "proxy", ProxyAttnConfig(gamma=gamma), (), texts, 0.1, (0.1,) * 3, mean, recalls
        )

    sweep = [run(0.99, (0.99, 0.99, 0.97)), run(0.9, (0.98, 0.90, 0.96)), run(0.8, (0.97, 0.80, 0.90))]
    best = sweep[1]  # worst-layer recall 0.90, mean 0.9467
    assignments = calibration.per_layer_gammas(sweep, best)
    assert assignments[0] == (0.8, 0.9, 0.8)  # floor 0.90: layer 1 needs 0.9, the others go lower
    assert assignments[1] == (0.8, 0.99, 0.9)  # floor = mean recall


def test_calibration_texts_reach_past_gpl3_which_stays_their_start():
    gpl3 = corpus.license_text(corpus.NLL_LICENSE)
    if gpl3 is None:
        pytest.skip("no licence directory here")
    start = tuple(_bytes(gpl3.text))
    tokens = len(start) + 1000  # more than GPL-3 has: refused while the texts were GPL-3 alone
    texts = calibration.calibration_texts(_bytes, tokens)
    assert [len(t.ids) for t in texts] == [tokens, tokens]
    assert [t.source.tokens for t in texts] == [tokens, tokens]
    assert texts[0].ids[: len(start)] == start and texts[0].source.name.startswith("licenses:GPL-3+")
    shorter = calibration.calibration_texts(_bytes, 256)  # within GPL-3: the same tokens as before
    assert shorter[0].ids == start[:256]
    with pytest.raises(ValueError, match="lower tokens"):
        calibration.calibration_texts(_bytes, 10**7)


def test_calibration_parameters_are_checked_before_any_work():
    with pytest.raises(ValueError, match="chunk_size"):
        CalibrationParameters(chunk_size=100, block_size=64)
    with pytest.raises(ValueError, match="gamma"):
        CalibrationParameters(gammas=(1.5,))
    with pytest.raises(ValueError, match="target_delta_nll"):
        CalibrationParameters(target_delta_nll=-0.1)


# the profile file ------------------------------------------------------------------------------
def test_profile_round_trips_through_its_file(calibrated, tmp_path):
    path = calibrated.save(tmp_path / "p.json")
    loaded = Profile.load(path)
    assert loaded == calibrated
    assert loaded.name == calibrated.name
    document = json.loads(path.read_text())
    assert document["format"] == "proxyprefill-profile" and document["version"] == 1
    assert document["name"] == calibrated.name
    assert document["calibration"]["target_delta_nll"] == 0.02


def test_unusable_profile_files_are_refused_with_the_field(calibrated, tmp_path):
    document = json.loads(calibrated.to_json())
    for change, match in (
        ({"version": 99}, "version 99"),
        ({"format": "other"}, "format"),
        ({"settings": {**document["settings"], "attention": "fast"}}, "settings.attention"),
    ):
        with pytest.raises(ProfileError, match=match):
            Profile.from_json(json.dumps({**document, **change}))
    del document["settings"]
    with pytest.raises(ProfileError, match="settings"):
        Profile.from_json(json.dumps(document))
    with pytest.raises(ProfileError, match="cannot read"):
        Profile.load(tmp_path / "missing.json")


# the engine ------------------------------------------------------------------------------------
def test_engine_loads_the_models_profile_by_default_and_runs_its_per_layer_settings(
    tiny_dir, engine, calibrated, tmp_path, monkeypatch
):
    monkeypatch.setenv("PROXYPREFILL_CACHE", str(tmp_path))
    profile = _profile_with(engine, _per_layer_settings(), calibrated)
    path = profile.save(profiles.default_profile_path(engine.model_info))
    assert path.parent == tmp_path / "profiles"

    served = PrefillEngine.from_pretrained(tiny_dir, device="cpu")
    assert served.profile == profile
    result = served.prefill(PROMPT, chunk_size=128)
    assert result.profile == profile.name and result.attention == "proxy"
    per_layer = [profile.settings.config.replace(gamma=g) for g in (1.0, 0.3)]
    explicit = engine.prefill(PROMPT, chunk_size=128, config=per_layer)
    assert explicit.profile == ""
    torch.testing.assert_close(result.sparsity, explicit.sparsity)
    torch.testing.assert_close(result.keys[1], explicit.keys[1])
    # gamma 1.0 keeps nearly everything in layer 0; gamma 0.3 skips much more in layer 1
    assert result.sparsity[1].mean() > result.sparsity[0].mean()


def test_explicit_request_settings_override_the_profile(engine, calibrated):
    profile = _profile_with(engine, _per_layer_settings(), calibrated)
    served = PrefillEngine.from_model(engine.model, model_id=engine.model_info.model_id, profile=profile)
    uniform = profile.settings.config.replace(gamma=0.3)
    with_config = served.prefill(PROMPT, chunk_size=128, config=uniform)
    assert with_config.profile == ""
    torch.testing.assert_close(
        with_config.sparsity, engine.prefill(PROMPT, chunk_size=128, config=uniform).sparsity
    )
    dense = served.prefill(PROMPT, chunk_size=128, attention="dense")
    assert dense.profile == "" and dense.attention == "dense" and float(dense.sparsity.sum()) == 0.0
    with pytest.raises(PrefillError, match="per-layer"):
        served.prefill(PROMPT, chunk_size=128, config=[uniform])


def test_a_dense_profile_makes_dense_the_default(engine, calibrated):
    settings = ProfileSettings("dense", ProxyAttnConfig(block_size=BLOCK))
    profile = _profile_with(engine, settings, calibrated)
    served = PrefillEngine.from_model(engine.model, model_id=engine.model_info.model_id, profile=profile)
    result = served.prefill(PROMPT, chunk_size=128)
    assert result.attention == "dense" and result.profile == profile.name


def test_a_profile_for_another_model_is_refused(tiny_dir, engine, calibrated, tmp_path):
    renamed = dataclasses.replace(calibrated, model_id="another-model")
    with pytest.raises(ProfileError, match="model_id 'another-model'"):
        PrefillEngine.from_pretrained(tiny_dir, device="cpu", profile=renamed.save(tmp_path / "renamed.json"))
    other = tmp_path / "three-layers"
    save_tiny_llama(other, num_layers=3)
    with pytest.raises(ProfileError, match="model_fingerprint"):
        PrefillEngine.from_pretrained(other, device="cpu", model_id=calibrated.model_id, profile=calibrated)


def test_the_server_refuses_a_profile_file_that_is_not_there(tmp_path):
    from proxyprefill.service import config as config_mod

    with pytest.raises(config_mod.ConfigError, match="profile"):
        config_mod.load(environ={}, profile=str(tmp_path / "missing.json"))
    assert config_mod.load(environ={}).profile == "auto"


def test_calibrate_flags_state_their_defaults_and_bad_values_stop_before_loading(capsys):
    import argparse

    from proxyprefill import cli, offline_commands

    parser = argparse.ArgumentParser()
    offline_commands.add_calibrate_flags(parser)
    options = [action for action in parser._actions if action.dest != "help"]
    assert len(options) == 16
    for action in options:
        assert "default" in action.help, action.dest
    assert cli.main(["calibrate", "--chunk-size", "100", "--block-size", "64"]) == 2
    assert "chunk_size" in capsys.readouterr().err

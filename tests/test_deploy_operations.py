"""What an operator meets first: `serve --help`, start-up validation, `python -m proxyprefill`."""

import argparse
import dataclasses
import os
import subprocess
import sys

import pytest

from proxyprefill.service import config as config_mod


def _serve_help_by_flag() -> dict[str, str]:
    parser = argparse.ArgumentParser()
    config_mod.add_flags(parser)
    return {action.dest: action.help or "" for action in parser._actions if action.dest != "help"}


def test_every_serve_flag_documents_its_default_and_environment_name():
    helps = _serve_help_by_flag()
    fields = {spec.name: spec for spec in dataclasses.fields(config_mod.ServerConfig)}
    assert set(helps) == set(fields) | {"config"}
    for name, spec in fields.items():
        text = helps[name]
        assert f"environment PROXYPREFILL_{name.upper()})" in text, name
        shown = "unset" if spec.default is None else str(spec.default)
        assert f"(default: {shown};" in text, name
        assert len(text.split(" (default:")[0]) >= 10, f"{name} needs a description"
    assert "environment PROXYPREFILL_CONFIG" in helps["config"]


def test_python_dash_m_runs_the_command_and_serve_help_lists_every_field():
    done = subprocess.run(
        [sys.executable, "-m", "proxyprefill", "serve", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "COLUMNS": "200"},
    )
    assert done.returncode == 0, done.stderr
    for spec in dataclasses.fields(config_mod.ServerConfig):
        assert f"--{spec.name.replace('_', '-')}" in done.stdout
        assert f"PROXYPREFILL_{spec.name.upper()}" in done.stdout


@pytest.mark.parametrize(
    ("variable", "value", "field"),
    [
        ("BACKEND", "tritonn", "backend"),
        ("DEVICE", "cdua", "device"),
        ("LOG_LEVEL", "LOUD", "log_level"),
        ("METRICS_PORT", "70000", "metrics_port"),
        ("RAY_NUM_CPUS", "0", "ray_num_cpus"),
        ("MAX_ALPHA", "0", "max_alpha"),
        ("MAX_TEXT_BYTES", "0", "max_text_bytes"),
        ("MIN_BUDGET_TOKENS_FLOOR", "0", "min_budget_tokens_floor"),
    ],
)
def test_bad_settings_fail_at_load_naming_the_field(variable, value, field):
    with pytest.raises(config_mod.ConfigError, match=f"^{field} ") as caught:
        config_mod.load(environ={f"PROXYPREFILL_{variable}": value})
    assert f"got {value!r}" in str(caught.value) or f"got {value}" in str(caught.value)


def test_a_misspelled_variable_name_is_refused_and_other_variables_left_alone():
    with pytest.raises(
        config_mod.ConfigError,
        match="PROXYPREFILL_BAKEND is not a setting; did you mean PROXYPREFILL_BACKEND",
    ):
        config_mod.load(environ={"PROXYPREFILL_BAKEND": "triton"})
    with pytest.raises(config_mod.ConfigError, match="did you mean PROXYPREFILL_MAX_PENDING_TOKENS"):
        config_mod.load(environ={"PROXYPREFILL_MAX_PENDING_TOKEN": "10"})
    others = {"PROXYPREFILL_CACHE": "/tmp", "PROXYPREFILL_TOKEN": "secret", "PROXYPREFILL_CONFIG": ""}
    assert config_mod.load(environ=others) == config_mod.ServerConfig()


def test_valid_backends_and_devices_load():
    assert config_mod.load(environ={"PROXYPREFILL_BACKEND": "torch"}).backend == "torch"
    assert config_mod.load(environ={"PROXYPREFILL_DEVICE": "cuda:1"}).device == "cuda:1"


def test_serve_with_a_misspelled_backend_stops_at_start_naming_the_field():
    environ = {**os.environ, "PROXYPREFILL_BACKEND": "tritonn", "PROXYPREFILL_LISTEN": "127.0.0.1:0"}
    done = subprocess.run(
        [sys.executable, "-m", "proxyprefill", "serve"],
        capture_output=True,
        text=True,
        timeout=120,
        env=environ,
    )
    assert done.returncode == 2
    assert "configuration error: backend must be one of" in done.stderr
    assert "'tritonn'" in done.stderr
    assert "Traceback" not in done.stderr


def test_server_config_has_no_catch_all_field():
    assert "extra" not in {spec.name for spec in dataclasses.fields(config_mod.ServerConfig)}


def test_metrics_carry_the_model_name_and_the_usual_serving_histograms():
    from proxyprefill.service.metrics import ServiceMetrics

    metrics = ServiceMetrics("SmolLM2-135M")
    metrics.time_to_first_token.observe(0.3)
    metrics.prompt_length.observe(3000)
    metrics.requests.labels("Prefill", "OK").inc()
    lines = metrics.exposition().decode().splitlines()
    samples = [line for line in lines if line.startswith("proxyprefill_")]
    assert samples and all('model_name="SmolLM2-135M"' in line for line in samples)
    assert "# TYPE proxyprefill_time_to_first_token_seconds histogram" in lines
    assert "# TYPE proxyprefill_request_prompt_tokens histogram" in lines

    def sample(prefix: str) -> float:
        return float(next(line for line in samples if line.startswith(prefix)).split()[-1])

    assert sample('proxyprefill_time_to_first_token_seconds_bucket{le="0.25"') == 0.0
    assert sample('proxyprefill_time_to_first_token_seconds_bucket{le="0.5"') == 1.0
    assert sample('proxyprefill_request_prompt_tokens_bucket{le="2048.0"') == 0.0
    assert sample('proxyprefill_request_prompt_tokens_bucket{le="4096.0"') == 1.0
    assert sample("proxyprefill_request_prompt_tokens_sum") == 3000.0
    assert sample('proxyprefill_requests_total{code="OK",method="Prefill"') == 1.0

"""The service serves a calibrated profile: GetModelInfo names it, the summary of a request without
attention settings names it (and its per-layer settings ran on the worker), and a request that
sets the mode or a ProxyAttn field runs without it. A local Ray pool of one worker on a tiny
random Llama."""

import dataclasses

import pytest
import torch
from _support import save_tiny_llama

ray = pytest.importorskip("ray")
pytest.importorskip("grpc_health")

from proxyprefill.kernels import ProxyAttnConfig  # noqa: E402
from proxyprefill.service import config as config_mod  # noqa: E402
from proxyprefill.service.client import PrefillClient  # noqa: E402
from proxyprefill.service.local import LocalService  # noqa: E402
from proxyprefill.workers import calibration  # noqa: E402
from proxyprefill.workers.engine import PrefillEngine  # noqa: E402
from proxyprefill.workers.profiles import CalibrationParameters, ProfileSettings  # noqa: E402

pytestmark = pytest.mark.slow

PROMPT = [(7 * i + 3) % 256 for i in range(512)]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(service, profile, profile path, model dir): the tiny model served with a per-layer profile."""
    root = tmp_path_factory.mktemp("served")
    model_dir = root / "tiny-llama"
    save_tiny_llama(model_dir, num_layers=2)
    engine = PrefillEngine.from_pretrained(model_dir, device="cpu", profile="none")
    params = CalibrationParameters(
        tokens=256, chunk_size=128, block_size=32, gammas=(0.9,), min_budget_tokens=(64,), proxy_groups=(2,)
    )
    texts = calibration.calibration_texts(lambda text: list(text.encode()), 256)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: a second thread only waits on a busy machine
    measured = calibration.calibrate(engine, texts, params)
    torch.set_num_threads(threads)
    config = ProxyAttnConfig(block_size=32, min_budget_tokens=64, dense_below_tokens=0, proxy_groups=2)
    profile = dataclasses.replace(
        measured, settings=ProfileSettings("proxy", config, layer_gammas=(1.0, 0.3))
    )
    path = profile.save(root / "tiny.profile.json")

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    server_config = config_mod.load(
        environ={},
        listen="127.0.0.1:0",
        model=str(model_dir),
        profile=str(path),
        num_workers=1,
        min_budget_tokens=128,
        dense_below_tokens=0,
    )
    service = LocalService(server_config).start()
    yield service, profile, path, model_dir
    service.stop()
    ray.shutdown()


def test_model_info_and_summary_name_the_profile_that_served(served):
    service, profile, path, model_dir = served
    with PrefillClient(service.target) as client:
        assert client.model_info().profile == profile.name
        outcome = client.prefill(token_ids=PROMPT, kv="none", logits="none", chunk_size=128)
    summary = outcome.summary
    assert summary.profile == profile.name and summary.attention_mode == "proxy"
    local = PrefillEngine.from_pretrained(model_dir, device="cpu", profile=path).prefill(
        PROMPT, chunk_size=128
    )
    expected = local.sparsity.double().mean(dim=1)
    got = torch.tensor(list(summary.layer_sparsity), dtype=torch.float64)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
    assert summary.layer_sparsity[1] > summary.layer_sparsity[0]  # gamma 0.3 against 1.0


def test_requests_with_their_own_settings_run_without_the_profile(served):
    service, profile, _, _ = served
    with PrefillClient(service.target) as client:
        dense = client.prefill(token_ids=PROMPT, kv="none", logits="none", chunk_size=128, attention="dense")
        tuned = client.prefill(token_ids=PROMPT, kv="none", logits="none", chunk_size=128, gamma=0.9)
    assert dense.summary.profile == "" and dense.summary.attention_mode == "dense"
    assert dense.summary.sparsity == 0.0
    assert tuned.summary.profile == "" and tuned.summary.attention_mode == "proxy"

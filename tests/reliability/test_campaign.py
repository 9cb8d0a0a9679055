"""The CI subset of the load and faults campaign (campaign.py): the same checks at a small scale,
on the tiny random Llama and a local Ray pool of two workers."""

import pytest

pytest.importorskip("ray")
pytest.importorskip("grpc_health")

from _support import save_tiny_llama  # noqa: E402

from .campaign import CampaignConfig, run_campaign  # noqa: E402

pytestmark = pytest.mark.slow


def test_small_load_and_faults_campaign_loses_nothing(tmp_path):
    save_tiny_llama(tmp_path, num_layers=4)
    config = CampaignConfig(
        requests=40, clients=8, fault_requests=30, kills=1, front_end_restarts=1, model=str(tmp_path)
    )
    load, faults = run_campaign(config, warmup=10)
    assert load.losses == [] and faults.losses == []
    assert load.statuses.get("OK", 0) > 0 and faults.statuses.get("OK", 0) > 0
    assert set(load.statuses) <= {"OK", "RESOURCE_EXHAUSTED", "CANCELLED", "DEADLINE_EXCEEDED"}
    assert len(faults.recoveries_s) == 1  # the pool came back after the kill
    for phase in (load, faults):
        assert not any(phase.after.held.values()), phase.after.held

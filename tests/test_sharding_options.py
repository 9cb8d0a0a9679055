"""The per-request pipeline_stages field and the server's sharding options (no Ray, no model)."""

import grpc
import pytest

from proxyprefill.protos import prefill_pb2 as pb
from proxyprefill.service import config as config_mod
from proxyprefill.service.validation import Limits, RequestError, validate_prefill

MODEL = type("Info", (), {"vocab_size": 100, "max_position_embeddings": 4096})()


def _limits(**config) -> Limits:
    return Limits.from_config(config_mod.ServerConfig(min_budget_tokens=256, **config), MODEL)


def _request(stages: int) -> pb.PrefillRequest:
    return pb.PrefillRequest(tokens=pb.TokenIds(ids=[1, 2, 3]), pipeline_stages=stages)


def test_pipeline_stages_within_the_servers_maximum_pass_through():
    limits = _limits(pipeline_workers=3)
    assert limits.max_pipeline_stages == 3
    assert [validate_prefill(_request(n), limits, None).pipeline_stages for n in range(4)] == [0, 1, 2, 3]


@pytest.mark.parametrize("workers, stages", [(0, 2), (3, 4), (2, 2**31)])
def test_pipeline_stages_beyond_the_maximum_are_invalid_and_named(workers, stages):
    limits = _limits(pipeline_workers=workers)
    assert validate_prefill(_request(1), limits, None).pipeline_stages == 1  # one worker is always fine
    with pytest.raises(RequestError) as caught:
        validate_prefill(_request(stages), limits, None)
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.message.startswith("pipeline_stages")
    assert f"[0, {max(1, workers)}]" in caught.value.message


def test_sharding_options_in_every_config_layer_and_their_checks(tmp_path):
    path = tmp_path / "server.toml"
    path.write_text("[server]\npipeline_workers = 2\nshard_above_tokens = 4096\n")
    parser = __import__("argparse").ArgumentParser()
    config_mod.add_flags(parser)
    args = parser.parse_args(["--config", str(path), "--pipeline-stage-memory-bytes", "1048576"])
    config = config_mod.load(args, environ={"PROXYPREFILL_SHARD_ABOVE_TOKENS": "8192"})
    assert (config.pipeline_workers, config.shard_above_tokens) == (2, 8192)
    assert config.pipeline_stage_memory_bytes == 1 << 20
    assert config_mod.ServerConfig().pipeline_workers == 0  # sharding is off unless asked for
    for bad in ({"pipeline_workers": 1}, {"pipeline_workers": -1}, {"shard_above_tokens": 0}):
        with pytest.raises(config_mod.ConfigError, match=next(iter(bad))):
            config_mod.load(environ={}, **bad)
    assert "sharding off" in parser.format_help()

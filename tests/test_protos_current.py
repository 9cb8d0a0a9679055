"""The committed generated gRPC modules match the .proto (regenerate with `make protos`)."""

import importlib.util
import sys
from pathlib import Path

import pytest

pytest.importorskip("grpc_tools")

PROTO_DIR = Path(__file__).resolve().parents[1] / "protos"


def _generator():
    spec = importlib.util.spec_from_file_location("proxyprefill_protos_generate", PROTO_DIR / "generate.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_generated_modules_are_current():
    stale = _generator().stale_files()
    assert stale == [], f"stale generated modules {stale}: run `make protos`"


def test_generated_imports_are_package_relative():
    grpc_module = (PROTO_DIR / "prefill_pb2_grpc.py").read_text()
    assert "from . import prefill_pb2 as prefill__pb2" in grpc_module
    assert "\nimport prefill_pb2" not in grpc_module


def test_generated_modules_import_from_the_package():
    from proxyprefill.protos import prefill_pb2, prefill_pb2_grpc

    assert prefill_pb2.DESCRIPTOR.package == "proxyprefill.v1"
    assert hasattr(prefill_pb2_grpc, "PrefillServiceServicer")
    service = prefill_pb2.DESCRIPTOR.services_by_name["PrefillService"]
    assert {m.name for m in service.methods} >= {
        "Prefill",
        "FetchKV",
        "RenewLease",
        "ReleaseKV",
        "GetModelInfo",
    }


def test_generated_code_accepts_the_oldest_supported_grpcio():
    """The GPU machines run grpcio 1.84.0; generated code refuses runtimes older than its tools."""
    grpc_module = (PROTO_DIR / "prefill_pb2_grpc.py").read_text()
    assert "GRPC_GENERATED_VERSION = '1.84.0'" in grpc_module, "generate with grpcio-tools==1.84.0"

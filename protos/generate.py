"""Regenerate the Python modules of the gRPC contract (`make protos` runs this).

    python protos/generate.py            # rewrite protos/*_pb2*.py[i] in place
    python protos/generate.py --check    # exit 1 when the committed modules are stale

The modules are generated with grpcio-tools 1.84.x on purpose: generated code refuses grpcio
runtimes older than the generator, and the GPU machines run grpcio 1.84. protoc writes
`import prefill_pb2`, which only works with protos/ on sys.path; we rewrite it to a
package-relative import so that `proxyprefill.protos.prefill_pb2_grpc` imports anywhere.
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
from pathlib import Path

PROTO_DIR = Path(__file__).resolve().parent
PROTO_FILES = ("prefill.proto",)
REQUIRED_TOOLS_SERIES = "1.84."


def generated_names(proto: str) -> list[str]:
    stem = proto.removesuffix(".proto")
    return [f"{stem}_pb2.py", f"{stem}_pb2_grpc.py", f"{stem}_pb2.pyi"]


def generate(out_dir: Path) -> list[Path]:
    """Runs protoc on every proto into `out_dir`; returns the files written."""
    import grpc_tools
    from grpc_tools import protoc

    version = _tools_version()
    if not version.startswith(REQUIRED_TOOLS_SERIES):
        raise SystemExit(f"grpcio-tools {REQUIRED_TOOLS_SERIES}x is required, found {version}")
    include = Path(grpc_tools.__file__).parent / "_proto"
    written = []
    for proto in PROTO_FILES:
        args = [
            "grpc_tools.protoc",
            f"-I{PROTO_DIR}",
            f"-I{include}",
            f"--python_out={out_dir}",
            f"--pyi_out={out_dir}",
            f"--grpc_python_out={out_dir}",
            str(PROTO_DIR / proto),
        ]
        if protoc.main(args) != 0:
            raise SystemExit(f"protoc failed on {proto}")
        for name in generated_names(proto):
            path = out_dir / name
            path.write_text(_package_relative(path.read_text()))
            written.append(path)
    return written


def _package_relative(source: str) -> str:
    # `import prefill_pb2 as prefill__pb2` -> `from . import prefill_pb2 as prefill__pb2`
    return re.sub(r"^import (\w+_pb2) as (\w+)$", r"from . import \1 as \2", source, flags=re.M)


def _tools_version() -> str:
    from importlib.metadata import version

    return version("grpcio-tools")


def stale_files() -> list[str]:
    """Names of committed modules that differ from freshly generated ones."""
    with tempfile.TemporaryDirectory() as tmp:
        fresh = generate(Path(tmp))
        return [
            path.name
            for path in fresh
            if not (PROTO_DIR / path.name).exists() or (PROTO_DIR / path.name).read_text() != path.read_text()
        ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only report stale modules")
    args = parser.parse_args(argv)
    if args.check:
        stale = stale_files()
        if stale:
            print("stale generated modules: " + ", ".join(stale) + " (run `make protos`)")
            return 1
        print("generated modules are current")
        return 0
    for path in generate(PROTO_DIR):
        print(f"wrote {path.relative_to(PROTO_DIR.parent)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Helpers the image's pods run (installed as `proxyprefill-pod`).

proxyprefill-pod health [--address 127.0.0.1:50051] [--tls-ca ca.crt --tls-server-name NAME]
    exit 0 when the service's gRPC health says SERVING, 1 otherwise (Docker HEALTHCHECK,
    Kubernetes readiness probe). The server opens its port only after every worker has loaded
    the model, so SERVING means warmed up.
proxyprefill-pod wait-for-gpus N [--timeout 1800]
    on a Ray head: wait until the cluster has N GPUs. `serve` sizes its worker pool from the
    GPUs it finds at start; started before the GPU pods join, it would find none.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

SERVICE_NAME = "proxyprefill.v1.PrefillService"


def health_status(
    address: str,
    service: str,
    timeout: float,
    tls_ca: str | None = None,
    tls_server_name: str | None = None,
    tls_cert: str | None = None,
    tls_key: str | None = None,
) -> str:
    """The serving status the server reports for `service`, by name (SERVING, NOT_SERVING, ...)."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    if tls_ca:
        credentials = grpc.ssl_channel_credentials(
            root_certificates=Path(tls_ca).read_bytes(),
            private_key=Path(tls_key).read_bytes() if tls_key else None,
            certificate_chain=Path(tls_cert).read_bytes() if tls_cert else None,
        )
        options = [("grpc.ssl_target_name_override", tls_server_name)] if tls_server_name else []
        channel = grpc.secure_channel(address, credentials, options=options)
    else:
        channel = grpc.insecure_channel(address)
    with channel:
        stub = health_pb2_grpc.HealthStub(channel)
        response = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
    return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)


def wait_for(count: Callable[[], float], target: float, timeout: float, poll_seconds: float = 5.0) -> float:
    """Polls `count()` until it reaches `target`; returns it, or raises TimeoutError with the last
    value when `timeout` seconds pass first."""
    deadline = time.monotonic() + timeout
    while True:
        value = count()
        if value >= target:
            return value
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{value:g} of {target:g} after {timeout:g} s")
        time.sleep(poll_seconds)


def _cluster_gpus() -> float:
    import ray

    if not ray.is_initialized():
        ray.init(address="auto", logging_level="ERROR")
    return ray.cluster_resources().get("GPU", 0.0)


def cmd_health(args: argparse.Namespace) -> int:
    try:
        status = health_status(
            args.address,
            args.service,
            args.timeout,
            args.tls_ca,
            args.tls_server_name,
            args.tls_cert,
            args.tls_key,
        )
    except Exception as error:  # unreachable, refused, TLS mismatch: all mean "not ready"
        print(f"health: {args.address}: {type(error).__name__}: {error}", file=sys.stderr)
        return 1
    print(f"health: {args.address}: {status}")
    return 0 if status == "SERVING" else 1


def cmd_wait_for_gpus(args: argparse.Namespace) -> int:
    try:
        found = wait_for(_cluster_gpus, args.gpus, args.timeout, args.poll_seconds)
    except TimeoutError as error:
        print(f"wait-for-gpus: the Ray cluster has {error}", file=sys.stderr)
        return 1
    print(f"wait-for-gpus: the Ray cluster has {found:g} GPU(s)")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="proxyprefill-pod", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    health = commands.add_parser("health", help="exit 0 when the gRPC health check says SERVING")
    health.add_argument("--address", default="127.0.0.1:50051", help="HOST:PORT (default: %(default)s)")
    health.add_argument(
        "--service", default=SERVICE_NAME, help="health service name to check (default: %(default)s)"
    )
    health.add_argument("--timeout", type=float, default=3.0, help="seconds (default: %(default)s)")
    health.add_argument("--tls-ca", help="PEM CA certificate: connect with TLS (default: plaintext)")
    health.add_argument(
        "--tls-server-name", help="name the server certificate is checked against (default: the address)"
    )
    health.add_argument("--tls-cert", help="PEM client certificate, for mutual TLS (default: none)")
    health.add_argument("--tls-key", help="PEM key of --tls-cert (default: none)")
    health.set_defaults(run=cmd_health)

    wait = commands.add_parser("wait-for-gpus", help="wait until the Ray cluster has N GPUs")
    wait.add_argument("gpus", type=float, help="GPUs to wait for")
    wait.add_argument("--timeout", type=float, default=1800.0, help="seconds (default: %(default)s)")
    wait.add_argument("--poll-seconds", type=float, default=5.0, help="seconds (default: %(default)s)")
    wait.set_defaults(run=cmd_wait_for_gpus)

    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())

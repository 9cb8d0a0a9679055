"""deploy/: every Kubernetes manifest rendered and validated against the KubeRay CRD schemas
(vendored in deploy/crds/), the image's pins against the benchmarks' versions, and the pod
helpers (gRPC health probe, GPU wait, head entrypoint) run for real.

The manifests are kustomize directories that use only `resources`, `components`, JSON 6902
`patches` and `images`; `render` below applies exactly those, so the tests need no binary. Where
`kubectl` is installed, its own `kubectl kustomize` must give the same objects."""

import copy
import dataclasses
import json
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import jsonschema
import pytest
import yaml

from proxyprefill.service.config import ServerConfig

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
KUBERNETES = DEPLOY / "kubernetes"
# every directory a user applies: the service, the batch job, and the overlay with every component
RENDERED = ("service", "batch", "example")
KUSTOMIZE_KEYS = {"apiVersion", "kind", "resources", "components", "patches", "images"}
CRD_FILES = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml"}


# rendering -----------------------------------------------------------------------------------
def _load_all(path: Path) -> list[dict]:
    return [doc for doc in yaml.load_all(path.read_text(), Loader=yaml.CSafeLoader) if doc]


def _pointer(path: str) -> list[str]:
    return [part.replace("~1", "/").replace("~0", "~") for part in path.lstrip("/").split("/")]


def _apply_operation(document: dict, operation: dict) -> None:
    *parents, last = _pointer(operation["path"])
    node = document
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node[part]
    op = operation["op"]
    if isinstance(node, list):
        index = len(node) if last == "-" else int(last)
        if op == "add":
            node.insert(index, copy.deepcopy(operation["value"]))
        elif op == "replace":
            node[index] = copy.deepcopy(operation["value"])
        else:
            assert op == "remove", op
            del node[index]
    else:
        assert op == "add" or last in node, f"{op} {operation['path']}: no such field"
        if op == "remove":
            del node[last]
        else:
            node[last] = copy.deepcopy(operation["value"])


def render(directory: Path, inherited: list[dict] | None = None) -> list[dict]:
    """The objects `kubectl kustomize directory` builds, for the subset of kustomize used here."""
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    assert set(kustomization) <= KUSTOMIZE_KEYS, f"{directory}: {set(kustomization) - KUSTOMIZE_KEYS}"
    documents = list(inherited or [])
    for entry in kustomization.get("resources", []):
        path = directory / entry
        documents += render(path) if path.is_dir() else _load_all(path)
    for component in kustomization.get("components", []):
        documents = render(directory / component, documents)
    for patch in kustomization.get("patches", []):
        target = patch["target"]
        matches = [
            d for d in documents if d["kind"] == target["kind"] and d["metadata"]["name"] == target["name"]
        ]
        assert len(matches) == 1, f"{directory}: patch target {target} matches {len(matches)} objects"
        for operation in yaml.safe_load(patch["patch"]):
            _apply_operation(matches[0], operation)
    for image in kustomization.get("images", []):
        for container in _containers(documents):
            name, _, tag = container["image"].partition(":")
            if name == image["name"]:
                container["image"] = f"{image.get('newName', name)}:{image.get('newTag', tag)}"
    return documents


def _containers(documents: list[dict]) -> list[dict]:
    found = []

    def walk(node):
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "containers":
                    found.extend(value)
                else:
                    walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(documents)
    return found


def _by_kind(documents: list[dict]) -> dict[str, dict]:
    kinds = [d["kind"] for d in documents]
    assert len(kinds) == len(set(kinds)), kinds
    return {d["kind"]: d for d in documents}


@pytest.fixture(scope="module")
def rendered() -> dict[str, dict[str, dict]]:
    return {name: _by_kind(render(KUBERNETES / name)) for name in RENDERED}


# schemas -------------------------------------------------------------------------------------
def _closed(schema):
    """The schema with unknown fields refused (as `kubectl apply --validate=strict` does): the CRD
    schemas only list fields, and the API server would drop a misspelled one silently."""
    if isinstance(schema, list):
        return [_closed(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    closed = {key: _closed(value) for key, value in schema.items()}
    if "properties" in schema and "additionalProperties" not in schema:
        if not schema.get("x-kubernetes-preserve-unknown-fields"):
            closed["additionalProperties"] = False
    return closed


@pytest.fixture(scope="module")
def crd_validators() -> dict[str, jsonschema.Draft7Validator]:
    validators = {}
    for kind, filename in CRD_FILES.items():
        crd = yaml.load((DEPLOY / "crds" / filename).read_text(), Loader=yaml.CSafeLoader)
        assert crd["spec"]["names"]["kind"] == kind
        version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
        schema = _closed(version["schema"]["openAPIV3Schema"])
        validators[kind] = jsonschema.Draft7Validator(schema)
    return validators


def _schema_errors(validator, document) -> list[str]:
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(document)]


@pytest.mark.parametrize("name", RENDERED)
def test_every_kuberay_object_validates_against_its_crd_schema(rendered, crd_validators, name):
    kuberay = [d for d in rendered[name].values() if d["apiVersion"] == "ray.io/v1"]
    assert kuberay, name
    for document in kuberay:
        assert _schema_errors(crd_validators[document["kind"]], document) == [], document["kind"]


def test_the_schema_check_refuses_misspelled_fields_and_wrong_types(rendered, crd_validators):
    cluster = copy.deepcopy(rendered["service"]["RayCluster"])
    cluster["spec"]["workerGroupSpecs"][0]["replica"] = 3  # misspelled
    cluster["spec"]["headGroupSpec"]["rayStartParams"]["num-gpus"] = 0  # must be a string
    errors = _schema_errors(crd_validators["RayCluster"], cluster)
    assert any("'replica' was unexpected" in error for error in errors), errors
    assert any(error.startswith("spec/headGroupSpec/rayStartParams/num-gpus") for error in errors), errors
    job = copy.deepcopy(rendered["batch"]["RayJob"])
    del job["spec"]["rayClusterSpec"]["headGroupSpec"]
    assert any(
        "'headGroupSpec' is a required property" in e for e in _schema_errors(crd_validators["RayJob"], job)
    )


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
@pytest.mark.parametrize("name", RENDERED)
def test_kubectl_kustomize_builds_the_same_objects(rendered, name):
    built = subprocess.run(
        ["kubectl", "kustomize", str(KUBERNETES / name)], capture_output=True, text=True, timeout=60
    )
    assert built.returncode == 0, built.stderr
    assert _by_kind(_load_all_text(built.stdout)) == rendered[name]


def _load_all_text(text: str) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(text) if doc]


# what the manifests promise ------------------------------------------------------------------
def _ray_pin() -> str:
    service = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"][
        "service"
    ]
    pins = [spec for spec in service if re.match(r"ray\s*==", spec)]
    assert len(pins) == 1, f"pyproject's service extra must pin ray exactly: {service}"
    return pins[0].split("==")[1].strip()


def _constraints() -> dict[str, str]:
    lines = (DEPLOY / "constraints.txt").read_text().splitlines()
    pairs = [line.split("==") for line in lines if line.strip() and not line.startswith("#")]
    return {name.strip(): version.strip() for name, version in pairs}


def _clusters(rendered) -> list[tuple[str, dict]]:
    """(directory, RayCluster spec) of every rendered directory."""
    specs = []
    for name, objects in rendered.items():
        if "RayCluster" in objects:
            specs.append((name, objects["RayCluster"]["spec"]))
        if "RayJob" in objects:
            specs.append((name, objects["RayJob"]["spec"]["rayClusterSpec"]))
    return specs


def test_ray_pinned_once_for_ci_the_image_and_the_clusters(rendered):
    pin = _ray_pin()
    assert _constraints()["ray"] == pin
    for name, spec in _clusters(rendered):
        assert spec["rayVersion"] == pin, name


def test_head_has_no_gpu_and_workers_have_gpus_and_the_model_volume(rendered):
    for name, spec in _clusters(rendered):
        assert spec["headGroupSpec"]["rayStartParams"]["num-gpus"] == "0", name
        for group in spec["workerGroupSpecs"]:
            pod = group["template"]["spec"]
            limits = pod["containers"][0]["resources"]["limits"]
            assert int(limits["nvidia.com/gpu"]) >= 1, name
            mounts = {m["mountPath"]: m for m in pod["containers"][0]["volumeMounts"]}
            assert mounts["/models"]["readOnly"] is True, name
            volume = next(v for v in pod["volumes"] if v["name"] == mounts["/models"]["name"])
            assert volume["persistentVolumeClaim"]["claimName"], name
        for pod in [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]:
            assert pod["spec"]["securityContext"]["runAsNonRoot"] is True, name


def test_no_manifest_runs_its_own_ray_start(rendered):
    for name, spec in _clusters(rendered):
        pods = [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]
        for pod in pods:
            for container in pod["spec"]["containers"]:
                command = " ".join(container.get("command", []) + container.get("args", []))
                assert "ray start" not in command, name
    head = rendered["service"]["RayCluster"]["spec"]["headGroupSpec"]["template"]
    # the head's entrypoint runs KubeRay's own generated command, which KubeRay hands over only
    # under this annotation
    assert head["spec"]["containers"][0]["command"] == ["tini", "--", "proxyprefill-head"]
    assert head["metadata"]["annotations"]["ray.io/overwrite-container-cmd"] == "true"


def test_head_readiness_is_the_grpc_health_check_and_it_waits_for_every_gpu(rendered):
    for name in ("service", "example"):
        spec = rendered[name]["RayCluster"]["spec"]
        head = spec["headGroupSpec"]["template"]["spec"]["containers"][0]
        command = head["readinessProbe"]["exec"]["command"]
        assert command[:2] == ["proxyprefill-pod", "health"], name
        args = _podctl_args(command[1:])
        assert args.address.endswith(":50051"), name
        environment = {e["name"]: e.get("value") for e in head["env"]}
        gpus = sum(
            group["replicas"]
            * int(group["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
            for group in spec["workerGroupSpecs"]
        )
        assert int(environment["HEAD_WAIT_FOR_GPUS"]) == gpus, name


def test_every_proxyprefill_setting_names_a_server_config_field(rendered):
    fields = {f"PROXYPREFILL_{spec.name.upper()}" for spec in dataclasses.fields(ServerConfig)}
    known = fields | {"PROXYPREFILL_CACHE", "PROXYPREFILL_CONFIG"}
    for name, objects in rendered.items():
        names = list(objects.get("ConfigMap", {}).get("data", {}))
        names += [e["name"] for c in _containers(list(objects.values())) for e in c.get("env", [])]
        assert {n for n in names if n.startswith("PROXYPREFILL_")} <= known, name
        if "ConfigMap" in objects:
            assert objects["ConfigMap"]["data"]["PROXYPREFILL_MODEL"].startswith("/models/"), name


def test_service_and_servicemonitor_point_at_the_head_ports(rendered):
    objects = rendered["example"]
    head = objects["RayCluster"]["spec"]["headGroupSpec"]["template"]
    port_names = {p["name"] for p in head["spec"]["containers"][0]["ports"]}
    service = objects["Service"]
    assert {p["targetPort"] for p in service["spec"]["ports"]} <= port_names
    assert service["spec"]["selector"] == {"ray.io/cluster": "proxyprefill", "ray.io/node-type": "head"}
    monitor = objects["ServiceMonitor"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert {e["port"] for e in monitor["spec"]["endpoints"]} <= {p["name"] for p in service["spec"]["ports"]}
    assert head["metadata"]["annotations"]["prometheus.io/port"] == "9400"
    assert objects["ConfigMap"]["data"]["PROXYPREFILL_METRICS_PORT"] == "9400"


def test_the_overlay_sets_the_users_knobs(rendered):
    base, example = rendered["service"], rendered["example"]
    images = {c["image"] for c in _containers(list(example.values()))}
    assert images == {"registry.example.com/ml/proxyprefill:0.1.0"}
    head = example["RayCluster"]["spec"]["headGroupSpec"]["template"]["spec"]
    environment = {e["name"]: e.get("value") for e in head["containers"][0]["env"]}
    assert environment["PROXYPREFILL_TLS_CERT"] == "/etc/proxyprefill/tls/tls.crt"
    assert environment["PROXYPREFILL_AUTH_TOKENS_FILE"] == "/etc/proxyprefill/auth/tokens"
    secrets = {v["secret"]["secretName"] for v in head["volumes"] if "secret" in v}
    assert secrets == {"proxyprefill-tls", "proxyprefill-tokens"}
    mounted = {m["name"] for m in head["containers"][0]["volumeMounts"]}
    assert {v["name"] for v in head["volumes"]} == mounted
    probe = _podctl_args(head["containers"][0]["readinessProbe"]["exec"]["command"][1:])
    assert probe.tls_ca == "/etc/proxyprefill/tls/ca.crt" and probe.tls_server_name == "proxyprefill"
    assert example["RayCluster"]["spec"]["workerGroupSpecs"][0]["replicas"] == 4
    assert "ServiceMonitor" not in base and "PROXYPREFILL_TLS_CERT" not in json.dumps(base)


def test_the_batch_job_runs_the_batch_command(rendered):
    job = rendered["batch"]["RayJob"]["spec"]
    words = job["entrypoint"].split()
    assert words[:2] == ["proxyprefill", "batch"]
    assert "--input" in words and "--output" in words
    assert job["shutdownAfterJobFinishes"] is True
    import argparse

    from proxyprefill import offline_commands

    parser = argparse.ArgumentParser()
    offline_commands.add_batch_flags(parser)
    args = parser.parse_args(words[2:])
    assert args.output.startswith("/data/") and args.model.startswith("/models/")


# the image -----------------------------------------------------------------------------------
def _bench_versions() -> dict[str, set[str]]:
    """Every version the GPU results in bench/results recorded (those run on a CUDA build of
    torch), by package."""
    seen: dict[str, set[str]] = {}
    for path in sorted((ROOT / "bench" / "results").glob("*.json")):
        found: dict[str, set[str]] = {}

        def walk(node, found=found):
            if isinstance(node, dict):
                for key, value in node.items():
                    if key in ("torch", "triton", "transformers", "grpcio", "python") and isinstance(
                        value, str
                    ):
                        found.setdefault(key, set()).add(value)
                    else:
                        walk(value)

        walk(json.loads(path.read_text()))
        if any("+cu" in version for version in found.get("torch", ())):
            for key, versions in found.items():
                seen.setdefault(key, set()).update(versions)
    return seen


def test_image_pins_are_the_versions_the_gpu_benchmarks_ran():
    pins, bench = _constraints(), _bench_versions()
    assert pins["torch"] in {v.split("+")[0] for v in bench["torch"]}
    assert pins["triton"] in bench["triton"]
    assert pins["transformers"] in bench["transformers"]
    assert pins["grpcio"] in bench["grpcio"]
    assert pins["grpcio-health-checking"] == pins["grpcio-reflection"] == pins["grpcio"]
    python = re.search(r"^FROM python:(\d+\.\d+)", (DEPLOY / "Dockerfile").read_text(), re.M).group(1)
    assert python in {".".join(v.split(".")[:2]) for v in bench["python"]}


def test_dockerfile_runs_as_a_user_with_a_grpc_health_check():
    text = (DEPLOY / "Dockerfile").read_text()
    users = re.findall(r"^USER (\S+)", text, re.M)
    assert users and users[-1] not in ("root", "0")
    assert re.search(r'^HEALTHCHECK .*\n?.*CMD \["proxyprefill-pod", "health"', text, re.M)
    assert "-c deploy/constraints.txt" in text
    for line in re.findall(r"^COPY (?:--\S+ )*(.+)$", text, re.M):
        for source in line.split()[:-1]:
            assert (ROOT / source).exists(), source


# pod helpers ---------------------------------------------------------------------------------
def _podctl():
    import importlib.util

    spec = importlib.util.spec_from_file_location("proxyprefill_podctl", DEPLOY / "podctl.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _podctl_args(argv: list[str]):
    """The probe's arguments as the helper's own parser reads them (nothing is contacted)."""
    module = _podctl()
    captured = {}

    def record(args) -> int:
        captured["args"] = args
        return 0

    module.cmd_health = record  # main() looks the handler up when it builds the parser
    assert module.main(argv) == 0
    return captured["args"]


def test_health_probe_answers_from_a_real_grpc_health_service():
    from concurrent import futures

    import grpc
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    podctl = _podctl()
    servicer = health.HealthServicer()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        address = f"127.0.0.1:{port}"
        servicer.set(podctl.SERVICE_NAME, health_pb2.HealthCheckResponse.NOT_SERVING)
        assert podctl.main(["health", "--address", address]) == 1
        servicer.set(podctl.SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
        assert podctl.main(["health", "--address", address]) == 0
        assert podctl.main(["health", "--address", address, "--service", "no.such.Service"]) == 1
    finally:
        server.stop(None)
    assert podctl.main(["health", "--address", address, "--timeout", "1"]) == 1  # nobody listening


def test_health_probe_checks_the_name_the_server_registers():
    from proxyprefill.service.server import SERVICE_NAME

    assert _podctl().SERVICE_NAME == SERVICE_NAME


def test_wait_for_returns_once_the_count_is_reached_and_times_out_otherwise():
    wait_for = _podctl().wait_for
    counts = iter([0, 1, 2, 4])
    assert wait_for(lambda: next(counts), 2, timeout=60, poll_seconds=0) == 2
    with pytest.raises(TimeoutError, match="1 of 4"):
        wait_for(lambda: 1, 4, timeout=0, poll_seconds=0)


def _fake_bin(tmp_path: Path) -> Path:
    """`ray`, `proxyprefill` and `proxyprefill-pod` that append their arguments to calls.log."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("ray", "proxyprefill", "proxyprefill-pod"):
        script = bin_dir / name
        script.write_text(f'#!/usr/bin/env bash\necho "{name} $*" >> "{tmp_path}/calls.log"\n')
        script.chmod(0o755)
    return bin_dir


def test_head_entrypoint_runs_kuberays_ray_start_without_block_then_serve(tmp_path):
    bin_dir = _fake_bin(tmp_path)
    generated = "ray start --head  --block  --dashboard-host=0.0.0.0  --num-gpus=0  --resources='{\"a\": 1}' "
    environment = {
        "PATH": f"{bin_dir}:/usr/bin:/bin",
        "KUBERAY_GEN_RAY_START_CMD": generated,
        "HEAD_WAIT_FOR_GPUS": "4",
    }
    done = subprocess.run(
        ["bash", str(DEPLOY / "head-entrypoint.sh"), "--log-level", "DEBUG"],
        env=environment,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    calls = (tmp_path / "calls.log").read_text().splitlines()
    assert calls == [
        'ray start --head --dashboard-host=0.0.0.0 --num-gpus=0 --resources={"a": 1}',
        "proxyprefill-pod wait-for-gpus 4 --timeout 1800",
        "proxyprefill serve --ray-address auto --log-level DEBUG",
    ]


def test_head_entrypoint_refuses_to_start_without_kuberays_command(tmp_path):
    bin_dir = _fake_bin(tmp_path)
    done = subprocess.run(
        ["bash", str(DEPLOY / "head-entrypoint.sh")],
        env={"PATH": f"{bin_dir}:/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode != 0
    assert "ray.io/overwrite-container-cmd" in done.stderr
    assert not (tmp_path / "calls.log").exists()


def test_pod_helper_help_runs_with_the_images_python():
    done = subprocess.run(
        [sys.executable, str(DEPLOY / "podctl.py"), "health", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0 and "--tls-server-name" in done.stdout

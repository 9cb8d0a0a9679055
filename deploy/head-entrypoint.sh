#!/usr/bin/env bash
# Head container of the service's KubeRay RayCluster (installed as `proxyprefill-head`).
# The head pod carries the annotation ray.io/overwrite-container-cmd: "true", so KubeRay does not
# run its generated `ray start` itself but hands it over in KUBERAY_GEN_RAY_START_CMD. We run that
# command as it is (its rayStartParams, its resources) less --block, optionally wait for the GPU
# workers to join (HEAD_WAIT_FOR_GPUS), then run the gRPC front end in the foreground, so that
# SIGTERM reaches it and it drains. Arguments go to `proxyprefill serve`; its settings come from
# the PROXYPREFILL_* environment.
set -euo pipefail
: "${KUBERAY_GEN_RAY_START_CMD:?is unset: the head pod needs the annotation ray.io/overwrite-container-cmd}"
ulimit -n "${RAY_START_ULIMIT_OPEN_FILES:-65536}" || echo "proxyprefill-head: keeping ulimit -n $(ulimit -n)"
eval "${KUBERAY_GEN_RAY_START_CMD// --block / }"
if [ "${HEAD_WAIT_FOR_GPUS:-0}" != "0" ]; then
    proxyprefill-pod wait-for-gpus "${HEAD_WAIT_FOR_GPUS}" --timeout "${HEAD_WAIT_TIMEOUT_SECONDS:-1800}"
fi
exec proxyprefill serve --ray-address auto "$@"

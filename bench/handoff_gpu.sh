#!/usr/bin/env bash
# The issue-12 GPU runs on one H200 (BENCHMARKS.md, "Time to first decode token (H200)"). Usage,
# on the device machine in the repo root after `source .device/env.sh`:
#   bash bench/handoff_gpu.sh tests     the GPU tests (CUDA IPC through the service, engine, kernels)
#   bash bench/handoff_gpu.sh service   service fixed cost and FetchKV GB/s, Llama-3.2-1B shape, 32k
#   bash bench/handoff_gpu.sh ttft      prefill + handoff + one decode step, Llama-3.1-8B shape, at
#                                       32k and 128k, by CUDA IPC and by FetchKV
#   bash bench/handoff_gpu.sh grpc128   FetchKV alone at 128k over 4 streams of 16 MiB pieces
#   bash bench/handoff_gpu.sh fixed     where the fixed cost goes (bench/fixed_cost.py), 1B shape,
#                                       512 and 32k tokens; needs opentelemetry-api/-sdk/
#                                       -semantic-conventions wheels in .device (the image has none)
# Several phases may be named at once; each runs under `timeout` and the next one runs whatever it
# ended with. Results go to $OUT (default /tmp/handoff-out) as JSON with a log; random-weight models
# are written once per machine under /tmp.
set -uo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
out=${OUT:-/tmp/handoff-out}
mkdir -p "$out"
python=${PYTHON:-python3}
log=$out/handoff-gpu.log

step() {  # name limit_s command...
  local name=$1 limit=$2 started=$SECONDS
  shift 2
  echo "== $name" | tee -a "$log"
  timeout -k 10 "$limit" "$@" 2>&1 | grep -v -e Warning -e 'warnings.warn' >>"$log"
  local rc=${PIPESTATUS[0]}
  echo "== $name: exit $rc after $((SECONDS - started)) s" | tee -a "$log"
  tail -n 14 "$log" | grep -v '^== '
}

model() {  # shape -> directory (made once)
  local dir=/tmp/random-$1
  [ -f "$dir/config.json" ] || "$python" "$here/bench/make_random_model.py" --shape "$1" --out "$dir" >>"$log" 2>&1
  echo "$dir"
}

"$python" -c 'import torch, triton, transformers, grpc, ray; print("torch", torch.__version__, "triton",
  triton.__version__, "transformers", transformers.__version__, "grpcio", grpc.__version__, "ray", ray.__version__,
  "gpu", torch.cuda.get_device_name(0))' | tee -a "$log"
git -C "$here" rev-parse --short HEAD 2>/dev/null | sed 's/^/commit /' | tee -a "$log"
for phase in "$@"; do
  case $phase in
    tests)
      step tests 300 "$python" -m pytest -q -x -p no:cacheprovider \
        tests/test_kv_share_gpu.py tests/test_engine_gpu.py tests/test_triton_gpu.py ;;
    service)
      step service 240 "$python" "$here/bench/service.py" --model "$(model llama-3.2-1b)" --attention proxy \
        --lengths 512 32768 --chunk-size 8192 --repeats 5 --load-requests 32 --fetch-tokens 32768 \
        --fetch-streams 1 2 4 --fetch-more-chunk-bytes 16777216 --out "$out/service-h200.json" ;;
    ttft)
      step ttft 540 "$python" "$here/bench/handoff.py" --ttft --model "$(model llama-3.1-8b)" \
        --tokens 32768,131072 --paths cuda_ipc,grpc --repeats 2 --out "$out/handoff-ttft-h200.json" ;;
    grpc128)
      step grpc128 300 "$python" "$here/bench/handoff.py" --ttft --model "$(model llama-3.1-8b)" \
        --tokens 131072 --paths grpc --repeats 2 --streams 4 --fetch-chunk-bytes 16777216 \
        --out "$out/handoff-ttft-h200-131072-grpc-4x16MiB.json" ;;
    fixed)
      step fixed 300 "$python" "$here/bench/fixed_cost.py" --model "$(model llama-3.2-1b)" --device cuda \
        --attention proxy --lengths 512 32768 --repeats 10 --out "$out/fixed-cost-h200.json" ;;
    *) echo "unknown phase $phase" >&2; exit 2 ;;
  esac
done

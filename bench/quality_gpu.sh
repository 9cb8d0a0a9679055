#!/usr/bin/env bash
# The GPU runs behind bench/results/quality-*.json (bench/ACCURACY.md, "Paired quality on the GPU").
# Models staged on the GPU machine as ~/models/qwen05.gguf and ~/models/smollm2.gguf (the recipe is
# in ACCURACY.md). Usage: bash bench/quality_gpu.sh PHASE OUT_DIR [SAMPLES]
#   qwen32   Qwen2.5-Coder-0.5B at 32k: the defaults, the coarse baseline and the candidate fixes
#   qwen16   the same at 8k and 16k
#   smollm2  SmolLM2-135M at 4k and 8k with sparse attention forced on (dense_below_tokens=0)
set -euo pipefail
phase=$1 out=$2 samples=${3:-50}
here=$(cd "$(dirname "$0")" && pwd)
candidates=(
  default: meanpool:estimator=meanpool g-kv:proxy_groups=kv
  min4k:min_budget_tokens=4096 g-kv+min4k:proxy_groups=kv,min_budget_tokens=4096
  power-floor:budget=gamma+power g-kv+power-floor:proxy_groups=kv,budget=gamma+power
  local4:local_blocks=4 gamma0.98:gamma=0.98
)
case $phase in
  qwen32)
    python "$here/quality.py" --model ~/models/qwen05.gguf --lengths 32768 --samples "$samples" \
      --nll-length 32768 --variants "${candidates[@]}" --out "$out/quality-qwen05-32k.json" ;;
  qwen16)
    python "$here/quality.py" --model ~/models/qwen05.gguf --lengths 8192 16384 --samples "$samples" \
      --nll-length 16384 --variants "${candidates[@]}" --out "$out/quality-qwen05-8k-16k.json" ;;
  smollm2)
    python "$here/quality.py" --model ~/models/smollm2.gguf --lengths 4096 8192 --samples "$samples" \
      --nll-length 8192 --base dense_below_tokens=0 --out "$out/quality-smollm2-forced.json" --variants \
      default: meanpool:estimator=meanpool g-kv:proxy_groups=kv g-kv+gamma0.99:proxy_groups=kv,gamma=0.99 \
      g-kv+gamma0.995:proxy_groups=kv,gamma=0.995 g-kv+min1k:proxy_groups=kv,min_budget_tokens=1024,gamma=0.99 ;;
  *) echo "unknown phase $phase"; exit 2 ;;
esac

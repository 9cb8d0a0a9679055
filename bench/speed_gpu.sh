#!/usr/bin/env bash
# Prefill speed on one H200 (bench/speed.py), for this tree and optionally a baseline tree in the
# same run: 1B shape at 128k (first request apart) and 1M tokens with the time split, the
# estimation steps alone at three offsets, the 8B shape at 128k against the dense engine.
# Writes $OUT/speed-<label>-<suite>.json and $OUT/speed.log; prints the table last.
#
#   bash bench/speed_gpu.sh                 # this tree only (~2.5 min)
#   bash bench/speed_gpu.sh .baseline       # and the tree in .baseline (~5 min in all)
#   SMOKE=1 bash bench/speed_gpu.sh .baseline   # the tiny CPU suite through the same steps
#
# A baseline tree: `mkdir .baseline && git archive main | tar -x -C .baseline` and
# `echo /.baseline/ >> .git/info/exclude`, then carry ".baseline". Each tree runs in fresh
# processes with an empty Triton cache, importing `proxyprefill` from that tree (a package whose
# subpackages link to the tree's folders), so "first request" is a cold start for a tree without
# a warm-up. Every measurement is saved as it finishes; a suite over its time budget skips the
# rest, and one that fails or hangs does not stop the others.
set -uo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
out=${OUT:-/tmp/speed-out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
python=${PYTHON:-python3}
scratch=$(mktemp -d)

package_of() {  # tree -> a folder holding a `proxyprefill` package made of the tree's folders
  local tree site
  tree=$(cd "$1" && pwd)
  site="$scratch/site-$(echo "$tree" | md5sum | cut -c1-8)"
  mkdir -p "$site/proxyprefill"
  cp "$tree"/proxyprefill/*.py "$site/proxyprefill/"
  for sub in workers service protos; do ln -sfn "$tree/$sub" "$site/proxyprefill/$sub"; done
  # the kernels live in proxyprefill/kernels/ (at the root, kernels/, in older trees)
  if [ -d "$tree/proxyprefill/kernels" ]; then
    ln -sfn "$tree/proxyprefill/kernels" "$site/proxyprefill/kernels"
  else
    ln -sfn "$tree/kernels" "$site/proxyprefill/kernels"
  fi
  echo "$site"
}

suite() {  # label tree suite budget_s limit_s [speed.py options]
  local label=$1 tree=$2 name=$3 budget=$4 limit=$5
  shift 5
  local site cache
  site=$(package_of "$tree") && cache=$(mktemp -d -p "$scratch")
  echo "== $label $name (tree $tree, budget ${budget}s)" | tee -a "$out/speed.log"
  TRITON_CACHE_DIR=$cache PYTHONPATH=$site timeout -k 10 "$limit" "$python" "$here/bench/speed.py" \
    --suite "$name" --label "$label" --tree "$tree" --budget-s "$budget" \
    --out "$out/speed-$label-$name.json" "$@" 2>&1 | grep -v -e Warning -e 'return forward_call' \
    | tee -a "$out/speed.log"
  echo "== $label $name: exit ${PIPESTATUS[0]}" | tee -a "$out/speed.log"
}

"$python" -c 'import torch, triton, transformers; print("torch", torch.__version__, "triton", triton.__version__,
  "transformers", transformers.__version__, "gpu", torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)' \
  | tee -a "$out/speed.log"
if [ -n "${SMOKE:-}" ]; then
  suite new "$here" tiny 600 900 --warm-up
  [ -n "${1:-}" ] && suite base "$1" tiny 600 900
else
  suite new "$here" 1b 100 170 --warm-up
  suite new "$here" 8b 85 140 --warm-up --dense
  if [ -n "${1:-}" ]; then
    suite base "$1" 1b 90 150 --warm-up
    suite base "$1" 8b 30 80 --warm-up
  fi
fi
"$python" "$here/bench/speed.py" --table "$out"/speed-*.json 2>&1 | tee -a "$out/speed.log"
rm -rf "$scratch"

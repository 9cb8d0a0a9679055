#!/usr/bin/env bash
# The GPU runs behind bench/results/quality-*.json (bench/ACCURACY.md, "Paired quality on the GPU").
# Models staged on the GPU machine as ~/models/qwen05.gguf and ~/models/smollm2.gguf (the recipe is
# in ACCURACY.md). Usage: bash bench/quality_gpu.sh PHASE OUT_DIR [SAMPLES]
#   qwen32   Qwen2.5-Coder-0.5B at 32k: the defaults, the coarse baseline and the candidate fixes
#   qwen16   the same at 8k and 16k
#   smollm2  SmolLM2-135M at 4k and 8k with sparse attention forced on (dense_below_tokens=0)
# The issue-14 runs ("What a user gets by default" in ACCURACY.md):
#   prepare            convert each staged GGUF once into a bf16 model directory beside it
#                      (~/models/qwen05, ~/models/smollm2): reading a GGUF's tokenizer alone takes
#                      about a minute a process, the directories load in seconds
#   remaining-qwen     Qwen: `proxyprefill calibrate` at 16k tokens a text, then paired quality at
#                      8k, 16k and 32k of dense, the calibrated profile, the built-in defaults, and
#                      the coarse estimator on the profile's budgets (matched sparsity)
#   remaining-smollm2  SmolLM2 with sparse attention forced on: calibrate at 8k tokens a text with
#                      dense_below_tokens=0, then paired quality at 4k and 8k of dense, the profile
#                      and the built-in defaults
#   remaining          both, Qwen first, inside one time budget
# Every step runs under what is left of BUDGET_S (default 520 s from the start of the phase) and is
# skipped when too little is left; the quality JSON is rewritten after every variant, so a step cut
# short keeps the variants it finished. Steps and their seconds go to OUT_DIR/steps.tsv, and the
# last thing printed is each result's targets table.
# Environment: MODELS_DIR (default ~/models); QWEN, SMOLLM2 (model paths; default the prepared
# directories); BUDGET_S; TINY=1 runs the same steps at a few hundred tokens (checks the script on
# a CPU with any small model, e.g. QWEN=SMOLLM2=<a SmolLM2 directory>).
set -euo pipefail
phase=$1 samples=${3:-50}
mkdir -p "$2" && out=$(cd "$2" && pwd)
here=$(cd "$(dirname "$0")" && pwd)
models=${MODELS_DIR:-$HOME/models}
qwen=${QWEN:-$models/qwen05} smollm2=${SMOLLM2:-$models/smollm2}
# `python -m`/`-c` put the working directory first on sys.path; in the project's root its
# proxyprefill/ (without workers/ and service/, which the installed package maps in) would shadow
# the installed package, so every step runs from OUT_DIR.
cd "$out"
deadline=$((SECONDS + ${BUDGET_S:-520}))

candidates=(
  default: meanpool:estimator=meanpool g-kv:proxy_groups=kv
  min4k:min_budget_tokens=4096 g-kv+min4k:proxy_groups=kv,min_budget_tokens=4096
  power-floor:budget=gamma+power g-kv+power-floor:proxy_groups=kv,budget=gamma+power
  local4:local_blocks=4 gamma0.98:gamma=0.98
)

# Sizes: the runs, or (TINY=1) a check of the same steps. The check's calibration has short texts,
# a floor below their length (a floor as long as the text keeps every block) and two gammas.
if [ "${TINY:-0}" = 1 ]; then
  qwen_lengths=(1024 2048) qwen_nll=2048 qwen_chunk=512
  qwen_cal=(--tokens 512 --chunk-size 512 --min-budget-tokens 128 --gammas 0.9 0.5)
  smol_lengths=(1024) smol_nll=1024
  smol_cal=(--tokens 512 --chunk-size 512 --min-budget-tokens 128 --gammas 0.9 0.5)
else
  # Qwen: serving's chunk, 16k tokens a text (two chunks, both sparse in the calibration), the
  # library's 2,048-token floor, gammas and proxy groups (1 and 2) as the command's defaults
  qwen_lengths=(8192 16384 32768) qwen_nll=32768 qwen_chunk=8192
  qwen_cal=(--tokens 16384 --chunk-size 8192 --min-budget-tokens 2048)
  # SmolLM2 (8k positions): one 8k chunk a text like the 8k prompts, two floors, gammas up to 0.995
  smol_lengths=(4096 8192) smol_nll=8192
  smol_cal=(--tokens 8192 --chunk-size 8192 --min-budget-tokens 512 2048 --gammas 0.8 0.9 0.95 0.98 0.99 0.995)
fi

# step NAME LEAST_SECONDS COMMAND...: run COMMAND under the time left (output also in NAME.log),
# or skip it when less than LEAST_SECONDS is left; a failing step is recorded, not fatal.
step() {
  local name=$1 least=$2 left=$((deadline - SECONDS)) started=$SECONDS status=0
  shift 2
  if [ "$left" -lt "$least" ]; then
    echo "== $name: skipped, ${left}s left (needs ${least}s)"
    printf '%s\tskipped\t0\n' "$name" >> steps.tsv
    return 0
  fi
  echo "== $name (up to ${left}s)"
  timeout --kill-after=15 "$left" "$@" 2>&1 | tee "$name.log" || status=$?
  printf '%s\t%s\t%s\n' "$name" "$([ $status = 0 ] && echo ok || echo "exit $status")" \
    "$((SECONDS - started))" >> steps.tsv
}

# profile_attention FILE: "proxy" or "dense" (what the calibration chose), "none" without a profile.
profile_attention() {
  if [ -f "$1" ]; then
    python -c 'import json, sys; print(json.load(open(sys.argv[1]))["settings"]["attention"])' "$1"
  else
    echo none
  fi
}

calibrate() {  # calibrate NAME MODEL FLAGS...: the profile goes to OUT_DIR/profile-NAME.json
  local name=$1 model=$2
  shift 2
  step "calibrate-$name" 30 python -m proxyprefill calibrate --model "$model" \
    --out "$out/profile-$name.json" "$@"
}

remaining_qwen() {
  calibrate qwen05 "$qwen" "${qwen_cal[@]}"
  local profile=$out/profile-qwen05.json variants profile_flag=()
  # the profile first (what a calibrated user gets), then the built-in defaults, then the coarse
  # estimator on the profile's budgets; without a sparse profile, one proxy per KV head stands in
  case $(profile_attention "$profile") in
    proxy) variants=(profile:profile default: profile-meanpool:profile,estimator=meanpool) ;;
    dense) variants=(profile:profile default: g-kv:proxy_groups=kv g-kv-meanpool:proxy_groups=kv,estimator=meanpool) ;;
    none) variants=(default: g-kv:proxy_groups=kv g-kv-meanpool:proxy_groups=kv,estimator=meanpool) ;;
  esac
  [ -f "$profile" ] && profile_flag=(--profile "$profile")
  step quality-qwen05 60 python "$here/quality.py" --model "$qwen" --lengths "${qwen_lengths[@]}" \
    --samples "$samples" --nll-length "$qwen_nll" --chunk-size "$qwen_chunk" "${profile_flag[@]}" \
    --variants "${variants[@]}" --out "$out/quality-qwen05.json"
}

remaining_smollm2() {
  calibrate smollm2 "$smollm2" "${smol_cal[@]}" --dense-below-tokens 0
  local profile=$out/profile-smollm2.json variants profile_flag=()
  case $(profile_attention "$profile") in
    none) variants=(default: g-kv:proxy_groups=kv) ;;
    *) variants=(profile:profile default:) ;;
  esac
  [ -f "$profile" ] && profile_flag=(--profile "$profile")
  step quality-smollm2 40 python "$here/quality.py" --model "$smollm2" --lengths "${smol_lengths[@]}" \
    --samples "$samples" --nll-length "$smol_nll" --base dense_below_tokens=0 "${profile_flag[@]}" \
    --variants "${variants[@]}" --out "$out/quality-smollm2-forced.json"
}

# summary: the steps' times, then per model what the calibration chose and the targets table
# (the full tables go to summary-NAME.md).
summary() {
  echo "== steps (name, status, seconds)"
  cat steps.tsv
  for name in qwen05 smollm2; do
    [ -f "calibrate-$name.log" ] && sed -n '/^profile /,/^wrote /p' "calibrate-$name.log"
    result=quality-$name.json
    [ "$name" = smollm2 ] && result=quality-smollm2-forced.json
    [ -f "$result" ] || continue
    echo "== $result"
    python "$here/quality.py" --summarize "$result" > "summary-$name.md" || continue
    sed -n '/^bound:/,$p' "summary-$name.md"
  done
}

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
  prepare)
    for name in qwen05 smollm2; do
      if [ -f "$models/$name/config.json" ]; then echo "$models/$name: ready"; continue; fi
      if [ ! -f "$models/$name.gguf" ]; then echo "no $models/$name.gguf: stage it first"; continue; fi
      step "prepare-$name" 30 python -c 'import sys, torch
from proxyprefill.workers.model import convert_gguf
print("wrote", convert_gguf(sys.argv[1], sys.argv[2], dtype=torch.bfloat16))' \
        "$models/$name.gguf" "$models/$name"
    done
    cat steps.tsv 2>/dev/null || true ;;
  remaining-qwen) remaining_qwen; summary ;;
  remaining-smollm2) remaining_smollm2; summary ;;
  remaining) remaining_qwen; remaining_smollm2; summary ;;
  *) echo "unknown phase $phase"; exit 2 ;;
esac

#!/usr/bin/env bash
# One command for the day a GPU is lent: Loom's 125m/350m/1.3b presets against the independent
# reference GPT at the same dtype (bfloat16, cuDNN attention on both), the memory and compile
# reports and the decode benchmark, printing one JSON line per measurement to stdout and to
# $OUT_FILE. About 8 minutes on one H100 (each step is capped by `timeout`).
#
#   scripts/gpu_benchmark.sh [--dry-run] [--reference PATH] [--nanodo PATH] [--out FILE]
#
# --dry-run runs the same commands at tiny shapes (configs/bench_tiny.py, 2 steps) on whatever
# backend there is, so the script itself can be checked on a CPU. --nanodo adds nanodo's own
# train step on the tiny shape (a checkout of google-deepmind/nanodo; nanodo is not installed).
# Run from the repository root with Loom's environment active.
set -euo pipefail

DRY=0
REF="../shared/bench/reference_gpt.py"
NANODO=""
OUT_FILE="gpu_benchmark.jsonl"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --reference) REF="$2"; shift ;;
    --nanodo) NANODO="$2"; shift ;;
    --out) OUT_FILE="$2"; shift ;;
    *) echo "gpu_benchmark.sh: unknown option $1 (see the header of $0)" >&2; exit 2 ;;
  esac
  shift
done
[[ -f "$REF" ]] || { echo "gpu_benchmark.sh: no reference at $REF (pass --reference PATH)" >&2; exit 2; }
: > "$OUT_FILE"

# run LIMIT_S ARGS...: one benchmark, its JSON lines to stdout and $OUT_FILE; a failure or a
# timeout becomes a JSON line too, and the suite goes on.
run() {
  local limit="$1"; shift
  local log; log="$(mktemp)"
  local rc=0
  timeout "$limit" python -m train.benchmark "$@" > "$log" 2>&1 || rc=$?
  grep -E '^\{' "$log" | tee -a "$OUT_FILE" || true
  if [[ $rc -ne 0 ]]; then
    local why; why="$(grep -vE '^\{' "$log" | tail -n 1 | tr -d '"\\' | cut -c1-300)"
    printf '{"failed": "train.benchmark %s", "rc": %d, "last_line": "%s"}\n' "$*" "$rc" "$why" \
      | tee -a "$OUT_FILE"
  fi
  rm -f "$log"
}

python - <<'PY' | tee -a "$OUT_FILE"
import json, jax
d = jax.devices()[0]
print(json.dumps(dict(suite="gpu_benchmark", jax=jax.__version__, backend=jax.default_backend(),
                      device=d.device_kind, n_devices=jax.device_count())))
PY

if [[ $DRY -eq 1 ]]; then
  run 600 --config configs/bench_tiny.py --config.model.dtype=bfloat16 --reference "$REF" \
      --reference-preset tiny --rounds 1 --steps 2
  [[ -n "$NANODO" ]] && run 600 --config configs/bench_tiny.py --nanodo "$NANODO" --rounds 1 \
      --steps 2 --dtypes float32,bfloat16
  run 600 --memory --config configs/bench_tiny.py --config.data.seq_len=64
  run 600 --compile --config configs/bench_tiny.py --depths 2,4
  run 600 --generate --config configs/bench_tiny.py --batch-sizes 1 --prompt-len 8 \
      --new-tokens 4 --repeats 1
  exit 0
fi

# Training step, Loom vs the reference, bfloat16 + cuDNN attention (attention=auto is cudnn on a
# GPU at bf16; the reference gets --impl cudnn from train.benchmark on a GPU).
run 150 --config configs/gpt_125m.py --reference "$REF" --reference-preset 125m --rounds 1 --steps 10
run 150 --config configs/gpt_350m.py --reference "$REF" --reference-preset 350m --rounds 1 --steps 10
run 180 --config configs/gpt_1_3b.py --reference "$REF" --reference-preset 1.3b --rounds 1 --steps 5
[[ -n "$NANODO" ]] && run 120 --config configs/bench_tiny.py --config.model.dtype=bfloat16 \
    --config.model.scan_layers=true --nanodo "$NANODO" --rounds 2 --steps 10
# Memory per device (8 fake CPU devices, by definition of the report) and compile time (here, on
# the GPU backend).
run 240 --memory
run 240 --compile --config configs/bench_tiny.py
# Decoding: time to first token and decode tokens/s, KV cache vs recomputation.
run 90 --generate --config configs/gpt_125m.py --batch-sizes 1,8 --prompt-len 128 --new-tokens 128

#!/usr/bin/env bash
# Measure `mmrun bench` and the PyTorch twin (../shared/reference/torch_twin.py) side by side, in one
# window, alternating, and print the ratios. Only ratios measured this way mean anything: the machines
# change CPU from day to day.
#
# Usage: scripts/bench-vs-torch.sh [ROUNDS]   (default 3; each round measures every figure once)
# Environment:
#   MMRUN_BIN       the mmrun binary (default target/release/mmrun, built by `cargo build --release`)
#   MMRUN_TORCH_PY  python of a venv with torch (default ~/.cache/mmrun-torch-venv/bin/python, which
#                   ../shared/reference/setup-torch.sh makes)
#   MMRUN_TWIN      torch_twin.py (default ../shared/reference/torch_twin.py)
#   BENCH_SHAPE     the shape for both sides, as "h=512 l=8 kv=4 inter=1664 b=8 t=512" (the default,
#                   the reference shape; give only the keys to change)
#
# Output: a line per measurement ("figure NAME TOKENS_PER_S") as it goes, then one JSON object with
# each figure's median and the ratios the performance goals are stated in.
set -euo pipefail
cd "$(dirname "$0")/.."

ROUNDS=${1:-3}
MMRUN_BIN=${MMRUN_BIN:-target/release/mmrun}
PY=${MMRUN_TORCH_PY:-$HOME/.cache/mmrun-torch-venv/bin/python}
TWIN=${MMRUN_TWIN:-../shared/reference/torch_twin.py}
declare -A S=([h]=512 [l]=8 [kv]=4 [inter]=1664 [b]=8 [t]=512)
for kv in ${BENCH_SHAPE:-}; do S[${kv%%=*}]=${kv#*=}; done

[ -x "$PY" ] || { echo "no torch venv at $PY: run ../shared/reference/setup-torch.sh, or set MMRUN_TORCH_PY" >&2; exit 2; }
[ -f "$TWIN" ] || { echo "no $TWIN: set MMRUN_TWIN to the twin's path" >&2; exit 2; }
if [ ! -x "$MMRUN_BIN" ]; then
  echo "building $MMRUN_BIN (cargo build --release)" >&2
  cargo build --release --quiet
fi

threads=$(nproc)
shape_mm=(--hidden "${S[h]}" --layers "${S[l]}" --kv-heads "${S[kv]}" --intermediate "${S[inter]}"
  --batch "${S[b]}" --seq "${S[t]}")
shape_pt=("h=${S[h]}" "l=${S[l]}" "kv=${S[kv]}" "inter=${S[inter]}" "b=${S[b]}" "t=${S[t]}" qknorm=1
  "threads=$threads")
out=$(mktemp)
trap 'rm -f "$out"' EXIT

figure() { echo "figure $1 $2" | tee -a "$out"; }
# `mmrun bench --json` prints one JSON object: take one field of it.
field() { python3 -c 'import json,sys; v=json.load(sys.stdin)[sys.argv[1]]; print("nan" if v is None else v)' "$1"; }
# The twin's last line ends "=> N tok/s".
twin() { "$PY" "$TWIN" "$@" | tail -1 | sed -n 's/.*=> \([0-9.]*\) tok\/s.*/\1/p'; }

echo "machine: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | xargs); $threads threads;" \
  "load $(cut -d' ' -f1-3 /proc/loadavg)"
for r in $(seq 1 "$ROUNDS"); do
  echo "round $r/$ROUNDS" >&2
  # Alternate which side goes first, so a machine that drifts does not favour one.
  order=(mmrun torch)
  [ $((r % 2)) -eq 0 ] && order=(torch mmrun)
  for side in "${order[@]}"; do
    if [ "$side" = mmrun ]; then
      j=$("$MMRUN_BIN" bench --json --device cpu --dtype f32 "${shape_mm[@]}" --gen-tokens 200)
      figure mmrun_train_f32 "$(field train_tokens_per_s <<<"$j")"
      figure mmrun_gen_f32 "$(field gen_tokens_per_s_f32 <<<"$j")"
      figure mmrun_gen_bf16 "$(field gen_tokens_per_s_bf16 <<<"$j")"
      figure mmrun_matmul_peak_gflops_f32 "$(field matmul_peak_gflops <<<"$j")"
      figure mmrun_matmul_peak_gflops_bf16 "$(field matmul_peak_gflops_bf16 <<<"$j")"
      j=$("$MMRUN_BIN" bench --json --device cpu --dtype bf16 "${shape_mm[@]}" --gen-tokens 0)
      figure mmrun_train_bf16 "$(field train_tokens_per_s <<<"$j")"
    else
      figure torch_train_fp32 "$(twin "${shape_pt[@]}" steps=8)"
      figure torch_train_bf16_autocast "$(twin "${shape_pt[@]}" steps=8 amp=1)"
      figure torch_gen_fp32 "$(twin mode=gen n=200 "${shape_pt[@]}")"
      figure torch_gen_bf16 "$(twin mode=gen n=200 "${shape_pt[@]}" amp=1)"
    fi
  done
done
echo "load after: $(cut -d' ' -f1-3 /proc/loadavg)"

python3 - "$out" <<'EOF'
import json, statistics, sys
figs = {}
for line in open(sys.argv[1]):
    _, name, value = line.split()
    try:
        figs.setdefault(name, []).append(float(value))
    except ValueError:
        pass
med = {k: statistics.median(v) for k, v in figs.items() if v}
# mmrun's best training and generation precision on this CPU against the twin's best: the goals
# compare best with best.
med["mmrun_train_best"] = max(med.get("mmrun_train_f32", 0.0), med.get("mmrun_train_bf16", 0.0))
med["torch_gen_best"] = max(med.get("torch_gen_fp32", 0.0), med.get("torch_gen_bf16", 0.0))
med["mmrun_gen_best"] = max(med.get("mmrun_gen_f32", 0.0), med.get("mmrun_gen_bf16", 0.0))

def ratio(a, b):
    return round(med[a] / med[b], 3) if med.get(a) and med.get(b) else None

print(json.dumps({
    "median": {k: round(v, 1) for k, v in sorted(med.items())},
    "samples": {k: len(v) for k, v in sorted(figs.items())},
    "ratios": {
        "train_best_vs_torch_bf16_autocast": ratio("mmrun_train_best", "torch_train_bf16_autocast"),
        "train_best_vs_torch_fp32": ratio("mmrun_train_best", "torch_train_fp32"),
        "train_f32_vs_torch_fp32": ratio("mmrun_train_f32", "torch_train_fp32"),
        "train_bf16_vs_torch_bf16_autocast": ratio("mmrun_train_bf16", "torch_train_bf16_autocast"),
        "gen_best_vs_torch_best": ratio("mmrun_gen_best", "torch_gen_best"),
        "gen_f32_vs_torch_best": ratio("mmrun_gen_f32", "torch_gen_best"),
        "gen_bf16_vs_torch_best": ratio("mmrun_gen_bf16", "torch_gen_best"),
    },
    "goals": {"train_best_vs_torch_bf16_autocast": 1.2, "train_best_vs_torch_fp32": 2.0,
              "gen_best_vs_torch_best": 2.0},
}, indent=1))
EOF

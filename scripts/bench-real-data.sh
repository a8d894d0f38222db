#!/usr/bin/env bash
# The end-to-end comparison of issue 11 on real data: the reference trainer
# (jingyaogong/minimind's trainer/train_pretrain.py, CPU, fp32 — it has no CPU autocast) against
# `mmrun run` of the same pretraining, alternated in one window, wall time of the whole command.
#
# Shape: hidden 256 x 4 layers (8 q / 4 kv heads, SwiGLU 832, the reference's defaults for that
# width), max_seq_len 256, batch 8, 2 epochs, no accumulation, lr 5e-4 with the reference's cosine,
# the reference tokenizer (../shared/data/minimind_tokenizer). Data: {"text"} chunks of 200–400
# characters cut from ../shared/data/medicalgpt/pretrain/{en_article_tail500,fever}.txt (all of
# both: 125 + 406 = 531 lines, 151 384 characters; the issue's cut had 532), written fresh into a
# temporary folder.
#
# mmrun runs twice per round: padded rows as the reference (`packing = false`) and packed rows,
# both at `precision = "auto"` (bf16 on CPUs with AMX or a fast avx512_bf16, else f32) and once
# padded at f32. Each run gets an empty cache, so nothing is reused between runs.
#
# Usage: MINIMIND_DIR=<checkout of github.com/jingyaogong/minimind> scripts/bench-real-data.sh [ROUNDS]
# Environment: MMRUN_BIN (default target/release/mmrun), MMRUN_TORCH_PY (python of a venv with
# torch, transformers and datasets; default ~/.cache/mmrun-torch-venv/bin/python), MMRUN_SHARED
# (default ../shared).
# Output: "figure NAME SECONDS" lines as it goes, then one JSON object with medians and ratios.
set -euo pipefail
cd "$(dirname "$0")/.."

ROUNDS=${1:-2}
MMRUN_BIN=$(realpath "${MMRUN_BIN:-target/release/mmrun}")
PY=${MMRUN_TORCH_PY:-$HOME/.cache/mmrun-torch-venv/bin/python}
SHARED=$(realpath "${MMRUN_SHARED:-../shared}")
MINIMIND=${MINIMIND_DIR:?set MINIMIND_DIR to a checkout of github.com/jingyaogong/minimind}
[ -x "$MMRUN_BIN" ] || { echo "no $MMRUN_BIN: cargo build --release" >&2; exit 2; }
"$PY" -c 'import torch, transformers, datasets' ||
  { echo "$PY lacks torch/transformers/datasets: pip install transformers==4.57.6 datasets==3.6.0" >&2; exit 2; }

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
out="$work/figures"

python3 - "$SHARED/data/medicalgpt/pretrain" "$work/pretrain.jsonl" <<'EOF'
import json, sys
src, dst = sys.argv[1], sys.argv[2]

def chunks(path):
    """Consecutive non-empty lines joined until 200-400 characters; longer lines are cut at 400."""
    cur = ""
    for line in open(path, encoding="utf-8"):
        line = line.strip()
        while line:
            room = 400 - len(cur) - (1 if cur else 0)
            piece, line = (line, "") if len(line) <= room else (line[:room], line[room:])
            cur = f"{cur}\n{piece}" if cur else piece
            if len(cur) >= 200:
                yield cur
                cur = ""
    if len(cur) >= 200:
        yield cur

rows = list(chunks(f"{src}/en_article_tail500.txt")) + list(chunks(f"{src}/fever.txt"))
with open(dst, "w", encoding="utf-8") as f:
    for r in rows:
        f.write(json.dumps({"text": r}, ensure_ascii=False) + "\n")
print(f"data: {len(rows)} lines, {sum(map(len, rows))} characters", file=sys.stderr)
EOF

# The reference, in a scratch copy (it writes checkpoints next to itself) using the shared tokenizer.
cp -r "$MINIMIND" "$work/minimind"
cp "$SHARED/data/minimind_tokenizer/tokenizer.json" "$SHARED/data/minimind_tokenizer/tokenizer_config.json" \
  "$work/minimind/model/"

cat >"$work/recipe.toml" <<EOF
[recipe]
name = "real_data_256x4"
seed = 42
device = "cpu"
precision = "auto"

[model]
preset = "minimind-small"
hidden_size = 256
num_hidden_layers = 4
num_attention_heads = 8
num_key_value_heads = 4
intermediate_size = 832

[datasets.text]
source = "$work/pretrain.jsonl"
format = "text"

[stages.tok]
kind = "tokenizer"
source = "$SHARED/data/minimind_tokenizer"

[stages.base]
kind = "pretrain"
tokenizer = "tok"
data = "text"
max_seq_len = 256
batch_size = 8
epochs = 2
lr = 5e-4
packing = false
EOF

figure() { echo "figure $1 $2" | tee -a "$out"; }
timed() { local t0; t0=$(date +%s.%N); "$@" >"$work/last.log" 2>&1 || { tail -20 "$work/last.log" >&2; exit 1; }
  python3 -c "import sys; print(round($(date +%s.%N) - $t0, 2))"; }
reference() {
  (cd "$work/minimind/trainer" && timed "$PY" train_pretrain.py --device cpu --hidden_size 256 \
    --num_hidden_layers 4 --max_seq_len 256 --batch_size 8 --epochs 2 --accumulation_steps 1 \
    --num_workers 0 --data_path "$work/pretrain.jsonl" --save_dir "$work/ref_out")
}
mmrun() {
  rm -rf "${work:?}/home" "${work:?}/runs"
  timed "$MMRUN_BIN" run "$work/recipe.toml" --home "$work/home" --runs-dir "$work/runs" "$@"
}

echo "machine: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | xargs); $(nproc) threads;" \
  "load $(cut -d' ' -f1-3 /proc/loadavg)"
for r in $(seq 1 "$ROUNDS"); do
  echo "round $r/$ROUNDS" >&2
  order=(mmrun reference)
  [ $((r % 2)) -eq 0 ] && order=(reference mmrun)
  for side in "${order[@]}"; do
    if [ "$side" = reference ]; then
      figure reference_fp32 "$(reference)"
    else
      figure mmrun_auto_padded "$(mmrun)"
      figure mmrun_auto_packed "$(mmrun --set stages.base.packing=true)"
      figure mmrun_f32_padded "$(mmrun --set recipe.precision=f32)"
    fi
  done
done
echo "load after: $(cut -d' ' -f1-3 /proc/loadavg)"

python3 - "$out" <<'EOF'
import json, statistics, sys
figs = {}
for line in open(sys.argv[1]):
    _, name, value = line.split()
    figs.setdefault(name, []).append(float(value))
med = {k: statistics.median(v) for k, v in figs.items()}
ref = med["reference_fp32"]
print(json.dumps({
    "seconds": figs,
    "median_s": med,
    "speedup_vs_reference": {k: round(ref / v, 2) for k, v in med.items() if k != "reference_fp32"},
}, indent=1))
EOF

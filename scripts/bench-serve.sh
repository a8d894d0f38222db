#!/usr/bin/env bash
# Serving throughput of `mmrun serve` on this machine: single-stream tokens/s, and total tokens/s
# with 1, 4 and 16 concurrent streams, for the quickstart model and for the `minimind-small` shape.
# Prints one JSON object per measurement.
#
#   scripts/bench-serve.sh                 # both models (trains them first if needed)
#   scripts/bench-serve.sh <model>...      # given models: <run>:<stage> or folders
#
# Environment: MMRUN_BIN (default target/release/mmrun; build it with `cargo build --release`),
# TOKENS (answer length, default 128; answers ignore end-of-sequence, so each is exactly that
# long), PORT (default 18998). Needs curl and python3.
# The quickstart model is the `grpo` stage of recipes/quickstart.toml (trained on first use, cached
# after). The `minimind-small` model is one pretraining step of that preset (random-quality
# weights, the real shape and cost: 26M parameters, vocab 6400).
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${MMRUN_BIN:-target/release/mmrun}
TOKENS=${TOKENS:-128}
PORT=${PORT:-18998}
WORK=${MMRUN_BENCH_DIR:-$(mktemp -d)}
export MMRUN_HOME=${MMRUN_HOME:-.mmrun} MMRUN_RUNS_DIR=${MMRUN_RUNS_DIR:-runs}
[ -x "$BIN" ] || { echo "no $BIN; run cargo build --release (or set MMRUN_BIN)" >&2; exit 2; }

last_model() { # the last model of the last run of recipe $1
  "$BIN" show --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["models"][-1]["reference"])'
}

models=("$@")
if [ ${#models[@]} -eq 0 ]; then
  "$BIN" recipes/quickstart.toml >/dev/null
  models+=("$(last_model)")
  cat >"$WORK/small.toml" <<'EOF'
[recipe]
name = "bench_small"
seed = 1
device = "cpu"
[model]
preset = "minimind-small"
[datasets.text]
source = "builtin:arithmetic"
format = "text"
builtin = { count = 2000 }
[stages.tok]
kind = "tokenizer"
data = ["text"]
vocab_size = 6400
[stages.base]
kind = "pretrain"
tokenizer = "tok"
data = "text"
max_seq_len = 64
batch_size = 2
max_steps = 1
EOF
  "$BIN" "$WORK/small.toml" >/dev/null
  models+=("$(last_model)")
fi

for model in "${models[@]}"; do
  "$BIN" serve "$model" --port "$PORT" --max-tokens 4096 2>"$WORK/serve.log" &
  pid=$!
  trap 'kill $pid 2>/dev/null || true' EXIT
  until curl -sf "http://127.0.0.1:$PORT/health" >/dev/null; do
    kill -0 $pid 2>/dev/null || { cat "$WORK/serve.log" >&2; exit 1; }
    sleep 0.2
  done
  for n in 1 4 16; do
    start=$(date +%s.%N)
    for i in $(seq "$n"); do
      # ignore_eos: every answer is exactly $TOKENS tokens, so runs compare like for like.
      curl -s "http://127.0.0.1:$PORT/v1/completions" -H 'Content-Type: application/json' \
        -d "{\"prompt\": \"Question: What is $i plus 3? Answer:\", \"max_tokens\": $TOKENS, \"temperature\": 1.0, \"seed\": $i, \"ignore_eos\": true}" \
        >"$WORK/out.$i" &
    done
    wait $(jobs -p | grep -v "^$pid$") 2>/dev/null || true
    end=$(date +%s.%N)
    tokens=$(cat $(seq -f "$WORK/out.%g" 1 "$n") | grep -o '"completion_tokens":[0-9]*' | cut -d: -f2 | awk '{s += $1} END {print s + 0}')
    # One JSON object per measurement (machine-readable; `jq -s` collects them).
    awk -v m="$model" -v n="$n" -v t="$tokens" -v s="$start" -v e="$end" -v k="$TOKENS" \
      'BEGIN { d = e - s; printf "{\"bench\": \"serve\", \"model\": \"%s\", \"streams\": %d, \"answer_tokens\": %d, \"tokens\": %d, \"seconds\": %.3f, \"tokens_per_s\": %.1f, \"tokens_per_s_per_stream\": %.1f}\n", m, n, k, t, d, t / d, t / d / n }'
  done
  kill $pid
  wait $pid 2>/dev/null || true
  trap - EXIT
done

#!/usr/bin/env bash
# The GPU checks, in one go, on a machine with NVIDIA GPUs (e.g. a session's lent device):
#   1. build mmrun with CUDA (and NCCL when libnccl is found),
#   2. `mmrun bench --device cuda:0` in f32 and in bf16,
#   3. the quickstart recipe on cuda:0,
#   4. with 2 or more GPUs, a 2-rank data-parallel pretrain on cuda:0 and cuda:1 next to 1 rank
#      with the same global batch (their losses should agree to float tolerance),
#   5. the test suite built with the same features (last: it is the longest).
# Cheapest first, so a run cut short still reports the figures that matter most.
#
# Every result is one machine-readable line on stdout,
#   GPUCHECK <step> status=<ok|fail|skip> seconds=<n> [key=value ...]
# and the logs and the bench JSON land in $OUT (default: target/gpu-check). The exit status is
# that of the first failed step (0 when all passed or were skipped).
#
# Environment (all optional):
#   OUT                  where logs go (the device tool's output folder)
#   MMRUN_GPU_FEATURES   cargo features (default: nccl when libnccl is found, else cuda)
#   MMRUN_GPU_TEST_ARGS  test filter and flags after `cargo test --release --features …` (default:
#                        the whole suite)
#   MMRUN_GPU_TEST_SECS  time limit of the test step (default 420)
#   MMRUN_CUDA_VENV      a venv with nvcc from PyPI when the machine has no CUDA toolkit
#                        (scripts/check-cuda.sh makes one)
#   CUDA_COMPUTE_CAP     kernels' target arch (default: what nvidia-smi reports for GPU 0)
set -uo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo" || exit 1
out="${OUT:-$repo/target/gpu-check}"
mkdir -p "$out"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
first_failure=0

# report STEP STATUS SECONDS [key=value ...]
report() {
    local step="$1" status="$2" secs="$3"
    shift 3
    echo "GPUCHECK $step status=$status seconds=$secs $*"
    if [[ "$status" == fail && "$first_failure" == 0 ]]; then
        first_failure=1
    fi
}

# run STEP CMD...: run CMD with its output in $out/STEP.log; sets $secs and returns its status.
run() {
    local step="$1"
    shift
    local t0=$SECONDS
    "$@" >"$out/$step.log" 2>&1
    local rc=$?
    secs=$((SECONDS - t0))
    return $rc
}

# --- the machine ---------------------------------------------------------------------------
if ! command -v nvidia-smi >/dev/null; then
    report machine fail 0 reason=no-nvidia-smi
    exit 1
fi
gpus="$(nvidia-smi --query-gpu=name --format=csv,noheader | wc -l)"
gpu_name="$(nvidia-smi --query-gpu=name --format=csv,noheader | head -n 1 | tr ' ' '_')"
cap="$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -n 1 | tr -d '.')"
driver="$(nvidia-smi --query-gpu=driver_version --format=csv,noheader | head -n 1)"
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-$cap}"
report machine ok 0 "gpus=$gpus" "gpu=$gpu_name" "compute_cap=$CUDA_COMPUTE_CAP" "driver=$driver" "cores=$(nproc)"

if ! command -v nvcc >/dev/null; then
    venv="${MMRUN_CUDA_VENV:-$repo/../cudaenv}"
    nvcc_path="$(find "$venv" -path '*/nvidia/*' -name nvcc -type f -perm -u+x 2>/dev/null | head -n 1 || true)"
    if [[ -n "$nvcc_path" ]]; then
        cuda_bin="$(dirname "$nvcc_path")"
        cuda_home="$(dirname "$cuda_bin")"
        export PATH="$cuda_bin:$PATH" CUDA_HOME="$cuda_home" CUDA_PATH="$cuda_home"
    elif [[ -x /usr/local/cuda/bin/nvcc ]]; then
        export PATH="/usr/local/cuda/bin:$PATH" CUDA_HOME=/usr/local/cuda CUDA_PATH=/usr/local/cuda
    else
        report build fail 0 reason=no-nvcc hint=run-scripts/check-cuda.sh-first-or-set-MMRUN_CUDA_VENV
        exit 1
    fi
fi
if [[ -z "${MMRUN_GPU_FEATURES:-}" ]]; then
    if ldconfig -p 2>/dev/null | grep -q 'libnccl\.so'; then
        MMRUN_GPU_FEATURES=nccl
    else
        MMRUN_GPU_FEATURES=cuda
    fi
fi
features="$MMRUN_GPU_FEATURES"

# --- 1. build -------------------------------------------------------------------------------
if run build cargo build --release --features "$features"; then
    report build ok "$secs" "features=$features"
else
    report build fail "$secs" "features=$features" "log=$out/build.log"
    exit 1
fi
mmrun="$repo/target/release/mmrun"

# --- 2. bench, f32 and bf16 ------------------------------------------------------------------
for dtype in f32 bf16; do
    if run "bench-$dtype" "$mmrun" bench --device cuda:0 --dtype "$dtype" --json; then
        json="$(grep -E '^\{' "$out/bench-$dtype.log" | tail -n 1)"
        printf '%s\n' "$json" >"$out/bench-$dtype.json"
        # One key=value per numeric field of the bench JSON (top level and one level down).
        figures="$(python3 -c '
import json, sys
d = json.loads(sys.argv[1])
def flat(p, v):
    if isinstance(v, dict):
        for k, x in v.items():
            yield from flat(f"{p}.{k}" if p else k, x)
    elif isinstance(v, (int, float)) and not isinstance(v, bool):
        yield f"{p}={v:g}"
print(" ".join(flat("", d)))
' "$json" 2>/dev/null || echo "json=$out/bench-$dtype.json")"
        report "bench-$dtype" ok "$secs" "$figures"
    else
        report "bench-$dtype" fail "$secs" "log=$out/bench-$dtype.log"
    fi
done

# The last `"loss"` value a stage logged to a run's metrics.jsonl.
last_loss() {
    python3 -c '
import json, sys
loss = None
for line in open(sys.argv[1]):
    m = json.loads(line)
    if m.get("stage") == sys.argv[2] and "loss" in m:
        loss = m["loss"]
print(loss)
' "$1" "$2" 2>/dev/null || echo unknown
}

# --- 3. the quickstart on cuda:0 -------------------------------------------------------------
qs_runs="$work/qs-runs"
if run quickstart "$mmrun" --home "$work/qs-home" --runs-dir "$qs_runs" recipes/quickstart.toml \
    --set 'recipe.device="cuda:0"'; then
    metrics="$(find "$qs_runs" -name metrics.jsonl | head -n 1)"
    report quickstart ok "$secs" "pretrain_last_loss=$(last_loss "$metrics" base)" \
        "sft_last_loss=$(last_loss "$metrics" sft)" "log=$out/quickstart.log"
else
    report quickstart fail "$secs" "log=$out/quickstart.log"
fi

# --- 4. two ranks on two GPUs against one rank with the same global batch --------------------
if ((gpus >= 2)); then
    cat >"$work/dp.toml" <<'TOML'
[recipe]
name = "gpu-dp"
seed = 5
device = "cuda:0"
precision = "f32"

[model]
preset = "tiny"

[datasets.text]
source = "builtin:arithmetic"
format = "text"
builtin = { count = 2000, seed = 1, max_operand = 12 }

[stages.tok]
kind = "tokenizer"
data = ["text"]
vocab_size = 400

[stages.base]
kind = "pretrain"
tokenizer = "tok"
data = "text"
max_seq_len = 64
batch_size = 16
world_size = 2
max_steps = 50
lr = 2e-3
TOML
    # shellcheck disable=SC2317  # called through `run`
    dp() { # dp NAME WORLD BATCH: ranks cuda:0.. of BATCH rows each
        "$mmrun" --home "$work/dp-home" --runs-dir "$work/dp-runs-$1" "$work/dp.toml" \
            --set "stages.base.world_size=$2" --set "stages.base.batch_size=$3"
    }
    if run dp-2-ranks dp two 2 16; then
        t2=$secs
        if run dp-1-rank dp one 1 32; then
            two="$(last_loss "$(find "$work/dp-runs-two" -name metrics.jsonl | head -n 1)" base)"
            one="$(last_loss "$(find "$work/dp-runs-one" -name metrics.jsonl | head -n 1)" base)"
            collective=nccl
            if grep -qF "built without the \`nccl\` feature" "$out/dp-2-ranks.log"; then collective=tcp; fi
            report data-parallel ok "$t2" "ranks=2" "collective=$collective" "last_loss_2x16=$two" \
                "last_loss_1x32=$one" "seconds_1x32=$secs"
        else
            report data-parallel fail "$secs" "log=$out/dp-1-rank.log"
        fi
    else
        report data-parallel fail "$secs" "log=$out/dp-2-ranks.log"
    fi
else
    report data-parallel skip 0 reason=fewer-than-2-gpus
fi

# --- 5. the test suite with the same features ------------------------------------------------
read -r -a test_args <<<"${MMRUN_GPU_TEST_ARGS:-}"
if run tests timeout "${MMRUN_GPU_TEST_SECS:-420}" cargo test --release --features "$features" "${test_args[@]}"; then
    passed="$(grep -Eo '[0-9]+ passed' "$out/tests.log" | awk '{s += $1} END {print s + 0}')"
    report tests ok "$secs" "passed=$passed" "features=$features"
else
    rc=$?
    passed="$(grep -Eo '[0-9]+ passed' "$out/tests.log" | awk '{s += $1} END {print s + 0}')"
    failed="$(grep -Eo '[0-9]+ failed' "$out/tests.log" | awk '{s += $1} END {print s + 0}')"
    report tests fail "$secs" "passed=$passed" "failed=$failed" "timed_out=$([[ $rc == 124 ]] && echo yes || echo no)" \
        "log=$out/tests.log"
fi

exit "$first_failure"

#!/usr/bin/env bash
# Type-check mmrun's CUDA build (`cargo check --features nccl`, i.e. CUDA plus the NCCL collective)
# on a machine with no GPU and no system CUDA toolkit.
#
# candle-kernels' build script compiles its .cu kernels with nvcc even for `cargo check`, so nvcc
# must exist; NVIDIA ships it (and the headers it needs) as PyPI wheels. This script puts them in
# a virtualenv outside the repository (idempotent: an existing venv with a working nvcc is reused),
# puts that nvcc on PATH, and runs the check. Nothing is linked, so no libcuda / GPU is needed.
#
# Environment (all optional):
#   MMRUN_CUDA_VENV      venv location            (default: <repo>/../cudaenv)
#   CUDARC_CUDA_VERSION  CUDA API cudarc binds to (default: 13040; cudarc 0.19 accepts 11040..13040)
#   CUDA_COMPUTE_CAP     kernels' target arch     (default: 90, i.e. H100)
#   MMRUN_CUDA_PIP_SPEC  version of the nvcc/runtime/crt/nvvm wheels (default: "==13.4.*", matching
#                        CUDARC_CUDA_VERSION; CCCL is versioned on its own and takes any 13.x)
#   CARGO_TARGET_DIR     as usual; extra args are passed to cargo check (e.g. --all-targets)
#
# Not part of .ci/run: CI may have no PyPI access. Run it by hand after touching cfg(cuda) code.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${MMRUN_CUDA_VENV:-$repo/../cudaenv}"
spec="${MMRUN_CUDA_PIP_SPEC:-==13.4.*}"
export CUDARC_CUDA_VERSION="${CUDARC_CUDA_VERSION:-13040}"
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"

find_nvcc() {
    # An absent venv is not an error here (pipefail would make it one): it means "install".
    [[ -d "$venv" ]] || return 0
    find "$venv" -path '*/nvidia/*' -name nvcc -type f -perm -u+x 2>/dev/null | head -n 1 || true
}

nvcc="$(find_nvcc)"
if [[ -z "$nvcc" ]]; then
    echo "check-cuda: installing nvcc from PyPI into $venv" >&2
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --upgrade pip
    # nvcc itself, the CUDA runtime headers, the crt headers, NVVM (cicc, libdevice) and CCCL
    # (libcu++/cub/thrust headers the kernels include).
    "$venv/bin/pip" install --quiet \
        "nvidia-cuda-nvcc$spec" "nvidia-cuda-runtime$spec" "nvidia-cuda-crt$spec" \
        "nvidia-nvvm$spec" "nvidia-cuda-cccl>=13,<14"
    nvcc="$(find_nvcc)"
    [[ -n "$nvcc" ]] || { echo "check-cuda: no nvcc found under $venv after pip install" >&2; exit 1; }
fi

cuda_home="$(dirname "$(dirname "$nvcc")")"
nvcc_bin="$(dirname "$nvcc")"
export PATH="$nvcc_bin:$PATH"
export CUDA_HOME="$cuda_home" CUDA_PATH="$cuda_home"
echo "check-cuda: $("$nvcc" --version | tail -n 1) at $nvcc; CUDARC_CUDA_VERSION=$CUDARC_CUDA_VERSION CUDA_COMPUTE_CAP=$CUDA_COMPUTE_CAP" >&2

cd "$repo"
# `nccl` includes `cuda`: one check covers both (libnccl is only needed to link, not to check).
exec cargo check --features nccl "$@"

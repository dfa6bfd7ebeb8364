#!/usr/bin/env bash
# Wheels an offline GPU image lacks, to carry there (run this on a machine with a network and pip):
#
#   scripts/gpu_wheels.sh DIR                   # DeepSpeed 0.19.8 + its dependencies, for CPython 3.12 x86_64
#   scripts/gpu_wheels.sh DIR --deepspeed 0.19.8 --python-version 3.12 --platform manylinux_2_28_aarch64
#
# then, on the GPU machine (which keeps its own torch, numpy and CUDA):
#
#   python3 -m pip install --no-index --find-links DIR deepspeed
#
# DIR gets (1) a DeepSpeed wheel built from its source with DS_BUILD_OPS=0: pure Python, its CUDA ops
# are compiled just in time on first use if ever (evertrain uses none of them), and (2) DeepSpeed's
# dependencies as wheels for the target interpreter and platform, not this one's (pip download
# --only-binary=:all: --python-version/--platform: some, like pydantic-core and msgpack, are compiled).
# torch and numpy are left out: the image has them, and pip must not replace its CUDA torch.
# Building DeepSpeed's wheel imports torch: run this with a python that has torch (any build).
# PIP overrides the pip command (default: "pip" on PATH, else "python3 -m pip").
set -euo pipefail

usage() {
    echo "usage: scripts/gpu_wheels.sh DIR [--deepspeed VERSION] [--python-version X.Y] [--platform TAG]" >&2
    exit 2
}

dir=""
deepspeed_version="0.19.8"
python_version="3.12"
platforms=()
while [[ $# -gt 0 ]]; do
    case "$1" in
        --deepspeed) [[ $# -ge 2 ]] || usage; deepspeed_version="$2"; shift 2 ;;
        --python-version) [[ $# -ge 2 ]] || usage; python_version="$2"; shift 2 ;;
        --platform) [[ $# -ge 2 ]] || usage; platforms+=("$2"); shift 2 ;;
        -h|--help) usage ;;
        -*) echo "gpu_wheels.sh: unknown option $1" >&2; usage ;;
        *) [[ -z "$dir" ]] || { echo "gpu_wheels.sh: one DIR only (got $dir and $1)" >&2; usage; }; dir="$1"; shift ;;
    esac
done
[[ -n "$dir" ]] || usage
if ! [[ "$python_version" =~ ^3\.[0-9]+$ ]]; then
    echo "gpu_wheels.sh: --python-version must look like 3.12, got $python_version" >&2
    exit 2
fi
if [[ ${#platforms[@]} -eq 0 ]]; then
    # manylinux_2_28 and 2014 (= 2_17) cover what current wheels are tagged with on x86_64
    platforms=(manylinux_2_28_x86_64 manylinux2014_x86_64)
fi
if [[ -n "${PIP:-}" ]]; then
    read -r -a pip <<< "$PIP"
elif command -v pip > /dev/null; then
    pip=(pip)
else
    pip=(python3 -m pip)
fi
abi="cp${python_version/./}"
mkdir -p "$dir"

# DeepSpeed's own dependencies (its setup.py requirements), less torch and numpy. pip resolves their
# dependencies in turn (pydantic pins its pydantic-core), none of which needs torch.
deps=(einops hjson msgpack ninja packaging psutil py-cpuinfo "pydantic>=2.0.0" tqdm)

echo "gpu_wheels.sh: building deepspeed==$deepspeed_version (DS_BUILD_OPS=0) into $dir"
DS_BUILD_OPS=0 "${pip[@]}" wheel --no-deps --no-build-isolation --no-binary deepspeed -w "$dir" \
    "deepspeed==$deepspeed_version"

echo "gpu_wheels.sh: downloading its dependencies for CPython $python_version (${platforms[*]}) into $dir"
platform_args=()
for p in "${platforms[@]}"; do
    platform_args+=(--platform "$p")
done
"${pip[@]}" download --only-binary=:all: --python-version "$python_version" --implementation cp --abi "$abi" \
    "${platform_args[@]}" -d "$dir" "${deps[@]}"

shopt -s nullglob
wheels=("$dir"/deepspeed-"$deepspeed_version"-*.whl)
if [[ ${#wheels[@]} -eq 0 ]]; then
    echo "gpu_wheels.sh: no deepspeed-$deepspeed_version wheel in $dir after the build" >&2
    exit 1
fi
echo "gpu_wheels.sh: $(ls "$dir" | wc -l) files in $dir; on the GPU machine:"
echo "  python3 -m pip install --no-index --find-links $dir deepspeed"

#!/usr/bin/env bash
# Build mamba-ssm and causal-conv1d wheels from their source distributions for THIS machine's GPU
# architecture only. Their setup.py files compile every architecture from sm_75 to sm_121, which is
# what makes user builds take hours; for one architecture it is minutes (H100, 16 cores: ~2.5 min
# for mamba-ssm, ~7 min for causal-conv1d, both in parallel).
#
# Usage:
#   bash scripts/build_kernels.sh [--sdist-dir DIR] [--out DIR] [--arch 90] [--jobs N] [--install]
#   bash scripts/build_kernels.sh --fetch [--python-version 3.12] [--wheel SPEC ...]   (where there is internet)
# Offline: put mamba_ssm-*.tar.gz and causal_conv1d-*.tar.gz into --sdist-dir (default .sdist/).
# Online, missing sdists are downloaded first (pip download --no-binary). Needs torch with CUDA, nvcc,
# ninja, packaging and einops in the current python; the wheels match that torch.
# --fetch (no GPU needed; the current python needs torch and setuptools, as the project's .venv has) downloads
# what an offline GPU machine lacks: the two sdists into --sdist-dir, and into --out the wheels, for that
# machine's Python (--python-version, default this python's; x86-64 Linux), of adamba's own dependencies that
# CUDA images usually lack (rustbpe) and of setuptools + wheel for `pip install -e .` without an index. Give
# --wheel SPEC for any other package pip there says is missing. Then, there:
#   bash scripts/build_kernels.sh --install && python3 -m pip install --no-index --find-links .whl -e .
# (--install installs the kernel wheels without their dependencies: mamba-ssm 2.3.2 also asks for tilelang,
# apache-tvm-ffi and quack-kernels, which only its Mamba-3 uses and imports optionally; pip's resolver,
# e.g. `pip install .[gpu]`, would want them too.)
set -euo pipefail

SDIST_DIR=.sdist
OUT_DIR=.whl
ARCH=""
JOBS=$(nproc)
INSTALL=0
FETCH=0
PY_VERSION=""
EXTRA_WHEELS=()
# what an offline GPU machine needs beyond a CUDA PyTorch image: adamba's dependencies such images lack, and the
# build backend for the editable install (pip's isolated build installs setuptools>=64 from --find-links)
FETCH_WHEELS=("rustbpe>=0.1" "setuptools>=64" "wheel")
PY=${PYTHON:-python3}
MAMBA_VERSION=2.3.2.post1
CONV_VERSION=1.7.0
while [ $# -gt 0 ]; do
  case "$1" in
    --sdist-dir) SDIST_DIR=$2; shift 2 ;;
    --out) OUT_DIR=$2; shift 2 ;;
    --arch) ARCH=$2; shift 2 ;;
    --jobs) JOBS=$2; shift 2 ;;
    --install) INSTALL=1; shift ;;
    --fetch) FETCH=1; shift ;;
    --python-version) PY_VERSION=$2; shift 2 ;;
    --wheel) EXTRA_WHEELS+=("$2"); shift 2 ;;
    -h|--help) sed -n '2,/^set /{/^#/p}' "$0"; exit 0 ;;
    *) echo "unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done

download_sdists() {
  for spec in "mamba_ssm-${MAMBA_VERSION}:mamba-ssm==${MAMBA_VERSION}" "causal_conv1d-${CONV_VERSION}:causal-conv1d==${CONV_VERSION}"; do
    name=${spec%%:*}; req=${spec#*:}
    if [ ! -f "$SDIST_DIR/$name.tar.gz" ]; then
      echo "no $SDIST_DIR/$name.tar.gz; downloading $req"
      # metadata is prepared without build isolation (the isolated build would download torch): MAMBA_SKIP_CUDA_BUILD
      # and CAUSAL_CONV1D_SKIP_CUDA_BUILD keep it to metadata
      MAMBA_SKIP_CUDA_BUILD=TRUE CAUSAL_CONV1D_SKIP_CUDA_BUILD=TRUE \
        $PY -m pip download --no-deps --no-build-isolation --no-binary=:all: "$req" -d "$SDIST_DIR" \
        || { echo "download failed: place $name.tar.gz in $SDIST_DIR (offline machines: see --fetch)" >&2; exit 1; }
    fi
  done
}

if [ $FETCH -eq 1 ]; then
  mkdir -p "$SDIST_DIR" "$OUT_DIR"
  download_sdists
  [ -n "$PY_VERSION" ] || PY_VERSION=$($PY -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
  echo "wheels for CPython $PY_VERSION on x86-64 Linux into $OUT_DIR: ${FETCH_WHEELS[*]} ${EXTRA_WHEELS[*]:-}"
  $PY -m pip download --no-deps --only-binary=:all: --python-version "$PY_VERSION" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$OUT_DIR" "${FETCH_WHEELS[@]}" ${EXTRA_WHEELS[@]+"${EXTRA_WHEELS[@]}"}
  ls -la "$SDIST_DIR" "$OUT_DIR"
  echo "carry $SDIST_DIR and $OUT_DIR to the GPU machine, then there: bash scripts/build_kernels.sh --install && python3 -m pip install --no-index --find-links $OUT_DIR -e ."
  exit 0
fi

if [ -z "$ARCH" ]; then
  ARCH=$($PY -c 'import torch; assert torch.cuda.is_available(), "no CUDA GPU visible to torch"; a, b = torch.cuda.get_device_capability(); print(f"{a}{b}")') \
    || { echo "could not detect the GPU architecture; pass --arch (e.g. 90 for H100/H200)" >&2; exit 1; }
fi
echo "building for sm_${ARCH} with ${JOBS} jobs"

export MAMBA_FORCE_BUILD=TRUE CAUSAL_CONV1D_FORCE_BUILD=TRUE
mkdir -p "$SDIST_DIR" "$OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
download_sdists
export MAMBA_SKIP_CUDA_BUILD=FALSE CAUSAL_CONV1D_SKIP_CUDA_BUILD=FALSE

WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

# Keep only the -gencode pair for our architecture in setup.py (TORCH_CUDA_ARCH_LIST is ignored there).
trim_gencode() {
  $PY - "$1" "$ARCH" <<'EOF'
import re, sys
path, arch = sys.argv[1], sys.argv[2]
src = open(path).read()
pair = re.compile(r'(?P<i>[ \t]*)cc_flag\.append\("-gencode"\)\n[ \t]*cc_flag\.append\("arch=compute_(?P<a>\d+),code=sm_\d+"\)\n')
kept = []
def repl(m):
    if m.group("a") == arch and not kept:
        kept.append(arch)
        return m.group(0)
    return f'{m.group("i")}pass\n{m.group("i")}pass\n'
out = pair.sub(repl, src)
if not kept:  # an architecture setup.py does not list: add it right after the list starts
    out = re.sub(r'(\n([ \t]*)cc_flag = \[\]\n)', lambda m: m.group(1) + f'{m.group(2)}cc_flag += ["-gencode", "arch=compute_{arch},code=sm_{arch}"]\n', out, count=1)
if out == src:
    sys.exit(f"could not find the -gencode list in {path}; the sdist layout changed")
open(path, "w").write(out)
print(f"{path}: -gencode trimmed to sm_{arch}")
EOF
}

build_one() {
  local tarball=$1 log=$2
  tar -xzf "$tarball" -C "$WORK"
  local dir="$WORK/$(basename "$tarball" .tar.gz)"
  trim_gencode "$dir/setup.py"
  (cd "$dir" && MAX_JOBS=$3 $PY -m pip wheel --no-index --no-deps --no-build-isolation -w "$OUT_DIR" . ) > "$log" 2>&1
}

start=$(date +%s)
half=$(( JOBS / 2 > 0 ? JOBS / 2 : 1 ))
build_one "$SDIST_DIR/causal_conv1d-${CONV_VERSION}.tar.gz" "$OUT_DIR/causal_conv1d.build.log" "$half" & p1=$!
build_one "$SDIST_DIR/mamba_ssm-${MAMBA_VERSION}.tar.gz" "$OUT_DIR/mamba_ssm.build.log" "$half" & p2=$!
status=0
wait $p1 || { echo "causal-conv1d build failed; see $OUT_DIR/causal_conv1d.build.log" >&2; tail -30 "$OUT_DIR/causal_conv1d.build.log" >&2; status=1; }
wait $p2 || { echo "mamba-ssm build failed; see $OUT_DIR/mamba_ssm.build.log" >&2; tail -30 "$OUT_DIR/mamba_ssm.build.log" >&2; status=1; }
echo "build took $(( $(date +%s) - start )) s"
ls -la "$OUT_DIR"/*.whl 2>/dev/null || true
[ $status -eq 0 ] || exit $status
if [ $INSTALL -eq 1 ]; then
  $PY -m pip install --no-index --no-deps "$OUT_DIR"/causal_conv1d-*.whl "$OUT_DIR"/mamba_ssm-*.whl
fi

#!/usr/bin/env bash
# Build mamba-ssm and causal-conv1d wheels from their source distributions for THIS machine's GPU
# architecture only. Their setup.py files compile every architecture from sm_75 to sm_121, which is
# what makes user builds take hours; for one architecture it is minutes (H100, 16 cores: ~2.5 min
# for mamba-ssm, ~7 min for causal-conv1d, both in parallel).
#
# Usage:
#   bash scripts/build_kernels.sh [--sdist-dir DIR] [--out DIR] [--arch 90] [--jobs N] [--install]
# Offline: put mamba_ssm-*.tar.gz and causal_conv1d-*.tar.gz into --sdist-dir (default .sdist/).
# Online, missing sdists are downloaded first (pip download --no-binary). Needs torch with CUDA, nvcc,
# ninja, packaging and einops in the current python; the wheels match that torch.
set -euo pipefail

SDIST_DIR=.sdist
OUT_DIR=.whl
ARCH=""
JOBS=$(nproc)
INSTALL=0
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
    -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
    *) echo "unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done

if [ -z "$ARCH" ]; then
  ARCH=$($PY -c 'import torch; assert torch.cuda.is_available(), "no CUDA GPU visible to torch"; a, b = torch.cuda.get_device_capability(); print(f"{a}{b}")') \
    || { echo "could not detect the GPU architecture; pass --arch (e.g. 90 for H100/H200)" >&2; exit 1; }
fi
echo "building for sm_${ARCH} with ${JOBS} jobs"

export MAMBA_SKIP_CUDA_BUILD=TRUE CAUSAL_CONV1D_SKIP_CUDA_BUILD=TRUE MAMBA_FORCE_BUILD=TRUE CAUSAL_CONV1D_FORCE_BUILD=TRUE
mkdir -p "$SDIST_DIR" "$OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
for spec in "mamba_ssm-${MAMBA_VERSION}:mamba-ssm==${MAMBA_VERSION}" "causal_conv1d-${CONV_VERSION}:causal-conv1d==${CONV_VERSION}"; do
  name=${spec%%:*}; req=${spec#*:}
  if [ ! -f "$SDIST_DIR/$name.tar.gz" ]; then
    echo "no $SDIST_DIR/$name.tar.gz; downloading $req"
    $PY -m pip download --no-deps --no-build-isolation --no-binary=:all: "$req" -d "$SDIST_DIR" \
      || { echo "download failed: place $name.tar.gz in $SDIST_DIR (offline machines)" >&2; exit 1; }
  fi
done
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

#!/usr/bin/env bash
# Issue #29's GPU measurements in stages that each fit one device call of 10 minutes (an H100 or H200, one GPU):
#
#   bash runs/decode_gpu.sh check        # CUDA tests of the split-key decode attention (nanochat/decode_attention.py),
#                                        # the decode matvec kernel (nanochat/decode_matvec.py) and of the engine's
#                                        # graph / compiled steps and speculation with them (~5 min)
#   bash runs/decode_gpu.sh compiled     # CUDA tests of speculation through compiled segments (inductor; each case
#                                        # compiles for 35-95 s): exit drafts (rounds queued ahead) first, then plan
#                                        # drafts (~8 min)
#   bash runs/decode_gpu.sh matvec       # the matvec kernel against cuBLAS and inductor at the d20 hybrid's shapes,
#                                        # with a sweep of its configs (~3 min)
#   bash runs/decode_gpu.sh think        # tuned think at d20, bf16, 1K and 8K context, attention path reduce (the
#                                        # default), torch and triton (the kernel); with --profile: ms/token, MBU,
#                                        # where the step goes
#   bash runs/decode_gpu.sh speculate    # tuned speculation (exit:10, k = 4) at 1K with --profile: x think, draft and
#                                        # verify ms, one round's kernels, then the d20 hybrid's host time a token
#                                        # and a round with the graphs taken out (~7 min); ATTN=reduce|torch|triton
#                                        # (default reduce) and MATVEC=torch|triton (default torch): the defaults
#                                        # are the library's, the kernels opt-in (measured slower, session 26)
#   bash runs/decode_gpu.sh head         # tuned think at d20, 1K, the readout's product through cuBLAS (--head-path
#                                        # cublas) against inductor's fused readout, profiled, then tuned speculation
#                                        # (exit:10, k = 4) with it (~8 min)
#   bash runs/decode_gpu.sh mamba        # the two-kernel Mamba-1 decode position (nanochat/decode_mamba.py): its CUDA
#                                        # tests, then tuned think at d20, 1K with it and without, profiled (~6 min)
#   bash runs/decode_gpu.sh prefetch     # an experiment for the bandwidth goal: a skeleton of the d20 step (its matrices
#                                        # in order, small kernels between) with each group's weights prefetched into
#                                        # L2 ahead of its products, against none (scripts/bench_prefetch.py; ~1 min)
#   bash runs/decode_gpu.sh tiny         # the tiny chat checkpoint: think against exit:5 and ghost drafts, k = 1..3,
#                                        # with the fallback, CUDA graphs (CKPT=<chat_final dir> DATA=<its data dir>);
#                                        # then the same decodes' host time with the graphs taken out (bench host)
#
# Add --dry-run to print the commands without running them (tests/test_decode_gpu.py checks them against the bench's
# own argument parser). The bench's tables go to stdout; record them in docs/benchmarks.md with the device, date,
# commit and command. The GPU image lacks rustbpe: put its wheel in .whl/ (pip download rustbpe, carried in).
# Inductor's cache stays in its default place (/tmp/torchinductor_$USER), outside the working tree, so that stages run
# one after another on one machine reuse each other's compiles (a device call replaces or removes the tree's ignored
# paths).
set -euo pipefail
cd "$(dirname "$0")/.."

STAGE="${1:-}"
DRY_RUN=0
[ "${2:-}" = "--dry-run" ] && DRY_RUN=1
[ "${2:-}" != "" ] && [ "${2:-}" != "--dry-run" ] && { echo "unknown argument ${2} (use --dry-run or none)" >&2; exit 2; }
PY="${PY:-python}"
ATTN="${ATTN:-reduce}"
MATVEC="${MATVEC:-torch}"
case "$ATTN" in reduce|torch|triton) ;; *) echo "ATTN=$ATTN: use reduce, torch or triton" >&2; exit 2 ;; esac
case "$MATVEC" in torch|triton) ;; *) echo "MATVEC=$MATVEC: use torch or triton" >&2; exit 2 ;; esac

run() {  # print the command (quoted to be pasted), run it unless --dry-run
    printf '+'; printf ' %q' "$@"; echo
    [ "$DRY_RUN" = 1 ] || "$@"
}

case "$STAGE" in
    check|compiled|matvec|think|speculate|head|mamba|prefetch|tiny) ;;
    *) echo "usage: bash runs/decode_gpu.sh check|compiled|matvec|think|speculate|head|mamba|prefetch|tiny [--dry-run]" >&2; exit 2 ;;
esac
if [ "$DRY_RUN" = 0 ] && [ -d .whl ] && ! "$PY" -c "import rustbpe" 2>/dev/null; then
    "$PY" -m pip install -q --no-index --find-links .whl rustbpe
fi

D20=(--models hybrid --depth 20 --weights bf16 --modes think --decode-tokens 32 --engine-decode tuned)
case "$STAGE" in
    check)
        run env ADAMBA_DECODE_ATTENTION=triton ADAMBA_DECODE_MATVEC=triton "$PY" -m pytest -p no:cacheprovider \
            tests/test_decode_attention.py tests/test_decode_matvec.py tests/test_engine_static.py tests/test_speculative.py \
            -k "on_cuda or (test_graph_speculation_equals_eager_on_cuda and not compiled)"
        ;;
    compiled)
        for draft in exit plan; do
            run "$PY" -m pytest -p no:cacheprovider tests/test_speculative.py \
                -k "test_graph_speculation_equals_eager_on_cuda and compiled and $draft"
        done
        ;;
    matvec)
        run "$PY" -m scripts.bench matvec --sweep
        ;;
    think)
        for paths in "reduce torch" "torch torch" "triton torch"; do
            set -- $paths
            run "$PY" -m scripts.bench --profile decode "${D20[@]}" --contexts 1024,8192 --attention-path "$1" \
                --matvec-path "$2"
        done
        ;;
    speculate)
        run "$PY" -m scripts.bench --profile decode "${D20[@]}" --contexts 1024 --speculate 4 --speculate-from 4 \
            --draft exit:10 --attention-path "$ATTN" --matvec-path "$MATVEC"
        run "$PY" -m scripts.bench host --depth 20 --n-embd 1280 --vocab-size 65536 --speculate 4 --draft exit:10
        ;;
    head)
        for head in cublas torch; do
            run "$PY" -m scripts.bench --profile decode "${D20[@]}" --contexts 1024 --head-path "$head"
        done
        run "$PY" -m scripts.bench decode "${D20[@]}" --contexts 1024 --speculate 4 --speculate-from 4 --draft exit:10 \
            --head-path cublas
        ;;
    mamba)
        run "$PY" -m pytest -p no:cacheprovider tests/test_decode_mamba.py -k cuda
        for path in triton torch; do
            run "$PY" -m scripts.bench --profile decode "${D20[@]}" --contexts 1024 --mamba-step-path "$path"
        done
        ;;
    prefetch)
        run "$PY" -m scripts.bench prefetch
        ;;
    tiny)
        : "${CKPT:?set CKPT to the chat_final directory of the tiny pipeline}" "${DATA:?set DATA to its data directory}"
        run env ADAMBA_DECODE_ATTENTION="$ATTN" ADAMBA_DECODE_MATVEC="$MATVEC" "$PY" -m scripts.bench adaptive --checkpoint "$CKPT" --data-dir "$DATA" \
            --rows 16 --prompt-len 12 --decode-tokens 20 --modes think --engine-decode graph --speculate 3 \
            --draft "exit:5;ghost"
        run "$PY" -m scripts.bench host --checkpoint "$CKPT" --tokens 20 --speculate 3 --draft "exit:5;plan:ghost"
        ;;
esac

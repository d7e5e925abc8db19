#!/usr/bin/env bash
# Multi-GPU runs of scripts.fractal_train on one node, on random weights and the synthetic corpus. They check
# agreement and measure throughput; nothing here trains a useful model.
#
#   bash runs/multigpu.sh agree   # phase 2 on a small hybrid, 50 steps at one global batch: 1 GPU, 2-GPU DDP,
#                                 # 2-GPU FSDP2, a repeat of the 1-GPU run (the bf16 noise floor), and the
#                                 # 2-GPU checkpoints of step 25 resumed on 1 GPU
#   bash runs/multigpu.sh agree-moe  # the same on a hybrid whose Mamba blocks have MoE FFNs: 1 GPU, its repeat,
#                                 # 2-GPU DDP (experts replicated), 2-GPU --expert-parallel, and the expert-parallel
#                                 # checkpoint of step 25 resumed on 1 GPU
#   bash runs/multigpu.sh scale   # speedrun stages 1 and 2 at nanochat-d32 shapes for a few steps on 1, 2, 4, 8
#                                 # GPUs (up to NGPU; one micro-batch per GPU): tok/s per GPU, MFU, peak memory,
#                                 # scaling efficiency = per-GPU tok/s at N GPUs / at 1 GPU
#
# Each prints a table and writes $WORK/<mode>/summary.json. Runs that fit side by side on disjoint GPUs run
# at the same time (the 1-GPU and 2-GPU runs, say); no GPU is shared by two runs.
# Settings (environment):
#   TOKENIZER_DIR  a tokenizer.pkl (+ token_bytes.pt) directory; its vocab size is the models' (required: use
#                  one of 65,536 ids, nanochat's, to get nanochat-d32's exact shapes in `scale`)
#   WORK           scratch directory (default /tmp/adamba_multigpu); checkpoints of `scale` take about 30 GB
#   NGPU           GPUs to use (default: all that torch sees)
#   STEPS_AGREE=50 SEQ_AGREE=1024 DBS_AGREE=8 DEPTH_AGREE=12 EXPERTS_AGREE=8 (agree-moe)
#   STEPS_SCALE=6 DEPTH_SCALE=32 SEQ_SCALE=2048 DBS1=4 DBS2=2 PARALLEL_SCALE=fsdp (runs on more than one GPU; 1 GPU is plain)
#   SIZES_SCALE=1,2,4,8 (those up to NGPU)  PHASES_SCALE=1,2  EXTRA_SCALE="" (more fractal_train flags for the runs
#                  on more than one GPU, e.g. --fsdp-keep-params)  SCALE_DIR=scale (the output directory under WORK)
#   PREPARE_ONLY=1 scale: make the hybrid checkpoint and stop (to overlap it with other work)
#   DEVICE=cpu     a smoke test of this script on CPU processes (gloo); NGPU then counts processes
set -euo pipefail
cd "$(dirname "$0")/.."

MODE=${1:-}
case "$MODE" in
  agree|agree-moe|scale) ;;
  -h|--help) sed -n '2,27p' "$0"; exit 0 ;;
  *) echo "usage: bash runs/multigpu.sh agree|agree-moe|scale (see --help)" >&2; exit 2 ;;
esac
PY=${PYTHON:-python3}
TOKENIZER_DIR=${TOKENIZER_DIR:-}
[ -f "$TOKENIZER_DIR/tokenizer.pkl" ] || { echo "set TOKENIZER_DIR to a directory with a tokenizer.pkl (now: '$TOKENIZER_DIR')" >&2; exit 2; }
WORK=${WORK:-/tmp/adamba_multigpu}
NGPU=${NGPU:-}
if [ -z "$NGPU" ]; then NGPU=$($PY -c "import torch; print(torch.cuda.device_count())"); fi
DEVICE_ARGS=(); [ -n "${DEVICE:-}" ] && DEVICE_ARGS=(--device="$DEVICE")
[ "$NGPU" -ge 2 ] || { echo "multigpu.sh needs at least 2 GPUs, this machine has $NGPU" >&2; exit 2; }
VOCAB=$($PY -c "from nanochat.tokenizer import Tokenizer; print(Tokenizer.from_directory('$TOKENIZER_DIR').get_vocab_size())")
export NANOCHAT_BASE_DIR=$WORK/base PYTHONUNBUFFERED=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}
DATA=$WORK/data
mkdir -p "$WORK"
echo "== multigpu $MODE: $NGPU GPUs, vocab $VOCAB, work dir $WORK"

if ! compgen -G "$DATA/*.parquet" > /dev/null; then
  $PY -m nanochat.dataset --synthetic --data-dir "$DATA" --num-shards 8 --docs-per-shard 6000
fi

make_hybrid() {  # depth dst surgery-args...: a random nanochat GPT of nanochat's depth rule -> scripts.surgery
  local depth=$1 dst=$2; shift 2
  if compgen -G "$dst/meta_*.json" > /dev/null; then echo "== hybrid $dst exists"; return; fi
  local src=$WORK/src_d$depth
  if ! compgen -G "$src/meta_*.json" > /dev/null; then
    local dev=${DEVICE:-}
    if [ -z "$dev" ]; then dev=$($PY -c "import torch; print('cuda' if torch.cuda.is_available() else 'cpu')"); fi
    $PY -c "from scripts.surgery import write_synthetic_nanochat as w; w('$src', $depth, vocab_size=$VOCAB, device='$dev')"
    cp "$TOKENIZER_DIR/tokenizer.pkl" "$src/"
    [ -f "$TOKENIZER_DIR/token_bytes.pt" ] && cp "$TOKENIZER_DIR/token_bytes.pt" "$src/"
  fi
  local t0=$SECONDS
  $PY -m scripts.surgery --src "$src" --dst "$dst" --new-dim $((64 * depth)) --adaptive "$@"
  echo "== surgery d$depth: $((SECONDS - t0)) s"
}

launch() {  # gpus(comma list) log args...: 1 GPU = a plain process, more = torchrun; in the background
  local gpus=$1 log=$2; shift 2
  local n; n=$(echo "$gpus" | tr ',' '\n' | wc -l)
  echo "+ [GPUs $gpus] fractal_train $* > $log"
  if [ "$n" = 1 ]; then
    CUDA_VISIBLE_DEVICES=$gpus $PY -m scripts.fractal_train "$@" "${DEVICE_ARGS[@]}" > "$log" 2>&1 &
  else
    CUDA_VISIBLE_DEVICES=$gpus torchrun --standalone --nproc_per_node="$n" -m scripts.fractal_train "$@" "${DEVICE_ARGS[@]}" \
      > "$log" 2>&1 &
  fi
}

wait_all() {  # wait for the background runs; a failed one prints its log tail and stops the script
  local failed=0
  for pid in $(jobs -p); do wait "$pid" || failed=1; done
  if [ "$failed" = 1 ]; then
    for f in "$@"; do grep -q "training time" "$f" || { echo "== FAILED: $f"; tail -30 "$f"; }; done
    exit 1
  fi
}

gpus() {  # first:count -> comma list of GPU ids
  seq -s, "$1" $(($1 + $2 - 1))
}

copy_step() {  # src_dir step dst_dir: one checkpoint step (model, meta, optimizer) and the tokenizer
  mkdir -p "$3"
  cp "$1"/*"_$(printf %06d "$2")"* "$1"/tokenizer.pkl "$3"/
  [ -f "$1/token_bytes.pt" ] && cp "$1/token_bytes.pt" "$3"/ || true
}

if [ "$MODE" = agree ]; then
  D=${DEPTH_AGREE:-12} STEPS=${STEPS_AGREE:-50} T=${SEQ_AGREE:-1024} DBS=${DBS_AGREE:-8}
  A=$WORK/agree
  rm -rf "$A"; mkdir -p "$A"
  HYB=$WORK/hybrid_d${D}
  make_hybrid "$D" "$HYB" --exit-stride 4
  COMMON=(--phase=2 --checkpoint="$HYB" --data-dir="$DATA" --max-seq-len="$T" --device-batch-size="$DBS" --data-ranks=2
          --total-batch-size=$((2 * DBS * T)) --num-iterations="$STEPS" --eval-every=-1 --save-every=$((STEPS / 2)))
  HALF=$((STEPS / 2))
  if [ "$NGPU" -ge 4 ]; then
    launch 0 "$A/one.log" "${COMMON[@]}" --out-dir="$A/one"
    launch 1,2 "$A/ddp.log" "${COMMON[@]}" --out-dir="$A/ddp" --parallel=ddp
    launch 3 "$A/one_repeat.log" "${COMMON[@]}" --out-dir="$A/one_repeat"
    wait_all "$A"/one.log "$A"/ddp.log "$A"/one_repeat.log
    copy_step "$A/ddp" "$HALF" "$A/ddp_resumed_1gpu"
    launch 0,1 "$A/fsdp.log" "${COMMON[@]}" --out-dir="$A/fsdp" --parallel=fsdp
    launch 2 "$A/ddp_resumed_1gpu.log" "${COMMON[@]}" --out-dir="$A/ddp_resumed_1gpu" --resume
    wait_all "$A"/fsdp.log "$A"/ddp_resumed_1gpu.log
  else
    for run in one ddp one_repeat fsdp; do
      case $run in
        one|one_repeat) launch 0 "$A/$run.log" "${COMMON[@]}" --out-dir="$A/$run" ;;
        *) launch 0,1 "$A/$run.log" "${COMMON[@]}" --out-dir="$A/$run" --parallel=$run ;;
      esac
      wait_all "$A/$run.log"
    done
    copy_step "$A/ddp" "$HALF" "$A/ddp_resumed_1gpu"
    launch 0 "$A/ddp_resumed_1gpu.log" "${COMMON[@]}" --out-dir="$A/ddp_resumed_1gpu" --resume
    wait_all "$A/ddp_resumed_1gpu.log"
  fi
  copy_step "$A/fsdp" "$HALF" "$A/fsdp_resumed_1gpu"
  launch 0 "$A/fsdp_resumed_1gpu.log" "${COMMON[@]}" --out-dir="$A/fsdp_resumed_1gpu" --resume
  wait_all "$A/fsdp_resumed_1gpu.log"
  $PY runs/multigpu_report.py agree "$A"
elif [ "$MODE" = agree-moe ]; then
  D=${DEPTH_AGREE:-12} STEPS=${STEPS_AGREE:-50} T=${SEQ_AGREE:-1024} DBS=${DBS_AGREE:-8}
  A=$WORK/agree_moe
  rm -rf "$A"; mkdir -p "$A"
  HYB=$WORK/hybrid_moe_d${D}
  make_hybrid "$D" "$HYB" --exit-stride 4 --mamba-ffn=moe --num-experts="${EXPERTS_AGREE:-8}"
  COMMON=(--phase=2 --checkpoint="$HYB" --data-dir="$DATA" --max-seq-len="$T" --device-batch-size="$DBS" --data-ranks=2
          --total-batch-size=$((2 * DBS * T)) --num-iterations="$STEPS" --eval-every=-1 --save-every=$((STEPS / 2)))
  HALF=$((STEPS / 2))
  for run in one one_repeat ddp ep; do
    case $run in
      one|one_repeat) launch 0 "$A/$run.log" "${COMMON[@]}" --out-dir="$A/$run" ;;
      ddp) launch 0,1 "$A/$run.log" "${COMMON[@]}" --out-dir="$A/$run" --parallel=ddp ;;
      ep) launch 0,1 "$A/$run.log" "${COMMON[@]}" --out-dir="$A/$run" --parallel=ddp --expert-parallel ;;
    esac
    wait_all "$A/$run.log"
  done
  copy_step "$A/ep" "$HALF" "$A/ep_resumed_1gpu"
  launch 0 "$A/ep_resumed_1gpu.log" "${COMMON[@]}" --out-dir="$A/ep_resumed_1gpu" --resume
  wait_all "$A/ep_resumed_1gpu.log"
  $PY runs/multigpu_report.py agree "$A"
else
  D=${DEPTH_SCALE:-32} STEPS=${STEPS_SCALE:-6} T=${SEQ_SCALE:-2048} PAR=${PARALLEL_SCALE:-fsdp}
  read -r -a EXTRA <<< "${EXTRA_SCALE:-}"
  S=$WORK/${SCALE_DIR:-scale}
  rm -rf "$S"; mkdir -p "$S"
  HYB=$WORK/hybrid_d${D}
  make_hybrid "$D" "$HYB" --exit-stride 8   # runs/speedrun.sh's surgery settings
  if [ -n "${PREPARE_ONLY:-}" ]; then echo "== PREPARE_ONLY: $HYB is ready"; exit 0; fi
  SIZES=()
  for n in $(echo "${SIZES_SCALE:-1,2,4,8}" | tr ',' ' '); do
    if [ "$n" -le "$NGPU" ]; then SIZES+=("$n"); else echo "== skipping $n GPUs: only $NGPU"; fi
  done
  for phase in $(echo "${PHASES_SCALE:-1,2}" | tr ',' ' '); do
    dbs=$([ "$phase" = 1 ] && echo "${DBS1:-4}" || echo "${DBS2:-2}")
    # runs that fit side by side on disjoint GPUs start together (on 4 GPUs: 1 and 2, then 4)
    next=0 logs=()
    for n in "${SIZES[@]}"; do
      if [ $((next + n)) -gt "$NGPU" ]; then wait_all "${logs[@]}"; next=0 logs=(); fi
      par=(); [ "$n" -gt 1 ] && par=(--parallel="$PAR" "${EXTRA[@]}")
      log=$S/p${phase}_n$n.log
      launch "$(gpus "$next" "$n")" "$log" --phase="$phase" --checkpoint="$HYB" --data-dir="$DATA" \
        --max-seq-len="$T" --device-batch-size="$dbs" --total-batch-size=$((dbs * T * n)) --num-iterations="$STEPS" \
        --eval-every=-1 --no-save --out-dir="$S/p${phase}_n$n" "${par[@]}"
      logs+=("$log") next=$((next + n))
    done
    wait_all "${logs[@]}"
  done
  $PY runs/multigpu_report.py scale "$S"
fi

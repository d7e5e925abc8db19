#!/usr/bin/env bash
# The whole Adamba pipeline at d32 scale on one node of 8 GPUs:
#   data      python -m nanochat.dataset --download N           FineWeb-Edu shards (the last one is val)
#   surgery   python -m scripts.surgery --hub karpathy/nanochat-d32 --new-dim=NEW_DIM    nanochat-d32 + tokenizer from the hub
#   phase 1   torchrun -m scripts.fractal_train --phase=1       only the new Mamba blocks train
#   phase 2   torchrun -m scripts.fractal_train --phase=2       all weights, full width + narrow plans (PLAN_SCHEDULE) + distillation, gates, router
#   growth    python -m scripts.surgery --expand-from=NEW_DIM --new-dim=GROW_DIM
#   phase 3   torchrun -m scripts.fractal_train --phase=3       the grown model
#   calibrate python -m scripts.calibrate_gates                  the gates' isotonic maps + auto's operating point (Learn-then-Test), val half
#   eval      python -m scripts.generate, modes think and auto, --show-compute; python -m scripts.bench adaptive:
#             held-out decode loss and tokens/s per mode on the other half of the val split
#   base eval python -m scripts.base_eval                       CORE and val bpb per compute mode
#   tasks     python -m scripts.fetch_tasks                      the SFT mixture and the chat benchmarks from the hub
#   sft       torchrun -m scripts.chat_sft                       conversations, assistant tokens only; widths, gates, router keep training
#   chat cal  python -m scripts.calibrate_gates                  auto's operating point again, for the SFT'd model
#   chat eval torchrun -m scripts.chat_eval                      ARC-E/C, MMLU, GSM8K, HumanEval, SpellingBee per mode, ChatCORE
#   rl        torchrun -m scripts.chat_rl --compute-cost L       GSM8K policy gradient, minus L x the compute fraction
#   rl cal + eval                                                calibrate and chat_eval the RL checkpoint
#   report    $RUN_DIR/report.md: sizes, every phase's final val metrics, the eval outputs, every stage's per-mode tables
# Every stage is skipped when its output exists; a training phase with checkpoints but no final one resumes.
#
#   bash runs/speedrun.sh --dry-run    # the plan: commands, measured parameter counts, time and cost estimates
#   bash runs/speedrun.sh              # run it (settings below are environment variables)
#
# Parameter counts in the plan are measured: nanochat/surgery.py's create_hybrid and grow, the functions
# scripts.surgery runs, applied to meta-device tensors of the source's shapes (no memory, a few seconds).
# Time = steps x tokens/step x FLOPs/token / (MFU x peak x GPUs), FLOPs/token = HybridGPT.estimate_flops summed
# over the plans a step runs (scripts.fractal_train's MFU convention); MFU from the measured constants below.
set -euo pipefail
cd "$(dirname "$0")/.."

DRY_RUN=0
for a in "$@"; do
  case "$a" in
    --dry-run) DRY_RUN=1 ;;
    -h|--help) sed -n '2,28p' "$0"; exit 0 ;;
    *) echo "unknown argument $a (use --dry-run or none)" >&2; exit 2 ;;
  esac
done

PY=${PYTHON:-python3}
if [ "$DRY_RUN" = 1 ] && ! "$PY" -c "import torch" 2>/dev/null; then
  # the plan measures parameter counts with the package's own code: on a fresh machine, set up as runs/runcpu.sh does
  echo "== $PY has no torch: setting up .venv (CPU torch, this package) for the plan, as runs/runcpu.sh does"
  source runs/cpu_venv.sh
  cpu_venv
fi
NPROC=${NPROC:-8}                       # GPUs of this node
HUB=${HUB:-karpathy/nanochat-d32}        # the source GPT and its tokenizer
NEW_DIM=${NEW_DIM:-2048}                # width after surgery (d32 is 2048: Mamba blocks are inserted, no growth)
GROW_DIM=${GROW_DIM:-3072}              # width after growth
MAMBA=${MAMBA:-1}                       # Mamba version of the new blocks: 1, whose every phase is measured (Mamba-2: phase 2 at full depth 1.14x slower, kept-readout B4 rows; 1.1-1.3x slower at d20 eager; phases 1, 3 not measured)
EXIT_STRIDE=${EXIT_STRIDE:-8}           # a readout every 8th block: at 1, 63 exit readouts add 67.6 GFLOP/token at d32 (1.7x the phase-2 sandwich); MFU_P2 was measured at 8
SEQ_LEN=${SEQ_LEN:-2048}
TOTAL_BATCH=${TOTAL_BATCH:-524288}      # tokens per optimizer step, all GPUs (nanochat's)
DBS1=${DBS1:-4}                         # rows per GPU per micro-batch, phase 1: peak 73.5 GiB per GPU with FSDP2 on 4 H200s
DBS2=${DBS2:-4}                         # phase 2 with KEEP_PARAMS=1: peak 67.5 GiB per rank of 8 (71.6 with EXIT_READOUTS=0; bench train --fake-world 8)
DBS3=${DBS3:-2}                         # phase 3, SFT, and phase 2 with KEEP_PARAMS=0: peak 66.6 GiB per rank (grown, GROWN_KEEP=1; 68.6 with EXIT_READOUTS=0)
KEEP_PARAMS=${KEEP_PARAMS:-1}           # phase 2: --fsdp-keep-params --fsdp-bf16 --fsdp-reduce=pass --readout-checkpoint=off
                                        # (gathered weights kept in bf16, exit readouts' logits kept for the backward: 1.20x at
                                        # batch 2, measured); 0: FSDP2 defaults at DBS3 rows
GROWN_KEEP=${GROWN_KEEP:-1}             # phase 3 and SFT (the grown model): the same four flags (bf16 gathered weights kept,
                                        # gradients reduce-scattered every pass, readout logits kept); 0: FSDP2 defaults
EXIT_READOUTS=${EXIT_READOUTS:-1}       # phases 2, 3 and SFT: fractal_train --exit-readouts (of the 7 exits before the last, each
                                        # pass reads this many, in turn; 0: all 7). 1 is 1.21x phase 2's micro-batches and 1.14x
                                        # phase 3's (measured), and the tiny pipeline with it passes issue #28's targets on seeds
                                        # 0, 1, 2 (README); rates other than 0 and 1 are not measured: priced at 0's
PLAN_SCHEDULE=${PLAN_SCHEDULE:-cycle}   # phases 2, 3 and SFT: fractal_train --plan-schedule (cycle: full width and one narrow
                                        # plan a step in turn; every: every level each step). cycle's step is 2.1x cheaper at d32
                                        # (FLOPs and measured MFU), and the tiny pipeline with it passes issue #28's targets on
                                        # seeds 0, 1, 2 (auto's mean compute 0.706 against every's 0.640; README)
case "$PLAN_SCHEDULE" in every|cycle) ;; *) echo "PLAN_SCHEDULE=$PLAN_SCHEDULE: use every or cycle" >&2; exit 2 ;; esac
for v in KEEP_PARAMS GROWN_KEEP; do
  case "${!v}" in 0|1) ;; *) echo "$v=${!v}: use 0 or 1" >&2; exit 2 ;; esac
done
case "$EXIT_READOUTS" in ''|*[!0-9]*) echo "EXIT_READOUTS=$EXIT_READOUTS: use 0 (every exit) or the exits a pass reads" >&2; exit 2 ;; esac
P1_STEPS=${P1_STEPS:-2000}
P2_STEPS=${P2_STEPS:-4000}
P3_STEPS=${P3_STEPS:-4000}
SFT_STEPS=${SFT_STEPS:-1000}            # chat_sft steps of TOTAL_BATCH tokens (packed conversations)
RL_STEPS=${RL_STEPS:-300}               # chat_rl steps (generation-bound: not in the time estimate, not measured)
COMPUTE_COST=${COMPUTE_COST:-0.1}       # chat_rl's lambda: reward - lambda x compute fraction
CHARS_PER_TOKEN=${CHARS_PER_TOKEN:-4.8} # nanochat's tokenizer on FineWeb-Edu, for the shard count
CHARS_PER_SHARD=${CHARS_PER_SHARD:-250000000}
GPU_HOUR_USD=${GPU_HOUR_USD:-3.00}      # an assumption: set your price
PEAK_FLOPS=${PEAK_FLOPS:-989.4e12}      # dense bf16 per GPU, H100 SXM / H200

# Measured MFU (scripts.fractal_train's convention), per GPU of the 8-GPU run = one GPU's rate at the d32 shapes, the
# micro-batch above and per-block compile (--compile=blocks) x the share of a step its micro-batches take (the update
# runs once per 8-16 micro-batches, each rank 1/8 of it) x the 8-GPU scaling efficiency measured for that phase's
# FSDP2 setting (`bash runs/multigpu.sh scale`, 8 H200s, 2026-11-22). The one-GPU rates: one H100, 2026-12-06, code
# 774aef3, `python -m scripts.bench --warmup W --iters I train --depth 32 --batch B --grad-accum 4 --models M --layers N
# --phases P --exit-strides 8 --recipes cycle --compile blocks`, the "MFU w/o update" column; --layers N keeps the
# model's shapes with fewer blocks, because the full depth's unsharded optimizer states do not fit one 80 GB GPU
# (docs/benchmarks.md, "Session 17"):
#   phase 1: hybrid, 32 blocks, B 4: 47.8% x 0.953 x 92.4% = 0.421
#   phase 2, KEEP_PARAMS=0: hybrid, 32 blocks, B 2, cycle, without --fsdp-keep-params: 23.6% x 0.976 x 71.8% = 0.165
#   phase 3, GROWN_KEEP=0: hybrid-grown, 16 blocks, B 2, cycle: 32.2% x 0.967 x 71.8% (FSDP2 defaults, phase 2's 8-GPU
#     figure) = 0.224
# Phase 3 with GROWN_KEEP=1 is one rank of the 8-GPU run at full depth (64 blocks), measured on one H100 over a fake
# process group (`bench train --fake-world 8`: every buffer of a rank, no communication), 2026-12-06, code 4c1ca6f,
# `python -m scripts.bench --warmup 10 --iters 10 train --depth 32 --batch 2 --grad-accum 2 --phases 2 --exit-strides 8
# --recipes cycle --compile blocks --fake-world 8 --models hybrid-grown --fsdp-keep-params --fsdp-bf16 --fsdp-reduce
# pass`, the mean over one whole period of the cycle (10 steps): 33.7% without its update (184 ms a rank) x 0.986 (16
# micro-batches of 830 ms a step) x 95.7% (phase 2's keep-params 8-GPU efficiency: not measured for this setting, whose
# reduce-scatters per pass move 32x the gradient bytes of one per step, overlapped with the backward) = 0.318.
# Phase 2's rate and GROWN_KEEP=0's were timed as the median of the first steps after the warm-up: under the cycle those
# are the cheapest narrow plans (128, 256) while the FLOPs are the period's mean, which overstates the MFU a little
# (the bench times whole periods since 4c1ca6f). Phase 1 runs one plan.
# Phase 2 with KEEP_PARAMS=1, one rank of 8 at full depth the same way, 2026-12-06, code dca6156, `... train --depth 32
# --batch 4 --grad-accum 2 --phases 2 --exit-strides 8 --recipes cycle --compile blocks --fake-world 8 --models hybrid
# --fsdp-keep-params --fsdp-bf16 --fsdp-reduce pass --readout-checkpoint off` (mean of one 8-step period): 29.4% without
# its update (139 ms a rank) x 0.980 (8 micro-batches of 857 ms a step) x 95.7% (assumed, as for phase 3) = 0.276.
# EXIT_READOUTS=1 (and phase 3 with its readouts kept) was measured the same way on one H200, 2026-12-06, code df1e20e
# (`... --exit-readouts 1`, `--readout-checkpoint off` for phase 3 too), beside the H100's settings again on that H200,
# and scaled to the H100 by that pair's ratio (phase 2: 29.4% H100 / 30.5% H200, every exit read; phase 3: 33.7% /
# 36.3%, readouts recomputed):
#   phase 2, KEEP_PARAMS=1, EXIT_READOUTS=1: 36.9% on the H200 -> 35.6% x 0.976 (8 micro-batches of 707 ms, the 139 ms
#     update) x 95.7% (assumed) = 0.333
#   phase 3, GROWN_KEEP=1, EXIT_READOUTS=1: 42.2% -> 39.2% x 0.984 (16 of 714 ms, the 184 ms update) x 95.7% = 0.369
#   phase 3, GROWN_KEEP=1, EXIT_READOUTS=0, readouts kept: 37.2% -> 34.5% x 0.986 x 95.7% = 0.326
# KEEP_PARAMS=0 and GROWN_KEEP=0 were measured with every exit read; with fewer they are priced at that rate.
if [ "$EXIT_READOUTS" = 1 ]; then KEEP_MFU_P2=0.333 KEEP_MFU_P3=0.369; else KEEP_MFU_P2=0.276 KEEP_MFU_P3=0.326; fi
MFU_P1=${MFU_P1:-0.421}
MFU_P2=${MFU_P2:-$([ "$KEEP_PARAMS" = 1 ] && echo $KEEP_MFU_P2 || echo 0.165)}
MFU_P3=${MFU_P3:-$([ "$GROWN_KEEP" = 1 ] && echo $KEEP_MFU_P3 || echo 0.224)}   # SFT runs phase 3's step: priced at it
# These are the cycle schedule's. Under PLAN_SCHEDULE=every the phase-2/3 step's MFU is priced at cycle's x 0.82, the
# ratio measured at d32 on one H100 eager (`... train --depth 32 --batch 2 --grad-accum 2 --models hybrid --phases 2
# --exit-strides 8 --recipes sandwich,adaptive,cycle --compile none`, batch 1: every level 8.2%, cycle 10.0% MFU).
SCHEDULE_MFU_RATIO=${SCHEDULE_MFU_RATIO:-$([ "$PLAN_SCHEDULE" = cycle ] && echo 1.0 || echo 0.82)}
if ! [[ "$SCHEDULE_MFU_RATIO" =~ ^[0-9]*\.?[0-9]+$ ]] || [[ "$SCHEDULE_MFU_RATIO" =~ ^[0.]+$ ]]; then
  echo "SCHEDULE_MFU_RATIO=$SCHEDULE_MFU_RATIO: use a positive number (the schedule's step MFU / cycle's)" >&2; exit 2
fi
# Not measured: whole-model compile at d32 (one graph per plan: 9 at d32's levels), phases 1 and 2 at full depth (their
# rates are of fewer blocks of the same shapes), phase 3 on 8 GPUs, Mamba-2 outside phase 2, more than one node.

export NANOCHAT_BASE_DIR=${NANOCHAT_BASE_DIR:-$HOME/.cache/nanochat}
RUN_DIR=${RUN_DIR:-$NANOCHAT_BASE_DIR/speedrun}
DATA_DIR=$NANOCHAT_BASE_DIR/base_data
HYB=$RUN_DIR/hybrid_$NEW_DIM
P1=$RUN_DIR/phase1
P2=$RUN_DIR/phase2
GROWN=$RUN_DIR/grown_$GROW_DIM
P3=$RUN_DIR/phase3
FINAL=$RUN_DIR/final
SFT=$RUN_DIR/chat_sft
SFT_FINAL=$RUN_DIR/chat_final
RL=$RUN_DIR/chat_rl
RL_FINAL=$RUN_DIR/chat_rl_final
export ADAMBA_REPORT_DIR=$RUN_DIR/report   # every stage's per-mode metrics (nanochat.run_report), rendered by scripts.report
TOKENS=$(( (P1_STEPS + P2_STEPS + P3_STEPS) * TOTAL_BATCH ))
SHARDS=$($PY -c "import math; print(math.ceil($TOKENS * $CHARS_PER_TOKEN / $CHARS_PER_SHARD) + 1)")  # + 1: the last is val

SURGERY_ARGS=(--hub "$HUB" --new-dim="$NEW_DIM" --mamba "$MAMBA" --exit-stride "$EXIT_STRIDE" --adaptive --dst "$HYB")
GROW_ARGS=(--src "$P2" --expand-from="$NEW_DIM" --new-dim="$GROW_DIM" --dst "$GROWN")
TRAIN_COMMON=(--max-seq-len "$SEQ_LEN" --total-batch-size "$TOTAL_BATCH" --parallel fsdp --compile=blocks --save-every 500)
TORCHRUN=(torchrun --standalone --nproc_per_node="$NPROC" -m scripts.fractal_train)

final_meta() { printf '%s/meta_%06d.json' "$1" "$2"; }
have_checkpoint() { compgen -G "$1/meta_*.json" > /dev/null; }

run() {  # print the command, run it unless --dry-run
  echo "+ $*"
  if [ "$DRY_RUN" = 0 ]; then "$@"; fi
}

train_phase() {  # name out_dir steps args...: skip when finished, --resume when interrupted
  local name=$1 out=$2 steps=$3; shift 3
  if [ -f "$(final_meta "$out" "$steps")" ]; then echo "== $name: done ($(final_meta "$out" "$steps")), skipped"; return; fi
  local resume=()
  if have_checkpoint "$out"; then resume=(--resume); echo "== $name: resuming $out"; else echo "== $name"; fi
  run "${TORCHRUN[@]}" "$@" --num-iterations "$steps" --out-dir "$out" "${TRAIN_COMMON[@]}" "${resume[@]}"
}

# -----------------------------------------------------------------------------
# the plan: sizes measured from what the scripts build, time and cost from the measured MFU
echo "== plan: $HUB -> surgery to $NEW_DIM -> phases 1, 2 -> growth to $GROW_DIM -> phase 3 on $NPROC GPUs ($RUN_DIR)"
MAMBA="$MAMBA" NEW_DIM="$NEW_DIM" GROW_DIM="$GROW_DIM" HUB="$HUB" SEQ_LEN="$SEQ_LEN" TOTAL_BATCH="$TOTAL_BATCH" NPROC="$NPROC" \
P1_STEPS="$P1_STEPS" P2_STEPS="$P2_STEPS" P3_STEPS="$P3_STEPS" SFT_STEPS="$SFT_STEPS" MFU_P1="$MFU_P1" MFU_P2="$MFU_P2" MFU_P3="$MFU_P3" \
PEAK_FLOPS="$PEAK_FLOPS" GPU_HOUR_USD="$GPU_HOUR_USD" SURGERY_ARGS="${SURGERY_ARGS[*]}" PLAN_SCHEDULE="$PLAN_SCHEDULE" \
SCHEDULE_MFU_RATIO="$SCHEDULE_MFU_RATIO" $PY - <<'EOF'
import glob, json, os, re
import torch
from nanochat.common import get_base_dir
from nanochat.gpt import GPT, GPTConfig
from nanochat.hybrid_gpt import HybridGPT
from nanochat import surgery
from scripts.surgery import parse_args

env = os.environ
hub = env["HUB"]
metas = sorted(glob.glob(os.path.join(get_base_dir(), "hub", hub.replace("/", "--"), "meta_*.json")))
if metas:  # the downloaded checkpoint's own config
    src = GPTConfig(**{k: v for k, v in json.load(open(metas[-1]))["model_config"].items() if k in GPTConfig.__dataclass_fields__})
    where = metas[-1]
else:  # not downloaded yet: nanochat's depth rule for the hub name's dN (width 64 N, heads of 128, its 65536-id tokenizer)
    depth = int(re.search(r"d(\d+)$", hub).group(1))
    src = GPTConfig.from_depth(depth)
    where = f"nanochat's depth rule for d{depth} (checkpoint not downloaded yet)"
a = parse_args(env["SURGERY_ARGS"].split())  # scripts.surgery's own parser: the same defaults as the real run
kwargs = dict(mamba_version=a.mamba, d_state=a.d_state, d_conv=a.d_conv, expand=a.expand, mamba_headdim=a.mamba_headdim,
              mamba_ngroups=a.mamba_ngroups, num_experts=a.num_experts, expert_dim=a.expert_dim, moe_top_k=a.moe_top_k,
              capacity_factor=a.capacity_factor, exit_stride=a.exit_stride)
if a.adaptive is not None:
    kwargs["adaptive"] = a.adaptive
D = src.n_embd
with torch.device("meta"):  # shapes only: create and grow exactly as scripts.surgery does, on tensors without data
    state = dict(GPT(src).state_dict())  # nanochat's checkpoint layout
    src_params = sum(t.numel() for t in state.values())
    state, cfg, info = surgery.create_hybrid(state, src, layer_pattern=a.pattern, mamba_ffn=a.mamba_ffn,
                                             upcycle_moe=a.upcycle_moe, seed=a.seed, **kwargs)
    new_dim, grow_dim = int(env["NEW_DIM"]), int(env["GROW_DIM"])
    if new_dim > D:
        state, cfg, _ = surgery.grow(state, cfg, new_dim, head_growth=a.head_growth)
    hyb_params = sum(t.numel() for t in state.values())
    p1_trainable = sum(t.numel() for k, t in state.items() if any(k.startswith(p) for p in info["new_param_prefixes"]))
    gstate, gcfg, _ = surgery.grow(state, cfg, grow_dim)
    grown_params = sum(t.numel() for t in gstate.values())
    hyb, grown = HybridGPT(cfg), HybridGPT(gcfg)


def step_flops(model, every_level):
    """FLOPs per token of one step: full width, or fractal_train's phase-2/3 step under PLAN_SCHEDULE
    (nanochat.adaptive_train.step_plans), the mean over the steps after which its plans repeat: every = full + every
    narrower level, uniform plans on even steps and the router's menu on odd ones; cycle = full + one narrow plan."""
    from nanochat.adaptive_train import step_plans, schedule_period
    if not every_level:
        return model.estimate_flops()
    schedule = env["PLAN_SCHEDULE"]
    period = schedule_period(model.config, schedule)
    return sum(sum(model.estimate_flops(p) for p in step_plans(model.config, True, None, 0, False, s, schedule))
               for s in range(period)) / period


tok_step, gpus, peak, usd = int(env["TOTAL_BATCH"]), int(env["NPROC"]), float(env["PEAK_FLOPS"]), float(env["GPU_HOUR_USD"])
print(f"source {hub}: {src_params / 1e9:.3f}B parameters ({src.n_layer} layers, width {D}; config from {where})")
print(f"hybrid (surgery): {hyb_params / 1e9:.3f}B ({cfg.n_layer} blocks {cfg.layer_pattern}/{cfg.ffn_pattern}, width {cfg.n_embd}, "
      f"Mamba-{cfg.mamba_version}, exits every {cfg.exit_stride}); phase 1 trains {p1_trainable / 1e9:.3f}B of it")
print(f"grown: {grown_params / 1e9:.3f}B (width {gcfg.n_embd}, {gcfg.n_head} heads, levels {gcfg.width_levels})")
print(f"{'stage':<9}{'params':>9}{'trains':>9}{'steps':>7}{'tokens':>8}{'GFLOP/tok':>11}{'MFU':>6}{'hours':>7}{'cost $':>9}")
total_h = 0.0
for name, model, params, trains, steps, every_level, mfu in (
        ("phase 1", hyb, hyb_params, p1_trainable, int(env["P1_STEPS"]), False, float(env["MFU_P1"])),
        ("phase 2", hyb, hyb_params, hyb_params, int(env["P2_STEPS"]), True, float(env["MFU_P2"])),
        ("phase 3", grown, grown_params, grown_params, int(env["P3_STEPS"]), True, float(env["MFU_P3"])),
        # SFT runs phase 3's step on the grown model (conversations instead of text): phase 3's MFU, not measured apart
        ("sft", grown, grown_params, grown_params, int(env["SFT_STEPS"]), True, float(env["MFU_P3"]))):
    f = step_flops(model, every_level)
    if every_level:  # the cycle-measured MFU times the schedule's measured ratio to it
        mfu *= float(env["SCHEDULE_MFU_RATIO"])
    hours = steps * tok_step * f / (mfu * peak * gpus) / 3600
    total_h += hours
    print(f"{name:<9}{params / 1e9:>8.2f}B{trains / 1e9:>8.2f}B{steps:>7}{steps * tok_step / 1e9:>7.2f}B{f / 1e9:>11.1f}"
          f"{mfu:>6.3f}{hours:>7.1f}{hours * gpus * usd:>9,.0f}")
print(f"training total: {total_h:.1f} h on {gpus} GPUs, ${total_h * gpus * usd:,.0f} at ${usd}/GPU-hour "
      f"(download, surgery, growth, calibration, eval and chat_rl not estimated: not measured)")
EOF
echo "data: $SHARDS shards for $(( TOKENS / 1000000 ))M tokens ($CHARS_PER_TOKEN chars/token, $CHARS_PER_SHARD chars/shard)"

# -----------------------------------------------------------------------------
# the stages
if [ "$DRY_RUN" = 0 ]; then mkdir -p "$RUN_DIR"; fi

n_shards=$(compgen -G "$DATA_DIR/shard_*.parquet" | wc -l || true)
if [ "$n_shards" -ge "$SHARDS" ]; then echo "== data: $n_shards shards in $DATA_DIR, skipped"
else echo "== data"; run $PY -m nanochat.dataset --download "$SHARDS" --data-dir "$DATA_DIR"; fi

if have_checkpoint "$HYB"; then echo "== surgery: $HYB exists, skipped"
else echo "== surgery"; run $PY -m scripts.surgery "${SURGERY_ARGS[@]}"; fi

train_phase "phase 1" "$P1" "$P1_STEPS" --phase=1 --checkpoint="$HYB" --device-batch-size "$DBS1" --data-dir "$DATA_DIR"
P2_FSDP=(--device-batch-size "$DBS3"); [ "$KEEP_PARAMS" = 1 ] && P2_FSDP=(--device-batch-size "$DBS2" --fsdp-keep-params \
  --fsdp-bf16 --fsdp-reduce=pass --readout-checkpoint=off)
GROWN_FSDP=(); [ "$GROWN_KEEP" = 1 ] && GROWN_FSDP=(--fsdp-keep-params --fsdp-bf16 --fsdp-reduce=pass --readout-checkpoint=off)
P2_FSDP+=(--exit-readouts "$EXIT_READOUTS"); GROWN_FSDP+=(--exit-readouts "$EXIT_READOUTS")
train_phase "phase 2" "$P2" "$P2_STEPS" --phase=2 --checkpoint="$P1" --data-dir "$DATA_DIR" --continue-data \
  --plan-schedule "$PLAN_SCHEDULE" "${P2_FSDP[@]}"

if have_checkpoint "$GROWN"; then echo "== growth: $GROWN exists, skipped"
else echo "== growth"; run $PY -m scripts.surgery "${GROW_ARGS[@]}"; fi

# NOTE: the grown checkpoint's meta carries no data position, so phase 3 reads the train stream from its start
train_phase "phase 3" "$P3" "$P3_STEPS" --phase=3 --checkpoint="$GROWN" --expanded-dim="$GROW_DIM" \
  --device-batch-size "$DBS3" --data-dir "$DATA_DIR" --plan-schedule "$PLAN_SCHEDULE" "${GROWN_FSDP[@]}"

if have_checkpoint "$FINAL"; then echo "== calibrate: $FINAL exists, skipped"
else echo "== calibrate"; run $PY -m scripts.calibrate_gates --checkpoint "$P3" --out-dir "$FINAL" --data-dir "$DATA_DIR"; fi

PROMPT="The chemical symbol of gold is"
for mode in think auto; do
  out=$RUN_DIR/eval_$mode.txt
  if [ -s "$out" ]; then echo "== eval $mode: $out exists, skipped"; continue; fi
  echo "== eval $mode"
  if [ "$DRY_RUN" = 1 ]; then echo "+ $PY -m scripts.generate --checkpoint $FINAL --mode $mode --prompt \"$PROMPT\" --max-tokens 64 --show-compute > $out"
  else $PY -m scripts.generate --checkpoint "$FINAL" --mode "$mode" --prompt "$PROMPT" --max-tokens 64 --show-compute > "$out.tmp" && mv "$out.tmp" "$out"; fi
done
out=$RUN_DIR/eval_adaptive.txt
if [ -s "$out" ]; then echo "== eval adaptive: $out exists, skipped"
else
  echo "== eval adaptive"
  BENCH=($PY -m scripts.bench adaptive --checkpoint "$FINAL" --data-dir "$DATA_DIR" --modes think,normal,auto --rows 16)
  if [ "$DRY_RUN" = 1 ]; then echo "+ ${BENCH[*]} > $out"
  else "${BENCH[@]}" > "$out.tmp" && mv "$out.tmp" "$out"; fi
fi

if [ -s "$RUN_DIR/base_eval.json" ]; then echo "== base eval: done, skipped"
else echo "== base eval"; run $PY -m scripts.base_eval --checkpoint "$FINAL" --bpb --data-dir "$DATA_DIR" --out-json "$RUN_DIR/base_eval.json"; fi

echo "== tasks"; run $PY -m scripts.fetch_tasks   # cached: a second run downloads nothing

CHAT_TRAIN=(--max-seq-len "$SEQ_LEN" --total-batch-size "$TOTAL_BATCH" --parallel fsdp --compile=blocks --save-every 500 --device-batch-size "$DBS3")
if [ -f "$(final_meta "$SFT" "$SFT_STEPS")" ]; then echo "== sft: done, skipped"
else
  resume=(); if have_checkpoint "$SFT"; then resume=(--resume); fi
  echo "== sft"; run torchrun --standalone --nproc_per_node="$NPROC" -m scripts.chat_sft --checkpoint "$FINAL" --out-dir "$SFT" \
    --num-iterations "$SFT_STEPS" --plan-schedule "$PLAN_SCHEDULE" "${CHAT_TRAIN[@]}" "${GROWN_FSDP[@]}" "${resume[@]}"
fi
if have_checkpoint "$SFT_FINAL"; then echo "== chat calibrate: $SFT_FINAL exists, skipped"
else echo "== chat calibrate"; run $PY -m scripts.calibrate_gates --checkpoint "$SFT" --out-dir "$SFT_FINAL" --data-dir "$DATA_DIR"; fi
CHAT_EVAL=(torchrun --standalone --nproc_per_node="$NPROC" -m scripts.chat_eval)
if [ -s "$RUN_DIR/chat_eval.json" ]; then echo "== chat eval: done, skipped"
else echo "== chat eval"; run "${CHAT_EVAL[@]}" --checkpoint "$SFT_FINAL" --out-json "$RUN_DIR/chat_eval.json" --plot "$RUN_DIR/chat_eval.png"; fi

if [ -f "$(final_meta "$RL" "$RL_STEPS")" ]; then echo "== rl: done, skipped"
else echo "== rl"; run torchrun --standalone --nproc_per_node="$NPROC" -m scripts.chat_rl --checkpoint "$SFT_FINAL" --out-dir "$RL" \
  --num-steps "$RL_STEPS" --compute-cost "$COMPUTE_COST"; fi
if have_checkpoint "$RL_FINAL"; then echo "== rl calibrate: $RL_FINAL exists, skipped"
else echo "== rl calibrate"; run $PY -m scripts.calibrate_gates --checkpoint "$RL" --out-dir "$RL_FINAL" --data-dir "$DATA_DIR"; fi
if [ -s "$RUN_DIR/chat_rl_eval.json" ]; then echo "== rl eval: done, skipped"
else echo "== rl eval"; run "${CHAT_EVAL[@]}" --checkpoint "$RL_FINAL" --out-json "$RUN_DIR/chat_rl_eval.json" --plot "$RUN_DIR/chat_rl_eval.png" \
  --report-stage chat_eval_rl; fi

echo "== report -> $RUN_DIR/report.md"
if [ "$DRY_RUN" = 0 ]; then
RUN_DIR="$RUN_DIR" $PY - <<'EOF' > "$RUN_DIR/report.md"
import glob, json, os
run = os.environ["RUN_DIR"]
print("# Adamba speedrun report\n")
for name in ("hybrid_*", "phase1", "phase2", "grown_*", "phase3", "final"):
    for d in sorted(glob.glob(os.path.join(run, name))):
        metas = sorted(glob.glob(os.path.join(d, "meta_*.json")))
        meta = json.load(open(metas[-1]))
        cfg = meta.get("model_config", {})
        print(f"## {os.path.basename(d)} (step {meta.get('step')})")
        print(f"width {cfg.get('n_embd')}, {cfg.get('n_layer')} blocks {cfg.get('layer_pattern')}/{cfg.get('ffn_pattern')}")
        if meta.get("val"):
            print("\n| metric | value |\n|---|---|")
            for k, v in meta["val"].items():
                print(f"| {k} | {v:.4f} |")
        print()
for mode in ("think", "auto", "adaptive"):
    p = os.path.join(run, f"eval_{mode}.txt")
    print(f"## eval, mode {mode}\n\n```\n{open(p).read().rstrip()}\n```\n")
EOF
$PY -m scripts.report --report-dir "$ADAMBA_REPORT_DIR" > /dev/null && cat "$ADAMBA_REPORT_DIR/report.md" >> "$RUN_DIR/report.md"
cat "$RUN_DIR/report.md"
fi

"""
Train a hybrid (attention + Mamba) checkpoint in three phases (what --phase decides: the table PHASES).

    torchrun --standalone --nproc_per_node=8 -m scripts.fractal_train --phase=1 --checkpoint=~/ckpt/hybrid
    torchrun --standalone --nproc_per_node=8 -m scripts.fractal_train --phase=2 --checkpoint=<phase 1 out-dir>
    python -m scripts.surgery --src=<phase 2 out-dir> --expand-from=D --new-dim=D2 --dst=<grown>
    torchrun --standalone --nproc_per_node=8 -m scripts.fractal_train --phase=3 --checkpoint=<grown> --expanded-dim=D2

Phase 1: only the Mamba mixers (every `.mamba.` parameter) and the parameters surgery created
    new (meta["surgery"]["new_param_prefixes"]) train; everything else has requires_grad=False, so it
    gets no gradient and is in no optimizer. Full width only (--matryoshka is an error).
Phase 2: every parameter trains. Each step runs full width and one narrow plan per width level (uniform on even
    steps, the router's menu on odd ones: confidence_probe.plan_menu), plus --n-random-plans random ones,
    one forward + backward per plan on the same micro-batch (nanochat.adaptive_train, whose docstring gives the
    objective): CE + --distill-weight * KL(full || narrow) from the same micro-batch's full-width logits (--distill,
    on by default in the phases whose table entry says distill) + --exit-loss-weight * the exit readouts' CE + MoE
    router losses, mean over plans; the gates (every plan's exits, target: the full model's top-1) and the router
    (BCE on "this plan gave the full model's top-1") train beside them without gradients into the trunk, an AdamW
    group of their own (--controller-lr). Every loss counts only tokens whose target is not -1 (the loader's mask).
    --exit-loss-weight (default 0.1) makes the intermediate residuals readable by the shared head, which
    the gates need to find tokens that can exit. Toy check (tests' tiny hybrid, synthetic corpus, 60
    phase-2 steps, CPU, 2026-11-22): full-width val bpb 0.688 / 0.683 / 0.681 and exit rate at 0.9
    2.9% / 5.2% / 7.1% for weights 0 / 0.1 / 0.3, so no loss at full width there; recheck at scale.
Phase 3: phase 2 on a grown checkpoint (config.grown_from non-empty). The parameter entries that
    growth added (meta["surgery"]["grow"]["old_index"] says where the old ones went) take
    --new-channel-lr-mult times the step of the others: the optimizer's update is scaled elementwise after it is computed (a gradient
    hook would do nothing: Adam and Muon both normalise the gradient's scale away).

Data parallel: --parallel=ddp keeps a full replica per rank and sums the gradients with one bucketed
all-reduce after the last backward of the step (several backwards per step, parameters unused by
some of them, and controllers called outside the model's forward are why this is not the DDP wrapper);
--parallel=fsdp shards with FSDP2 (fully_shard per block, then the root; the controllers stay replicated, their
gradients all-reduced); --fsdp-keep-params keeps the gathered parameters for the whole step (one all-gather per block
and step, not two per pass); --fsdp-bf16 gathers bf16 matrices; --fsdp-reduce=pass reduce-scatters after every pass.
--expert-parallel (with ddp) shards every MoE's experts over the ranks instead of replicating them
(nanochat.moe_ep: rows travel by all_to_all, one host sync per MoE call, that part runs eager); the
expert gradients are complete without an all-reduce, and checkpoints hold the full experts.
The training stream is cut into --data-ranks interleaved shards (default: the world size); each rank
reads data-ranks / world_size of them, one per micro-batch in turn. A fixed --data-ranks makes the
tokens of every step independent of the number of processes (resume on fewer GPUs, or check that
2 ranks equal 1).

Resume (--resume: the latest checkpoint in --out-dir) is exact: weights, optimizer states, every data
shard's position, and the random plans, which are functions of (seed, step), so there is no RNG state to
lose. A checkpoint holds the full model and the full optimizer state (one file each, written by rank 0), so
a run saved on N ranks, with either --parallel, resumes on any number of ranks (same --data-ranks).
--compile (=model) compiles the whole training forward once for each distinct plan it meets: full width and every
narrow uniform and menu plan (9 graphs at d32's five width levels; dynamo's recompile limit is raised to that count
so none runs eager); --sample-dim's per-block random plans make them unbounded. --compile=blocks compiles each block
instead: one graph per block kind, width and grad mode, shared by identical blocks (what runs/speedrun.sh measured
and runs).
Ctrl-C or SIGTERM finishes the current step, saves it and prints the command that resumes (exit 130 / 143).
"""
import os
import sys
import math
import time
import random
import argparse
from collections import namedtuple
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, distribute_tensor

from nanochat.common import (compute_init, compute_cleanup, print0, autodetect_device_type, autocast_context,
                             get_base_dir, expand_path, init_wandb, synchronize, peak_memory_note, add_runtime_args,
                             run_script)
from nanochat.tokenizer import compute_token_bytes, save_token_bytes, TOKEN_BYTES_FILENAME
from nanochat.dataset import get_data_dir, split_parquet_files
from nanochat.dataloader import tokenizing_distributed_data_loader
from nanochat.moe_ep import shard_experts, is_expert_shard
from nanochat.adaptive_train import (SCHEDULES, step_plans as adaptive_step_plans, plan_label, train_micro_batch,
                                     evaluate_widths, plan_flops, exit_rotation_period)
from nanochat.surgery import grown_masks
from nanochat.optim import (setup_optimizers, lr_multiplier, set_lr_multiplier, muon_momentum, set_muon_momentum,
                            optimizer_state_dicts, load_optimizer_state_dicts)
from nanochat.train_utils import (peak_flops, apply_activation_checkpointing, apply_fsdp, allreduce_gradients,
                                  add_parallel_args, fsdp_before_backward, clip_grad_norm, full_state_dict,
                                  optimizer_state_full, optimizer_state_to_dtensor, format_eta, GracefulStop,
                                  resume_command, compile_model)
from nanochat import checkpoint_manager as cm
from nanochat import run_report


@dataclass(frozen=True)
class Phase:
    """What --phase decides (the module docstring says why)."""
    new_only: bool     # only the Mamba mixers and surgery's new parameters train (phase1_trainable); the rest is frozen
    matryoshka: bool   # --matryoshka's default: sample width plans; where False, --matryoshka is an error
    controllers: bool  # the gates and width predictor train, their losses on the full-width forward (config.adaptive)
    exit_loss: bool    # the full-width forward adds --exit-loss-weight x the exit readouts' CE
    grown: bool        # needs a grown checkpoint; --expanded-dim checks it, --new-channel-lr-mult masks the grown entries
    distill: bool      # --distill's default: narrow plans also learn KL(full || narrow) from the step's full logits
    chat: bool = False  # scripts.chat_sft: conversations instead of text shards; a dense GPT may train too


PHASES = {
    1: Phase(new_only=True, matryoshka=False, controllers=False, exit_loss=False, grown=False, distill=False),
    2: Phase(new_only=False, matryoshka=True, controllers=True, exit_loss=True, grown=False, distill=True),
    3: Phase(new_only=False, matryoshka=True, controllers=True, exit_loss=True, grown=True, distill=True),
}


def phases_where(field, value=True):  # '2 and 3': the phases whose entry has field == value, for error messages
    return " and ".join(str(n) for n, phase in PHASES.items() if getattr(phase, field) == value)


EPILOG = """
FLOPs and MFU: a step's FLOPs are tokens_per_step * sum over the plans it ran of
3 * model.forward_flops_per_token(T/2, plan) (= model.estimate_flops(plan) when T is the model's
sequence_len): 2 FLOPs per multiply-accumulate of every weight matmul, attention over the mean causal
context, the Mamba conv and scan, MoE router + top-k experts, backward = 2x forward. Not counted:
the exit readouts of the full-width forward, the controllers, norms and activations (so MFU
understates what the hardware does). MFU = FLOPs / dt / (world_size * peak bf16 FLOP/s); n/a on CPU.
"""


def get_args(argv=None):
    return build_parser().parse_args(argv)


def build_parser(description="Fractal training of a hybrid checkpoint: phase 1 (Mamba only), 2 (all + Matryoshka + "
                 "controllers), 3 (grown model)", phase_flag=True):
    """The flags of a training run; scripts.chat_sft builds on them (without --phase)."""
    p = argparse.ArgumentParser(description=description, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    if phase_flag:
        p.add_argument("--phase", type=int, required=True, choices=tuple(PHASES))
    p.add_argument("--checkpoint", type=str, required=True, help="hybrid checkpoint dir or model_<step>.pt (tokenizer.pkl beside it)")
    p.add_argument("--matryoshka", action=argparse.BooleanOptionalAction, default=None,
                   help="sample width plans (default on for phases 2/3; an error in phase 1)")
    p.add_argument("--sample-dim", action="store_true", help="random plans give each block its own width (else one width for all)")
    p.add_argument("--n-random-plans", type=int, default=0, help="random plans per step besides the full and menu plans")
    p.add_argument("--distill", action=argparse.BooleanOptionalAction, default=None,
                   help="narrow plans learn KL(full || narrow) from the step's full-width logits (default: the phase's)")
    p.add_argument("--distill-weight", type=float, default=1.0, help="weight of the distillation KL")
    p.add_argument("--plan-schedule", choices=SCHEDULES, default="every",
                   help="narrow plans per step: every = one per width level (uniform / router menu on alternate steps); "
                        "cycle = one per step, taking every level's uniform and menu plan in turn (cheaper steps)")
    p.add_argument("--anchor-weight", type=float, default=0.0,
                   help="full width also learns KL(input || full) from a frozen copy of --checkpoint (0: off)")
    p.add_argument("--full-weight", type=float, default=1.0,
                   help="weight of the full-width plan's objective against each narrow plan's (1: all alike)")
    p.add_argument("--expanded-dim", type=int, default=None, help="phase 3: the grown n_embd, checked against the checkpoint")
    p.add_argument("--exit-loss-weight", type=float, default=0.1, help="weight of the exit readouts' CE on the trunk (phases 2/3)")
    p.add_argument("--exit-readouts", type=int, default=0, help="phases 2/3: exits (before the last) each pass reads out, "
                   "in turn (adaptive_train.rotating_exits; fewer vocabulary-wide readouts a pass); 0: every exit")
    p.add_argument("--exit-threshold", type=float, default=0.9, help="eval: gate probability above which a token exits")
    p.add_argument("--plan-epsilon", type=float, default=None,
                   help="eval: the router's accepted probability of missing the full model's answer (default: its threshold)")
    p.add_argument("--log-every", type=int, default=1, help="print the step line every N steps (and the last)")
    # runtime
    p.add_argument("--run", type=str, default="dummy", help="wandb run name ('dummy' = no wandb)")
    p.add_argument("--device", type=str, default="", help="cuda|cpu|mps (empty = autodetect)")
    p.add_argument("--seed", type=int, default=42, help="seed of the plan sampling (a function of seed and step)")
    p.add_argument("--compile", nargs="?", const="model", default=None, choices=("model", "blocks"),
                   help="torch.compile: the whole model (--compile or --compile=model: one graph per distinct plan) or "
                        "each block (--compile=blocks: one graph per block kind and width, shared by identical blocks)")
    p.add_argument("--activation-checkpointing", action="store_true", help="recompute block activations in backward")
    p.add_argument("--readout-checkpoint", default="on", choices=("on", "off"), help="phases 2/3: recompute the exit "
                   "readouts' logits in backward (off: keep them, B*T*vocab*2 bytes per exit; HybridGPT.READOUT_CHECKPOINT)")
    add_parallel_args(p)  # --parallel, --fsdp-keep-params, --fsdp-bf16, --fsdp-reduce, --expert-parallel
    # data and batch
    p.add_argument("--data-dir", type=str, default=None, help="parquet shards (default <base_dir>/base_data)")
    p.add_argument("--data-ranks", type=int, default=0, help="interleaved shards of the train stream (0 = world size)")
    p.add_argument("--num-iterations", type=int, default=1000, help="optimizer steps of this phase")
    p.add_argument("--device-batch-size", type=int, default=16, help="rows per forward per rank")
    p.add_argument("--max-seq-len", type=int, default=0, help="T (0 = the model's sequence_len)")
    p.add_argument("--total-batch-size", type=int, default=0, help="tokens per step, all ranks (0 = one micro-batch per data shard)")
    # optimization
    p.add_argument("--matrix-lr", type=float, default=0.02, help="Muon lr of hidden matrices")
    p.add_argument("--embedding-lr", type=float, default=0.2, help="AdamW lr of wte (x (n_embd/768)^-0.5)")
    p.add_argument("--unembedding-lr", type=float, default=0.004, help="AdamW lr of lm_head (x (n_embd/768)^-0.5)")
    p.add_argument("--scalar-lr", type=float, default=0.004, help="AdamW lr of A_log, D, conv, norms, routers (x (n_embd/768)^-0.5)")
    p.add_argument("--controller-lr", type=float, default=1e-3, help="AdamW lr of the gates and width predictor (not scaled)")
    p.add_argument("--new-channel-lr-mult", type=float, default=1.0, help="phase 3: step multiplier of the grown entries")
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay of wte and lm_head")
    p.add_argument("--warmup-ratio", type=float, default=0.0)
    p.add_argument("--warmdown-ratio", type=float, default=0.2)
    p.add_argument("--grad-clip", type=float, default=1.0, help="clip the global grad norm (0 = off)")
    # eval and checkpoints
    p.add_argument("--eval-every", type=int, default=250, help="val metrics every N steps and at the end (-1 = off)")
    p.add_argument("--eval-tokens", type=int, default=2 * 524288, help="val tokens per evaluation setting, all ranks")
    p.add_argument("--save-every", type=int, default=-1, help="checkpoint every N steps (always at the end)")
    p.add_argument("--no-save", action="store_true", help="write no checkpoint at all, not even the last (throughput runs)")
    p.add_argument("--out-dir", type=str, default=None, help="default <base_dir>/fractal_checkpoints/phase<N>")
    p.add_argument("--resume", action="store_true", help="continue exactly from the latest checkpoint in --out-dir")
    p.add_argument("--continue-data", action="store_true",
                   help="start the train stream where the --checkpoint's run stopped (e.g. phase 2 after phase 1)")
    add_runtime_args(p)  # --debug, --threads, --require-kernels (read by run_script)
    return p


def check_args(args, phase=None):
    """The phase's table entry (or the given one), after --matryoshka's default is filled in and flags it cannot use
    are refused."""
    phase = phase or PHASES[args.phase]
    if args.matryoshka is None:
        args.matryoshka = phase.matryoshka
    if args.distill is None:
        args.distill = phase.distill and args.matryoshka
    if args.distill and not args.matryoshka:
        raise ValueError("--distill teaches the narrow plans from full width; it needs --matryoshka (phases "
                         f"{phases_where('matryoshka')})")
    if args.matryoshka and not phase.matryoshka:
        raise ValueError(f"--matryoshka is for phases {phases_where('matryoshka')}: phase {args.phase} trains at full width only")
    if args.sample_dim and not args.matryoshka:
        raise ValueError("--sample-dim samples per-block widths of Matryoshka plans; it needs --matryoshka")
    if args.expanded_dim is not None and not phase.grown:
        raise ValueError(f"--expanded-dim records the grown width of phase {phases_where('grown')}; "
                         f"drop it for phases {phases_where('grown', False)}")
    if args.sample_dim and not args.n_random_plans:
        raise ValueError("--sample-dim shapes the random plans: give --n-random-plans >= 1")
    if min(args.n_random_plans, args.exit_loss_weight, args.new_channel_lr_mult, args.distill_weight,
           args.anchor_weight, args.exit_readouts) < 0 or args.log_every < 1 or not args.full_weight > 0:
        raise ValueError("--n-random-plans, --exit-loss-weight, --new-channel-lr-mult, --distill-weight, --anchor-weight, "
                         "--exit-readouts must be >= 0, --full-weight > 0 and --log-every >= 1")
    return phase


def phase1_trainable(name, new_prefixes):
    return ".mamba." in name or any(name.startswith(prefix) for prefix in new_prefixes)


# -----------------------------------------------------------------------------
# Setup: process, checkpoint + tokenizer (every missing or mismatched piece stops here), batch geometry

# This process and its batches: B rows of T tokens per forward; the train stream in data_ranks interleaved shards,
# my_shards of them on this rank (one per micro-batch in turn); grad_accum micro-batches, total_batch tokens a step
Geometry = namedtuple("Geometry", "ddp rank world_size device T B data_ranks my_shards total_batch grad_accum")


def setup_process(args, user_args):
    """(ddp, rank, world_size, device, wandb run); the flags that need several ranks stop here on one."""
    ddp, rank, _, world_size, device = compute_init(args.device or autodetect_device_type())
    wandb_run = init_wandb(args.run, "adamba", user_args, rank)
    if args.parallel == "fsdp" and not ddp:
        raise ValueError("--parallel=fsdp shards over ranks: start with torchrun --nproc_per_node=N (N >= 2)")
    if (args.fsdp_keep_params or args.fsdp_bf16 or args.fsdp_reduce != "step") and (
            args.parallel != "fsdp" or args.fsdp_bf16 and device.type != "cuda"):
        raise ValueError("--fsdp-keep-params, --fsdp-bf16, --fsdp-reduce need --parallel=fsdp (--fsdp-bf16: CUDA too)")
    if args.expert_parallel and (args.parallel != "ddp" or world_size < 2):
        raise ValueError("--expert-parallel shards the experts over the ranks of --parallel=ddp: start with torchrun "
                         "--nproc_per_node=N (N >= 2), without --parallel=fsdp")
    return ddp, rank, world_size, device, wandb_run


# Where the run reads and writes, and what its checkpoints' meta records of the run and its sources (provenance)
Paths = namedtuple("Paths", "data_dir out_dir load_path start_step provenance")


def load_checkpoint(args, phase, user_args, world_size, device):
    """(model, tokenizer, meta, Paths) of the --checkpoint, or with --resume the latest step in --out-dir. Missing data,
    a checkpoint this phase cannot train, a tokenizer that does not fit: each stops here with what to do."""
    data_dir = None if phase.chat else get_data_dir(args.data_dir)
    for split in ("train", "val") if data_dir else ():
        split_parquet_files(split, data_dir)  # raises, saying how to get data, if there is none
    out_dir = expand_path(args.out_dir) or os.path.join(get_base_dir(), "fractal_checkpoints", f"phase{args.phase}")
    source_dir, source_step = cm.resolve_checkpoint(args.checkpoint)
    if not args.resume and os.path.isdir(out_dir) and cm.list_steps(out_dir):
        raise ValueError(f"{out_dir} already holds checkpoints (steps {cm.list_steps(out_dir)}): pass --resume to "
                         f"continue that run, or use another --out-dir")
    load_path, start_step = (out_dir, cm.find_last_step(out_dir)) if args.resume else (cm.model_path(source_dir, source_step), 0)
    model, tokenizer, meta = cm.load_model_and_tokenizer(load_path, device=device)
    if cm.model_kind_of(meta) != "hybrid" and not (phase.chat and cm.model_kind_of(meta) == "gpt"):
        raise ValueError(f"{load_path} holds a {cm.model_kind_of(meta)!r} model; fractal_train trains hybrid checkpoints: "
                         f"make one with python -m scripts.surgery --new-dim=D")
    config = model.config
    if args.resume and meta.get("phase") != args.phase:
        raise ValueError(f"--resume: {out_dir} holds a phase {meta.get('phase')} run, not phase {args.phase}")
    if phase.grown and not config.grown_from:
        raise ValueError(f"phase {args.phase} needs a grown checkpoint: run scripts.surgery --expand-from ...")
    if args.expanded_dim is not None and args.expanded_dim != config.n_embd:
        raise ValueError(f"--expanded-dim={args.expanded_dim} but the checkpoint's n_embd is {config.n_embd}")
    if phase.controllers and not config.adaptive:
        raise ValueError(f"phase {args.phase} trains the confidence gates and width predictor, but this checkpoint has "
                         f"none (config.adaptive=False): create the hybrid with scripts.surgery --adaptive")
    if args.expert_parallel and ("E" not in ffn_pattern(config) or config.num_experts % world_size):
        raise ValueError(f"--expert-parallel needs MoE blocks whose experts divide over {world_size} ranks; this model has "
                         f"ffn_pattern {ffn_pattern(config)!r} and {getattr(config, 'num_experts', 0)} experts")
    source = meta.get("source") if args.resume else {"checkpoint": source_dir, "step": source_step,
                                                      "phase": meta.get("phase"), "model_kind": meta.get("model_kind")}
    provenance = {"user_args": user_args, "source": source, "surgery": meta.get("surgery"),
                  "lineage": meta.get("lineage", []) if args.resume else meta.get("lineage", []) + [source]}
    return model, tokenizer, meta, Paths(data_dir, out_dir, load_path, start_step, provenance)


def batch_geometry(args, config, ddp, rank, world_size, device):
    B, T = args.device_batch_size, args.max_seq_len or config.sequence_len
    data_ranks = args.data_ranks or world_size
    if data_ranks % world_size != 0:
        raise ValueError(f"--data-ranks={data_ranks} must be a multiple of the world size {world_size}")
    shards_per_rank = data_ranks // world_size
    total_batch = args.total_batch_size or B * T * data_ranks
    world_tokens = B * T * world_size
    if total_batch % world_tokens != 0 or (total_batch // world_tokens) % shards_per_rank != 0:
        raise ValueError(f"--total-batch-size={total_batch} must be a multiple of B*T*world_size*(data_ranks/world_size) "
                         f"= {B}*{T}*{world_size}*{shards_per_rank}")
    my_shards = list(range(rank * shards_per_rank, (rank + 1) * shards_per_rank))
    geo = Geometry(ddp, rank, world_size, device, T, B, data_ranks, my_shards, total_batch, total_batch // world_tokens)
    print0(f"tokens per step {total_batch:,} = {B} x {T} x {world_size} ranks x {geo.grad_accum} micro-batches | "
           f"data ranks {data_ranks} | steps {args.num_iterations}")
    return geo


# -----------------------------------------------------------------------------
# Model and optimizers: what trains, wrapped for training from outside the model; resume state

# The model and what updates it: train_model is what the step calls (compiled or not); the step clips train_params
# and scales the grown entries of mask_params ([(parameter, mask)])
Trainables = namedtuple("Trainables", "model train_model controllers optimizers train_params mask_params anchor replicated")


def prepare_training(args, phase, model, meta, geo):
    """What trains, as the phase says (the rest: requires_grad=False, in no optimizer); activation checkpointing, FSDP2,
    expert parallel, compile; then Muon + AdamW by kind (optim.setup_optimizers), the controllers a group of their own."""
    model.train()
    new_prefixes = (meta.get("surgery") or {}).get("new_param_prefixes") or []
    for name, p in model.named_parameters():
        p.requires_grad_(not phase.new_only or phase1_trainable(name, new_prefixes))
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if not n_train:
        raise ValueError(f"phase {args.phase}: no parameter to train (no Mamba blocks, no surgery.new_param_prefixes)")
    print0(f"trainable {n_train:,} | frozen {sum(p.numel() for p in model.parameters()) - n_train:,} parameters")
    controllers = model.controllers if phase.controllers else None
    ctrl_params = list(controllers.parameters()) if controllers is not None else []
    masks = grown_masks(model, meta) if phase.grown and args.new_channel_lr_mult != 1.0 else {}
    model.READOUT_CHECKPOINT = args.readout_checkpoint == "on"  # (this model's; the class default is on)
    if args.activation_checkpointing:
        apply_activation_checkpointing(model.transformer.h)
    replicated = []  # what FSDP2 leaves whole, all-reduced by the step: the controllers (and fp32 ones, --fsdp-bf16)
    if args.parallel == "fsdp":  # DTensors replace the parameters: optimizers after it; wte (bf16 on CUDA) apart
        replicated = apply_fsdp(model, model.transformer.h, ctrl_params, geo.device.type, separate=[model.transformer.wte],
                                reshard_after_forward=not args.fsdp_keep_params, bf16_matrices=args.fsdp_bf16)
    if args.expert_parallel:  # the experts become DTensors sharded on the expert dim; the rest stays replicated
        from torch.distributed.device_mesh import init_device_mesh
        n_moe = shard_experts(model, init_device_mesh(geo.device.type, (geo.world_size,)))
        print0(f"expert parallel: the experts of {n_moe} MoE blocks over {geo.world_size} ranks, "
               f"{model.config.num_experts // geo.world_size} per rank")
    params = dict(model.named_parameters())  # masks of DTensor parameters (fsdp, expert shards) sharded like them
    masks = {n: distribute_tensor(m, params[n].device_mesh, params[n].placements)
             if isinstance(params[n], DTensor) else m for n, m in masks.items()}
    train_model = (compile_model(model, args.compile, args.matryoshka, args.n_random_plans, args.sample_dim,
                                 exit_sets=exit_rotation_period(model.config, args.exit_readouts))
                   if args.compile else model)
    mask_params = [(p, masks[n]) for n, p in model.named_parameters() if n in masks]
    optimizers = setup_optimizers(model, matrix_lr=args.matrix_lr, embedding_lr=args.embedding_lr,
                                  unembedding_lr=args.unembedding_lr, scalar_lr=args.scalar_lr,
                                  weight_decay=args.weight_decay, controller_lr=args.controller_lr)
    train_params = [p for p in model.parameters() if p.requires_grad]
    anchor = None
    if args.anchor_weight > 0:  # the phase's input, frozen: a full replica on every rank
        anchor, _ = cm.load_model(cm.model_path(*cm.resolve_checkpoint(args.checkpoint)), device=geo.device)
        anchor.eval().requires_grad_(False)
        print0(f"anchor: full width also learns KL(input || full) x {args.anchor_weight} from {args.checkpoint}")
    return Trainables(model, train_model, controllers, optimizers, train_params, mask_params, anchor, replicated)


def restore_state(args, meta, paths, optimizers, data_ranks):
    """The data shards' loader states to start from: fresh (None), the resumed run's, or (--continue-data) those of
    the --checkpoint's run; with --resume also the optimizer states and the CPU RNG, once the flags agree."""
    if args.resume:
        saved = meta.get("user_args", {})
        added = {"plan_schedule": "every", "full_weight": 1.0, "anchor_weight": 0.0}  # flags newer than some runs
        for key in ("device_batch_size", "max_seq_len", "total_batch_size", "matryoshka", "sample_dim",
                    "n_random_plans", "seed", "data_dir", *added):
            if saved.get(key, added.get(key)) != getattr(args, key):
                raise ValueError(f"--resume: the run in {paths.out_dir} used --{key.replace('_', '-')}={saved.get(key)!r}, "
                                 f"now {getattr(args, key)!r}; exact resume needs the same value")
        if meta.get("data_ranks") != data_ranks:
            raise ValueError(f"--resume: the run used {meta.get('data_ranks')} data ranks, now {data_ranks}: "
                             f"pass --data-ranks={meta.get('data_ranks')}")
        # one file of full (unsharded) optimizer state, whatever the world size and --parallel that saved it
        saved_opt = cm.load_optimizer_state(paths.out_dir, paths.start_step, 0, "cpu")  # load_state_dict moves it to the params
        load_optimizer_state_dicts(optimizers, saved_opt["optimizers"])
        optimizer_state_to_dtensor(optimizers)  # the state of DTensor parameters (fsdp, expert shards) sharded like them
        torch.set_rng_state(saved_opt["rng_cpu"])
        print0(f"resumed {paths.out_dir} at step {paths.start_step}")
    elif args.continue_data:
        prev = meta.get("user_args") or {}
        if meta.get("data_ranks") != data_ranks or expand_path(prev.get("data_dir")) != expand_path(args.data_dir):
            raise ValueError(f"--continue-data: {paths.load_path} was trained with data ranks {meta.get('data_ranks')} on "
                             f"{prev.get('data_dir')!r}; continuing its stream needs the same --data-ranks and --data-dir")
    else:
        return [None] * data_ranks
    return meta["dataloader_state"]


# -----------------------------------------------------------------------------
# Data: one train stream per data shard of this rank; the val batches are read once and kept

def make_data(args, tokenizer, meta, paths, loader_states, geo):
    if geo.rank == 0:  # the tokenizer travels with the checkpoints (the next phase and surgery read it there)
        cm.copy_tokenizer_files(meta["tokenizer_dir"], paths.out_dir)
        if not os.path.exists(os.path.join(paths.out_dir, TOKEN_BYTES_FILENAME)):
            save_token_bytes(tokenizer, paths.out_dir)
    B, T, data_dir, device = geo.B, geo.T, paths.data_dir, geo.device
    loaders = {j: tokenizing_distributed_data_loader(tokenizer, B, T, "train", data_dir=data_dir, device=device,
                                                     resume_state=loader_states[j], rank=j, world_size=geo.data_ranks)
               for j in geo.my_shards}
    world_tokens = B * T * geo.world_size
    val_batches = []
    if args.eval_every > 0:
        if args.eval_tokens < world_tokens:
            raise ValueError(f"--eval-tokens={args.eval_tokens} is less than one batch of {world_tokens} tokens")
        val_loader = tokenizing_distributed_data_loader(tokenizer, B, T, "val", data_dir=data_dir, device=device)
        val_batches = [next(val_loader)[:2] for _ in range(args.eval_tokens // world_tokens)]
    return loaders, val_batches


# -----------------------------------------------------------------------------
# One training step: at its start the model has had `step` updates

def step_plans(args, config, step):
    """The plans of this step: a function of (seed, step) alone, so a resumed run draws the same."""
    rng = random.Random(args.seed * 1_000_003 + step)
    return adaptive_step_plans(config, args.matryoshka, rng, args.n_random_plans, args.sample_dim, step, args.plan_schedule)


def train_step(args, phase, t, loaders, loader_states, geo, step, plans):
    """Forward + backward of every plan (full width first) on each micro-batch, gradient reductions, update. Returns
    [CE per plan..., distill KL, MoE router, gate, router loss] (means over micro-batches and ranks), lrm, grad norm, dt,
    dt update."""
    model, controllers, grad_accum, world_size = t.model, t.controllers, geo.grad_accum, geo.world_size
    shards_per_rank = len(geo.my_shards)
    # mean over plans and micro-batches, and over ranks: our all-reduce sums, FSDP2's reduce-scatter averages
    full_w = args.full_weight if len(plans) > 1 else 1.0
    scale = 1.0 / ((len(plans) - 1 + full_w) * grad_accum * (world_size if args.parallel == "ddp" else 1))
    synchronize(geo.device)
    t0 = time.time()
    sums = torch.zeros(len(plans) + 4, device=geo.device)  # per-plan CE, distill KL, MoE router, gate, router losses
    for micro in range(grad_accum):
        j = geo.my_shards[micro % shards_per_rank]
        x, y, loader_states[j] = next(loaders[j])

        def backward(objective, i):
            if args.parallel == "fsdp":  # reduce-scatter after the step's last backward (or each: --fsdp-reduce=pass)
                fsdp_before_backward(model, micro == grad_accum - 1 and i == len(plans) - 1, args.fsdp_keep_params,
                                     args.fsdp_reduce == "pass")
            (objective * (scale * full_w if i == 0 else scale)).backward()

        with autocast_context(geo.device.type):  # bf16 on CUDA, fp32 elsewhere
            sums += train_micro_batch(model, t.train_model, x, y, plans, controllers,
                                      args.exit_loss_weight if phase.exit_loss else 0.0,
                                      args.distill_weight if args.distill else 0.0, backward=backward,
                                      anchor=t.anchor, anchor_weight=args.anchor_weight,
                                      exit_readouts=args.exit_readouts, micro_index=step * grad_accum + micro)
    if args.parallel == "ddp":  # expert shards: every rank's tokens already reached them (all_to_all): no all-reduce
        allreduce_gradients([p for p in t.train_params if not is_expert_shard(p)])
    elif t.replicated:  # fsdp: the replicated controllers (and fp32 parameters); loss not scaled by the world size
        allreduce_gradients(t.replicated, divide_by=world_size)
    if geo.ddp:
        dist.all_reduce(sums, op=dist.ReduceOp.SUM)
    sums = (sums / (grad_accum * world_size)).tolist()  # a device sync: what follows is the update
    t_update = time.time()
    grad_norm = clip_grad_norm(t.train_params, args.grad_clip) if args.grad_clip > 0 else None
    lrm = lr_multiplier(step, args.num_iterations, args.warmup_ratio, args.warmdown_ratio)
    set_lr_multiplier(t.optimizers, lrm)
    set_muon_momentum(t.optimizers, muon_momentum(step))
    before = [p.detach().clone() for p, _ in t.mask_params]
    for opt in t.optimizers:
        opt.step()
    with torch.no_grad():
        for (p, m), old in zip(t.mask_params, before):  # grown entries: old + mult * (their update)
            p.copy_(torch.where(m, old + args.new_channel_lr_mult * (p - old), p))
    model.zero_grad(set_to_none=True)
    for block in model.transformer.h:
        if getattr(block, "ffn_kind", None) == "E" and block.moe.bias_balancing:
            block.moe.update_bias()
    synchronize(geo.device)
    t1 = time.time()
    if not math.isfinite(sums[0]):
        raise FloatingPointError(f"step {step}: full-width loss is {sums[0]}; lower the learning rates or check the data")
    return sums, lrm, None if grad_norm is None else grad_norm.item(), t1 - t0, t1 - t_update


# -----------------------------------------------------------------------------
# Evaluating and saving

def save(args, step, val, t, loader_states, paths, geo):
    """Optimizer state (full, from rank 0), then the model and, last, the meta with every data shard's position."""
    states = [{j: loader_states[j] for j in geo.my_shards}]  # this rank's shards, then (ddp) every rank's
    if geo.ddp:
        states = [None] * geo.world_size
        dist.all_gather_object(states, {j: loader_states[j] for j in geo.my_shards})
    by_shard = {int(j): state for d in states for j, state in d.items()}
    all_states = [by_shard[j] for j in range(geo.data_ranks)]
    # full optimizer state (gathered under fsdp: a collective), one file from rank 0, so a run saved on N ranks
    # resumes on any number, with either --parallel
    opt_state = {"optimizers": optimizer_state_full(optimizer_state_dicts(t.optimizers)), "rng_cpu": torch.get_rng_state()}
    model_state = full_state_dict(t.model)  # collective under fsdp
    if geo.ddp:
        dist.barrier()
    meta = {"model_kind": t.model.kind, "model_config": t.model.config.to_dict(), "step": step, "phase": args.phase,
            "dataloader_state": all_states, "data_ranks": geo.data_ranks, "world_size": geo.world_size,
            "num_iterations": args.num_iterations, "val": val, **paths.provenance}
    if geo.rank == 0:
        cm.save_checkpoint(paths.out_dir, step, model_state, meta, optim_state=opt_state, rank=0)
    if geo.ddp:
        dist.barrier()


def ffn_pattern(config):
    return getattr(config, "ffn_pattern", "")  # a dense GPT (scripts.chat_sft) has none


def main(argv=None):
    args = get_args(argv)
    return train(args, check_args(args), make_data, "scripts.fractal_train", argv)


def train(args, phase, data_fn, script, argv=None):
    """The run: setup, the step loop, checkpoints. data_fn(args, tokenizer, meta, paths, loader_states, geo) ->
    (train loaders by data shard, val batches): make_data here, chat conversations in scripts.chat_sft."""
    user_args = vars(args).copy()
    ddp, rank, world_size, device, wandb_run = setup_process(args, user_args)
    model, tokenizer, meta, paths = load_checkpoint(args, phase, user_args, world_size, device)
    config = model.config
    token_bytes = compute_token_bytes(tokenizer).to(device)
    print0(f"{script} phase {args.phase} | model {paths.load_path} (step {meta['checkpoint_step']}) | n_embd {config.n_embd} | "
           f"layers {config.n_layer} ({getattr(config, 'layer_pattern', 'dense')}/{ffn_pattern(config)}) | levels "
           f"{getattr(config, 'width_levels', '-')} | data {paths.data_dir or 'conversations'}")
    geo = batch_geometry(args, config, ddp, rank, world_size, device)
    t = prepare_training(args, phase, model, meta, geo)
    loader_states = restore_state(args, meta, paths, t.optimizers, geo.data_ranks)
    loaders, val_batches = data_fn(args, tokenizer, meta, paths, loader_states, geo)
    num_iterations, has_moe, peak = args.num_iterations, "E" in ffn_pattern(config), peak_flops(device)

    # -------------------------------------------------------------------------
    # Training loop: at the top of step s the model has had s updates
    history = {k: [] for k in ("steps", "loss", "plan_losses", "plan_labels", "distill_kl", "gate_loss", "predictor_loss",
                               "router_loss")}
    history["val"] = {}
    step_times, val = [], None
    step = paths.start_step
    stop = GracefulStop()  # SIGINT / SIGTERM: finish the step, save it, print the --resume command
    while True:
        stopping = stop.requested(device)
        last_step = step >= num_iterations or stopping
        if args.eval_every > 0 and not stopping and (last_step or step % args.eval_every == 0):
            val = evaluate_widths(model, t.controllers, val_batches, token_bytes, geo.T, args.exit_threshold, args.plan_epsilon)
            history["val"][step] = val
            print0(f"step {step:05d} | val " + " | ".join(f"{k} {v:.4f}" for k, v in val.items()))
            wandb_run.log({"step": step, **{f"val/{k}": v for k, v in val.items()}})
        if not args.no_save and step > paths.start_step and (last_step or (args.save_every > 0 and step % args.save_every == 0)):
            save(args, step, val, t, loader_states, paths, geo)
        if last_step:
            break
        plans = step_plans(args, config, step)
        sums, lrm, grad_norm, dt, dt_update = train_step(args, phase, t, loaders, loader_states, geo, step, plans)

        # ---- one line every --log-every steps
        step_times.append(dt)
        recent = step_times[1:] or step_times  # the first step includes compilation and warmup
        eta = (num_iterations - step - 1) * sum(recent) / len(recent)
        tok_per_sec = geo.total_batch / dt
        step_flops = geo.total_batch * sum(3 * plan_flops(model, geo.T / 2, plan) for plan in plans)
        mfu = 100 * step_flops / dt / (peak * world_size) if peak else None
        labels = [plan_label(plan, config) for plan in plans]
        widths = " ".join(f"{label} {l:.3f}" for label, l in zip(labels[1:], sums[1:len(plans)]))
        ctrl = f" | kl {sums[len(plans)]:.4f}" if args.distill else ""
        ctrl += f" | gate {sums[-2]:.4f} router {sums[-1]:.4f}" if t.controllers is not None else ""
        ctrl += f" | moe {sums[-3]:.4f}" if has_moe else ""
        if step % args.log_every == 0 or step == num_iterations - 1:
            print0(f"step {step:05d}/{num_iterations:05d} ({100 * step / num_iterations:.1f}%) | loss {sums[0]:.6f}"
                   + (f" [{widths}]" if widths else "") + ctrl +
                   f" | lrm {lrm:.2f} | dt {dt * 1000:.0f}ms | tok/s {int(tok_per_sec):,} | "
                   f"mfu {f'{mfu:.2f}' if mfu is not None else 'n/a'} | update {dt_update * 1000:.0f}ms | eta {format_eta(eta)}")
        for k, v in zip(("steps", "loss", "plan_losses", "plan_labels", "distill_kl", "gate_loss", "predictor_loss",
                         "router_loss"), (step, sums[0], sums[:len(plans)], labels, sums[len(plans)], *sums[-2:], sums[-3])):
            history[k].append(v)
        log = {"step": step, "train/loss": sums[0], "train/lrm": lrm, "train/dt": dt, "train/tok_per_sec": tok_per_sec,
               **{f"train/loss_{label}": l for label, l in zip(labels[1:], sums[1:len(plans)])}}
        if t.controllers is not None:
            log.update({"train/gate_loss": sums[-2], "train/predictor_loss": sums[-1]})
        optional = {"router_loss": sums[-3] if has_moe else None, "mfu": mfu, "grad_norm": grad_norm}
        wandb_run.log({**log, **{f"train/{k}": v for k, v in optional.items() if v is not None}})
        step += 1

    print0(f"{peak_memory_note(device)}training time {sum(step_times) / 60:.2f}m")
    if history["loss"]:  # the run report's stage: phase1..3 or sft (scripts.chat_sft)
        run_report.record("chat_sft" if phase.chat else f"phase{args.phase}", {
            "checkpoint": paths.out_dir, "steps": step, "loss_last": history["loss"][-1], "val": val,
            "training_minutes": sum(step_times) / 60})
    wandb_run.finish()
    compute_cleanup()
    if stop.signum is not None:  # saved above (unless --no-save); say how to go on, exit 128 + signal
        stop.finish(step, saved=not args.no_save and step > paths.start_step,
                    resume=resume_command(script, sys.argv[1:] if argv is None else argv, paths.out_dir)
                    if os.path.isdir(paths.out_dir) and cm.list_steps(paths.out_dir) else None)
    stop.close()
    return dict(history, checkpoint_dir=paths.out_dir, checkpoint=cm.model_path(paths.out_dir, step), last_step=step,
                num_iterations=num_iterations, model_config=config.to_dict())


if __name__ == "__main__":
    run_script(main)

"""
Train a hybrid (attention + Mamba) checkpoint in three phases.

    torchrun --standalone --nproc_per_node=8 -m scripts.fractal_train --phase=1 --checkpoint=~/ckpt/hybrid
    torchrun --standalone --nproc_per_node=8 -m scripts.fractal_train --phase=2 --checkpoint=<phase 1 out-dir>
    python -m scripts.surgery --src=<phase 2 out-dir> --expand-from=D --new-dim=D2 --dst=<grown>
    torchrun --standalone --nproc_per_node=8 -m scripts.fractal_train --phase=3 --checkpoint=<grown> --expanded-dim=D2

Phase 1: only the Mamba mixers (every `.mamba.` parameter) and the parameters surgery created
    new (meta["surgery"]["new_param_prefixes"]) train; everything else has requires_grad=False, so it
    gets no gradient and is in no optimizer. Full width only (--matryoshka is an error).
Phase 2: every parameter trains. Each step runs the sandwich of width plans (matryoshka.sample_plans:
    full, smallest, --n-random-plans random ones; --sample-dim gives each block its own random width),
    one forward + backward per plan on the same micro-batch. The objective is the MEAN over plans of
        CE(plan) + MoE router losses(plan)
    plus, on the full-width forward only, --exit-loss-weight * mean CE of the exit readouts before
    the last block, and the gate + width-predictor losses (confidence_probe.controller_losses, which
    stop gradients into the trunk). The controllers are an AdamW group of their own (--controller-lr).
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
--parallel=fsdp shards with FSDP2 (fully_shard per block, then the root; the small controllers stay
replicated, their gradients all-reduced); --fsdp-keep-params keeps the gathered parameters for the whole
step (one all-gather per block and step; phase 2's three passes otherwise gather every block six times).
--expert-parallel (with ddp) shards every MoE's experts over the ranks instead of replicating them
(nanochat.moe_ep: rows travel by all_to_all, one host sync per MoE call, that part runs eager); the
expert gradients are complete without an all-reduce, and checkpoints hold the full experts.
The training stream is cut into --data-ranks interleaved shards (default: the world size); each rank
reads data-ranks / world_size of them, one per micro-batch in turn. A fixed --data-ranks makes the
tokens of every step independent of the number of processes (resume on fewer GPUs, or check that
2 ranks equal 1).

Resume (--resume: the latest checkpoint in --out-dir) is exact: weights, optimizer states, every data
shard's position, and the random choices, which are functions of (seed, step) for the plans and of
(seed, step, data shard, micro-batch round) for the controllers' probes, so there is no RNG state to
lose. A checkpoint holds the full model and the full optimizer state (one file each, written by rank 0), so
a run saved on N ranks, with either --parallel, resumes on any number of ranks (same --data-ranks).
Ctrl-C or SIGTERM finishes the current step, saves it and prints the command that resumes (exit 130 / 143).
--compile compiles the training forward for each distinct plan it meets (recompiles on new
plans; --sample-dim makes many), so it pays off for long runs with uniform plans.
"""
import os
import sys
import math
import time
import random
import argparse

import torch
import torch.distributed as dist

from nanochat.common import (compute_init, compute_cleanup, print0, autodetect_device_type, autocast_context,
                             get_base_dir, expand_path, init_wandb, synchronize, peak_memory_note, add_runtime_args,
                             run_script)
from nanochat.tokenizer import Tokenizer, compute_token_bytes, save_token_bytes, TOKENIZER_FILENAME, TOKEN_BYTES_FILENAME
from nanochat.dataset import get_data_dir, split_parquet_files
from nanochat.dataloader import tokenizing_distributed_data_loader
from nanochat.loss_eval import all_reduce_sums, evaluate_bpb
from nanochat.moe_ep import shard_experts, is_expert_shard
from nanochat.matryoshka import sample_plans
from nanochat.optim import (setup_optimizers, lr_multiplier, set_lr_multiplier, muon_momentum, set_muon_momentum,
                            optimizer_state_dicts, load_optimizer_state_dicts)
from nanochat.train_utils import (peak_flops, apply_activation_checkpointing, apply_fsdp, allreduce_gradients,
                                  clip_grad_norm, full_state_dict, optimizer_state_full, optimizer_state_to_dtensor,
                                  format_eta, GracefulStop, resume_command)
from nanochat import checkpoint_manager as cm

EPILOG = """
FLOPs and MFU: a step's FLOPs are tokens_per_step * sum over the plans it ran of
3 * model.forward_flops_per_token(T/2, plan) (= model.estimate_flops(plan) when T is the model's
sequence_len): 2 FLOPs per multiply-accumulate of every weight matmul, attention over the mean causal
context, the Mamba conv and scan, MoE router + top-k experts, backward = 2x forward. Not counted:
the exit readouts of the full-width forward, the controllers, norms and activations (so MFU
understates what the hardware does). MFU = FLOPs / dt / (world_size * peak bf16 FLOP/s); n/a on CPU.
"""


def get_args(argv=None):
    p = argparse.ArgumentParser(description="Fractal training of a hybrid checkpoint: phase 1 (Mamba only), "
                                "2 (all + Matryoshka + controllers), 3 (grown model)", epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--phase", type=int, required=True, choices=(1, 2, 3))
    p.add_argument("--checkpoint", type=str, required=True, help="hybrid checkpoint dir or model_<step>.pt (tokenizer.pkl beside it)")
    p.add_argument("--matryoshka", action=argparse.BooleanOptionalAction, default=None,
                   help="sample width plans (default on for phases 2/3; an error in phase 1)")
    p.add_argument("--sample-dim", action="store_true", help="random plans give each block its own width (else one width for all)")
    p.add_argument("--n-random-plans", type=int, default=1, help="random plans per step besides the full and smallest")
    p.add_argument("--expanded-dim", type=int, default=None, help="phase 3: the grown n_embd, checked against the checkpoint")
    p.add_argument("--exit-loss-weight", type=float, default=0.1, help="weight of the exit readouts' CE on the trunk (phases 2/3)")
    p.add_argument("--exit-threshold", type=float, default=0.9, help="eval: gate probability above which a token exits")
    p.add_argument("--plan-epsilon", type=float, default=0.02, help="eval: per-block loss budget of the predictor's plan (nats)")
    # runtime
    p.add_argument("--run", type=str, default="dummy", help="wandb run name ('dummy' = no wandb)")
    p.add_argument("--device", type=str, default="", help="cuda|cpu|mps (empty = autodetect)")
    p.add_argument("--seed", type=int, default=42, help="seed of the plan sampling (a function of seed and step)")
    p.add_argument("--compile", action="store_true", help="torch.compile the training forward (recompiles per distinct plan)")
    p.add_argument("--activation-checkpointing", action="store_true", help="recompute block activations in backward")
    p.add_argument("--parallel", type=str, default="ddp", choices=("ddp", "fsdp"))
    p.add_argument("--fsdp-keep-params", action="store_true",
                   help="fsdp: keep the gathered parameters for the whole step (no reshard after a forward, nor between "
                        "the step's backward passes): one all-gather per block and step instead of two per pass; costs "
                        "the memory of the unsharded model")
    p.add_argument("--expert-parallel", action="store_true",
                   help="ddp: shard every MoE's experts over the ranks (num_experts / world size each, rows sent by "
                        "all_to_all; nanochat.moe_ep); the rest stays replicated")
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
    p.add_argument("--log-every", type=int, default=1, help="print the step line every N steps (and the last)")
    add_runtime_args(p)  # --debug, --threads, --require-kernels (read by run_script)
    return p.parse_args(argv)


def check_args(args):
    if args.matryoshka is None:
        args.matryoshka = args.phase >= 2
    if args.phase == 1 and args.matryoshka:
        raise ValueError("--matryoshka is for phases 2 and 3: phase 1 trains the new Mamba blocks at full width only")
    if args.sample_dim and not args.matryoshka:
        raise ValueError("--sample-dim samples per-block widths of Matryoshka plans; it needs --matryoshka")
    if args.expanded_dim is not None and args.phase != 3:
        raise ValueError("--expanded-dim records the grown width of phase 3; drop it for phases 1 and 2")
    if args.n_random_plans < 0 or args.exit_loss_weight < 0 or args.new_channel_lr_mult < 0:
        raise ValueError("--n-random-plans, --exit-loss-weight and --new-channel-lr-mult must be >= 0")
    if args.log_every < 1:
        raise ValueError(f"--log-every={args.log_every}: print every N >= 1 steps")


def plan_label(plan):
    """'w64' for a uniform plan, 'm48' (mean width) for a per-block one."""
    return f"w{plan[0]}" if len(set(plan)) == 1 else f"m{round(sum(plan) / len(plan))}"


def phase1_trainable(name, new_prefixes):
    return ".mamba." in name or any(name.startswith(prefix) for prefix in new_prefixes)


def grown_masks(model, meta):
    """
    {parameter name: bool mask, True on the entries the last growth added}, from where surgery.grow
    put the old entries (meta["surgery"]["grow"]["old_index"], per parameter the runs per dim).
    Parameters it does not list (the re-initialised controllers) are not masked.
    """
    from nanochat.surgery import new_entry_mask
    old_index = ((meta.get("surgery") or {}).get("grow") or {}).get("old_index")
    if old_index is None:
        raise ValueError("phase 3: the checkpoint's meta has no surgery.grow.old_index, so the grown entries are "
                         "unknown; grow it with scripts.surgery --expand-from, or pass --new-channel-lr-mult=1")
    params = dict(model.named_parameters())
    unknown = sorted(set(old_index) - set(params))
    if unknown:
        raise ValueError(f"surgery.grow.old_index names parameters the model does not have: {unknown[:5]}")
    return {n: new_entry_mask(tuple(params[n].shape), runs).to(params[n].device) for n, runs in old_index.items()}


def controller_eval(model, batches, token_bytes, T, exit_threshold, plan_epsilon):
    """
    Held-out metrics of the controllers (this rank's batches, summed over ranks):
    bpb_pred: bits per byte with each row at the width predictor's plan (read from its first T/2 tokens);
    compute_pred: that plan's forward FLOPs per token over the full width's (mean over rows);
    exit_rate / exit_precision: teacher forced, at full width, a token exits at the first gate whose
    (raw, uncalibrated) probability is > exit_threshold; precision = its exit readout's top-1 agrees
    with the final top-1 (confidence_probe.gate_scores).
    """
    from nanochat.confidence_probe import gate_scores
    c, ctrl = model.config, model.controllers
    full_flops = model.forward_flops_per_token(T / 2)
    dev = token_bytes.device
    frac = torch.zeros(2, dtype=torch.float64, device=dev)  # sum of compute fractions, rows

    def at_predicted_plan(x, y, loss_reduction="none"):
        pooled = ctrl.predictor.pool(model.prefix_hidden(x, c.predictor_after)[:, :T // 2])
        plan = ctrl.predictor.plan(ctrl.predictor(pooled), plan_epsilon, ctrl.matters)  # (B, n_layer)
        for row in plan.tolist():
            frac[0] += model.forward_flops_per_token(T / 2, row) / full_flops
            frac[1] += 1
        return model(x, y, width=plan, loss_reduction=loss_reduction)

    res = {"bpb_pred": evaluate_bpb(at_predicted_plan, batches, len(batches), token_bytes)}
    probs, agree = gate_scores(model, batches, calibrated=False)  # (G, N) each
    fire = probs > exit_threshold
    exited = fire.any(0)
    first = fire.float().argmax(0)
    good = agree[first, torch.arange(agree.size(1))] & exited
    counts = torch.tensor([exited.numel(), exited.sum().item(), good.sum().item()], dtype=torch.float64, device=dev)
    all_reduce_sums(frac, counts)
    res["compute_pred"] = (frac[0] / frac[1]).item()
    res["exit_rate"] = (counts[1] / counts[0]).item()
    res["exit_precision"] = (counts[2] / counts[1]).item() if counts[1] > 0 else float("nan")
    return res


def main(argv=None):
    args = get_args(argv)
    check_args(args)
    user_args = vars(args).copy()

    # -------------------------------------------------------------------------
    # Process and device
    device_type = args.device or autodetect_device_type()
    ddp, rank, local_rank, world_size, device = compute_init(device_type)
    master = rank == 0
    autocast_ctx = autocast_context(device_type)  # bf16 on CUDA, fp32 elsewhere
    wandb_run = init_wandb(args.run, "adamba", user_args, rank)
    if args.parallel == "fsdp" and not ddp:
        raise ValueError("--parallel=fsdp shards over ranks: start with torchrun --nproc_per_node=N (N >= 2)")
    if args.expert_parallel and (args.parallel != "ddp" or world_size < 2):
        raise ValueError("--expert-parallel shards the experts over the ranks of --parallel=ddp: start with torchrun "
                         "--nproc_per_node=N (N >= 2), without --parallel=fsdp")

    # -------------------------------------------------------------------------
    # Checkpoint, tokenizer and data: every missing piece stops here with what to do
    data_dir = get_data_dir(args.data_dir)
    for split in ("train", "val"):
        split_parquet_files(split, data_dir)  # raises, saying how to get data, if there is none
    out_dir = expand_path(args.out_dir) or os.path.join(get_base_dir(), "fractal_checkpoints", f"phase{args.phase}")
    source_dir, source_step = cm.resolve_checkpoint(args.checkpoint)
    if args.resume:
        load_path = out_dir
        start_step = cm.find_last_step(out_dir)
    else:
        if os.path.isdir(out_dir) and cm.list_steps(out_dir):
            raise ValueError(f"{out_dir} already holds checkpoints (steps {cm.list_steps(out_dir)}): pass --resume to "
                             f"continue that run, or use another --out-dir")
        load_path, start_step = cm.model_path(source_dir, source_step), 0
    model, meta = cm.load_model(load_path, device=device)
    if cm.model_kind_of(meta) != "hybrid":
        raise ValueError(f"{load_path} holds a {cm.model_kind_of(meta)!r} model; fractal_train trains hybrid checkpoints: "
                         f"make one with python -m scripts.surgery --new-dim=D")
    config = model.config
    if args.resume and meta.get("phase") != args.phase:
        raise ValueError(f"--resume: {out_dir} holds a phase {meta.get('phase')} run, not phase {args.phase}")
    if args.phase == 3 and not config.grown_from:
        raise ValueError("phase 3 needs a grown checkpoint: run scripts.surgery --expand-from ...")
    if args.expanded_dim is not None and args.expanded_dim != config.n_embd:
        raise ValueError(f"--expanded-dim={args.expanded_dim} but the checkpoint's n_embd is {config.n_embd}")
    if args.phase >= 2 and not config.adaptive:
        raise ValueError(f"phase {args.phase} trains the confidence gates and width predictor, but this checkpoint has "
                         f"none (config.adaptive=False): create the hybrid with scripts.surgery --adaptive")
    if args.expert_parallel and ("E" not in config.ffn_pattern or config.num_experts % world_size):
        raise ValueError(f"--expert-parallel needs MoE blocks whose experts divide over {world_size} ranks; this model has "
                         f"ffn_pattern {config.ffn_pattern!r} and {config.num_experts} experts")
    tok_dir = cm.resolve_checkpoint(load_path)[0]
    if not os.path.isfile(os.path.join(tok_dir, TOKENIZER_FILENAME)):
        raise FileNotFoundError(f"no {TOKENIZER_FILENAME} in {tok_dir}: the tokenizer travels with the checkpoint; "
                                f"copy the one the model was trained with there")
    tokenizer = Tokenizer.from_directory(tok_dir)
    if tokenizer.get_vocab_size() != config.vocab_size:
        raise ValueError(f"the tokenizer in {tok_dir} has {tokenizer.get_vocab_size()} ids but the model's vocab_size is "
                         f"{config.vocab_size}; they must be the pair the model was trained with")
    token_bytes = compute_token_bytes(tokenizer).to(device)
    print0(f"phase {args.phase} | model {load_path} (step {meta['checkpoint_step']}) | n_embd {config.n_embd} | "
           f"layers {config.n_layer} ({config.layer_pattern}/{config.ffn_pattern}) | levels {config.width_levels} | data {data_dir}")

    # -------------------------------------------------------------------------
    # What trains. Phase 1: Mamba + surgery's new parameters; phases 2/3: everything
    model.train()
    new_prefixes = (meta.get("surgery") or {}).get("new_param_prefixes") or []
    for name, p in model.named_parameters():
        p.requires_grad_(args.phase >= 2 or phase1_trainable(name, new_prefixes))
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not trainable:
        raise ValueError(f"phase {args.phase}: no parameter to train (no Mamba blocks, no surgery.new_param_prefixes)")
    n_frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    print0(f"trainable {sum(p.numel() for _, p in trainable):,} | frozen {n_frozen:,} parameters")
    controllers = model.controllers if args.phase >= 2 else None
    if controllers is not None:
        from nanochat.confidence_probe import controller_losses
    ctrl_params = list(controllers.parameters()) if controllers is not None else []
    masks = grown_masks(model, meta) if args.phase == 3 and args.new_channel_lr_mult != 1.0 else {}

    # -------------------------------------------------------------------------
    # Batch geometry
    T = args.max_seq_len or config.sequence_len
    B = args.device_batch_size
    data_ranks = args.data_ranks or world_size
    if data_ranks % world_size != 0:
        raise ValueError(f"--data-ranks={data_ranks} must be a multiple of the world size {world_size}")
    shards_per_rank = data_ranks // world_size
    my_shards = list(range(rank * shards_per_rank, (rank + 1) * shards_per_rank))
    total_batch = args.total_batch_size or B * T * data_ranks
    world_tokens = B * T * world_size
    if total_batch % world_tokens != 0 or (total_batch // world_tokens) % shards_per_rank != 0:
        raise ValueError(f"--total-batch-size={total_batch} must be a multiple of B*T*world_size*(data_ranks/world_size) "
                         f"= {B}*{T}*{world_size}*{shards_per_rank}")
    grad_accum = total_batch // world_tokens
    num_iterations = args.num_iterations
    print0(f"tokens per step {total_batch:,} = {B} x {T} x {world_size} ranks x {grad_accum} micro-batches | "
           f"data ranks {data_ranks} | steps {num_iterations}")

    # -------------------------------------------------------------------------
    # Wrap for training from outside the model: activation checkpointing, FSDP2, compile
    if args.activation_checkpointing:
        apply_activation_checkpointing(model.transformer.h)
    if args.parallel == "fsdp":
        # NOTE: fully_shard replaces the parameters by DTensors: the optimizers must be built after it
        # the controllers stay replicated; wte (bf16 on CUDA, as nanochat) is a shard group of its own
        apply_fsdp(model, model.transformer.h, ctrl_params, device.type, separate=[model.transformer.wte],
                   reshard_after_forward=not args.fsdp_keep_params)
    if args.expert_parallel:  # the experts become DTensors sharded on the expert dim; the rest stays replicated
        from torch.distributed.device_mesh import init_device_mesh
        n_moe = shard_experts(model, init_device_mesh(device.type, (world_size,)))
        print0(f"expert parallel: the experts of {n_moe} MoE blocks over {world_size} ranks, "
               f"{config.num_experts // world_size} per rank")
    from torch.distributed.tensor import DTensor, distribute_tensor
    params = dict(model.named_parameters())  # masks of DTensor parameters (fsdp, expert shards) sharded like them
    masks = {n: distribute_tensor(m, params[n].device_mesh, params[n].placements)
             if isinstance(params[n], DTensor) else m for n, m in masks.items()}
    train_model = torch.compile(model, dynamic=False) if args.compile else model
    mask_params = [(p, masks[n]) for n, p in model.named_parameters() if n in masks]
    has_moe = "E" in config.ffn_pattern
    peak = peak_flops(device)

    # -------------------------------------------------------------------------
    # Optimizers: Muon + AdamW by kind (optim.setup_optimizers), controllers as an AdamW group of their own
    optimizers = setup_optimizers(model, matrix_lr=args.matrix_lr, embedding_lr=args.embedding_lr,
                                  unembedding_lr=args.unembedding_lr, scalar_lr=args.scalar_lr,
                                  weight_decay=args.weight_decay, controller_lr=args.controller_lr)
    train_params = [p for p in model.parameters() if p.requires_grad]
    # expert shards: every rank's tokens already reached them (summed by all_to_all), so no all-reduce
    replicated_params = [p for p in train_params if not is_expert_shard(p)]

    # -------------------------------------------------------------------------
    # Resume state
    loader_states = [None] * data_ranks
    if args.resume:
        saved = meta.get("user_args", {})
        for key in ("device_batch_size", "max_seq_len", "total_batch_size", "matryoshka", "sample_dim",
                    "n_random_plans", "seed", "data_dir"):
            if saved.get(key) != getattr(args, key):
                raise ValueError(f"--resume: the run in {out_dir} used --{key.replace('_', '-')}={saved.get(key)!r}, "
                                 f"now {getattr(args, key)!r}; exact resume needs the same value")
        if meta.get("data_ranks") != data_ranks:
            raise ValueError(f"--resume: the run used {meta.get('data_ranks')} data ranks, now {data_ranks}: "
                             f"pass --data-ranks={meta.get('data_ranks')}")
        loader_states = meta["dataloader_state"]
        # one file of full (unsharded) optimizer state, whatever the world size and --parallel that saved it
        saved_opt = cm.load_optimizer_state(out_dir, start_step, 0, "cpu")  # load_state_dict moves it to the params
        load_optimizer_state_dicts(optimizers, saved_opt["optimizers"])
        optimizer_state_to_dtensor(optimizers)  # the state of DTensor parameters (fsdp, expert shards) sharded like them
        torch.set_rng_state(saved_opt["rng_cpu"])
        print0(f"resumed {out_dir} at step {start_step}")
    elif args.continue_data:
        prev = meta.get("user_args") or {}
        if meta.get("data_ranks") != data_ranks or expand_path(prev.get("data_dir")) != expand_path(args.data_dir):
            raise ValueError(f"--continue-data: {load_path} was trained with data ranks {meta.get('data_ranks')} on "
                             f"{prev.get('data_dir')!r}; continuing its stream needs the same --data-ranks and --data-dir")
        loader_states = meta["dataloader_state"]
    source = meta.get("source") if args.resume else {"checkpoint": source_dir, "step": source_step,
                                                      "phase": meta.get("phase"), "model_kind": meta.get("model_kind")}
    lineage = meta.get("lineage", []) if args.resume else meta.get("lineage", []) + [source]

    # -------------------------------------------------------------------------
    # Data: one train stream per data shard of this rank; the val batches are read once and kept
    if master:  # the tokenizer travels with the checkpoints (the next phase and surgery read it there)
        cm.copy_tokenizer_files(tok_dir, out_dir)
        if not os.path.exists(os.path.join(out_dir, TOKEN_BYTES_FILENAME)):
            save_token_bytes(tokenizer, out_dir)
    loaders = {j: tokenizing_distributed_data_loader(tokenizer, B, T, "train", data_dir=data_dir, device=device,
                                                     resume_state=loader_states[j], rank=j, world_size=data_ranks)
               for j in my_shards}
    eval_steps = args.eval_tokens // world_tokens
    val_batches = []
    if args.eval_every > 0:
        if eval_steps < 1:
            raise ValueError(f"--eval-tokens={args.eval_tokens} is less than one batch of {world_tokens} tokens")
        val_loader = tokenizing_distributed_data_loader(tokenizer, B, T, "val", data_dir=data_dir, device=device)
        val_batches = [next(val_loader)[:2] for _ in range(eval_steps)]

    def evaluate():
        """Val bits per byte at every width level; (controllers) at the predictor's plan, exit statistics."""
        model.eval()
        results = {}
        with autocast_ctx:
            for w in config.width_levels:
                results[f"bpb_w{w}"] = evaluate_bpb(model, val_batches, eval_steps, token_bytes,
                                                    forward_kwargs={"width": w})
            if controllers is not None:
                results.update(controller_eval(model, val_batches, token_bytes, T, args.exit_threshold, args.plan_epsilon))
        model.train()
        return results

    def save(step, val):
        """Optimizer state (full, from rank 0), then the model and, last, the meta."""
        states = [None] * world_size
        mine = {j: loader_states[j] for j in my_shards}
        if ddp:
            dist.all_gather_object(states, mine)
        else:
            states = [mine]
        all_states = [None] * data_ranks
        for d in states:
            for j, s in d.items():
                all_states[int(j)] = s
        # full optimizer state (gathered under fsdp: a collective), one file from rank 0, so a run saved on N ranks
        # resumes on any number, with either --parallel
        opt_state = {"optimizers": optimizer_state_full(optimizer_state_dicts(optimizers)), "rng_cpu": torch.get_rng_state()}
        if master:
            cm.atomic_torch_save(opt_state, cm.optim_path(out_dir, step, 0))
        model_state = full_state_dict(model)  # collective under fsdp
        if ddp:
            dist.barrier()
        extra = {"model_kind": model.kind, "model_config": config.to_dict(), "step": step, "phase": args.phase,
                 "dataloader_state": all_states, "data_ranks": data_ranks, "world_size": world_size,
                 "user_args": user_args, "num_iterations": num_iterations, "val": val, "source": source,
                 "lineage": lineage, "surgery": meta.get("surgery")}
        if master:
            cm.save_checkpoint(out_dir, step, model_state, extra, rank=0)
        if ddp:
            dist.barrier()

    # -------------------------------------------------------------------------
    # Training loop: at the top of step s the model has had s updates
    history = {"steps": [], "loss": [], "plan_losses": [], "plan_labels": [], "gate_loss": [], "predictor_loss": [],
               "router_loss": [], "val": {}}
    step_times, val = [], None
    step = start_step
    stop = GracefulStop()  # SIGINT / SIGTERM: finish the step, save it, print the --resume command
    while True:
        stopping = stop.requested(device)
        last_step = step >= num_iterations or stopping
        if args.eval_every > 0 and not stopping and (last_step or step % args.eval_every == 0):
            val = evaluate()
            history["val"][step] = val
            print0(f"step {step:05d} | val " + " | ".join(f"{k} {v:.4f}" for k, v in val.items()))
            wandb_run.log({"step": step, **{f"val/{k}": v for k, v in val.items()}})
        if not args.no_save and step > start_step and (last_step or (args.save_every > 0 and step % args.save_every == 0)):
            save(step, val)
        if last_step:
            break

        # ---- the plans of this step: a function of (seed, step) alone, so a resumed run draws the same
        if args.matryoshka:
            rng = random.Random(args.seed * 1_000_003 + step)
            plans = sample_plans(config.width_levels, config.n_layer, rng, args.n_random_plans, args.sample_dim)
        else:
            plans = [[config.n_embd] * config.n_layer]
        # mean over plans and micro-batches, and over ranks: our all-reduce sums, FSDP2's reduce-scatter averages
        n_backward = len(plans) * grad_accum
        scale = 1.0 / (n_backward * (world_size if args.parallel == "ddp" else 1))
        synchronize(device)
        t0 = time.time()
        sums = torch.zeros(len(plans) + 3, device=device)  # per-plan CE, MoE router, gate, predictor losses
        for micro in range(grad_accum):
            j = my_shards[micro % shards_per_rank]
            x, y, loader_states[j] = next(loaders[j])
            # the controllers' probe choice: a function of (seed, step, which micro-batch of the global batch)
            probe_rng = random.Random(f"{args.seed}:{step}:{j}:{micro // shards_per_rank}")
            for i, plan in enumerate(plans):
                full = i == 0
                with autocast_ctx:
                    if full and args.phase >= 2:
                        out = train_model(x, y, width=plan, return_exits=True)
                        ce = out.loss
                        objective = ce
                        if args.exit_loss_weight > 0 and out.exit_losses.size(0) > 1:
                            objective = objective + args.exit_loss_weight * out.exit_losses[:-1].mean()
                    else:
                        ce = train_model(x, y, width=plan)
                        objective = ce
                    if has_moe:  # read now: the controllers' probe forwards overwrite each MoE's losses
                        router = model.moe_aux_loss()  # balancing + z losses with the MoE's coefficients
                        objective = objective + router
                        sums[-3] += router.detach().float() / len(plans)
                    if full and controllers is not None:
                        cl = controller_losses(model, x, y, out, rng=probe_rng)
                        objective = objective + cl["loss"]
                        sums[-2] += cl["gate_loss"].detach().float()
                        sums[-1] += cl["predictor_loss"].detach().float()
                sums[i] += ce.detach().float()
                if args.parallel == "fsdp":  # reduce-scatter once, after the step's last backward
                    last = micro == grad_accum - 1 and i == len(plans) - 1
                    model.set_requires_gradient_sync(last)
                    if args.fsdp_keep_params:  # the step's passes share the weights: gather them once per step
                        model.set_reshard_after_backward(last)
                (objective * scale).backward()
        if args.parallel == "ddp":
            allreduce_gradients(replicated_params)
        elif ctrl_params:  # fsdp: the replicated controllers; the loss was not scaled by the world size
            allreduce_gradients(ctrl_params, divide_by=world_size)
        if ddp:
            dist.all_reduce(sums, op=dist.ReduceOp.SUM)
        sums = (sums / (grad_accum * world_size)).tolist()  # a device sync: what follows is the update
        t_update = time.time()
        grad_norm = clip_grad_norm(train_params, args.grad_clip) if args.grad_clip > 0 else None
        lrm = lr_multiplier(step, num_iterations, args.warmup_ratio, args.warmdown_ratio)
        set_lr_multiplier(optimizers, lrm)
        set_muon_momentum(optimizers, muon_momentum(step))
        before = [p.detach().clone() for p, _ in mask_params]
        for opt in optimizers:
            opt.step()
        with torch.no_grad():
            for (p, m), old in zip(mask_params, before):  # grown entries: old + mult * (their update)
                p.copy_(torch.where(m, old + args.new_channel_lr_mult * (p - old), p))
        model.zero_grad(set_to_none=True)
        for block in model.transformer.h:
            if block.ffn_kind == "E" and block.moe.bias_balancing:
                block.moe.update_bias()
        synchronize(device)
        t1 = time.time()
        dt, dt_update = t1 - t0, t1 - t_update
        loss = sums[0]
        if not math.isfinite(loss):
            raise FloatingPointError(f"step {step}: full-width loss is {loss}; lower the learning rates or check the data")

        # ---- one line per step
        step_times.append(dt)
        recent = step_times[1:] or step_times  # the first step includes compilation and warmup
        eta = (num_iterations - step - 1) * sum(recent) / len(recent)
        tok_per_sec = total_batch / dt
        step_flops = total_batch * sum(3 * model.forward_flops_per_token(T / 2, plan) for plan in plans)
        mfu = 100 * step_flops / dt / (peak * world_size) if peak else None
        widths = " ".join(f"{plan_label(plan)} {l:.3f}" for plan, l in zip(plans[1:], sums[1:len(plans)]))
        ctrl = f" | gate {sums[-2]:.4f} pred {sums[-1]:.4f}" if controllers is not None else ""
        ctrl += f" | router {sums[-3]:.4f}" if has_moe else ""
        if step % args.log_every == 0 or step == num_iterations - 1:
            print0(f"step {step:05d}/{num_iterations:05d} ({100 * step / num_iterations:.1f}%) | loss {loss:.6f}"
                   + (f" [{widths}]" if widths else "") + ctrl +
                   f" | lrm {lrm:.2f} | dt {dt * 1000:.0f}ms | tok/s {int(tok_per_sec):,} | "
                   f"mfu {f'{mfu:.2f}' if mfu is not None else 'n/a'} | update {dt_update * 1000:.0f}ms | eta {format_eta(eta)}")
        history["steps"].append(step)
        history["loss"].append(loss)
        history["plan_losses"].append(sums[:len(plans)])
        history["plan_labels"].append([plan_label(plan) for plan in plans])
        history["gate_loss"].append(sums[-2])
        history["predictor_loss"].append(sums[-1])
        history["router_loss"].append(sums[-3])
        log = {"step": step, "train/loss": loss, "train/lrm": lrm, "train/dt": dt, "train/tok_per_sec": tok_per_sec,
               **{f"train/loss_{plan_label(plan)}": l for plan, l in zip(plans[1:], sums[1:len(plans)])}}
        if controllers is not None:
            log.update({"train/gate_loss": sums[-2], "train/predictor_loss": sums[-1]})
        if has_moe:
            log["train/router_loss"] = sums[-3]
        if grad_norm is not None:
            log["train/grad_norm"] = grad_norm.item()
        if mfu is not None:
            log["train/mfu"] = mfu
        wandb_run.log(log)
        step += 1

    print0(f"{peak_memory_note(device)}training time {sum(step_times) / 60:.2f}m")
    wandb_run.finish()
    compute_cleanup()
    if stop.signum is not None:  # saved above (unless --no-save); say how to go on, exit 128 + signal
        stop.finish(step, saved=not args.no_save and step > start_step,
                    resume=resume_command("scripts.fractal_train", sys.argv[1:] if argv is None else argv, out_dir)
                    if os.path.isdir(out_dir) and cm.list_steps(out_dir) else None)
    stop.close()
    return dict(history, checkpoint_dir=out_dir, checkpoint=cm.model_path(out_dir, step), last_step=step,
                num_iterations=num_iterations, model_config=config.to_dict())


if __name__ == "__main__":
    run_script(main)

"""
Pretrain the dense GPT (nanochat's base model) on the parquet shards.

    python -m scripts.base_train --depth=12                            # one GPU (or CPU, slowly)
    torchrun --standalone --nproc_per_node=8 -m scripts.base_train --depth=20
    python -m scripts.base_train --depth=2 --max-seq-len=128 --device-batch-size=4 \
        --total-batch-size=1024 --num-iterations=50 --eval-tokens=4096   # a CPU smoke run

--arch=gpt trains the Oct-2025 nanochat GPT (nanochat/gpt.py); --arch=modern today's nanochat (nanochat/gpt_modern.py:
value embeddings, residual scalars, smear, backout, sliding windows by --window-pattern), whose checkpoints
scripts.surgery takes as they are.
One dial: --depth sets the width (depth * 64) and the heads (head_dim 128, as nanochat);
--n-embd/--n-head/--n-kv-head override them for tiny models. Needs a tokenizer
(`python -m scripts.tok_train`) and shards (`python -m nanochat.dataset`).
Checkpoints go to --out-dir (default <base_dir>/base_checkpoints/d<depth>) with the tokenizer
copied beside them; --resume continues from the latest one exactly where it stopped. Ctrl-C or SIGTERM
finishes the current step, saves it and prints the command that resumes (exit 130 / 143).

FLOP convention for MFU (nanochat/flops.py, the one FLOP table): 2 FLOPs per multiply-accumulate of every
matmul, attention over the mean causal context (T/2), training = 3x forward; peak dense bf16
FLOP/s per GPU from train_utils.peak_flops (H100/H200 989.4e12); n/a on CPU and unknown GPUs.
"""
import os
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
import sys
import math
import time
import argparse
from contextlib import nullcontext

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from nanochat.common import (compute_init, compute_cleanup, print0, autodetect_device_type, autocast_context,
                             get_base_dir, expand_path, init_wandb, synchronize, peak_memory_note, add_runtime_args,
                             run_script)
from nanochat.gpt import GPT, GPTConfig
from nanochat.gpt_modern import ModernGPT, ModernConfig
from nanochat.tokenizer import Tokenizer, get_token_bytes, default_tokenizer_dir, TOKEN_BYTES_FILENAME
from nanochat.dataset import get_data_dir, split_parquet_files
from nanochat.dataloader import tokenizing_distributed_data_loader
from nanochat.loss_eval import evaluate_bpb
from nanochat.optim import (setup_optimizers, lr_multiplier, set_lr_multiplier, muon_momentum, set_muon_momentum,
                            optimizer_state_dicts, load_optimizer_state_dicts)
from nanochat.train_utils import peak_flops, GracefulStop, resume_command
from nanochat import checkpoint_manager as cm

def get_args(argv=None):
    parser = argparse.ArgumentParser(description="Pretrain the dense nanochat GPT")
    # runtime
    parser.add_argument("--run", type=str, default="dummy", help="wandb run name ('dummy' = no wandb)")
    parser.add_argument("--device", type=str, default="", help="cuda|cpu|mps (empty = autodetect)")
    parser.add_argument("--seed", type=int, default=42, help="seed for the weight init")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model for training")
    # model
    parser.add_argument("--arch", type=str, default="gpt", choices=("gpt", "modern"),
                        help="gpt: nanochat's Oct-2025 GPT; modern: today's nanochat (gpt_modern.py)")
    parser.add_argument("--window-pattern", type=str, default="SSSL",
                        help="--arch=modern: sliding windows tiled over the layers, L full context, S a quarter")
    parser.add_argument("--depth", type=int, default=20, help="layers; sets width and heads unless overridden")
    parser.add_argument("--n-embd", type=int, default=None, help="override the width (default depth*64)")
    parser.add_argument("--n-head", type=int, default=None, help="override the query heads (default ceil(n_embd/128))")
    parser.add_argument("--n-kv-head", type=int, default=None, help="override the key/value heads (default n_head)")
    parser.add_argument("--max-seq-len", type=int, default=2048, help="context length T")
    parser.add_argument("--vocab-size", type=int, default=None, help="must equal the tokenizer's (default: the tokenizer's)")
    # horizon: --num-iterations if > 0, else --target-param-data-ratio
    parser.add_argument("--num-iterations", type=int, default=-1, help="optimizer steps (-1 = from the ratio)")
    parser.add_argument("--target-param-data-ratio", type=float, default=20, help="training tokens / params (Chinchilla ~20)")
    # optimization
    parser.add_argument("--device-batch-size", type=int, default=32, help="rows per forward per GPU")
    parser.add_argument("--total-batch-size", type=int, default=524288, help="tokens per optimizer step, all ranks")
    parser.add_argument("--embedding-lr", type=float, default=0.2, help="AdamW lr of wte (scaled by (n_embd/768)^-0.5)")
    parser.add_argument("--unembedding-lr", type=float, default=0.004, help="AdamW lr of lm_head (scaled likewise)")
    parser.add_argument("--matrix-lr", type=float, default=0.02, help="Muon lr of the hidden matrices")
    parser.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay of wte and lm_head")
    parser.add_argument("--grad-clip", type=float, default=1.0, help="clip the global grad norm (0 = off)")
    parser.add_argument("--warmup-ratio", type=float, default=0.0, help="fraction of steps of linear lr warmup")
    parser.add_argument("--warmdown-ratio", type=float, default=0.2, help="fraction of steps of linear lr warmdown")
    parser.add_argument("--final-lr-frac", type=float, default=0.0, help="lr at the end, as a fraction of the peak")
    # evaluation and checkpoints
    parser.add_argument("--eval-every", type=int, default=250, help="val bits-per-byte every N steps and at the end (-1 = off)")
    parser.add_argument("--eval-tokens", type=int, default=20 * 524288, help="val tokens per evaluation, all ranks")
    parser.add_argument("--save-every", type=int, default=-1, help="checkpoint every N steps (always at the end)")
    parser.add_argument("--out-dir", type=str, default=None, help="default <base_dir>/base_checkpoints/d<depth>")
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out-dir")
    parser.add_argument("--data-dir", type=str, default=None, help="parquet shards (default <base_dir>/base_data)")
    parser.add_argument("--tokenizer-dir", type=str, default=None, help="tokenizer.pkl + token_bytes.pt (default <base_dir>/tokenizer)")
    parser.add_argument("--log-every", type=int, default=1, help="print the step line every N steps (and the last)")
    add_runtime_args(parser)  # --debug, --threads, --require-kernels (read by run_script)
    args = parser.parse_args(argv)
    if args.log_every < 1:
        raise ValueError(f"--log-every={args.log_every}: print every N >= 1 steps")
    return args


def main(argv=None):
    args = get_args(argv)
    user_config = vars(args).copy()  # goes into every checkpoint's meta

    # -------------------------------------------------------------------------
    # Process, device, logging
    device_type = args.device or autodetect_device_type()
    ddp, rank, local_rank, world_size, device = compute_init(device_type)
    master = rank == 0
    autocast_ctx = autocast_context(device_type)  # bf16 on CUDA, fp32 elsewhere
    wandb_run = init_wandb(args.run, "adamba", user_config, rank)

    # -------------------------------------------------------------------------
    # Tokenizer and data: missing ones stop here with what to do
    tokenizer_dir = expand_path(args.tokenizer_dir) or default_tokenizer_dir()
    tokenizer = Tokenizer.from_directory(tokenizer_dir)
    token_bytes = get_token_bytes(tokenizer_dir, device=device)
    vocab_size = tokenizer.get_vocab_size()
    if args.vocab_size is not None and args.vocab_size != vocab_size:
        raise ValueError(f"--vocab-size={args.vocab_size} but the tokenizer in {tokenizer_dir} has {vocab_size} ids; "
                         f"drop --vocab-size or train a tokenizer of that size (python -m scripts.tok_train --vocab-size=...)")
    if token_bytes.numel() != vocab_size:
        raise ValueError(f"{tokenizer_dir}/{TOKEN_BYTES_FILENAME} has {token_bytes.numel()} entries for a "
                         f"{vocab_size}-id tokenizer; rerun python -m scripts.tok_train")
    data_dir = get_data_dir(args.data_dir)
    split_parquet_files("train", data_dir), split_parquet_files("val", data_dir)  # both splits exist, or a clear error now
    print0(f"tokenizer: {tokenizer_dir} ({vocab_size:,} ids) | data: {data_dir}")

    # -------------------------------------------------------------------------
    # Model shape from the depth dial
    n_layer = args.depth
    n_embd = args.n_embd or args.depth * 64  # aspect ratio 64
    n_head = args.n_head or max(1, math.ceil(n_embd / 128))  # head_dim 128
    n_kv_head = args.n_kv_head or n_head
    T, B = args.max_seq_len, args.device_batch_size
    shape = dict(sequence_len=T, vocab_size=vocab_size, n_layer=n_layer, n_head=n_head, n_kv_head=n_kv_head, n_embd=n_embd)
    if args.arch == "modern":
        model_cls, model_config = ModernGPT, ModernConfig(**shape, window_pattern=args.window_pattern)
    else:
        model_cls, model_config = GPT, GPTConfig(**shape)
    print0(f"model: {model_config}")

    # batch: total_batch_size tokens per step = B * T * world_size * grad_accum_steps
    world_tokens = B * T * world_size
    if args.total_batch_size % world_tokens != 0:
        raise ValueError(f"--total-batch-size={args.total_batch_size} is not divisible by device_batch_size * "
                         f"max_seq_len * world_size = {B} * {T} * {world_size} = {world_tokens}; pick a multiple")
    grad_accum_steps = args.total_batch_size // world_tokens
    print0(f"tokens per step: {args.total_batch_size:,} = {B} x {T} x {world_size} ranks x {grad_accum_steps} accumulation")

    # -------------------------------------------------------------------------
    # Build and initialise the model (meta device first, then materialise: one init, in init_weights)
    with torch.device("meta"):
        orig_model = model_cls(model_config)
    orig_model.to_empty(device=device)
    torch.manual_seed(args.seed)
    orig_model.init_weights()
    num_params = orig_model.num_params()
    num_flops_per_token = orig_model.estimate_flops()
    print0(f"parameters: {num_params:,} | training FLOPs per token: {num_flops_per_token:e}")

    if args.num_iterations > 0:
        num_iterations = args.num_iterations
    elif args.target_param_data_ratio > 0:
        num_iterations = int(args.target_param_data_ratio * num_params) // args.total_batch_size
        if num_iterations < 1:
            raise ValueError(f"--target-param-data-ratio={args.target_param_data_ratio} gives less than one step of "
                             f"{args.total_batch_size:,} tokens; raise it or give --num-iterations")
    else:
        raise ValueError("no training horizon: give --num-iterations > 0 or --target-param-data-ratio > 0")
    total_tokens = args.total_batch_size * num_iterations
    print0(f"steps: {num_iterations:,} | tokens: {total_tokens:,} | tokens/params: {total_tokens / num_params:.2f} | "
           f"total FLOPs: {num_flops_per_token * total_tokens:e}")

    optimizers = setup_optimizers(orig_model, matrix_lr=args.matrix_lr, embedding_lr=args.embedding_lr,
                                  unembedding_lr=args.unembedding_lr, weight_decay=args.weight_decay)

    # -------------------------------------------------------------------------
    # Output directory: fresh, or resume from its latest checkpoint
    out_dir = expand_path(args.out_dir) or os.path.join(get_base_dir(), "base_checkpoints", f"d{args.depth}")
    start_step, loader_resume_state = 0, None
    if args.resume:
        start_step = cm.find_last_step(out_dir)  # a clear CheckpointError if there is none
        meta = cm.load_meta(out_dir, start_step)
        if meta.get("model_config") != model_config.to_dict():
            raise ValueError(f"--resume: the checkpoint in {out_dir} has model_config {meta.get('model_config')} but the "
                             f"flags give {model_config.to_dict()}; pass the same model flags as the original run")
        saved = meta.get("user_config", {})
        for key in ("device_batch_size", "max_seq_len", "total_batch_size"):
            if saved.get(key) != getattr(args, key):
                raise ValueError(f"--resume: the run in {out_dir} used --{key.replace('_', '-')}={saved.get(key)}, "
                                 f"now {getattr(args, key)}; the data position only resumes exactly with the same value")
        loader_states = meta.get("dataloader_state")
        if not isinstance(loader_states, list) or len(loader_states) != world_size:
            got = len(loader_states) if isinstance(loader_states, list) else "no"
            raise ValueError(f"--resume: the checkpoint has {got} per-rank data positions; this run has {world_size} "
                             f"ranks. Resume with the world size it was saved with")
        loader_resume_state = loader_states[rank]
        state_dict = cm.clean_state_dict(cm.load_torch_file(cm.model_path(out_dir, start_step), device))
        cm.load_state_dict_strict(orig_model, state_dict)  # copies into the initialised params, keeping their dtypes
        load_optimizer_state_dicts(optimizers, cm.load_optimizer_state(out_dir, start_step, rank, device))
        if saved.get("num_iterations") != args.num_iterations or saved.get("target_param_data_ratio") != args.target_param_data_ratio:
            print0(f"NOTE: the training horizon changed on resume (now {num_iterations} steps); the lr schedule follows the new one")
        print0(f"resumed from {out_dir} at step {start_step}")
    elif os.path.isdir(out_dir) and cm.list_steps(out_dir):
        raise ValueError(f"{out_dir} already holds checkpoints (steps {cm.list_steps(out_dir)}): pass --resume to "
                         f"continue that run, or use another --out-dir")
    if master:
        # the tokenizer travels with the checkpoints; on resume it must be the one the run started with
        cm.copy_tokenizer_files(tokenizer_dir, out_dir)

    # -------------------------------------------------------------------------
    # Data (train loader resumes exactly; val loaders are rebuilt for each evaluation)
    train_loader = tokenizing_distributed_data_loader(tokenizer, B, T, "train", data_dir=data_dir, device=device,
                                                      resume_state=loader_resume_state)
    x, y, x_state = next(train_loader)  # prefetch; x_state is the loader position after this batch
    loader_state = loader_resume_state  # the position after the last batch actually trained on
    eval_steps = args.eval_tokens // world_tokens
    if args.eval_every > 0 and eval_steps < 1:
        raise ValueError(f"--eval-tokens={args.eval_tokens} is less than one batch of {world_tokens} tokens")

    # -------------------------------------------------------------------------
    # Wrap for training: DDP and compile are applied from outside; the model knows nothing of them
    model = DDP(orig_model, device_ids=[local_rank] if device.type == "cuda" else None) if ddp else orig_model
    if args.compile:
        model = torch.compile(model, dynamic=False)
    peak = peak_flops(device)

    def save(step, val_bpb):
        # every rank writes its optimizer state, then (after a barrier) rank 0 the model and, last, the meta
        states = [None] * world_size
        if ddp:
            dist.all_gather_object(states, loader_state)
        else:
            states = [loader_state]
        cm.atomic_torch_save(optimizer_state_dicts(optimizers), cm.optim_path(out_dir, step, rank))
        if ddp:
            dist.barrier()
        extra = {"val_bpb": val_bpb, "dataloader_state": states, "user_config": user_config,
                 "world_size": world_size, "num_iterations": num_iterations, "tokenizer_dir": tokenizer_dir}
        if master:
            cm.save_model(out_dir, step, orig_model, extra_meta=extra)
        if ddp:
            dist.barrier()

    # -------------------------------------------------------------------------
    # Training loop: at the top of step s the model has had s updates
    history = {"steps": [], "losses": [], "val_bpb": {}}
    val_bpb, min_val_bpb = None, float("inf")
    step_times = []
    step = start_step
    stop = GracefulStop()  # SIGINT / SIGTERM: finish the step, save it, print the --resume command
    while True:
        stopping = stop.requested(device)
        last_step = step >= num_iterations or stopping

        if args.eval_every > 0 and not stopping and (last_step or step % args.eval_every == 0):
            orig_model.eval()
            val_loader = tokenizing_distributed_data_loader(tokenizer, B, T, "val", data_dir=data_dir, device=device)
            with autocast_ctx:
                val_bpb = evaluate_bpb(orig_model, val_loader, eval_steps, token_bytes)
            orig_model.train()
            min_val_bpb = min(min_val_bpb, val_bpb)
            history["val_bpb"][step] = val_bpb
            print0(f"step {step:05d} | val bpb {val_bpb:.6f}")
            wandb_run.log({"step": step, "val/bpb": val_bpb})

        if step > start_step and (last_step or (args.save_every > 0 and step % args.save_every == 0)):
            save(step, val_bpb)

        if last_step:
            break

        # ---- one optimizer step: grad_accum_steps micro-batches, then clip, schedule, update
        synchronize(device)
        t0 = time.time()
        loss_sum = torch.zeros((), device=device)
        for micro_step in range(grad_accum_steps):
            # under DDP only the last micro-batch all-reduces the gradients
            sync_ctx = model.no_sync() if ddp and micro_step < grad_accum_steps - 1 else nullcontext()
            with sync_ctx:
                with autocast_ctx:
                    loss = model(x, y)
                loss_sum += loss.detach()
                (loss / grad_accum_steps).backward()  # backward sums grads: divide for the mean
            loader_state = x_state
            x, y, x_state = next(train_loader)
        grad_norm = torch.nn.utils.clip_grad_norm_(orig_model.parameters(), args.grad_clip) if args.grad_clip > 0 else None
        lrm = lr_multiplier(step, num_iterations, args.warmup_ratio, args.warmdown_ratio, args.final_lr_frac)
        set_lr_multiplier(optimizers, lrm)
        set_muon_momentum(optimizers, muon_momentum(step))
        for opt in optimizers:
            opt.step()
        orig_model.zero_grad(set_to_none=True)
        train_loss = loss_sum / grad_accum_steps
        if ddp:
            dist.all_reduce(train_loss, op=dist.ReduceOp.AVG)
        train_loss = train_loss.item()  # also waits for the device
        synchronize(device)
        dt = time.time() - t0
        if not math.isfinite(train_loss):
            raise FloatingPointError(f"step {step}: training loss is {train_loss}; lower the learning rates or check the data")

        # ---- one line per step
        step_times.append(dt)
        recent = step_times[1:] or step_times  # the first step includes compilation and warmup
        eta_min = (num_iterations - step - 1) * sum(recent) / len(recent) / 60
        tok_per_sec = args.total_batch_size / dt
        mfu = 100 * num_flops_per_token * tok_per_sec / (peak * world_size) if peak else None
        mfu_str = f"{mfu:.2f}" if mfu is not None else "n/a"
        if step % args.log_every == 0 or step == num_iterations - 1:
            print0(f"step {step:05d}/{num_iterations:05d} ({100 * step / num_iterations:.2f}%) | loss {train_loss:.6f} | "
                   f"lrm {lrm:.2f} | dt {dt * 1000:.2f}ms | tok/sec {int(tok_per_sec):,} | mfu {mfu_str} | eta {eta_min:.1f}m")
        history["steps"].append(step)
        history["losses"].append(train_loss)
        log = {"step": step, "train/loss": train_loss, "train/lrm": lrm, "train/dt": dt, "train/tok_per_sec": tok_per_sec}
        if grad_norm is not None:
            log["train/grad_norm"] = grad_norm.item()
        if mfu is not None:
            log["train/mfu"] = mfu
        wandb_run.log(log)
        step += 1

    min_bpb_str = f"{min_val_bpb:.6f}" if history["val_bpb"] else "n/a"
    print0(f"{peak_memory_note(device)}training time: {sum(step_times) / 60:.2f}m | min val bpb: {min_bpb_str}")
    wandb_run.finish()
    compute_cleanup()
    if stop.signum is not None:  # saved above; say how to go on, exit 128 + signal
        stop.finish(step, saved=step > start_step,
                    resume=resume_command("scripts.base_train", sys.argv[1:] if argv is None else argv, out_dir)
                    if os.path.isdir(out_dir) and cm.list_steps(out_dir) else None)
    stop.close()
    return dict(history, checkpoint_dir=out_dir, last_step=step, num_iterations=num_iterations,
                num_params=num_params, num_flops_per_token=num_flops_per_token, min_val_bpb=min_val_bpb,
                model_config=model_config.to_dict())


if __name__ == "__main__":
    run_script(main)

"""
Training-loop plumbing that the training scripts share and that is not about any one model:
peak FLOPs for MFU, activation checkpointing and FSDP2 applied from outside the model,
a data-parallel gradient all-reduce, full state dicts from sharded models, optimizer
state that survives a save/load under FSDP2, and the graceful stop on SIGINT / SIGTERM.

The model files know nothing about any of this (torchtitan's habit): every function here takes a
built model and changes how it runs, never what it computes.
"""
import os
import time
import shlex
import signal
import functools
import threading

import torch
import torch.distributed as dist
from torch.utils.checkpoint import checkpoint

from nanochat.common import Interrupted, get_dist_info, print0

# bf16 dense tensor-core peak (no sparsity), FLOP/s; matched against torch.cuda.get_device_name
PEAK_FLOPS_BF16 = [("H200", 989.4e12), ("H100", 989.4e12), ("A100", 312e12), ("L40S", 362e12),
                   ("A10G", 125e12), ("RTX 4090", 165e12), ("RTX 3090", 71e12)]


def add_parallel_args(p):
    """scripts.fractal_train's (and chat_sft's) flags of how the ranks share the model; setup_process validates them."""
    p.add_argument("--parallel", type=str, default="ddp", choices=("ddp", "fsdp"))
    p.add_argument("--fsdp-keep-params", action="store_true",
                   help="fsdp: keep the gathered parameters for the whole step: one all-gather per block and step "
                        "instead of two per pass, for the memory of the unsharded model")
    p.add_argument("--fsdp-bf16", action="store_true", help="fsdp, CUDA: gather weight matrices as bf16, fp32 shards the "
                   "master copy; same forward, half the gather bytes and memory (apply_fsdp)")
    p.add_argument("--fsdp-reduce", default="step", choices=("step", "pass"), help="fsdp: reduce-scatter the gradients "
                   "once a step (holds unsharded fp32 grads) or after every backward pass (fsdp_before_backward)")
    p.add_argument("--expert-parallel", action="store_true",
                   help="ddp: shard every MoE's experts over the ranks (num_experts / world size each, rows sent by "
                        "all_to_all; nanochat.moe_ep); the rest stays replicated")


def peak_flops(device):
    """Peak bf16 FLOP/s of one device of this kind, or None where MFU means nothing (CPU, MPS, unknown GPU)."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, flops in PEAK_FLOPS_BF16:
        if key in name:
            return flops
    return None


def is_dist():
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def apply_activation_checkpointing(blocks):
    """
    Recompute each block's activations in the backward pass instead of keeping them: memory for
    one block's activations at a time, for about one extra forward. Wraps the instance's forward,
    so parameter names (and checkpoints) do not change.
    """
    for block in blocks:
        block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)


def compile_model(model, mode, matryoshka=False, n_random=0, per_block=False, backend=None, exit_sets=1):
    """torch.compile for training. mode "model": the whole forward, one graph per distinct plan the run meets
    (adaptive_train.distinct_plans; unbounded with random per-block plans); "blocks": each block of
    model.transformer.h, one graph per (block kind, width, grad mode), shared by identical blocks, so bounded whatever
    the plans. dynamo's recompile limit (8 by default) is raised to the count, so that no plan or width runs eager.
    backend: torch.compile's (None: its default). exit_sets: the distinct sets of exits the run's passes read out
    (fractal_train --exit-readouts), each another graph of the whole model. Returns what the training step calls
    (scripts.fractal_train's and scripts.bench train's)."""
    import torch._dynamo
    from nanochat.adaptive_train import distinct_plans
    config = model.config
    kw = dict(dynamic=False, **({"backend": backend} if backend else {}))
    if mode == "blocks":
        kinds = ({(config.mixer_kind(j), config.ffn_kind(j)) for j in range(config.n_layer)}
                 if hasattr(config, "mixer_kind") else {"gpt"})
        n_graphs = len(kinds) * len(getattr(config, "width_levels", None) or [None]) * 2  # training and eval
        for block in model.transformer.h:
            block.compile(**kw)
        out = model
    elif mode == "model":
        n_graphs = distinct_plans(config, matryoshka, n_random, per_block)
        n_graphs = None if n_graphs is None else n_graphs * exit_sets
        out = torch.compile(model, **kw)
    else:
        raise ValueError(f"compile mode {mode!r}: use model or blocks")
    if n_graphs is None:
        print0(f"--compile=model with --sample-dim: every new per-block plan compiles the model again; past "
               f"{torch._dynamo.config.recompile_limit} graphs dynamo runs the others eager (and says so); "
               f"--compile=blocks has one graph per block kind and width")
    else:
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, n_graphs)
    return out


def bf16_gathered(name, p, param_kind=None):
    """Whether --fsdp-bf16 gathers this parameter as bf16: the weights that bf16 autocast rounds to bf16 before every
    use anyway (nanochat.optim's "matrix" and "head" kinds). The rest (embeddings, biases, norm and conv weights,
    Mamba's A_log, D and dt bias, routers, scalars: computed in fp32 or added to activations) stays fp32."""
    from nanochat.optim import default_param_kind
    kind = (param_kind(name, p) if param_kind is not None else None) or default_param_kind(name, p)
    return kind in ("matrix", "head")


def apply_fsdp(model, blocks, replicated_params=(), device_type="cuda", separate=(), reshard_after_forward=True,
               bf16_matrices=False):
    """
    FSDP2: shard every block, then each module of `separate` on its own, then the root (what is left: the
    head); parameters become DTensors sharded on dim 0 over all ranks. One shard group must hold one
    dtype, so a module whose dtype differs from the rest (nanochat's bf16 embedding on CUDA next to the
    fp32 head) goes in `separate`. `replicated_params` stay whole plain tensors on every rank (small modules
    called through methods outside any forward, whose FSDP hooks would never run, e.g. the adaptive
    controllers). reshard_after_forward=False keeps each block's gathered parameters until its backward (one
    all-gather per block and pass instead of two, for the memory of the unsharded blocks); the root always keeps them.

    bf16_matrices=True gathers the weight matrices as bf16 (FSDP2's MixedPrecisionPolicy: the fp32 shards stay the
    optimizer's master weights, gradients are reduced and accumulated in fp32, forward inputs are not cast): half the
    all-gather bytes and half the memory of gathered weights, and no autocast copy of a weight per use. Under bf16
    autocast the forward is unchanged (autocast rounds an fp32 weight to bf16 the same way before each matmul).
    A block's parameters that autocast does not round (bf16_gathered false: Mamba's A_log, D, dt bias, conv weights,
    biases, norms; about 0.1% of a d32 hybrid) stay fp32 plain tensors, replicated like `replicated_params` (a shard
    group holds one dtype, and the model reads them directly, not through a submodule's forward that FSDP could hook).
    The embedding (`separate`: a lookup) is never cast.
    Returns every parameter left replicated (`replicated_params` and those): the caller all-reduces their gradients
    (allreduce_gradients), since FSDP does not.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard, MixedPrecisionPolicy
    mesh = init_device_mesh(device_type, (dist.get_world_size(),))
    kw = dict(mesh=mesh, reshard_after_forward=reshard_after_forward)
    bf16 = dict(mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32,
                                               cast_forward_inputs=False)) if bf16_matrices else {}
    kind = getattr(model, "param_kind", None)
    fp32 = {id(p) for n, p in model.named_parameters() if bf16_matrices and not bf16_gathered(n, p, kind)}
    replicated = list(replicated_params)
    for block in blocks:
        kept = [p for p in block.parameters() if id(p) in fp32]
        replicated += kept
        fully_shard(block, ignored_params=set(kept) or None, **bf16, **kw)
    for module in separate:
        fully_shard(module, **kw)
    # the root keeps what no block or separate module holds (the head): bf16 too when that is matrices only
    taken = {id(p) for m in [*blocks, *separate] for p in m.parameters()} | {id(p) for p in replicated}
    rest = [(n, p) for n, p in model.named_parameters() if id(p) not in taken]
    root_bf16 = bf16 if rest and all(bf16_gathered(n, p, kind) for n, p in rest) else {}
    fully_shard(model, mesh=mesh, ignored_params=set(replicated) or None, **root_bf16)
    return replicated


def fsdp_before_backward(model, last, keep_params=False, reduce_every_pass=False):
    """FSDP2 settings for the next backward of a step of several (micro-batches x passes); last: the step's final one.
    The gradients are reduce-scattered after the last backward only (the unsharded fp32 gradients of the whole model
    are held across the step: one reduce-scatter per block and step), or after every backward (reduce_every_pass:
    only the sharded gradients are held, for a reduce-scatter per block and pass, which overlaps the backward).
    keep_params (reshard_after_forward=False at apply_fsdp): the gathered weights also stay until the last backward,
    so the step's passes share one all-gather per block."""
    model.set_requires_gradient_sync(last or reduce_every_pass)
    if keep_params:
        model.set_reshard_after_backward(last)


def allreduce_gradients(params, bucket_numel=2**25, divide_by=1):
    """
    Data parallel with replicated weights: sum every trainable parameter's gradient over the ranks
    (callers scale the loss by 1 / (micro-steps * world size) so the sum is the global mean).
    A parameter that got no gradient on this rank (a step where it was not used) counts as zeros,
    on every rank and on a single process alike, so all ranks make the same collective calls and
    the optimizers step the same parameters whatever the world size. Gradients are flattened into buckets of at most
    `bucket_numel` elements of one dtype: one all-reduce per bucket instead of one per tensor.
    The sums are divided by `divide_by` (the world size where the loss was not scaled by it).
    """
    params = [p for p in params if p.requires_grad]
    for p in params:  # also on one process, so a run on one rank steps the same parameters as on many
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    if not is_dist():
        return
    by_dtype = {}
    for p in params:
        by_dtype.setdefault(p.grad.dtype, []).append(p)
    for group in by_dtype.values():
        bucket, size = [], 0
        for i, p in enumerate(group):
            bucket.append(p)
            size += p.grad.numel()
            if size >= bucket_numel or i == len(group) - 1:
                flat = torch.cat([q.grad.reshape(-1) for q in bucket])
                dist.all_reduce(flat, op=dist.ReduceOp.SUM)
                if divide_by != 1:
                    flat /= divide_by
                offset = 0
                for q in bucket:
                    n = q.grad.numel()
                    q.grad.copy_(flat[offset:offset + n].view_as(q.grad))
                    offset += n
                bucket, size = [], 0


def clip_grad_norm(params, max_norm):
    """
    Scale the gradients so their global L2 norm is at most max_norm; returns the norm before clipping
    (a 0-d fp32 tensor, the same on every rank). Gradients may mix FSDP2 DTensors (sharded on dim 0:
    their squared shard norms are summed over ranks) and plain tensors (replicated: counted once).
    Without DTensors this is torch.nn.utils.clip_grad_norm_ (tests compare them).
    """
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    sharded = [g for g in grads if hasattr(g, "to_local")]
    plain = [g for g in grads if not hasattr(g, "to_local")]
    norms = [torch.linalg.vector_norm(g.float()) for g in plain]
    if sharded:
        sq = sum(g.to_local().float().pow(2).sum() for g in sharded)
        dist.all_reduce(sq, op=dist.ReduceOp.SUM)
        norms.append(sq.sqrt())
    total = torch.linalg.vector_norm(torch.stack(norms))
    coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
    for g in grads:
        (g.to_local() if hasattr(g, "to_local") else g).mul_(coef.to(g.dtype))
    return total


def _is_fsdp(model):
    # the root's class, not its parameters' type: with reshard_after_forward=False an eval forward (no backward
    # to reshard) leaves every parameter gathered, a plain tensor, until the next sharding hook
    if not dist.is_available():
        return False
    from torch.distributed.fsdp import FSDPModule
    return isinstance(model, FSDPModule)


def full_state_dict(model):
    """The whole model's state_dict on CPU on rank 0 (every rank must call it under FSDP2, or when some parameters
    are DTensors, as nanochat.moe_ep's expert shards: those are gathered)."""
    if _is_fsdp(model):
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, StateDictOptions
        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().cpu() for k, v in model.state_dict().items()}


def optimizer_state_full(state_dicts):
    """
    Optimizer state_dicts with every DTensor gathered into its full tensor, and every tensor moved to
    the CPU, so one file holds the whole state whatever the number of ranks that saved it. Under FSDP2
    this is a collective (full_tensor per state tensor, in the same order on every rank): every rank
    calls it, rank 0 saves the result. Tensors are gathered one at a time, so the extra GPU memory is
    one full state tensor.
    """
    from torch.distributed.tensor import DTensor

    def full(v):
        if isinstance(v, DTensor):
            return v.full_tensor().cpu()
        return v.cpu() if torch.is_tensor(v) else v
    return [dict(sd, state={i: {k: full(v) for k, v in st.items()} for i, st in sd["state"].items()})
            for sd in state_dicts]


def optimizer_state_to_dtensor(optimizers):
    """
    After load_state_dict of a full state (optimizer_state_full): shard each per-parameter state tensor of a
    DTensor parameter (FSDP2, nanochat.moe_ep's expert shards) like the parameter (a collective:
    distribute_tensor, in the same order on every rank); plain parameters keep theirs, so without DTensors
    this does nothing. Scalars (step counts) stay plain tensors.
    """
    from torch.distributed.tensor import DTensor, distribute_tensor
    for opt in optimizers:
        for p, st in opt.state.items():
            if not isinstance(p, DTensor):
                continue
            for k, v in st.items():
                if torch.is_tensor(v) and not isinstance(v, DTensor) and v.ndim > 0:
                    if v.shape != p.shape:
                        raise ValueError(f"optimizer state {k!r} has shape {tuple(v.shape)}, its parameter {tuple(p.shape)}: "
                                         f"not a full state (optimizer_state_full)")
                    st[k] = distribute_tensor(v.to(p.device), p.device_mesh, p.placements)


def format_eta(seconds):
    if seconds < 90:
        return f"{seconds:.0f}s"
    if seconds < 5400:
        return f"{seconds / 60:.1f}m"
    return f"{seconds / 3600:.1f}h"


# -----------------------------------------------------------------------------
# Graceful stop: Ctrl-C or SIGTERM finishes the step, saves, and says how to resume

class GracefulStop:
    """
    SIGINT (Ctrl-C) and SIGTERM (a scheduler's stop; torchrun forwards it to its workers) during a training loop:
    the first one asks the loop to finish its current step, save it and leave (finish()); a second Ctrl-C stops at
    once with KeyboardInterrupt, keeping what the last save holds, as SIGKILL does (checkpoint files are written
    atomically, so no save is ever half there). A repeat within REPEAT_GRACE_S is the same request: a terminal's
    Ctrl-C reaches torchrun's workers directly and again through torchrun, which forwards the signal it gets
    (then kills the workers 30 s later). The loop calls requested() once per step; under torchrun every
    rank must call it, at the same step, since it is a collective: the ranks agree to stop at the same step, or
    the save's collectives would wait forever. close() (finish() calls it) puts the previous handlers back.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)
    REPEAT_GRACE_S = 2.0

    def __init__(self):
        self.signum = None
        self._first_at = None
        self._previous = {}
        if threading.current_thread() is threading.main_thread():  # signal handlers can only be set there
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        if self._first_at is not None:
            if signum == signal.SIGINT and time.monotonic() - self._first_at > self.REPEAT_GRACE_S:
                raise KeyboardInterrupt  # asked twice: stop now
            return
        self.signum, self._first_at = signum, time.monotonic()
        # os.write to fd 2, not print: a handler that prints while the loop prints can break the stream's buffer
        if get_dist_info()[1] == 0:
            os.write(2, f"\n{signal.Signals(signum).name}: finishing this step, then saving "
                     f"(Ctrl-C again to stop at once without saving)\n".encode())

    def requested(self, device=None):
        """True once a stop was asked for on any rank (a collective under torch.distributed)."""
        if dist.is_available() and dist.is_initialized():
            flag = torch.tensor([self.signum or 0], dtype=torch.int64, device=device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            self.signum = int(flag.item()) or None
        return self.signum is not None

    def close(self):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def finish(self, step, saved, resume):
        """After the loop left on a stop: say what was kept and how to go on, then raise common.Interrupted
        (run_script exits with 128 + the signal's number). saved: whether step `step` was just saved;
        resume: the command that continues the run (resume_command), or None where none can."""
        self.close()
        name = signal.Signals(self.signum).name
        kept = f"saved step {step}" if saved else "nothing new was saved (no step finished since the start or the last save)"
        msg = f"stopped by {name} at step {step}: {kept}"
        if resume:
            msg += f"\nresume with:\n  {resume}"
        print0(msg)
        raise Interrupted(self.signum, f"stopped by {name} at step {step}")


def resume_command(module, argv, out_dir):
    """
    The command that continues this run from its latest checkpoint: the same module and arguments, plus
    --resume and (when not given) the --out-dir it saved to; under torchrun, with the same number of processes.
    """
    args = [str(a) for a in argv]
    if "--resume" not in args:
        args.append("--resume")
    if not any(a == "--out-dir" or a.startswith("--out-dir=") for a in args):
        args.append(f"--out-dir={out_dir}")
    distributed, _, _, world_size = get_dist_info()
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    if not distributed:
        launcher = "python"
    elif local == world_size:
        launcher = f"torchrun --standalone --nproc_per_node={world_size}"
    else:
        launcher = f"torchrun <this run's torchrun options: {world_size} processes, {local} per node>"
    return f"{launcher} -m {module} {shlex.join(args)}"

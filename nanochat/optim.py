"""
Optimizers: Muon (orthogonalised momentum) for hidden weight matrices, AdamW for the rest.

Which parameter goes where is decided by explicit rules (`param_kind`), not by "every 2-D tensor":
    embedding  token/positional embeddings                      -> AdamW, embedding lr
    head       lm_head                                          -> AdamW, unembedding lr
    matrix     hidden 2-D weights (attention, MLP, Mamba in/out/x/dt projections) and
               stacked 3-D expert weights (orthogonalised per expert)  -> Muon
    scalar     everything else: Mamba A_log, D, dt_bias, conv1d weights and biases, norm
               weights, routers, biases                          -> AdamW, scalar lr, no weight decay
    controller a model's adaptive controllers (HybridGPT's gates and width predictor) -> AdamW at
               controller_lr, not width-scaled, no weight decay; with controller_lr=None, the scalar group
A model can override the rules for its own parameters with a `param_kind(name, param)` method
returning one of these names (or None to fall back to the defaults).

Distributed: under DDP the gradients are already averaged when step() runs, so every rank applies
the same update. Parameters that are DTensors (FSDP2, sharded on dim 0) keep momentum, weight decay
and the update on their local shards; each matrix is orthogonalised once, on its full tensor, by one
owner rank: matrices go in batches of world-size, slot j of a batch owned by rank j, and one
all_to_all sends every shard of a batch to its owner, a second one sends each rank its rows of the
updates. A 3-D stack of expert matrices sharded on dim 0 holds whole matrices on every rank, so each rank
orthogonalises its own (also the expert shards of nanochat.moe_ep). The result is bitwise the single-process
step on the full tensors (tests/test_optim_dist.py, on a CPU).
"""
import math

import torch
import torch.distributed as dist

KINDS = ("embedding", "head", "matrix", "scalar", "controller")


def default_param_kind(name, p):
    if getattr(p, "_no_weight_decay", False):
        return "scalar"
    leaf = name.split(".")[-1]
    if "wte" in name or "pos_emb" in name or "embed" in leaf:
        return "embedding"
    if name.startswith("lm_head") or ".lm_head." in name:
        return "head"
    if "conv1d" in name or "router" in name or "norm" in name or leaf in ("bias", "dt_bias", "A_log", "D"):
        return "scalar"
    if p.ndim in (2, 3):
        return "matrix"
    return "scalar"


def classify_params(model):
    """{kind: [(name, param)]} over trainable parameters, using the model's rules first."""
    groups = {k: [] for k in KINDS}
    custom = getattr(model, "param_kind", None)
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        kind = custom(name, p) if custom is not None else None
        kind = kind or default_param_kind(name, p)
        if kind not in groups:
            raise ValueError(f"param_kind({name}) returned {kind!r}; expected one of {KINDS}")
        groups[kind].append((name, p))
    return groups


def ns_dtype(device):
    """The dtype orthogonalize computes in (it casts its input to it first)."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def orthogonalize(G, steps=5):
    """
    Approximately orthogonalise G (..., m, n) by a quintic Newton-Schulz iteration, returning
    roughly U V^T of its SVD with singular values pushed into ~[0.7, 1.2] (Muon's tuned
    coefficients trade exactness for speed). Works in bf16 on GPU, fp32 on CPU.
    """
    a, b, c = 3.4445, -4.7750, 2.0315
    X = G.to(ns_dtype(G.device))
    transposed = G.size(-2) > G.size(-1)
    if transposed:
        X = X.mT
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    shape = X.shape
    X = X.reshape(-1, *shape[-2:])  # (batch, m, n): each iteration is three batched GEMMs, the scalings in their epilogues
    for _ in range(steps):
        A = torch.bmm(X, X.mT)
        B = torch.baddbmm(A, A, A, beta=b, alpha=c)  # b * A + c * A @ A
        X = torch.baddbmm(X, B, X, beta=a)  # a * X + B @ X
    X = X.view(shape)
    if transposed:
        X = X.mT
    return X


def _shard_rows(n, world):
    """Rows of each rank when FSDP2 shards n rows on dim 0 (torch.chunk: ceil(n/world) each, the last ranks fewer or none)."""
    per = -(-n // world)
    return [max(0, min(per, n - r * per)) for r in range(world)]


def _check_dim0_shard(p):
    from torch.distributed.tensor import Shard
    if p.device_mesh.ndim != 1 or tuple(p.placements) != (Shard(0),) or tuple(p.grad.placements) != (Shard(0),):
        raise ValueError(f"Muon: DTensor parameter {tuple(p.shape)} has placements {p.placements} (gradient "
                         f"{p.grad.placements}) on a {p.device_mesh.ndim}-D mesh; only Shard(0) on a 1-D mesh is supported")


class Muon(torch.optim.Optimizer):
    """
    Momentum (Nesterov by default) whose update is orthogonalised by Newton-Schulz before it is
    applied, scaled by sqrt(max(1, rows/cols)) so tall and wide matrices move alike.
    3-D parameters are treated as a batch of matrices (one per expert), and with stack=True plain matrices of one
    shape in one group are orthogonalised together, up to STACK_MAX at a time (one batched Newton-Schulz instead of
    one per matrix: fewer, larger GEMMs; orthogonalize treats each matrix of the batch alone).
    DTensor parameters (FSDP2 or nanochat.moe_ep, dim-0 shards on a 1-D mesh) are stepped on their local
    shards: a 2-D matrix is orthogonalised by one owner rank (two all_to_all per world-size matrices, see
    _step_sharded); a 3-D stack (experts) where its shards are, since each holds whole matrices (no
    communication). Their momentum buffers are DTensors sharded like them, so state_dict() holds the same layout.
    """

    STACK_MAX = 16  # same-shaped matrices orthogonalised together (one batched Newton-Schulz), at most this many

    def __init__(self, params, lr=0.02, momentum=0.95, nesterov=True, ns_steps=5, weight_decay=0.0, stack=False):
        super().__init__(params, dict(lr=lr, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps, weight_decay=weight_decay))
        # plain 2-D matrices of one shape and group: one batched orthogonalize per STACK_MAX. Off by default until
        # `python -m scripts.bench muon` has measured it on a GPU (the trainers' numbers are per matrix)
        self.stack = stack

    @staticmethod
    def _momentum(g, buf, group):
        """Update buf in place; return the direction to orthogonalise (Nesterov: g blended toward buf)."""
        buf.lerp_(g, 1 - group["momentum"])
        return g.lerp(buf, group["momentum"]) if group["nesterov"] else buf

    @staticmethod
    def _update(direction, ns_steps, dtype):
        """The orthogonalised direction (a full matrix, or a batch of them) in `dtype`, scaled by
        sqrt(max(1, rows/cols)); the one formula of the plain step and the sharded owners' step."""
        return orthogonalize(direction, ns_steps).to(dtype) * max(1.0, direction.size(-2) / direction.size(-1)) ** 0.5

    @staticmethod
    def _apply(p, update, group):
        """p (plain tensor or local shard) <- p * (1 - lr * wd) - lr * update, update already in p's dtype."""
        if group["weight_decay"] > 0:
            p.mul_(1 - group["lr"] * group["weight_decay"])
        p.add_(update, alpha=-group["lr"])

    @torch.no_grad()
    def step(self):
        sharded = {}  # (mesh, dtype) -> [(p, local direction, group)], in param-group order (the same on every rank)
        stacks = {}  # (group, shape, dtypes) -> [(p, direction)]: plain matrices orthogonalised together
        for gi, group in enumerate(self.param_groups):
            for p in group["params"]:
                if p.grad is None:  # under FSDP2 every rank has a gradient or none, so the batches agree
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p.grad)  # a DTensor like p.grad under FSDP2
                buf = state["momentum_buffer"]
                if hasattr(p, "device_mesh"):
                    if not hasattr(buf, "to_local"):
                        raise ValueError(f"Muon: momentum buffer of a DTensor parameter {tuple(p.shape)} is a plain tensor; "
                                         f"after loading a full optimizer state, shard it (train_utils.optimizer_state_to_dtensor)")
                    _check_dim0_shard(p)
                    g = self._momentum(p.grad.to_local(), buf.to_local(), group)
                    if p.ndim == 3:  # a stack of matrices cut along the stack: each shard holds whole matrices
                        self._apply(p.to_local(), self._update(g, group["ns_steps"], g.dtype).to(p.dtype), group)
                        continue
                    sharded.setdefault((p.device_mesh, p.dtype), []).append((p, g, group))
                    continue
                g = self._momentum(p.grad, buf, group)
                if self.stack and p.ndim == 2:
                    stacks.setdefault((gi, tuple(p.shape), p.dtype, g.dtype), []).append((p, g))
                    continue
                self._apply(p, self._update(g, group["ns_steps"], g.dtype).to(p.dtype), group)
        for (gi, _, dtype, gdtype), items in stacks.items():
            group = self.param_groups[gi]
            for i in range(0, len(items), self.STACK_MAX):
                chunk = items[i:i + self.STACK_MAX]
                updates = self._update(torch.stack([g for _, g in chunk]), group["ns_steps"], gdtype)
                for (p, _), update in zip(chunk, updates):
                    self._apply(p, update.to(dtype), group)
        for (mesh, dtype), items in sharded.items():
            world = mesh.size()
            for i in range(0, len(items), world):
                self._step_sharded(mesh, dtype, items[i:i + world])

    def _step_sharded(self, mesh, dtype, batch):
        """
        One batch of k <= world DTensor matrices of one mesh and dtype; slot j is owned by rank j.
        all_to_all #1: every rank sends its local rows of matrix j to rank j, which concatenates them
        (in rank order: the dim-0 shards) into the full direction and computes its update exactly as
        the single-process step does. all_to_all #2: rank j sends every rank its rows of update j.
        """
        rank, world, group = mesh.get_local_rank(), mesh.size(), mesh.get_group()
        rows, inner = [], []  # per slot: rows of each rank; elements per row
        for p, g, _ in batch:
            r = _shard_rows(p.size(0), world)
            local = p.to_local().shape
            if local[0] != r[rank] or local[1:] != p.shape[1:] or g.shape != local:
                raise ValueError(f"Muon: rank {rank} holds a shard {tuple(local)} (gradient {tuple(g.shape)}) of "
                                 f"{tuple(p.shape)}, expected {r[rank]} rows (torch.chunk over {world} ranks)")
            rows.append(r)
            inner.append(math.prod(p.shape[1:]))
        k, device = len(batch), batch[0][1].device
        # The wire dtype of the directions is the one orthogonalize casts to as its first op, so the owner's
        # result is bitwise that of the full tensor (and bf16 on CUDA halves the bytes of fp32 gradients).
        wire = ns_dtype(device)
        send = torch.cat([g.reshape(-1).to(wire) for _, g, _ in batch])
        send_splits = [rows[j][rank] * inner[j] for j in range(k)] + [0] * (world - k)
        own = rank < k
        recv_splits = [rows[rank][s] * inner[rank] for s in range(world)] if own else [0] * world
        recv = torch.empty(sum(recv_splits), dtype=wire, device=device)
        dist.all_to_all_single(recv, send, recv_splits, send_splits, group=group)
        if own:
            p, g, grp = batch[rank]
            full = recv.view(p.shape)
            update = self._update(full, grp["ns_steps"], g.dtype)  # g.dtype: what the full direction has
            send = update.to(dtype).reshape(-1)  # rows in rank order: the dim-0 shards, back to their ranks
        else:
            send = torch.empty(0, dtype=dtype, device=device)
        send_splits, recv_splits = recv_splits, send_splits
        recv = torch.empty(sum(recv_splits), dtype=dtype, device=device)
        dist.all_to_all_single(recv, send, recv_splits, send_splits, group=group)
        for (p, g, grp), part in zip(batch, recv.split(recv_splits[:k])):
            local = p.to_local()
            self._apply(local, part.view(local.shape), grp)


def setup_optimizers(model, matrix_lr=0.02, embedding_lr=0.2, unembedding_lr=0.004, scalar_lr=0.004,
                     weight_decay=0.0, adam_betas=(0.8, 0.95), controller_lr=None):
    """
    [AdamW, Muon] over the model's trainable parameters with explicit groups. AdamW learning rates
    are scaled by (n_embd/768)^-0.5 like nanochat. Each param group records `initial_lr` so schedules
    multiply it. (Per-entry learning rates for channels added by growth are applied by fractal_train
    to the update, since Adam and Muon normalise away any gradient scaling.)
    controller_lr: the AdamW lr of the "controller" parameters (a group after "scalar"); None puts them in "scalar".
    """
    groups = classify_params(model)
    if controller_lr is None:  # the controllers come last among the parameters, so the scalar order holds
        groups["scalar"] += groups.pop("controller")
    dim = getattr(model.config, "n_embd", 768)
    scale = (dim / 768) ** -0.5
    base_lr = {"embedding": embedding_lr * scale, "head": unembedding_lr * scale, "scalar": scalar_lr * scale,
               "controller": controller_lr}
    adam_groups = []
    for kind in ("embedding", "head", "scalar", "controller"):
        if groups.get(kind):
            wd = 0.0 if kind in ("scalar", "controller") else weight_decay
            adam_groups.append(dict(params=[p for _, p in groups[kind]], lr=base_lr[kind], weight_decay=wd, kind=kind,
                                    names=[n for n, _ in groups[kind]]))
    optimizers = []
    if adam_groups:
        adamw = torch.optim.AdamW(adam_groups, betas=adam_betas, eps=1e-10, fused=False)
        optimizers.append(adamw)
    if groups["matrix"]:
        by_shape = {}  # one group per shape keeps the update loop simple and lets overrides split cleanly
        for n, p in groups["matrix"]:
            by_shape.setdefault(tuple(p.shape), []).append((n, p))
        muon_groups = [dict(params=[p for _, p in ps], lr=matrix_lr, kind="matrix", names=[n for n, _ in ps])
                       for ps in by_shape.values()]
        optimizers.append(Muon(muon_groups, lr=matrix_lr, momentum=0.95))
    for opt in optimizers:
        for g in opt.param_groups:
            g["initial_lr"] = g["lr"]
    return optimizers


def set_lr_multiplier(optimizers, lrm):
    for opt in optimizers:
        for g in opt.param_groups:
            g["lr"] = g["initial_lr"] * lrm * g.get("lr_scale", 1.0)


def muon_momentum(step, warmup=300):
    """Muon momentum warms from 0.85 to 0.95 over the first `warmup` steps (as nanochat)."""
    frac = min(step / warmup, 1.0) if warmup > 0 else 1.0
    return (1 - frac) * 0.85 + frac * 0.95


def set_muon_momentum(optimizers, momentum):
    for opt in optimizers:
        if isinstance(opt, Muon):
            for g in opt.param_groups:
                g["momentum"] = momentum


def lr_multiplier(step, num_iterations, warmup_ratio=0.0, warmdown_ratio=0.2, final_lr_frac=0.0):
    """Warmup (linear from 0), constant, then linear warmdown to final_lr_frac."""
    warmup = round(warmup_ratio * num_iterations)
    warmdown = round(warmdown_ratio * num_iterations)
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if warmdown > 0 and step > num_iterations - warmdown:
        progress = (num_iterations - step) / warmdown
        return progress + (1 - progress) * final_lr_frac
    return 1.0


def optimizer_state_dicts(optimizers):
    return [opt.state_dict() for opt in optimizers]


def load_optimizer_state_dicts(optimizers, states):
    if len(states) != len(optimizers):
        raise ValueError(f"optimizer state has {len(states)} optimizers, expected {len(optimizers)}")
    for opt, st in zip(optimizers, states):
        opt.load_state_dict(st)

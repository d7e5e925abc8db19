"""
Switch-style Mixture-of-Experts FFN, and the Mamba + MoE model built from it.

MoE in one paragraph: a router (one bias-free Linear, fp32 logits) scores every real token
against E experts; each token goes to its top-k experts; each expert is a nanochat-style
ReLU^2 MLP with no biases, h = relu(x W1^T)^2, y = h W2^T; the token's output is the gate-weighted
sum of its experts' outputs. An expert takes at most `capacity` tokens per call (earlier tokens
first); a token an expert had no room for gets nothing from that expert (output 0 when it had
only that one), the residual stream carries it.

Parameter layout (the checkpoint contract):
    router.weight  (E, dim)              nn.Linear(dim, E, bias=False)
    w_in           (E, expert_dim, dim)  w_in[e] is expert e's c_fc.weight (nn.Linear(dim, expert_dim))
    w_out          (E, dim, expert_dim)  w_out[e] is expert e's c_proj.weight (nn.Linear(expert_dim, dim))
    expert_bias    (E,) fp32 buffer      only when bias_balancing=True

Dispatch: every one of the n*top_k assignments gets a row of the expert computation, so all shapes are
static and the forward never waits on the device (no host sync without a mask). The rows are ordered
as a stable sort on the key expert + E * dropped would order them: kept assignments first, grouped by
expert in token order, then the dropped ones. No sort runs: a running count per expert (a cumsum over
one-hot choices) gives every assignment its row. All experts run in one batched computation:
torch._grouped_mm with group ends offs = cumsum(kept per expert) (CUDA bf16 on sm90+, CPU fp32/bf16,
rows a multiple of 16 bytes; under torch.compile bf16 only), whose outputs for the rows past offs[-1]
are undefined memory; or torch.bmm on an (E, capacity, w) zero-padded buffer otherwise (dropless: padded
to the largest load, one host sync). The dropped rows' outputs are set to 0 with torch.where (0 * NaN
would be NaN) and their gradients never reach x. `moe_reference` is the plain per-expert loop both paths
are tested against. Router: F.linear in fp32; for CUDA bf16 tokens _RouterLogitsSplit, which skips the fp32
copy of x (weight split into two bf16 halves, fp32 accumulation; more accurate than TF32).

Where the experts run is decided from outside the model: MoE.expert_dispatch (None: here, on the full w_in and
w_out) is the hook that expert parallelism (nanochat.moe_ep, experts sharded over ranks, rows exchanged by
all_to_all) installs; this file never imports it. The Mamba + MoE model (create_mamba_moe) is nanochat.mamba_moe.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.distributed as dist

from nanochat.common import get_logger, log_once

logger = get_logger(__name__)


def grouped_mm_supported(dtype, device, row_sizes, compiled=None):
    """
    (ok, why): can torch._grouped_mm run the expert matmuls for this dtype and device?
    row_sizes are the inner sizes of every operand (dim, expert_dim, the sliced w and h_w):
    _grouped_mm needs every non-unit stride to be a multiple of 16 bytes.
    CUDA: bf16 on sm90+ only (the CUTLASS kernel). CPU (torch >= 2.9 has a CPU kernel): fp32 and bf16,
    but only bf16 under torch.compile, whose meta function for _grouped_mm rejects every other dtype.
    compiled: is the call traced by torch.compile (None: ask torch.compiler.is_compiling()).
    """
    if compiled is None:
        compiled = torch.compiler.is_compiling()
    if not hasattr(torch, "_grouped_mm"):
        return False, f"torch {torch.__version__} has no torch._grouped_mm"
    device = torch.device(device)
    if device.type == "cuda":
        if dtype != torch.bfloat16:
            return False, f"CUDA grouped_mm wants bf16, compute dtype is {dtype}"
        props = torch.cuda.get_device_properties(device)  # torch.compile folds this call to a constant
        if (props.major, props.minor) < (9, 0):
            return False, f"CUDA grouped_mm wants sm90+, this GPU is sm{props.major}{props.minor}"
    elif device.type == "cpu":
        if dtype not in (torch.float32, torch.bfloat16):
            return False, f"CPU grouped_mm wants fp32 or bf16, compute dtype is {dtype}"
        if dtype != torch.bfloat16 and compiled:
            return False, (f"under torch.compile grouped_mm wants bf16 (its meta function takes nothing else), "
                           f"compute dtype is {dtype}")
    else:
        return False, f"no grouped_mm on device type {device.type}"
    if any(s * dtype.itemsize % 16 for s in row_sizes):
        return False, f"row sizes {tuple(row_sizes)} x {dtype.itemsize} bytes are not all multiples of 16 bytes"
    return True, f"torch._grouped_mm, {dtype} on {device.type}"


class MoE(nn.Module):
    """
    Switch-style MoE FFN. See the module docstring for the parameter layout.

    Routing: probs = softmax(router(x)) in fp32; the top_k experts by score are chosen, where the
    score is probs (+ expert_bias when bias_balancing: the bias picks experts, it never weights them).
    Gate weight = the chosen expert's prob; for top_k > 1 the k chosen probs are renormalised to sum
    to 1. straight_gate=True makes every gate exactly 1/top_k in the forward pass while gradients
    still reach the router as if the gate were the (renormalised) prob (a straight-through gate);
    with identical experts (upcycling) the output is then exactly the shared expert's output.

    Capacity per expert = max(min_capacity, ceil(capacity_factor * n * top_k / E)), n = real tokens
    of this call (all B*T tokens unless a mask says otherwise). Assignments are kept in token order
    (flattened (B, T) order, batch row 0 first): an expert keeps the first `capacity` tokens that
    chose it and drops the rest. drop_tokens=False is dropless (no capacity).

    After each forward:
      aux_loss  = E * sum_e f_e * P_e (Switch load balancing); f_e = fraction of the n*top_k routing
                  choices (before capacity drops) that picked e, so the loss is 1 at perfect balance
                  for any top_k; P_e = mean router prob of e over real tokens. Gradient flows via P_e.
      z_loss    = mean over real tokens of logsumexp(logits)^2 (ST-MoE router z-loss).
      router_loss = aux_loss_coef * aux_loss + router_z_loss_coef * z_loss (what a trainer adds).
      last_stats = {"tokens_per_expert": (E,) long kept per expert, "dropped": int dropped assignments};
                  the forward keeps both on the device, reading last_stats syncs once for the int
    Matryoshka width: an input with only the first w < dim channels uses router.weight[:, :w] and each
    expert's first h_w = expert_dim * w // dim hidden units (w_in[:, :h_w, :w], w_out[:, :w, :h_w]).
    update_bias(): aux-loss-free balancing (DeepSeek-V3): expert_bias += rate * sign(mean load - load),
    load = routing choices counted over the training forwards since the last update (summed over ranks).

    expert_dispatch: None, or an object installed from outside (nanochat.moe_ep.shard_experts) that runs the
    expert computation elsewhere. It has two methods:
      run(moe, xs, kept_counts, cdtype) -> ys   xs (n*k, w) rows in cdtype, grouped by expert with the kept rows
          first (kept_counts (E,) of them per expert, in expert order); ys (n*k, w): the experts' outputs for
          the kept rows (what the other rows hold is masked to 0 afterwards). It may use the public helpers
          run_experts, pick_path and permute_rows.
      levels_for_call(moe, levels) -> sorted levels   the widths a per-token-width forward must call this MoE
          at (see MoE.levels_for_call), e.g. the same on every rank when each call is a collective.
    """

    def __init__(self, dim, num_experts, expert_dim, top_k=1, capacity_factor=1.0, min_capacity=4,
                 drop_tokens=True, router_z_loss_coef=1e-3, aux_loss_coef=1e-2, bias_balancing=False,
                 bias_update_rate=1e-3, straight_gate=False, dispatch="auto", device=None, dtype=None):
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k={top_k} must be in [1, num_experts={num_experts}]")
        if capacity_factor <= 0 or min_capacity < 0:
            raise ValueError(f"capacity_factor={capacity_factor} must be > 0 and min_capacity={min_capacity} >= 0")
        if dispatch not in ("auto", "grouped_mm", "bmm"):
            raise ValueError(f"dispatch={dispatch!r}: use 'auto', 'grouped_mm' or 'bmm'")
        self.dim, self.num_experts, self.expert_dim, self.top_k = dim, num_experts, expert_dim, top_k
        self.capacity_factor, self.min_capacity, self.drop_tokens = capacity_factor, min_capacity, drop_tokens
        self.router_z_loss_coef, self.aux_loss_coef = router_z_loss_coef, aux_loss_coef
        self.bias_balancing, self.bias_update_rate = bias_balancing, bias_update_rate
        self.straight_gate = straight_gate
        self.dispatch = dispatch  # may be changed on the instance, e.g. by tests and benchmarks
        factory = dict(device=device, dtype=dtype)
        self.router = nn.Linear(dim, num_experts, bias=False, **factory)
        self.w_in = nn.Parameter(torch.empty(num_experts, expert_dim, dim, **factory))   # (E, H, D)
        self.w_out = nn.Parameter(torch.empty(num_experts, dim, expert_dim, **factory))  # (E, D, H)
        if bias_balancing:
            self.register_buffer("expert_bias", torch.zeros(num_experts, device=device, dtype=torch.float32))
            self.register_buffer("_load_accum", torch.zeros(num_experts, device=device, dtype=torch.long), persistent=False)
        self.aux_loss = self.z_loss = None
        self._stats = None  # (kept per expert (E,), dropped ()) of the last forward, device tensors
        self.expert_dispatch = None  # runs the experts elsewhere once installed from outside (see the docstring)
        if torch.device(device if device is not None else "cpu").type != "meta":
            self.init_weights()

    @property
    def num_experts_per_tok(self):
        return self.top_k

    @property
    def last_stats(self):
        """{"tokens_per_expert": (E,) long tensor, "dropped": int} of the last forward (None before one).
        The int costs one host sync here, never in the forward."""
        if self._stats is None:
            return None
        kept, dropped = self._stats
        return {"tokens_per_expert": kept, "dropped": int(dropped)}

    @property
    def router_loss(self):
        if self.aux_loss is None:
            raise RuntimeError("router_loss is set by forward(); call the MoE first")
        return self.aux_loss_coef * self.aux_loss + self.router_z_loss_coef * self.z_loss

    @torch.no_grad()
    def init_weights(self):
        # nanochat's Linear rule for c_fc (fan_in=dim, fan_out=expert_dim); zero c_proj so a fresh
        # block adds nothing to the residual; a small router so routing starts near uniform
        std_in = 1.0 / math.sqrt(self.dim) * min(1.0, math.sqrt(self.expert_dim / self.dim))
        nn.init.normal_(self.w_in, mean=0.0, std=std_in)
        nn.init.zeros_(self.w_out)
        nn.init.normal_(self.router.weight, mean=0.0, std=0.1 / math.sqrt(self.dim))
        if self.bias_balancing:
            self.expert_bias.zero_()
            self._load_accum.zero_()

    @classmethod
    def from_dense(cls, c_fc_weight, c_proj_weight, num_experts, top_k=1, straight_gate=True, drop_tokens=False, **kwargs):
        """
        Upcycle a dense nanochat MLP (c_fc.weight (H, D), c_proj.weight (D, H)) into an MoE whose
        every expert is a copy of it; the router is freshly initialised (small normal).
        Does the MoE compute the dense MLP? With the plain Switch gate (gate = prob < 1) NO: the output
        is p * MLP(x). With the defaults here (straight_gate=True: gate exactly 1/top_k forward,
        drop_tokens=False: nothing dropped) and top_k=1 (or 2) it is EXACTLY the dense MLP, up to
        matmul rounding, while the router still learns through the straight-through gate. With
        dropping on, tokens over capacity get 0 instead of MLP(x).
        """
        H, D = c_fc_weight.shape
        if tuple(c_proj_weight.shape) != (D, H):
            raise ValueError(f"c_proj_weight has shape {tuple(c_proj_weight.shape)}, expected (D, H) = {(D, H)}")
        moe = cls(D, num_experts, H, top_k=top_k, straight_gate=straight_gate, drop_tokens=drop_tokens,
                  device=c_fc_weight.device, dtype=c_fc_weight.dtype, **kwargs)
        with torch.no_grad():
            moe.w_in.copy_(c_fc_weight.detach().unsqueeze(0).expand(num_experts, H, D))
            moe.w_out.copy_(c_proj_weight.detach().unsqueeze(0).expand(num_experts, D, H))
        return moe

    def capacity(self, num_tokens):
        """Per-expert capacity for a call with num_tokens real tokens; None when dropless."""
        if not self.drop_tokens:
            return None
        return max(self.min_capacity, math.ceil(self.capacity_factor * num_tokens * self.top_k / self.num_experts))

    def _check_input(self, x, mask, width):
        if x.ndim != 3:
            raise ValueError(f"MoE input must be (B, T, w), got shape {tuple(x.shape)}")
        B, T, w = x.shape
        if width is not None and width != w:
            raise ValueError(f"width={width} but the input has {w} channels; pass the sliced input")
        if not 1 <= w <= self.dim:
            raise ValueError(f"input width {w} must be in [1, dim={self.dim}]")
        h_w = self.expert_dim * w // self.dim
        if h_w < 1:
            raise ValueError(f"width {w} leaves no expert hidden units (expert_dim={self.expert_dim}, dim={self.dim})")
        if mask is not None and (mask.shape != (B, T) or mask.dtype != torch.bool):
            raise ValueError(f"mask must be a (B, T) = {(B, T)} bool tensor, got {tuple(mask.shape)} {mask.dtype}")
        return w, h_w

    def route(self, xr, w):
        """xr (n, w) real tokens -> logits (n, E) fp32, probs (n, E), top_idx (n, k), gate (n, k) fp32."""
        with torch.autocast(device_type=xr.device.type, enabled=False):
            if split_router_ok(xr):  # bf16 tokens: no fp32 copy of them (see _RouterLogitsSplit)
                logits = _RouterLogitsSplit.apply(xr, self.router.weight[:, :w])
            else:
                logits = F.linear(xr.float(), self.router.weight[:, :w].float())  # (n, E)
        probs = logits.softmax(dim=-1)
        scores = probs + self.expert_bias if self.bias_balancing else probs  # bias: selection only
        # (n, k), column 0 = first choice; top-1 as argmax, which compiles into the softmax's reduction
        top_idx = scores.argmax(dim=-1, keepdim=True) if self.top_k == 1 else scores.topk(self.top_k, dim=-1).indices
        gate = probs.gather(1, top_idx)  # (n, k)
        if self.top_k > 1:
            gate = gate / gate.sum(dim=-1, keepdim=True)
        if self.straight_gate:
            gate = gate - gate.detach() + 1.0 / self.top_k  # value 1/k, gradient of the prob
        return logits, probs, top_idx, gate

    def _set_losses(self, logits, probs, counts, n):
        if n == 0:  # nothing routed: zero losses still attached to the router's graph
            zero = logits.sum() * 0.0
            self.aux_loss, self.z_loss = zero, zero.clone()
            return
        f = counts.float() / (n * self.top_k)  # (E,) fraction of routing choices
        P = probs.mean(dim=0)  # (E,) mean router prob
        self.aux_loss = self.num_experts * (f * P).sum()
        self.z_loss = torch.logsumexp(logits, dim=-1).square().mean()

    def levels_for_call(self, levels):
        """The width levels, sorted, that a per-token-width forward (one call per level, each with the tokens of
        that level) calls this MoE at: its own, or those expert_dispatch decides (e.g. the union over the ranks
        of an expert-parallel group, where a rank with no token at a level calls it with none)."""
        levels = sorted(levels)
        return levels if self.expert_dispatch is None else self.expert_dispatch.levels_for_call(self, levels)

    def pick_path(self, dtype, device, w, h_w):
        """(path, why): the expert kernel for compute dtype and device at input width w, hidden width h_w:
        "grouped_mm" or "bmm", as self.dispatch asks and grouped_mm_supported allows."""
        if self.dispatch == "bmm":
            return "bmm", "forced by dispatch='bmm'"
        ok, why = grouped_mm_supported(dtype, device, (w, h_w, self.dim, self.expert_dim))
        if self.dispatch == "grouped_mm" and not ok:
            raise RuntimeError(f"dispatch='grouped_mm' cannot run here: {why}; use dispatch='auto' or 'bmm'")
        return ("grouped_mm", why) if ok else ("bmm", f"batched fallback: {why}")

    def forward(self, x, mask=None, width=None):
        """x (B, T, w), w <= dim (Matryoshka prefix); mask (B, T) bool, True = real. Returns (B, T, w)."""
        w, h_w = self._check_input(x, mask, width)
        B, T, _ = x.shape
        E, k = self.num_experts, self.top_k
        xf = x.reshape(B * T, w)
        real = mask.reshape(-1).nonzero().squeeze(1) if mask is not None else None  # (n,) real token rows
        xr = xf.index_select(0, real) if real is not None else xf  # (n, w)
        n = xr.shape[0]
        dev = x.device
        cdtype = torch.get_autocast_dtype(dev.type) if torch.is_autocast_enabled(dev.type) else x.dtype

        logits, probs, top_idx, gate = self.route(xr, w)
        capacity = self.capacity(n)

        # Assignment slots are token-major: slot = token * k + j for the token's j-th choice. Every slot gets a
        # row of the expert computation (static shapes, nothing for the host to wait on): kept rows first, grouped
        # by expert in token order, then the dropped rows; order[r] is the slot of row r, inv[slot] its row.
        # Counting, not sorting: a running count per expert along the slots gives each slot its place among its
        # expert's assignments in token order. The (E, n*k) int32 counts are transient (4 bytes * E per slot);
        # (E, n*k) so that the scan runs along the contiguous dimension (along dim 0 of (n*k, E) CUDA's eager
        # cumsum takes milliseconds).
        nk = n * k
        expert_flat = top_idx.reshape(-1)  # (nk,)
        # one-hot by comparison: F.one_hot would read the max index back to the host to check it
        onehot = (torch.arange(E, device=dev)[:, None] == expert_flat).to(torch.int32)  # (E, nk)
        running = onehot.cumsum(1, dtype=torch.int32)
        place = (running * onehot).sum(0).long() - 1  # (nk,) how many earlier slots chose the same expert
        counts = running[:, -1:].sum(1).long()  # (E,) routing choices per expert before capacity (zeros when nk = 0)
        ar = torch.arange(nk, device=dev)
        capped = capacity is not None and capacity < n  # else nothing can be dropped: at most n slots per expert
        kept_counts = counts.clamp(max=capacity) if capped else counts
        kept_starts = kept_counts.cumsum(0) - kept_counts  # (E,) first row of each expert's kept group
        inv = kept_starts.index_select(0, expert_flat) + place  # (nk,) row of each slot
        keep_row = None
        if capped:
            n_kept = kept_counts.sum()  # 0-d, stays on the device
            over = counts - kept_counts
            over_starts = n_kept + over.cumsum(0) - over  # (E,) first row of each expert's dropped slots
            inv = torch.where(place < capacity, inv, over_starts.index_select(0, expert_flat) + place - capacity)
            keep_row = ar < n_kept  # (nk,) rows that belong to an expert's group
        order = torch.empty_like(inv).scatter_(0, inv, ar)  # (nk,) the inverse permutation

        path, why = self.pick_path(cdtype, dev, w, h_w)
        log_once(logger, f"MoE expert dispatch: {path} ({why})")  # so a run's log says which expert kernel it used
        xs = _TokensToRows.apply(xr.to(cdtype), order, inv, keep_row, k)  # (nk, w) tokens grouped by expert
        if self.expert_dispatch is not None:  # the experts run elsewhere, e.g. sharded over ranks
            ys = self.expert_dispatch.run(self, xs, kept_counts, cdtype)
        else:
            # bmm: (E, cap, w) buffers; dropless pads to the largest load, which costs a host sync
            cap = None if path == "grouped_mm" else (
                min(capacity, n) if capacity is not None else (int(kept_counts.max()) if n > 0 else 0))
            ys = self.run_experts(xs, kept_counts, self.w_in[:, :h_w, :w].to(cdtype),
                                  self.w_out[:, :w, :h_w].to(cdtype), path, cap)
        if keep_row is not None:
            ys = torch.where(keep_row[:, None], ys, 0.0)  # dropped rows: exactly 0, also when ys there is NaN
        ys = permute_rows(ys, inv, order)  # (nk, w) in slot order
        gate = gate.to(cdtype)
        out_r = (ys.view(n, k, w) * gate[..., None]).sum(1) if k > 1 else ys * gate  # (n, w)

        self._set_losses(logits, probs, counts, n)
        if self.bias_balancing and self.training:
            self._load_accum += counts
        self._stats = (kept_counts.detach(), nk - kept_counts.sum().detach())
        if real is None:
            return out_r.view(B, T, w)
        out = torch.zeros(B * T, w, device=dev, dtype=out_r.dtype).index_copy(0, real, out_r)
        return out.view(B, T, w)

    def run_experts(self, xs, sizes, w_in, w_out, path, cap):
        """
        xs (m, w) rows grouped by expert, sizes (E',) rows per group in order; rows past sizes.sum() are in no
        group. w_in (E', h, w) and w_out (E', w, h) in xs's dtype. Returns (m, w); a row in no group gets
        undefined memory (grouped_mm: rows past offs[-1]; the gradients it gives their inputs too) or garbage
        (bmm), which the caller masks. cap: bmm's rows per expert, >= every size (unused by grouped_mm).
        """
        with torch.autocast(device_type=xs.device.type, enabled=False):  # operands already in xs's dtype
            if path == "grouped_mm":
                offs = sizes.cumsum(0).to(torch.int32)  # (E',) end row of each group
                hs = F.relu(torch._grouped_mm(xs, w_in.transpose(1, 2), offs=offs)).square()  # (m, h)
                return torch._grouped_mm(hs, w_out.transpose(1, 2), offs=offs)
            # pad to (E', cap, w) (+1 scratch row that every row in no group is written to and nothing reads)
            Ep, (m, w) = sizes.shape[0], xs.shape
            ends = sizes.cumsum(0)
            ar = torch.arange(m, device=xs.device)
            row_e = torch.searchsorted(ends, ar, right=True)  # (m,) group of each row, E' past the last
            row_ec = row_e.clamp(max=Ep - 1)
            flat = torch.where(row_e < Ep, row_ec * cap + ar - (ends - sizes).index_select(0, row_ec), Ep * cap)
            buf = xs.new_zeros(Ep * cap + 1, w).index_copy(0, flat, xs)
            hb = F.relu(torch.bmm(buf[:Ep * cap].view(Ep, cap, w), w_in.transpose(1, 2))).square()  # (E', cap, h)
            yb = torch.bmm(hb, w_out.transpose(1, 2)).view(Ep * cap, w)
            return yb.index_select(0, flat.clamp(max=max(Ep * cap - 1, 0)))

    @torch.no_grad()
    def update_bias(self):
        """Aux-loss-free balancing step; call after optimizer steps. Needs bias_balancing=True."""
        if not self.bias_balancing:
            raise RuntimeError("update_bias() needs MoE(..., bias_balancing=True)")
        load = self._load_accum.float()
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(load)  # every rank must hold the same bias
        if load.sum() == 0:
            raise RuntimeError("update_bias(): no training-mode forward since the last update, so no load to balance")
        self.expert_bias += self.bias_update_rate * torch.sign(load.mean() - load)
        self._load_accum.zero_()


class _TokensToRows(torch.autograd.Function):
    """
    xs = xr[order // k]: row r of the expert computation holds the token of assignment slot order[r].
    Backward: the rows where keep_row is False (dropped) get undefined gradients from grouped_mm (rows past
    offs[-1]); torch.where sets them to 0 (0 * NaN would be NaN); then inv gathers the rows back into slot
    order and each token sums its k slots. Gathers only: no atomics, which index_select's backward would use.
    """

    @staticmethod
    def forward(ctx, xr, order, inv, keep_row, k):
        ctx.save_for_backward(inv, keep_row)
        ctx.k = k
        return xr.index_select(0, order // k if k > 1 else order)

    @staticmethod
    def backward(ctx, grad_xs):
        inv, keep_row = ctx.saved_tensors
        k = ctx.k
        if keep_row is not None:
            grad_xs = torch.where(keep_row[:, None], grad_xs, 0.0)
        grad = grad_xs.index_select(0, inv)  # (n*k, w) slot order
        return (grad.view(-1, k, grad.shape[1]).sum(1) if k > 1 else grad), None, None, None, None


class _PermuteRows(torch.autograd.Function):
    """x[index] for a permutation index of x's rows; backward: the gradient gathered by the inverse permutation."""

    @staticmethod
    def forward(ctx, x, index, inverse):
        ctx.save_for_backward(inverse)
        return x.index_select(0, index)

    @staticmethod
    def backward(ctx, grad):
        inverse, = ctx.saved_tensors
        return grad.index_select(0, inverse), None, None


def permute_rows(x, index, inverse):
    """x[index], where index permutes x's rows and inverse is its inverse (inverse[index[i]] = i). The backward
    gathers the gradient by inverse; index_select's own backward would scatter-add it (atomics on CUDA)."""
    return _PermuteRows.apply(x, index, inverse)


def split_router_ok(x):
    """Router by _RouterLogitsSplit? For CUDA bf16 tokens when fp32 matmuls may run as TF32 (compute_init sets
    allow_tf32): the split is more accurate than TF32. With TF32 off, the exact fp32 path runs."""
    return x.is_cuda and x.dtype == torch.bfloat16 and torch.backends.cuda.matmul.allow_tf32


def _bf16_mm(a, b, out_dtype=torch.float32):
    """a @ b for bf16 a, b, accumulated in fp32 and returned in out_dtype (fp32 or bf16): one cuBLAS call on CUDA;
    elsewhere the same products in fp32 math (a bf16 x bf16 product is exact in fp32), so the CPU tests check the
    algorithm."""
    if not a.is_cuda:
        return (a.float() @ b.float()).to(out_dtype)
    return a @ b if out_dtype == torch.bfloat16 else torch.mm(a, b, out_dtype=out_dtype)


def _split_bf16(t):
    """t (fp32) as hi + lo, both bf16: hi = t with its low 16 bits cleared (exact in bf16), lo = bf16(t - hi).
    hi + lo keeps 16 significand bits (relative error <= 2^-15), against TF32's 11. A bit mask, not a round trip
    through bf16: inductor folds t.to(bf16).float() back into t, which would make lo zero under torch.compile."""
    hi = (t.view(torch.int32) & -65536).view(torch.float32)
    return hi.to(torch.bfloat16), (t - hi).to(torch.bfloat16)


class _RouterLogitsSplit(torch.autograd.Function):
    """
    Router logits x @ W^T for bf16 tokens x (n, w), fp32 (or bf16) weight W (E, w), with fp32 accumulation and
    fp32 output, without the fp32 copy of x that F.linear(x.float(), W.float()) writes (and keeps for backward).
    x is exact in bf16, so only W needs more than bf16: W = hi + lo (two bf16 halves), and one GEMM with 2E
    output columns gives x @ hi^T and x @ lo^T, summed in fp32. Backward: dW = g^T x by the same split of the fp32
    g; dx = g W, rounded to bf16 once (autograd's fp32 path rounds it to x's bf16 as well), from one bf16 GEMM
    over [g_hi, g_lo, g_hi] and [W_hi; W_hi; W_lo]. Tested against fp64 in tests/test_moe.py (the algorithm,
    on a CPU) and tests/test_gpu_kernels.py (cuBLAS).
    """

    @staticmethod
    def forward(ctx, x, weight):
        ctx.save_for_backward(x, weight)
        E = weight.shape[0]
        hi, lo = _split_bf16(weight.float())
        both = _bf16_mm(x, torch.cat([hi, lo]).t())  # (n, 2E)
        return both[:, :E] + both[:, E:]

    @staticmethod
    def backward(ctx, g):
        x, weight = ctx.saved_tensors
        E = weight.shape[0]
        g_hi, g_lo = _split_bf16(g.float())
        dx = dw = None
        if ctx.needs_input_grad[0]:
            w_hi, w_lo = _split_bf16(weight.float())
            a, b = torch.cat([g_hi, g_lo, g_hi], 1), torch.cat([w_hi, w_hi, w_lo])  # (n, 3E), (3E, w)
            dx = _bf16_mm(a, b, x.dtype)
        if ctx.needs_input_grad[1]:
            both = _bf16_mm(torch.cat([g_hi, g_lo], 1).t(), x)  # (2E, w)
            dw = (both[:E] + both[E:]).to(weight.dtype)
        return dx, dw


def moe_reference(moe, x, mask=None, width=None):
    """
    The plain per-expert loop: same router math (moe.route), capacity applied by taking each expert's
    first `capacity` tokens in token order, each expert's MLP run with F.linear on its own tokens.
    Computes in x's dtype (no autocast handling). Returns (y (B, T, w), tokens_per_expert (E,), dropped).
    """
    w, h_w = moe._check_input(x, mask, width)
    B, T, _ = x.shape
    xf = x.reshape(B * T, w)
    real = mask.reshape(-1).nonzero().squeeze(1) if mask is not None else torch.arange(B * T, device=x.device)
    xr = xf[real]
    _, _, top_idx, gate = moe.route(xr, w)
    capacity = moe.capacity(xr.shape[0])
    out_r = torch.zeros_like(xr)
    kept, dropped = [], 0
    for e in range(moe.num_experts):
        hit = top_idx == e  # (n, k)
        tok = hit.any(dim=1).nonzero().squeeze(1)  # tokens that chose e, in token order
        if capacity is not None:
            dropped += max(0, tok.numel() - capacity)
            tok = tok[:capacity]
        g = (gate * hit).sum(dim=1)[tok].to(x.dtype)
        h = F.relu(F.linear(xr[tok], moe.w_in[e, :h_w, :w])).square()
        y = F.linear(h, moe.w_out[e, :w, :h_w])
        out_r = out_r.index_add(0, tok, y * g[:, None])
        kept.append(tok.numel())
    out = torch.zeros_like(xf).index_copy(0, real, out_r)
    return out.view(B, T, w), torch.tensor(kept, dtype=torch.long), dropped


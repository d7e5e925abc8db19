"""
The scans behind nanochat/mamba_block.py, each beside its sequential float64 reference:
  selective_scan / selective_scan_reference   Mamba-1's selective scan: a chunked scan with a
      log-depth (Hillis-Steele) combine inside chunks and a hand-written backward, no Python loop over time;
      under torch.compile, torch's associative_scan instead (one scan kernel on CUDA)
  ssd_chunk_scan / ssd_reference              Mamba-2's state-space duality: chunked SSD
Both take initial states and packed-document resets (seq_idx); tests/test_mamba_block.py compares
each fast scan with its reference at float64 round-off.
"""
import torch
import torch.nn.functional as F


def _compute_dtype(dtype):
    return torch.promote_types(dtype, torch.float32)  # fp32, or fp64 for fp64 inputs


def _segment_ids(seq_idx):
    """(B, L) any ints -> (B, L) int64 counting the changes so far: 0 for the first document."""
    change = (seq_idx[:, 1:] != seq_idx[:, :-1]).long()
    return F.pad(_cumsum(change, 1), (1, 0))


# -----------------------------------------------------------------------------
# Mamba-1: selective scan (parallel) and its sequential reference

def _hillis_steele(a, b):
    """Inclusive scan of h_t = a_t * h_{t-1} + b_t (h_{-1} = 0) along dim -2 in log2(T) steps.
    Returns (prod_{s<=t} a_s, h_t). Each step updates positions k.. of copies of a and b in place: the values
    of padding the shifted operands with 0 and 1 (bitwise: a_t * 0 + b_t = b_t), with half the allocations
    (2-2.5x faster on the CPU). Called where autograd does not record (_LinearScan's forward and backward)."""
    k, T = 1, a.shape[-2]
    a, b = a.clone(), b.clone()
    while k < T:
        shifted = a[..., k:, :] * b[..., :-k, :]  # with a before this step's update
        a[..., k:, :] *= a[..., :-k, :].clone()  # the clone: the two ranges overlap
        b[..., k:, :] += shifted
        k *= 2
    return a, b


def _chunked_linear_scan(a, b, h0, chunk_size):
    """h_t = a_t * h_{t-1} + b_t along dim -2 with h_{-1} = h0. a, b: (..., L, N); h0: (..., N) or None.
    Log-depth scan inside chunks of chunk_size, then the same over the chunk ends. Only products of
    decays in [0, 1] are formed, so nothing overflows. Returns h (..., L, N) and h_{L-1} (..., N)."""
    L = a.shape[-2]
    Q = min(chunk_size, L)
    nc = -(-L // Q)
    pad = nc * Q - L
    if pad:  # decay 1 and no input: pads leave the state as it is
        a, b = F.pad(a, (0, 0, 0, pad), value=1.0), F.pad(b, (0, 0, 0, pad))
    a, b = a.unflatten(-2, (nc, Q)), b.unflatten(-2, (nc, Q))  # (..., nc, Q, N)
    a_loc, h_loc = _hillis_steele(a, b)  # within each chunk, from a zero state
    a_end, h_end = a_loc[..., -1, :], h_loc[..., -1, :]  # (..., nc, N)
    if h0 is not None:
        h_end = torch.cat([h_end[..., :1, :] + a_end[..., :1, :] * h0[..., None, :], h_end[..., 1:, :]], dim=-2)
    _, H_end = _hillis_steele(a_end, h_end)  # true state at each chunk end
    H_in = F.pad(H_end[..., :-1, :], (0, 0, 1, 0)) if h0 is None else torch.cat([h0[..., None, :], H_end[..., :-1, :]], dim=-2)
    h = h_loc + a_loc * H_in[..., None, :]
    return h.flatten(-3, -2)[..., :L, :], H_end[..., -1, :]


try:  # torch's scan higher-order op: under torch.compile on CUDA, inductor makes it one Triton scan kernel
    from torch._higher_order_ops.associative_scan import associative_scan as _associative_scan
except ImportError:  # older torch: the log-depth scan also runs compiled
    _associative_scan = None


def _combine(left, right):
    # (a1, b1) then (a2, b2): h -> a2 (a1 h + b1) + b2
    a1, b1 = left
    a2, b2 = right
    return a1 * a2, a2 * b1 + b2


def _assoc_linear_scan(a, b, h0, chunk_size=None):
    """_chunked_linear_scan's result (h, h_{L-1}) by torch's associative_scan along L, moved to the last dim.
    Used while torch.compile traces: on an H100 (d_model 1024, B 8 x L 2048, bf16 autocast) the compiled
    Mamba-1 fwd+bwd took 23.7 ms with it against 31.8 ms with the log-depth scan (the kernel path: 5.1 ms)."""
    at, bt = a.transpose(-1, -2).contiguous(), b.transpose(-1, -2).contiguous()  # (..., N, L)
    if h0 is not None:
        bt = torch.cat([bt[..., :1] + at[..., :1] * h0[..., None], bt[..., 1:]], dim=-1)
    mode = "pointwise" if a.is_cuda else "generic"  # pointwise (the fused kernel) is CUDA-only
    _, h = _associative_scan(_combine, (at, bt), dim=at.dim() - 1, combine_mode=mode)
    h = h.transpose(-1, -2)
    return h, h[..., -1, :]


def _scan_impl():
    """The log-depth scan in eager mode; torch's associative scan while torch.compile traces (when available)."""
    if _associative_scan is not None and torch.compiler.is_compiling():
        return _assoc_linear_scan
    return _chunked_linear_scan


class _LinearScan(torch.autograd.Function):
    """The linear scan (_scan_impl) with an analytic backward: the adjoint g_t = dL/dh_t + a_{t+1} g_{t+1} is the
    same scan run backwards in time, then dL/da_t = g_t h_{t-1}, dL/db_t = g_t, dL/dh0 = a_0 g_0.
    Autograd then keeps a and h instead of every log-step of the scan (about 20 (B, D, L, N) tensors)."""

    @staticmethod
    def forward(ctx, a, b, h0, chunk_size):
        h, last = _scan_impl()(a, b, h0, chunk_size)
        ctx.save_for_backward(a, h, h0)
        ctx.chunk_size = chunk_size
        return h, last

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_h, grad_last):
        a, h, h0 = ctx.saved_tensors
        grad_h = torch.cat([grad_h[..., :-1, :], grad_h[..., -1:, :] + grad_last[..., None, :]], dim=-2)
        a_next = F.pad(a[..., 1:, :], (0, 0, 0, 1))  # a_{t+1}; nothing follows the last step
        g, _ = _scan_impl()(a_next.flip(-2), grad_h.flip(-2), None, ctx.chunk_size)
        g = g.flip(-2)
        h_prev = F.pad(h[..., :-1, :], (0, 0, 1, 0)) if h0 is None else torch.cat([h0[..., None, :], h[..., :-1, :]], dim=-2)
        grad_h0 = None if h0 is None else a[..., 0, :] * g[..., 0, :]
        return g * h_prev, g, grad_h0, None


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   initial_state=None, seq_idx=None, return_last_state=False, chunk_size=16):
    """Parallel selective scan, same arguments and layout as mamba-ssm's selective_scan_fn (real A,
    input-dependent B and C) plus initial_state (B, D, N) and seq_idx (B, L).
    u, delta, z: (B, D, L); A: (D, N); B, C: (B, N, L); D, delta_bias: (D,).
    Computes in fp32 (fp64 for fp64 input); returns out (B, D, L) in u's dtype [, last_state (B, D, N)]."""
    dtype_in, f = u.dtype, _compute_dtype(u.dtype)
    u, delta, A, B, C = u.to(f), delta.to(f), A.to(f), B.to(f), C.to(f)
    if delta_bias is not None:
        delta = delta + delta_bias.to(f)[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    a = torch.exp(delta[..., None] * A[:, None, :])  # (B, D, L, N)
    b = (delta * u)[..., None] * B.transpose(1, 2)[:, None]  # (B, D, L, N)
    if seq_idx is not None:  # a new document: the state restarts (decay 0)
        start = F.pad(seq_idx[:, 1:] != seq_idx[:, :-1], (1, 0))
        a = a.masked_fill(start[:, None, :, None], 0.0)
    h0 = None if initial_state is None else initial_state.to(f)
    h, last = _LinearScan.apply(a, b, h0, chunk_size)  # (B, D, L, N), (B, D, N)
    y = torch.einsum("bdln,bnl->bdl", h, C)
    if D is not None:
        y = y + u * D.to(f)[:, None]
    if z is not None:
        y = y * F.silu(z.to(f))
    y = y.to(dtype_in)
    return (y, last) if return_last_state else y


def selective_scan_reference(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                             initial_state=None, seq_idx=None, return_last_state=False):
    """Sequential float64 reference of `selective_scan` (same arguments), one step per position."""
    u, delta, A, B, C = (t.double() for t in (u, delta, A, B, C))
    if delta_bias is not None:
        delta = delta + delta_bias.double()[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    h = u.new_zeros(u.shape[0], A.shape[0], A.shape[1]) if initial_state is None else initial_state.double()
    ys = []
    for t in range(u.shape[2]):
        decay = torch.exp(delta[:, :, t, None] * A)  # (B, D, N)
        if seq_idx is not None and t > 0:
            decay = decay * (seq_idx[:, t] == seq_idx[:, t - 1]).double()[:, None, None]
        h = decay * h + (delta[:, :, t] * u[:, :, t])[..., None] * B[:, None, :, t]
        ys.append(torch.einsum("bdn,bn->bd", h, C[:, :, t]))
    y = torch.stack(ys, dim=2)
    if D is not None:
        y = y + u * D.double()[:, None]
    if z is not None:
        y = y * F.silu(z.double())
    return (y, h) if return_last_state else y


# -----------------------------------------------------------------------------
# Mamba-2: chunked SSD and its sequential reference

@torch.library.custom_op("adamba::cumsum", mutates_args=())
def _cumsum(x: torch.Tensor, dim: int) -> torch.Tensor:
    """torch.cumsum as an op torch.compile does not look into. Inductor 2.11 fails to generate code for
    the SSD's chunk cumsums on CUDA ("Error in codegen for ComputedBuffer ... SplitScan", seen on an H100
    at the bench's shapes), so the compiled graph calls the ATen kernel here instead. Output contiguous."""
    return torch.cumsum(x.contiguous(), dim)


@_cumsum.register_fake
def _(x, dim):
    return x.new_empty(x.shape)


def _cumsum_setup(ctx, inputs, output):
    ctx.dim = inputs[1]


def _cumsum_backward(ctx, grad):
    # d/dx_k of sum_{j <= t} x_j: the reversed cumulative sum of the gradient
    return _cumsum(grad.flip(ctx.dim), ctx.dim).flip(ctx.dim), None


_cumsum.register_autograd(_cumsum_backward, setup_context=_cumsum_setup)


def _segsum(a):
    """(..., T) -> (..., T, T) with [t, s] = a_{s+1} + ... + a_t for t >= s (0 above the diagonal).
    Built by a masked cumsum, so no difference of large cumulative sums is ever taken."""
    T = a.shape[-1]
    strict = torch.tril(torch.ones(T, T, dtype=torch.bool, device=a.device), diagonal=-1)  # [k, s]: k > s
    return _cumsum(a[..., :, None].expand(*a.shape, T).masked_fill(~strict, 0.0), a.dim() - 1)


def ssd_chunk_scan(x, dt, A, B, C, chunk_size, D=None, z=None, dt_bias=None, dt_softplus=False,
                   dt_limit=(0.0, float("inf")), initial_states=None, seq_idx=None, return_final_states=False):
    """Chunked SSD (the ssd_minimal algorithm), same arguments as mamba-ssm's mamba_chunk_scan_combined.
    x: (b, l, h, p); dt: (b, l, h); A: (h,); B, C: (b, l, g, n) (head i uses group i // (h/g));
    D: (h,) or (h, p); z: (b, l, h, p); initial_states: (b, h, p, n); seq_idx: (b, l).
    Returns y (b, l, h, p) in x's dtype [, final_states (b, h, p, n) in fp32/fp64]."""
    dtype_in, f = x.dtype, _compute_dtype(x.dtype)
    b_, L, H, P = x.shape
    G = B.shape[2]
    if H % G:
        raise ValueError(f"nheads={H} must be a multiple of ngroups={G}")
    x, dt, A = x.to(f), dt.to(f), A.to(f)
    if dt_bias is not None:
        dt = dt + dt_bias.to(f)
    if dt_softplus:
        dt = F.softplus(dt)
    if tuple(dt_limit) != (0.0, float("inf")):
        dt = dt.clamp(min=dt_limit[0], max=dt_limit[1])
    B = B.to(f).repeat_interleave(H // G, dim=2)  # (b, l, h, n)
    C = C.to(f).repeat_interleave(H // G, dim=2)
    Q = min(chunk_size, L)
    nc = -(-L // Q)
    pad = nc * Q - L
    seg = None if seq_idx is None else _segment_ids(seq_idx)
    xdt = x * dt[..., None]
    a = dt * A  # (b, l, h) log decays, <= 0
    if pad:  # dt = 0 on pads: decay 1, no input, so the final state is that of position L-1
        xdt, a, B, C = (F.pad(t, (0, 0) * (t.dim() - 2) + (0, pad)) for t in (xdt, a, B, C))
        seg = None if seg is None else torch.cat([seg, seg[:, -1:].expand(-1, pad)], dim=1)
    xdt, B, C = (t.unflatten(1, (nc, Q)) for t in (xdt, B, C))  # (b, c, q, h, .)
    a = a.unflatten(1, (nc, Q)).permute(0, 3, 1, 2)  # (b, h, c, q)
    a_cum = _cumsum(a, 3)  # (b, h, c, q)
    causal = torch.tril(torch.ones(Q, Q, dtype=torch.bool, device=x.device))
    if seg is not None:
        seg = seg.unflatten(1, (nc, Q))  # (b, c, q)
        seg_end = F.pad(seg[:, :, -1], (1, 0))  # (b, c+1): the initial state is document 0
        seg_in = seg_end[:, :-1]  # document of the state entering each chunk
    # 1. within chunks: y_t = sum_{s<=t} C_t.B_s exp(a_{s+1}+..+a_t) dt_s x_s
    keep = causal if seg is None else causal & (seg[..., :, None] == seg[..., None, :])[:, None]
    Lmat = torch.where(keep, torch.exp(_segsum(a)), 0.0)  # (b, h, c, q, q)
    y = torch.einsum("bclhn,bcshn,bhcls,bcshp->bclhp", C, B, Lmat, xdt)
    # 2. each chunk's own contribution to the state at its end
    decay_states = torch.exp(a_cum[..., -1:] - a_cum)  # (b, h, c, q)
    if seg is not None:
        decay_states = decay_states * (seg == seg[..., -1:])[:, None]
    states = torch.einsum("bclhn,bhcl,bclhp->bchpn", B, decay_states, xdt)
    # 3. states at chunk boundaries: a short recurrence over chunks, written as a (c+1, c+1) matrix
    h0 = x.new_zeros(b_, H, P, B.shape[-1]) if initial_states is None else initial_states.to(f)
    states = torch.cat([h0[:, None], states], dim=1)  # (b, c+1, h, p, n)
    ss = _segsum(F.pad(a_cum[..., -1], (1, 0)))  # (b, h, c+1, c+1)
    keep = torch.tril(torch.ones(nc + 1, nc + 1, dtype=torch.bool, device=x.device))
    if seg is not None:
        keep = keep & (seg_end[:, :, None] == seg_end[:, None, :])[:, None]
    new_states = torch.einsum("bhzc,bchpn->bzhpn", torch.where(keep, torch.exp(ss), 0.0), states)
    states, final = new_states[:, :-1], new_states[:, -1]
    # 4. the state entering each chunk, read out at every position
    decay_out = torch.exp(a_cum)  # (b, h, c, q)
    if seg is not None:
        decay_out = decay_out * (seg == seg_in[..., None])[:, None]
    y = y + torch.einsum("bclhn,bchpn,bhcl->bclhp", C, states, decay_out)
    y = y.flatten(1, 2)[:, :L]
    if D is not None:
        y = y + x * (D.to(f)[:, None] if D.dim() == 1 else D.to(f))
    if z is not None:
        y = y * F.silu(z.to(f))
    y = y.to(dtype_in)
    return (y, final) if return_final_states else y


def ssd_reference(x, dt, A, B, C, D=None, z=None, initial_states=None, seq_idx=None):
    """Sequential float64 reference of `ssd_chunk_scan` (dt already positive; no bias/softplus).
    Returns (y (b, l, h, p), final_states (b, h, p, n)), both float64."""
    x, dt, A, B, C = (t.double() for t in (x, dt, A, B, C))
    H, G = x.shape[2], B.shape[2]
    B, C = B.repeat_interleave(H // G, dim=2), C.repeat_interleave(H // G, dim=2)
    h = x.new_zeros(x.shape[0], H, x.shape[3], B.shape[-1]) if initial_states is None else initial_states.double()
    ys = []
    for t in range(x.shape[1]):
        decay = torch.exp(dt[:, t] * A)  # (b, h)
        if seq_idx is not None and t > 0:
            decay = decay * (seq_idx[:, t] == seq_idx[:, t - 1]).double()[:, None]
        h = h * decay[..., None, None] + (dt[:, t, :, None] * x[:, t])[..., None] * B[:, t, :, None, :]
        ys.append(torch.einsum("bhpn,bhn->bhp", h, C[:, t]))
    y = torch.stack(ys, dim=1)
    if D is not None:
        y = y + x * (D.double()[:, None] if D.dim() == 1 else D.double())
    if z is not None:
        y = y * F.silu(z.double())
    return y, h

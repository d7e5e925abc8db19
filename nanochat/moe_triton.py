"""
The MoE expert MLPs as Triton kernels that read and write tokens in place (dispatch="triton" in nanochat.moe).

The grouped_mm path copies the tokens into expert order before its GEMMs and copies the results back after them,
and runs the ReLU^2, the gate and the masks as separate passes over (rows, hidden) and (rows, dim) tensors; forward
and backward together that is about a hundred kernel launches around six GEMMs. Here each GEMM gathers its input
rows through an index and writes its output rows through one (prologue and epilogue), so there are no permuted
copies, and the elementwise work rides along in the GEMMs:

  rows r = 0 .. nk-1 are the assignment slots in MoE.forward's `order` (kept rows grouped by expert, then the
  dropped ones); slot(r) = order[r], token(r) = slot(r) // top_k; counts[e] = kept rows of expert e.
  forward   a[r]       = relu(x[token(r)] @ w_in[e]^T)                        (rows GEMM, gather, ReLU epilogue)
            y[r]       = a[r]^2 @ w_out[e]^T                                  (rows GEMM, square prologue)
            out[slot(r)] = gate[slot(r)] * y[r]                               (same kernel's scatter epilogue)
  backward  dpre[r]    = gate[slot(r)] * (dout[token(r)] @ w_out[e]) * 2 a[r] (rows GEMM, gather; the ReLU^2 derivative)
            dx[slot(r)] = dpre[r] @ w_in[e]                                   (rows GEMM, scatter)
            dw_out[e]  = sum_r (gate dout[token(r)])^T a[r]^2                 (weight GEMM over the group's rows)
            dw_in[e]   = sum_r dpre[r]^T x[token(r)]                          (weight GEMM over the group's rows)
            dgate[slot(r)] = dout[token(r)] . y[r]                            (row dot)
A row past the kept ones belongs to no group: no kernel computes it, its out/dx slot stays 0 (the buffers are
zeroed when a call can drop), its dgate is 0. Each program of a rows GEMM finds its expert and first row from
`counts` itself (a cumulative sum over the E experts), so the launch grid is a static upper bound and nothing
waits on the device. With top_k > 1, out and dx are (n * top_k, w) in slot order and each token sums its k slots.

a (the ReLU output, bf16) and y (the ungated expert output) are saved for the backward. Accumulation is fp32;
operands are the input dtype (bf16 or fp16 on CUDA; fp32 only under TRITON_INTERPRET=1, where tests/test_moe.py
runs these kernels on a CPU against nanochat.moe.moe_reference).

The ops are torch.library custom ops (adamba::moe_experts_fwd / _bwd) with fake implementations, so a compiled
MoE keeps them whole.
"""
import os

import torch
import triton
import triton.language as tl
from torch import Tensor

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# Tiles under the interpreter (tests on a CPU): small, so padded work stays cheap in numpy
_INTERP_ROWS = dict(BM=16, BN=16, BK=16)
_INTERP_WEIGHT = dict(BM=16, BN=16, BK=16)


def _f32_dot(dtype):
    # fp32 operands: an exact fp32 dot, not TF32. Under the interpreter every dot runs in fp32, because its bf16
    # dot returns garbage (Triton 3.7); the operands are still rounded to the input dtype where the GPU rounds them.
    return INTERPRET or dtype == torch.float32


def _configs(shapes):
    return [triton.Config(dict(BM=bm, BN=bn, BK=bk), num_warps=w, num_stages=s) for bm, bn, bk, w, s in shapes]


# H100 bf16 candidates (the autotuner times each per (N, K) and keeps the fastest)
_ROWS_CONFIGS = _configs([(128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (128, 128, 64, 4, 4), (64, 128, 64, 4, 4),
                          (128, 64, 64, 4, 4)])
_WEIGHT_CONFIGS = _configs([(128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (128, 128, 64, 4, 4), (128, 128, 32, 4, 4),
                            (64, 128, 64, 4, 4)])

# rows GEMM epilogues
EPI_RELU = 0     # c[r] = relu(acc)
EPI_GATE = 1     # y[r] = acc (saved); c[slot(r)] = gate[slot(r)] * acc
EPI_DRELU2 = 2   # c[r] = gate[slot(r)] * acc * 2 * aux[r]
EPI_SCATTER = 3  # c[slot(r)] = acc


@triton.jit
def _group_of_tile(pid_m, counts_ptr, E, E_PAD: tl.constexpr, BM: tl.constexpr):
    """Row tile pid_m -> (expert, first row, end of that expert's rows); expert == E when past the last tile."""
    ei = tl.arange(0, E_PAD)
    cnt = tl.load(counts_ptr + ei, mask=ei < E, other=0).to(tl.int32)
    tiles = (cnt + BM - 1) // BM
    tile_end = tl.cumsum(tiles, 0)
    row_end = tl.cumsum(cnt, 0)
    e = tl.sum((tile_end <= pid_m).to(tl.int32), 0)
    sel = ei == e
    first_tile = tl.sum(tl.where(sel, tile_end - tiles, 0), 0)
    end = tl.sum(tl.where(sel, row_end, 0), 0)
    start = end - tl.sum(tl.where(sel, cnt, 0), 0)
    return e, start + (pid_m - first_tile) * BM, end


@triton.jit
def _rows_gemm(a_ptr, b_ptr, c_ptr, y_ptr, aux_ptr, order_ptr, gate_ptr, counts_ptr,
               E, N, K, stride_a, stride_be, stride_bk, stride_bn, stride_c, stride_y, stride_aux,
               TOP_K: tl.constexpr, A_GATHER: tl.constexpr, A_SQUARE: tl.constexpr, EPI: tl.constexpr,
               F32_DOT: tl.constexpr, E_PAD: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """C (rows, N) from A (rows or tokens, K) @ B[e] (K, N), one (BM, BN) tile of one expert's rows per program."""
    pid = tl.program_id(0)
    num_n = tl.cdiv(N, BN)
    pid_m = pid // num_n
    pid_n = pid % num_n
    e, row0, row_end = _group_of_tile(pid_m, counts_ptr, E, E_PAD, BM)
    if e >= E:
        return
    rows = row0 + tl.arange(0, BM)
    rmask = rows < row_end
    slot = tl.load(order_ptr + rows, mask=rmask, other=0)
    a_rows = slot // TOP_K if A_GATHER else rows
    offs_n = pid_n * BN + tl.arange(0, BN)
    nmask = offs_n < N
    offs_k = tl.arange(0, BK)
    a_ptrs = a_ptr + a_rows.to(tl.int64)[:, None] * stride_a + offs_k[None, :]
    b_ptrs = b_ptr + e.to(tl.int64) * stride_be + offs_k[:, None] * stride_bk + offs_n[None, :] * stride_bn
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, K, BK):
        kmask = offs_k < K - k0
        a = tl.load(a_ptrs, mask=rmask[:, None] & kmask[None, :], other=0.0)
        if A_SQUARE:
            af = a.to(tl.float32)
            a = (af * af).to(a.dtype)
        b = tl.load(b_ptrs, mask=kmask[:, None] & nmask[None, :], other=0.0)
        if F32_DOT:
            acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
        a_ptrs += BK
        b_ptrs += BK * stride_bk
    cmask = rmask[:, None] & nmask[None, :]
    if EPI == 0:
        out = tl.maximum(acc, 0.0)
        tl.store(c_ptr + rows.to(tl.int64)[:, None] * stride_c + offs_n[None, :], out.to(c_ptr.dtype.element_ty), mask=cmask)
    elif EPI == 1:
        tl.store(y_ptr + rows.to(tl.int64)[:, None] * stride_y + offs_n[None, :], acc.to(y_ptr.dtype.element_ty), mask=cmask)
        g = tl.load(gate_ptr + slot, mask=rmask, other=0.0)
        out = acc * g[:, None]
        tl.store(c_ptr + slot.to(tl.int64)[:, None] * stride_c + offs_n[None, :], out.to(c_ptr.dtype.element_ty), mask=cmask)
    elif EPI == 2:
        g = tl.load(gate_ptr + slot, mask=rmask, other=0.0)
        act = tl.load(aux_ptr + rows.to(tl.int64)[:, None] * stride_aux + offs_n[None, :], mask=cmask, other=0.0)
        out = acc * g[:, None] * 2.0 * act.to(tl.float32)
        tl.store(c_ptr + rows.to(tl.int64)[:, None] * stride_c + offs_n[None, :], out.to(c_ptr.dtype.element_ty), mask=cmask)
    else:
        tl.store(c_ptr + slot.to(tl.int64)[:, None] * stride_c + offs_n[None, :], acc.to(c_ptr.dtype.element_ty), mask=cmask)


@triton.jit
def _weight_gemm(l_ptr, r_ptr, out_ptr, order_ptr, gate_ptr, counts_ptr,
                 E, M, N, stride_l, stride_r, stride_oe, stride_om, stride_on,
                 TOP_K: tl.constexpr, L_GATHER: tl.constexpr, L_GATE: tl.constexpr, R_GATHER: tl.constexpr,
                 R_SQUARE: tl.constexpr, F32_DOT: tl.constexpr, E_PAD: tl.constexpr,
                 BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """out[e] (M, N) = sum over expert e's rows r of L[r]^T R[r]; one (BM, BN) tile of one expert per program."""
    pid = tl.program_id(0)
    e = tl.program_id(1)
    num_n = tl.cdiv(N, BN)
    pid_m = pid // num_n
    pid_n = pid % num_n
    ei = tl.arange(0, E_PAD)
    cnt = tl.load(counts_ptr + ei, mask=ei < E, other=0).to(tl.int32)
    start = tl.sum(tl.where(ei < e, cnt, 0), 0)
    end = start + tl.sum(tl.where(ei == e, cnt, 0), 0)
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_n = pid_n * BN + tl.arange(0, BN)
    mmask = offs_m < M
    nmask = offs_n < N
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(start, end, BK):
        rows = k0 + tl.arange(0, BK)
        kmask = rows < end
        slot = tl.load(order_ptr + rows, mask=kmask, other=0)
        l_rows = slot // TOP_K if L_GATHER else rows
        r_rows = slot // TOP_K if R_GATHER else rows
        lt = tl.load(l_ptr + l_rows.to(tl.int64)[:, None] * stride_l + offs_m[None, :], mask=kmask[:, None] & mmask[None, :], other=0.0)
        if L_GATE:
            g = tl.load(gate_ptr + slot, mask=kmask, other=0.0)
            lt = (lt.to(tl.float32) * g[:, None]).to(lt.dtype)
        rt = tl.load(r_ptr + r_rows.to(tl.int64)[:, None] * stride_r + offs_n[None, :], mask=kmask[:, None] & nmask[None, :], other=0.0)
        if R_SQUARE:
            rf = rt.to(tl.float32)
            rt = (rf * rf).to(rt.dtype)
        if F32_DOT:
            acc = tl.dot(tl.trans(lt.to(tl.float32)), rt.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(tl.trans(lt), rt, acc)
    optrs = out_ptr + e.to(tl.int64) * stride_oe + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on
    tl.store(optrs, acc.to(out_ptr.dtype.element_ty), mask=mmask[:, None] & nmask[None, :])


@triton.jit
def _dout_rows(dout_ptr, y_ptr, dys_ptr, dgate_ptr, order_ptr, gate_ptr, counts_ptr, E, NK, W, stride_d, stride_y,
               stride_dys, TOP_K: tl.constexpr, WRITE_DYS: tl.constexpr, E_PAD: tl.constexpr, BR: tl.constexpr,
               BW: tl.constexpr):
    """dgate[slot(r)] = dout[token(r)] . y[r]; with WRITE_DYS also dys[r] = gate[slot(r)] * dout[token(r)].
    Dropped rows (r >= kept rows) get 0 in both."""
    ei = tl.arange(0, E_PAD)
    n_kept = tl.sum(tl.load(counts_ptr + ei, mask=ei < E, other=0).to(tl.int32), 0)
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    inside = rows < NK
    slot = tl.load(order_ptr + rows, mask=inside, other=0)
    kept = inside & (rows < n_kept)
    tok = slot // TOP_K
    g = tl.load(gate_ptr + slot, mask=kept, other=0.0)
    acc = tl.zeros((BR,), dtype=tl.float32)
    for w0 in range(0, W, BW):
        cols = w0 + tl.arange(0, BW)
        m = kept[:, None] & (cols < W)[None, :]
        d = tl.load(dout_ptr + tok.to(tl.int64)[:, None] * stride_d + cols[None, :], mask=m, other=0.0).to(tl.float32)
        y = tl.load(y_ptr + rows.to(tl.int64)[:, None] * stride_y + cols[None, :], mask=m, other=0.0).to(tl.float32)
        acc += tl.sum(d * y, 1)
        if WRITE_DYS:
            tl.store(dys_ptr + rows.to(tl.int64)[:, None] * stride_dys + cols[None, :],
                     (d * g[:, None]).to(dys_ptr.dtype.element_ty), mask=inside[:, None] & (cols < W)[None, :])
    tl.store(dgate_ptr + slot, acc, mask=inside)


@triton.jit
def _to_slots(src_ptr, dst_ptr, order_ptr, gate_ptr, counts_ptr, E, NK, W, stride_src, stride_dst,
              HAS_GATE: tl.constexpr, E_PAD: tl.constexpr, BR: tl.constexpr, BW: tl.constexpr):
    """dst[slot(r)] = gate[slot(r)] * src[r] (or src[r]) for kept rows, 0 for dropped ones: every slot written once."""
    ei = tl.arange(0, E_PAD)
    n_kept = tl.sum(tl.load(counts_ptr + ei, mask=ei < E, other=0).to(tl.int32), 0)
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    inside = rows < NK
    slot = tl.load(order_ptr + rows, mask=inside, other=0)
    kept = inside & (rows < n_kept)
    if HAS_GATE:
        g = tl.load(gate_ptr + slot, mask=kept, other=0.0)
    for w0 in range(0, W, BW):
        cols = w0 + tl.arange(0, BW)
        cm = (cols < W)[None, :]
        v = tl.load(src_ptr + rows.to(tl.int64)[:, None] * stride_src + cols[None, :], mask=kept[:, None] & cm, other=0.0)
        v = v.to(tl.float32)
        if HAS_GATE:
            v = v * g[:, None]
        tl.store(dst_ptr + slot.to(tl.int64)[:, None] * stride_dst + cols[None, :], v.to(dst_ptr.dtype.element_ty),
                 mask=inside[:, None] & cm)


@triton.jit
def _relu_square(pre_ptr, hs_ptr, dhs_ptr, dpre_ptr, numel, BACKWARD: tl.constexpr, BLOCK: tl.constexpr):
    """hs = relu(pre)^2; BACKWARD also dpre = dhs * 2 relu(pre) (the hidden activations recomputed, not saved)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < numel
    a = tl.maximum(tl.load(pre_ptr + offs, mask=m, other=0.0).to(tl.float32), 0.0)
    tl.store(hs_ptr + offs, (a * a).to(hs_ptr.dtype.element_ty), mask=m)
    if BACKWARD:
        d = tl.load(dhs_ptr + offs, mask=m, other=0.0).to(tl.float32)
        tl.store(dpre_ptr + offs, (d * 2.0 * a).to(dpre_ptr.dtype.element_ty), mask=m)


_rows_gemm_tuned = triton.autotune(_ROWS_CONFIGS, key=["N", "K", "EPI", "A_GATHER"])(_rows_gemm)
_weight_gemm_tuned = triton.autotune(_WEIGHT_CONFIGS, key=["M", "N", "L_GATHER"])(_weight_gemm)


def _launch_rows(a, b, c, order, gate, counts, top_k, *, a_gather, a_square, epi, y=None, aux=None):
    """b is (E, K, N) given by strides (any layout); a's and c's rows are contiguous in their last dim."""
    E, K, N = b.shape
    nk = order.shape[0]
    y_ = y if y is not None else c
    aux_ = aux if aux is not None else c
    args = (a, b, c, y_, aux_, order, gate, counts, E, N, K, a.stride(0), b.stride(0), b.stride(1), b.stride(2),
            c.stride(0), y_.stride(0), aux_.stride(0))
    flags = dict(TOP_K=top_k, A_GATHER=a_gather, A_SQUARE=a_square, EPI=epi, F32_DOT=_f32_dot(a.dtype),
                 E_PAD=triton.next_power_of_2(E))
    if nk == 0:
        return
    if INTERPRET:
        bm, bn = _INTERP_ROWS["BM"], _INTERP_ROWS["BN"]
        _rows_gemm[((triton.cdiv(nk, bm) + E) * triton.cdiv(N, bn),)](*args, **flags, **_INTERP_ROWS)
    else:
        grid = lambda meta: ((triton.cdiv(nk, meta["BM"]) + E) * triton.cdiv(N, meta["BN"]),)
        _rows_gemm_tuned[grid](*args, **flags)


def _launch_weight(left, right, out, order, gate, counts, top_k, *, l_gather, l_gate, r_gather, r_square):
    E, M, N = out.shape
    args = (left, right, out, order, gate, counts, E, M, N, left.stride(0), right.stride(0),
            out.stride(0), out.stride(1), out.stride(2))
    flags = dict(TOP_K=top_k, L_GATHER=l_gather, L_GATE=l_gate, R_GATHER=r_gather, R_SQUARE=r_square,
                 F32_DOT=_f32_dot(left.dtype), E_PAD=triton.next_power_of_2(E))
    if INTERPRET:
        bm, bn = _INTERP_WEIGHT["BM"], _INTERP_WEIGHT["BN"]
        _weight_gemm[(triton.cdiv(M, bm) * triton.cdiv(N, bn), E)](*args, **flags, **_INTERP_WEIGHT)
    else:
        grid = lambda meta: (triton.cdiv(M, meta["BM"]) * triton.cdiv(N, meta["BN"]), E)
        _weight_gemm_tuned[grid](*args, **flags)


def _row_blocks(nk, w):
    # rows per program and channel chunk of the row-wise kernels (_dout_rows, _to_slots)
    return 16, min(128, triton.next_power_of_2(max(w, 1)))


def _launch_dout_rows(dout, y, dys, dgate, order, gate, counts, top_k):
    nk, w = y.shape
    if nk == 0:
        return
    E = counts.shape[0]
    br, bw = _row_blocks(nk, w)
    d = dys if dys is not None else y
    _dout_rows[(triton.cdiv(nk, br),)](dout, y, d, dgate, order, gate, counts, E, nk, w, dout.stride(0), y.stride(0),
                                       d.stride(0), TOP_K=top_k, WRITE_DYS=dys is not None,
                                       E_PAD=triton.next_power_of_2(E), BR=br, BW=bw)


def _launch_to_slots(src, dst, order, gate, counts):
    nk, w = src.shape
    if nk == 0:
        return
    E = counts.shape[0]
    br, bw = _row_blocks(nk, w)
    _to_slots[(triton.cdiv(nk, br),)](src, dst, order, gate if gate is not None else src, counts, E, nk, w,
                                      src.stride(0), dst.stride(0), HAS_GATE=gate is not None,
                                      E_PAD=triton.next_power_of_2(E), BR=br, BW=bw)


def _launch_relu_square(pre, hs, dhs=None, dpre=None):
    numel = pre.numel()
    if numel == 0:
        return
    block = 1024
    backward = dhs is not None
    _relu_square[(triton.cdiv(numel, block),)](pre, hs, dhs if backward else pre, dpre if backward else hs, numel,
                                               BACKWARD=backward, BLOCK=block)


def _check(x, w_in, w_out, gate, order, counts, top_k):
    n, w = x.shape
    E, h, w2 = w_in.shape
    if w2 != w or tuple(w_out.shape) != (E, w, h):
        raise ValueError(f"expert weights {tuple(w_in.shape)} / {tuple(w_out.shape)} do not fit input width {w}")
    if not (x.dtype == w_in.dtype == w_out.dtype):
        raise ValueError(f"x, w_in, w_out dtypes differ: {x.dtype}, {w_in.dtype}, {w_out.dtype}")
    if gate.dtype != torch.float32 or gate.shape != (n * top_k,) or order.shape != (n * top_k,) or counts.shape != (E,):
        raise ValueError("gate must be fp32 (n*top_k,), order (n*top_k,), counts (E,)")
    if x.stride(-1) != 1:
        raise ValueError("x must be contiguous in its last dim")


@torch.library.custom_op("adamba::moe_experts_fwd", mutates_args=())
def moe_experts_fwd(x: Tensor, w_in: Tensor, w_out: Tensor, gate: Tensor, order: Tensor, counts: Tensor,
                    top_k: int, may_drop: bool) -> tuple[Tensor, Tensor, Tensor]:
    """-> out (n, w) (summed over each token's k slots), a (nk, h) ReLU output, y (nk, w) ungated expert output."""
    _check(x, w_in, w_out, gate, order, counts, top_k)
    n, w = x.shape
    h = w_in.shape[1]
    nk = n * top_k
    a = x.new_empty(nk, h)
    y = x.new_empty(nk, w)
    out = x.new_zeros(nk, w) if may_drop else x.new_empty(nk, w)
    _launch_rows(x, w_in.transpose(1, 2), a, order, gate, counts, top_k, a_gather=True, a_square=False, epi=EPI_RELU)
    _launch_rows(a, w_out.transpose(1, 2), out, order, gate, counts, top_k, a_gather=False, a_square=True,
                 epi=EPI_GATE, y=y)
    if top_k > 1:
        out = out.view(n, top_k, w).sum(1)
    return out, a, y


@moe_experts_fwd.register_fake
def _(x, w_in, w_out, gate, order, counts, top_k, may_drop):
    n, w = x.shape
    return x.new_empty(n, w), x.new_empty(n * top_k, w_in.shape[1]), x.new_empty(n * top_k, w)


@torch.library.custom_op("adamba::moe_experts_bwd", mutates_args=())
def moe_experts_bwd(dout: Tensor, x: Tensor, w_in: Tensor, w_out: Tensor, gate: Tensor, order: Tensor, counts: Tensor,
                    a: Tensor, y: Tensor, top_k: int, may_drop: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """-> dx (n, w), dw_in (E, h, w), dw_out (E, w, h), dgate (nk,) fp32."""
    dout = dout.contiguous()
    n, w = x.shape
    E, h, _ = w_in.shape
    nk = n * top_k
    dpre = x.new_empty(nk, h)
    _launch_rows(dout, w_out, dpre, order, gate, counts, top_k, a_gather=True, a_square=False, epi=EPI_DRELU2, aux=a)
    dx = x.new_zeros(nk, w) if may_drop else x.new_empty(nk, w)
    _launch_rows(dpre, w_in, dx, order, gate, counts, top_k, a_gather=False, a_square=False, epi=EPI_SCATTER)
    if top_k > 1:
        dx = dx.view(n, top_k, w).sum(1)
    dw_out = w_out.new_empty(E, w, h)
    _launch_weight(dout, a, dw_out, order, gate, counts, top_k, l_gather=True, l_gate=True, r_gather=False, r_square=True)
    dw_in = w_in.new_empty(E, h, w)
    _launch_weight(dpre, x, dw_in, order, gate, counts, top_k, l_gather=False, l_gate=False, r_gather=True, r_square=False)
    dgate = gate.new_empty(nk)
    _launch_dout_rows(dout, y, None, dgate, order, gate, counts, top_k)
    return dx, dw_in, dw_out, dgate


@moe_experts_bwd.register_fake
def _(dout, x, w_in, w_out, gate, order, counts, a, y, top_k, may_drop):
    return x.new_empty(x.shape), w_in.new_empty(w_in.shape), w_out.new_empty(w_out.shape), gate.new_empty(gate.shape)


def _setup_context(ctx, inputs, output):
    x, w_in, w_out, gate, order, counts, top_k, may_drop = inputs
    _, a, y = output
    ctx.save_for_backward(x, w_in, w_out, gate, order, counts, a, y)
    ctx.top_k, ctx.may_drop = top_k, may_drop


def _backward(ctx, dout, _da, _dy):
    x, w_in, w_out, gate, order, counts, a, y = ctx.saved_tensors
    dx, dw_in, dw_out, dgate = moe_experts_bwd(dout, x, w_in, w_out, gate, order, counts, a, y, ctx.top_k, ctx.may_drop)
    return dx, dw_in, dw_out, dgate, None, None, None, None


moe_experts_fwd.register_autograd(_backward, setup_context=_setup_context)


# -----------------------------------------------------------------------------
# The same expert MLP with torch._grouped_mm (CUTLASS, sm90 bf16; also CPU) for the six GEMMs, and the Triton
# kernels above for everything between them: one gather of the token rows (xs, saved), relu^2 in one pass, the
# gate and the return to slot order in one pass (dropped slots written 0), and in the backward the gated gather of
# dout with dgate in one pass and relu^2's derivative in one pass (the hidden activations are recomputed from the
# pre-activations, which are saved). Rows past the kept ones are in no grouped_mm group; their values are
# undefined memory that no kernel here reads.

@torch.library.custom_op("adamba::moe_experts_gmm_fwd", mutates_args=())
def moe_experts_gmm_fwd(x: Tensor, w_in: Tensor, w_out: Tensor, gate: Tensor, order: Tensor, counts: Tensor,
                        top_k: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """-> out (n, w), xs (nk, w) token rows in row order, pre (nk, h) pre-activations, y (nk, w) ungated outputs."""
    _check(x, w_in, w_out, gate, order, counts, top_k)
    n, w = x.shape
    nk = n * top_k
    offs = counts.cumsum(0).to(torch.int32)
    xs = x.index_select(0, order // top_k if top_k > 1 else order)
    pre = torch._grouped_mm(xs, w_in.transpose(1, 2), offs=offs)
    hs = torch.empty_like(pre)
    _launch_relu_square(pre, hs)
    y = torch._grouped_mm(hs, w_out.transpose(1, 2), offs=offs)
    out = x.new_empty(nk, w)
    _launch_to_slots(y, out, order, gate, counts)
    if top_k > 1:
        out = out.view(n, top_k, w).sum(1)
    return out, xs, pre, y


@moe_experts_gmm_fwd.register_fake
def _(x, w_in, w_out, gate, order, counts, top_k):
    n, w = x.shape
    nk = n * top_k
    return x.new_empty(n, w), x.new_empty(nk, w), x.new_empty(nk, w_in.shape[1]), x.new_empty(nk, w)


@torch.library.custom_op("adamba::moe_experts_gmm_bwd", mutates_args=())
def moe_experts_gmm_bwd(dout: Tensor, w_in: Tensor, w_out: Tensor, gate: Tensor, order: Tensor, counts: Tensor,
                        xs: Tensor, pre: Tensor, y: Tensor, top_k: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """-> dx (n, w), dw_in (E, h, w), dw_out (E, w, h), dgate (nk,) fp32."""
    dout = dout.contiguous()
    nk, w = xs.shape
    n = nk // top_k
    offs = counts.cumsum(0).to(torch.int32)
    dys = torch.empty_like(y)
    dgate = gate.new_empty(nk)
    _launch_dout_rows(dout, y, dys, dgate, order, gate, counts, top_k)
    dhs = torch._grouped_mm(dys, w_out, offs=offs)  # (nk, h)
    hs, dpre = torch.empty_like(pre), torch.empty_like(pre)
    _launch_relu_square(pre, hs, dhs, dpre)
    dw_out = torch._grouped_mm(dys.t(), hs, offs=offs)  # (E, w, h): sums over each group's rows only
    dw_in = torch._grouped_mm(dpre.t(), xs, offs=offs)  # (E, h, w)
    dxs = torch._grouped_mm(dpre, w_in, offs=offs)  # (nk, w)
    dx = xs.new_empty(nk, w)
    _launch_to_slots(dxs, dx, order, None, counts)
    if top_k > 1:
        dx = dx.view(n, top_k, w).sum(1)
    return dx, dw_in.to(w_in.dtype), dw_out.to(w_out.dtype), dgate


@moe_experts_gmm_bwd.register_fake
def _(dout, w_in, w_out, gate, order, counts, xs, pre, y, top_k):
    nk, w = xs.shape
    return xs.new_empty(nk // top_k, w), w_in.new_empty(w_in.shape), w_out.new_empty(w_out.shape), gate.new_empty(gate.shape)


def _gmm_setup_context(ctx, inputs, output):
    x, w_in, w_out, gate, order, counts, top_k = inputs
    _, xs, pre, y = output
    ctx.save_for_backward(w_in, w_out, gate, order, counts, xs, pre, y)
    ctx.top_k = top_k


def _gmm_backward(ctx, dout, _dxs, _dpre, _dy):
    w_in, w_out, gate, order, counts, xs, pre, y = ctx.saved_tensors
    dx, dw_in, dw_out, dgate = moe_experts_gmm_bwd(dout, w_in, w_out, gate, order, counts, xs, pre, y, ctx.top_k)
    return dx, dw_in, dw_out, dgate, None, None, None


moe_experts_gmm_fwd.register_autograd(_gmm_backward, setup_context=_gmm_setup_context)

GEMMS = ("grouped_mm", "triton")


def fused_experts(x, w_in, w_out, gate, order, counts, top_k, may_drop, gemm="triton"):
    """
    x (n, w) tokens; w_in (E, h, w), w_out (E, w, h) in x's dtype (slices of the parameters are fine);
    gate (n * top_k,) fp32 in slot order; order (n * top_k,) the row -> slot permutation of MoE.forward (kept
    rows grouped by expert first); counts (E,) kept rows per expert; may_drop: some rows are dropped (their
    slots must read 0). gemm: "grouped_mm" (torch._grouped_mm's CUTLASS kernels, Triton between them) or "triton"
    (Triton GEMMs with the gathers and epilogues inside). Returns (n, w): each token's gate-weighted sum of its
    experts' outputs.
    """
    if gemm == "grouped_mm":
        return moe_experts_gmm_fwd(x, w_in, w_out, gate, order, counts, top_k)[0]
    if gemm != "triton":
        raise ValueError(f"gemm={gemm!r}: use one of {GEMMS}")
    return moe_experts_fwd(x, w_in, w_out, gate, order, counts, top_k, may_drop)[0]

"""
The Triton kernels of nanochat/decode_mamba.py (one Mamba-1 decode position in two kernels; see there), in a module
of their own so that they are defined at module level (the helper they call resolves as a global, in the
interpreter too) and Triton is imported only when decode_mamba.build() asks for them.
"""
import triton
import triton.language as tl


@triton.jit
def rounded(v, BF16: tl.constexpr):
    """fp32 v rounded to bf16's nearest (ties to even), kept in fp32, where BF16: what torch's .to(bfloat16)
    gives, written out so that Triton's interpreter (which truncates) computes it too. Finite inputs."""
    if BF16:
        u = v.to(tl.uint32, bitcast=True)
        u = (u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000
        v = u.to(tl.float32, bitcast=True)
    return v


@triton.jit
def conv_kernel(XZ, CS, CW, CB, WX, XC, P, sxb, scb, scd, scw, Dn, R2,
                HAS_BIAS: tl.constexpr, W: tl.constexpr, WP: tl.constexpr, BLOCK: tl.constexpr,
                RP: tl.constexpr, ACT_BF16: tl.constexpr, ST_BF16: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    pd = tl.program_id(1)
    d = pd * BLOCK + tl.arange(0, BLOCK)
    d_ok = d < Dn
    w = tl.arange(0, WP)
    x = tl.load(XZ + b * sxb + d, mask=d_ok, other=0.0)
    # the window after this position: the state's last W - 1 inputs, then x (in the state's dtype, as the
    # reference's conv_state[:, :, -1] = x stores it)
    old = tl.load(CS + b * scb + d[:, None] * scd + (w[None, :] + 1) * scw,
                  mask=d_ok[:, None] & (w[None, :] + 1 < W), other=0.0)
    x_st = rounded(x.to(tl.float32), ST_BF16 and not ACT_BF16)  # x as the state's dtype holds it
    win = tl.where(w[None, :] == W - 1, x_st[:, None], old.to(tl.float32))
    cw = tl.load(CW + d[:, None] * W + w[None, :], mask=d_ok[:, None] & (w[None, :] < W), other=0.0)
    out = tl.sum(win * cw.to(tl.float32), axis=1)
    if HAS_BIAS:
        out += tl.load(CB + d, mask=d_ok, other=0.0).to(tl.float32)
    xc = rounded(out * tl.sigmoid(out), ACT_BF16)  # SiLU, rounded as the reference returns it
    tl.debug_barrier()  # every thread has read the old windows before any writes the shifted ones
    tl.store(CS + b * scb + d[:, None] * scd + w[None, :] * scw, win.to(old.dtype),
             mask=d_ok[:, None] & (w[None, :] < W))
    tl.store(XC + b * Dn + d, xc.to(x.dtype), mask=d_ok)
    # this block's share of x_proj (R2 = dt_rank + 2 d_state outputs), fp32 partial sums
    r = tl.arange(0, RP)
    wx = tl.load(WX + r[:, None] * Dn + d[None, :], mask=(r[:, None] < R2) & d_ok[None, :], other=0.0)
    part = tl.sum(wx.to(tl.float32) * xc[None, :], axis=1)
    tl.store(P + (b * tl.num_programs(1) + pd) * RP + r, part)


@triton.jit
def state_kernel(XZ, XC, P, WDT, BDT, ALOG, DD, SS, Y, sxb, ssb, ssd, ssn, Dn, R, N, NB,
                 BLOCK: tl.constexpr, RP: tl.constexpr, RRP: tl.constexpr, NP: tl.constexpr,
                 NBP: tl.constexpr, ACT_BF16: tl.constexpr, ST_BF16: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    pd = tl.program_id(1)
    d = pd * BLOCK + tl.arange(0, BLOCK)
    d_ok = d < Dn
    xc = tl.load(XC + b * Dn + d, mask=d_ok, other=0.0)  # x_proj's and dt_proj's outputs are rounded to its dtype
    # x_proj's outputs from the partial sums of every channel block: dt's input (R), B and C (N each)
    j = tl.arange(0, NBP)
    rows = P + (b * NB + j[:, None]) * RP
    j_ok = j[:, None] < NB
    rr = tl.arange(0, RRP)
    dt_in = tl.sum(tl.load(rows + rr[None, :], mask=j_ok & (rr[None, :] < R), other=0.0), axis=0)
    dt_in = rounded(dt_in, ACT_BF16)
    n = tl.arange(0, NP)
    n_ok = n < N
    Bv = tl.sum(tl.load(rows + R + n[None, :], mask=j_ok & n_ok[None, :], other=0.0), axis=0)
    Cv = tl.sum(tl.load(rows + R + N + n[None, :], mask=j_ok & n_ok[None, :], other=0.0), axis=0)
    Bv = rounded(Bv, ACT_BF16)
    Cv = rounded(Cv, ACT_BF16)
    # dt = softplus(dt_proj(dt_in) + bias) for this block's channels
    wdt = tl.load(WDT + d[:, None] * R + rr[None, :], mask=d_ok[:, None] & (rr[None, :] < R), other=0.0)
    dt = rounded(tl.sum(wdt.to(tl.float32) * dt_in[None, :], axis=1), ACT_BF16)
    v = dt + tl.load(BDT + d, mask=d_ok, other=0.0).to(tl.float32)
    delta = tl.where(v > 20.0, v, tl.log(1.0 + tl.exp(v)))  # F.softplus (beta 1, threshold 20)
    A = -tl.exp(tl.load(ALOG + d[:, None] * N + n[None, :], mask=d_ok[:, None] & n_ok[None, :],
                        other=0.0).to(tl.float32))
    m2 = d_ok[:, None] & n_ok[None, :]
    sp = SS + b * ssb + d[:, None] * ssd + n[None, :] * ssn
    s = tl.load(sp, mask=m2, other=0.0)
    x = xc.to(tl.float32)
    s_new = s.to(tl.float32) * tl.exp(delta[:, None] * A) + (delta * x)[:, None] * Bv[None, :]
    tl.store(sp, rounded(s_new, ST_BF16).to(s.dtype), mask=m2)
    y = tl.sum(tl.where(m2, s_new * Cv[None, :], 0.0), axis=1)
    y += tl.load(DD + d, mask=d_ok, other=0.0).to(tl.float32) * x
    z = tl.load(XZ + b * sxb + Dn + d, mask=d_ok, other=0.0).to(tl.float32)
    tl.store(Y + b * Dn + d, rounded(y * (z * tl.sigmoid(z)), ACT_BF16).to(xc.dtype), mask=d_ok)

"""
mamba-ssm's and causal-conv1d's CUDA kernels as torch.library custom ops, for torch.compile.

mamba-ssm calls its CUDA scan through pybind (`selective_scan_cuda.fwd`) and its Triton SSD through Python
functions that dynamo cannot trace, so a compiled Mamba block breaks its graph at every mixer and each piece
between the breaks compiles on its own. Each op here has three parts:
  the kernel call (the real implementation),
  a fake implementation (output shapes, dtypes and strides) so dynamo and AOTAutograd can trace it,
  an autograd formula that calls the kernel's own backward.
The kernels are looked up when an op runs, so importing this module needs neither package.

Ops (an output shaped like an input has that input's layout, as torch.empty_like gives it and as the kernels
allocate it: the mixers' (B, D, L) tensors are often transposed views, and a forced .contiguous() would copy
each of them once per call; the other outputs are contiguous):
  adamba::conv1d_fwd / conv1d_bwd            depthwise causal conv (+ SiLU), causal-conv1d; optional seq_idx
  adamba::selective_scan_fwd / _bwd          Mamba-1 scan with the z gate, delta bias and softplus
  adamba::ssd_fwd / ssd_bwd                  Mamba-2 chunked SSD (dt already processed; no z, no initial state)

The wrappers `causal_conv1d`, `selective_scan` and `ssd_scan` are what the mixers of nanochat/mamba_block.py
call on the kernel path while torch.compile traces (a call without cache: training). In eager mode the mixers
keep mamba-ssm's fused autograd functions (mamba_inner_fn, mamba_split_conv1d_scan_combined), which recompute
activations and save memory. tests/test_gpu_kernels.py checks these ops with torch.library.opcheck and compares
a compiled mixer with the eager kernel path (outputs and gradients); tests/test_mamba_ops.py checks the plumbing
on CPU with the PyTorch scans standing in for the kernels.
"""
import math
import logging
from typing import Optional

import torch
from torch import Tensor

from nanochat.common import UserError, log_once, kernels_required, REQUIRE_KERNELS_ENV

logger = logging.getLogger(__name__)

SCAN_CHUNK = 2048  # the CUDA scan saves one state per 2048 positions: x is (B, D, ceil(L / 2048), 2 * N)


class _Kernels:
    """The kernel entry points, imported on first use (tests on CPU replace them with PyTorch stand-ins)."""

    def __init__(self):
        self.loaded = False

    def load(self):
        if self.loaded:
            return self
        import selective_scan_cuda
        from causal_conv1d.cpp_functions import causal_conv1d_bwd_function, causal_conv1d_fwd_function
        from mamba_ssm.ops.triton.ssd_combined import _mamba_chunk_scan_combined_bwd, _mamba_chunk_scan_combined_fwd
        self.scan_fwd, self.scan_bwd = selective_scan_cuda.fwd, selective_scan_cuda.bwd
        self.conv_fwd, self.conv_bwd = causal_conv1d_fwd_function, causal_conv1d_bwd_function
        self.ssd_fwd, self.ssd_bwd = _mamba_chunk_scan_combined_fwd, _mamba_chunk_scan_combined_bwd
        self.loaded = True
        return self


KERNELS = _Kernels()

KERNEL_BUILD_COMMAND = "bash scripts/build_kernels.sh --install"


class KernelsMissing(UserError, RuntimeError):
    """--require-kernels / ADAMBA_REQUIRE_KERNELS=1, and a Mamba mixer on CUDA cannot run the kernels."""


def kernels_missing_on_cuda(reason):
    """
    A Mamba mixer runs on CUDA without mamba-ssm's or causal-conv1d's kernels (`reason`: which, and why). The
    PyTorch path computes the same function 5-30x slower, so this is a WARNING once per process with the
    reason and the build command, and an error (KernelsMissing) under --require-kernels / ADAMBA_REQUIRE_KERNELS=1.
    """
    msg = f"Mamba mixers on CUDA without the kernels, 5-30x slower: {reason}. Build them: {KERNEL_BUILD_COMMAND} (README: GPU set-up)"
    if kernels_required():
        raise KernelsMissing(msg)
    log_once(logger, f"{msg}; {REQUIRE_KERNELS_ENV}=1 or --require-kernels makes this an error", logging.WARNING)


def _lastdim_contiguous(t):
    return t if t is None or t.stride(-1) == 1 else t.contiguous()


def _significant_strides(t):
    return tuple(st for n, st in zip(t.shape, t.stride()) if n > 1)


def _in_layout_of(t, ref):
    """t (shaped like ref) in the layout torch.empty_like(ref) would have, which the fakes promise. The kernels
    allocate their outputs that way, so this is t itself; a copy only if a kernel ever chose another layout."""
    if _significant_strides(t) == _significant_strides(torch.empty_like(ref, device="meta")):
        return t
    return torch.empty_like(ref, dtype=t.dtype).copy_(t)


# -----------------------------------------------------------------------------
# depthwise causal conv1d (+ SiLU): x (B, C, L), weight (C, W), bias (C,), seq_idx (B, L) int32 or None

@torch.library.custom_op("adamba::conv1d_fwd", mutates_args=())
def conv1d_fwd(x: Tensor, weight: Tensor, bias: Tensor, seq_idx: Optional[Tensor], silu: bool) -> Tensor:
    xk = x.contiguous() if x.stride(2) != 1 and x.stride(1) != 1 else x
    return _in_layout_of(KERNELS.load().conv_fwd(xk, weight, bias, seq_idx, None, None, silu), x)


@conv1d_fwd.register_fake
def _(x, weight, bias, seq_idx, silu):
    return torch.empty_like(x)


@torch.library.custom_op("adamba::conv1d_bwd", mutates_args=())
def conv1d_bwd(x: Tensor, weight: Tensor, bias: Tensor, seq_idx: Optional[Tensor], dout: Tensor,
               silu: bool) -> tuple[Tensor, Tensor, Tensor]:
    xk = x.contiguous() if x.stride(2) != 1 and x.stride(1) != 1 else x
    if dout.stride(2) != 1 and dout.stride(1) != 1:
        dout = dout.contiguous()
    dx, dw, db, _ = KERNELS.load().conv_bwd(xk, weight, bias, dout, seq_idx, None, None, None, False, silu)
    return _in_layout_of(dx, x), dw.to(weight.dtype).contiguous(), db.to(bias.dtype).contiguous()


@conv1d_bwd.register_fake
def _(x, weight, bias, seq_idx, dout, silu):
    return torch.empty_like(x), weight.new_empty(weight.shape), bias.new_empty(bias.shape)


def _conv1d_setup(ctx, inputs, output):
    x, weight, bias, seq_idx, silu = inputs
    ctx.save_for_backward(x, weight, bias, seq_idx)
    ctx.silu = silu


def _conv1d_backward(ctx, dout):
    x, weight, bias, seq_idx = ctx.saved_tensors
    dx, dw, db = conv1d_bwd(x, weight, bias, seq_idx, dout, ctx.silu)
    return dx, dw, db, None, None


conv1d_fwd.register_autograd(_conv1d_backward, setup_context=_conv1d_setup)


def causal_conv1d(x, weight, bias, seq_idx=None, activation="silu"):
    """x (B, C, L) -> (B, C, L): the depthwise causal conv of causal_conv1d_fn as one traceable op.
    weight (C, W); bias (C,) or None (zeros then, whose gradient is dropped)."""
    if bias is None:
        bias = weight.new_zeros(weight.shape[0])
    return conv1d_fwd(x, weight, bias, seq_idx, activation in ("silu", "swish"))


# -----------------------------------------------------------------------------
# Mamba-1 selective scan: u, delta, z (B, D, L); A (D, N) fp32; B, C (B, G, N, L); D, delta_bias (D,) fp32.
# out_z = (scan(u) + D * u) * silu(z), with delta = softplus(delta + delta_bias); x: the saved chunk states.

@torch.library.custom_op("adamba::selective_scan_fwd", mutates_args=())
def selective_scan_fwd(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor, z: Tensor,
                       delta_bias: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    uk, dk, Bk, Ck, zk = (_lastdim_contiguous(t) for t in (u, delta, B, C, z))
    out, x, out_z = KERNELS.load().scan_fwd(uk, dk, A, Bk, Ck, D.contiguous(), zk, delta_bias.contiguous(), True)
    return _in_layout_of(out, delta), x.contiguous(), _in_layout_of(out_z, z)


@selective_scan_fwd.register_fake
def _(u, delta, A, B, C, D, z, delta_bias):
    batch, dim, L = u.shape
    x = u.new_empty(batch, dim, math.ceil(L / SCAN_CHUNK), 2 * A.shape[1], dtype=A.dtype)
    return torch.empty_like(delta), x, torch.empty_like(z)


@torch.library.custom_op("adamba::selective_scan_bwd", mutates_args=())
def selective_scan_bwd(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor, z: Tensor,
                       delta_bias: Tensor, dout: Tensor, x: Tensor, out: Tensor
                       ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    like = (u, delta, A, B, C, D, delta_bias, z)  # the kernel returns (du, ddelta, dA, dB, dC, dD, ddelta_bias, dz)
    u, delta, B, C, z, dout, out = (_lastdim_contiguous(t) for t in (u, delta, B, C, z, dout, out))
    grads = KERNELS.load().scan_bwd(u, delta, A, B, C, D.contiguous(), z, delta_bias.contiguous(), dout,
                                    x.contiguous(), out, None, True, False)
    return tuple(_in_layout_of(g.to(t.dtype), t) for g, t in zip(grads, like))


@selective_scan_bwd.register_fake
def _(u, delta, A, B, C, D, z, delta_bias, dout, x, out):
    return tuple(torch.empty_like(t) for t in (u, delta, A, B, C, D, delta_bias, z))


def _scan_setup(ctx, inputs, output):
    out, x, _ = output
    ctx.save_for_backward(*inputs, x, out)


def _scan_backward(ctx, dout_unused, dx_unused, dout_z):
    u, delta, A, B, C, D, z, delta_bias, x, out = ctx.saved_tensors
    du, ddelta, dA, dB, dC, dD, ddelta_bias, dz = selective_scan_bwd(u, delta, A, B, C, D, z, delta_bias, dout_z, x, out)
    return du, ddelta, dA, dB, dC, dD, dz, ddelta_bias


selective_scan_fwd.register_autograd(_scan_backward, setup_context=_scan_setup)


def selective_scan(u, delta, A, B, C, D, z, delta_bias):
    """The gated Mamba-1 scan as one traceable op: returns out_z (B, D, L) in u's dtype."""
    return selective_scan_fwd(u, delta, A, B, C, D, z, delta_bias)[2]


# -----------------------------------------------------------------------------
# Mamba-2 chunked SSD: x (B, L, H, P); dt (B, L, H) already softplus'd and clamped; A (H,) fp32;
# B, C (B, L, G, N); D (H,) or (H, P); seq_idx (B, L) int32 or None. y = SSD(x) + D * x, (B, L, H, P).

@torch.library.custom_op("adamba::ssd_fwd", mutates_args=())
def ssd_fwd(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor, seq_idx: Optional[Tensor],
            chunk_size: int) -> Tensor:
    out = KERNELS.load().ssd_fwd(x, dt, A, B, C, chunk_size, D=D, seq_idx=seq_idx)[0]
    return out.to(x.dtype).contiguous()


@ssd_fwd.register_fake
def _(x, dt, A, B, C, D, seq_idx, chunk_size):
    return x.new_empty(x.shape)


@torch.library.custom_op("adamba::ssd_bwd", mutates_args=())
def ssd_bwd(dout: Tensor, x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor, out: Tensor,
            seq_idx: Optional[Tensor], chunk_size: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    dx, ddt, dA, dB, dC, dD = KERNELS.load().ssd_bwd(dout, x, dt, A, B, C, out, chunk_size, D=D, seq_idx=seq_idx)[:6]
    return tuple(g.to(t.dtype).contiguous() for g, t in zip((dx, ddt, dA, dB, dC, dD), (x, dt, A, B, C, D)))


@ssd_bwd.register_fake
def _(dout, x, dt, A, B, C, D, out, seq_idx, chunk_size):
    return tuple(t.new_empty(t.shape) for t in (x, dt, A, B, C, D))


def _ssd_setup(ctx, inputs, output):
    x, dt, A, B, C, D, seq_idx, chunk_size = inputs
    ctx.save_for_backward(x, dt, A, B, C, D, seq_idx, output)
    ctx.chunk_size = chunk_size


def _ssd_backward(ctx, dout):
    x, dt, A, B, C, D, seq_idx, out = ctx.saved_tensors
    dx, ddt, dA, dB, dC, dD = ssd_bwd(dout, x, dt, A, B, C, D, out, seq_idx, ctx.chunk_size)
    return dx, ddt, dA, dB, dC, dD, None, None


ssd_fwd.register_autograd(_ssd_backward, setup_context=_ssd_setup)


def ssd_scan(x, dt, A, B, C, D, chunk_size, seq_idx=None):
    """The Mamba-2 chunked SSD kernel as one traceable op (no z gate, no initial or final state)."""
    return ssd_fwd(x, dt, A, B, C, D, seq_idx, chunk_size)

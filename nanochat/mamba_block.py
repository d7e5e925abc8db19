"""
The Mamba mixers' shared plumbing (MambaMixer: kernel-or-PyTorch choice, padding, packed documents, the decode
cache) and `Mamba` (Mamba-1, selective scan). `Mamba2` (SSD) is built on the same base in nanochat/mamba2_block.py;
what this docstring says holds for both.

Constructor arguments, defaults, parameter names, shapes, dtypes and init are those of
mamba-ssm 2.3.2 (`mamba_ssm.modules.mamba_simple.Mamba`, `mamba_ssm.modules.mamba2.Mamba2`),
so state_dicts load strictly in either direction; a seed gives mamba-ssm's exact initial values.
Parameters an optimizer must not decay carry `_no_weight_decay = True` (A_log, D; Mamba2 also dt_bias);
Mamba's dt_proj.bias carries `_no_reinit = True`. `reset_parameters()` redoes the init in place.

Two implementations of one function, chosen per call by `module.path`:
  "auto"   mamba-ssm's CUDA/Triton kernels when importable, the input is on CUDA and the call is one
           they support; the PyTorch path otherwise (the choice is logged once per process)
  "kernel" the kernels or a RuntimeError saying why they cannot run
  "torch"  the PyTorch path: exact math with no Python loop over time (chunked log-depth scan for
           Mamba-1, chunked SSD for Mamba-2); runs on any device and under torch.compile
The scans and their sequential float64 references (`selective_scan_reference`, `ssd_reference`) live in
nanochat/mamba_scan.py; tests/test_mamba_block.py compares them.

Beyond mamba-ssm, forward takes
  mask (B, L) bool, True = real token: masked tokens are removed from the sequence (the conv and SSM
      of a real token see only earlier real tokens, states skip them), their output is 0. So left,
      right and interior padding all give each row the result of its unpadded sequence.
  seq_idx (B, L) int: packed documents; wherever seq_idx changes, the SSM state restarts from zero and
      the conv does not look back across the change.
  inference_params with seqlen_offset > 0 and L > 1: chunked prefill continuing from the cached states.
      The cached state continues the document of position 0. The caller advances seqlen_offset.
"""
import logging
import math
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanochat.mamba_scan import _compute_dtype, _segment_ids, selective_scan
from nanochat import decode_mamba, decode_matvec, mamba_ops
from nanochat.common import log_once

logger = logging.getLogger(__name__)

try:
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn, mamba_inner_fn
    from mamba_ssm.ops.triton.selective_state_update import selective_state_update
    from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined, mamba_split_conv1d_scan_combined
    KERNEL_IMPORT_ERROR = None
except Exception as e:  # not installed, or a build that does not load: the PyTorch path runs, on CUDA with a warning
    selective_scan_fn = mamba_inner_fn = selective_state_update = None
    mamba_chunk_scan_combined = mamba_split_conv1d_scan_combined = None
    KERNEL_IMPORT_ERROR = f"{type(e).__name__}: {e}"
try:
    from causal_conv1d import causal_conv1d_fn, causal_conv1d_update
    CONV_IMPORT_ERROR = None
except Exception as e:  # the depthwise conv then runs in PyTorch (same function; mamba-ssm does the same)
    causal_conv1d_fn = causal_conv1d_update = None
    CONV_IMPORT_ERROR = f"{type(e).__name__}: {e}"

PATHS = ("auto", "kernel", "torch")


@dataclass
class InferenceParams:
    """Duck type of mamba_ssm.utils.generation.InferenceParams: per layer_idx (conv_state, ssm_state)."""
    max_seqlen: int
    max_batch_size: int
    seqlen_offset: int = 0
    batch_size_offset: int = 0
    key_value_memory_dict: dict = field(default_factory=dict)
    lengths_per_sample: Optional[torch.Tensor] = None

    def reset(self, max_seqlen, max_batch_size):
        self.max_seqlen, self.max_batch_size, self.seqlen_offset = max_seqlen, max_batch_size, 0
        if self.lengths_per_sample is not None:
            self.lengths_per_sample.zero_()


# -----------------------------------------------------------------------------
# helpers of both mixers (Mamba2's module imports the public ones)

def _inverse_softplus(y):
    return y + torch.log(-torch.expm1(-y))


def dt_bias_init(n, dt_min, dt_max, dt_init_floor, device, dtype):
    """dt log-uniform in [dt_min, dt_max], floored at dt_init_floor; returns softplus^-1(dt).
    Computed in the parameter's dtype, as mamba-ssm does, so a seed gives its exact values."""
    u = torch.rand(n, device=device, dtype=dtype)
    dt = torch.exp(u * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)).clamp(min=dt_init_floor)
    return _inverse_softplus(dt)


def _compact(hidden_states, mask, seq_idx):
    """Move each row's real tokens to the front in order, so padding only trails.
    Returns compacted hidden (B, L, D), valid (B, L) (a prefix per row), seq_idx or None, and the
    permutation `order` (B, L) needed to put outputs back."""
    order = torch.argsort((~mask).to(torch.uint8), dim=1, stable=True)
    valid = torch.arange(mask.shape[1], device=mask.device)[None] < mask.sum(1, keepdim=True)
    h = hidden_states.gather(1, order[..., None].expand_as(hidden_states))
    if seq_idx is not None:
        seq_idx = seq_idx.gather(1, order)
        # the trailing pads copy the last real token's document, so they never start a new one
        last = seq_idx.gather(1, (mask.sum(1, keepdim=True) - 1).clamp(min=0))
        seq_idx = torch.where(valid, seq_idx, last)
    return h, valid, seq_idx, order


def _uncompact(out, order, mask):
    inv = torch.argsort(order, dim=1)
    return out.gather(1, inv[..., None].expand_as(out)) * mask[..., None].to(out.dtype)


def causal_conv(x, conv1d, prev, seg):
    """Depthwise causal conv (before the activation). x: (B, L, C); prev: (B, C, W) cached inputs (the
    last W-1 are the history) or None for zeros; seg: (B, L) segment ids or None. Returns (B, L, C)."""
    W, L = conv1d.kernel_size[0], x.shape[1]
    f = _compute_dtype(x.dtype)
    hist = x.new_zeros(x.shape[0], W - 1, x.shape[2]) if prev is None else prev[:, :, 1:].transpose(1, 2).to(x.dtype)
    full = torch.cat([hist, x], dim=1).to(f)  # (B, W-1+L, C)
    w, b = conv1d.weight.to(f), None if conv1d.bias is None else conv1d.bias.to(f)
    if seg is None:
        out = F.conv1d(full.transpose(1, 2), w, b, groups=w.shape[0]).transpose(1, 2)
    else:  # one term per tap (W of them), dropping taps from another document; history is document 0
        seg_full = F.pad(seg, (W - 1, 0))
        out = 0 if b is None else b
        for k in range(W):  # tap k reads x_{t-W+1+k}
            keep = (seg_full[:, k:k + L] == seg)[..., None]
            out = out + full[:, k:k + L] * keep * w[:, 0, k]
    return out.to(x.dtype)


def conv_state_after(x, prev, valid, seg, W):
    """The last W real conv inputs after this call: (B, C, W). x: (B, L, C) conv inputs (compacted, so
    real tokens are a prefix marked by valid); prev: cached (B, C, W) or None; entries from an earlier
    document than the last real token's are zeroed (the conv must not see them)."""
    B, L, C = x.shape
    prev = x.new_zeros(B, W, C) if prev is None else prev.transpose(1, 2).to(x.dtype)
    full = torch.cat([prev, x], dim=1)  # (B, W+L, C); real tokens at W .. W+n_real-1
    n_real = torch.full((B,), L, device=x.device) if valid is None else valid.sum(1)
    idx = n_real[:, None] + torch.arange(W, device=x.device)  # (B, W)
    state = full.gather(1, idx[..., None].expand(B, W, C))
    if seg is not None:
        seg_at = F.pad(seg, (W, 0)).gather(1, idx)
        state = state * (seg_at == seg_at[:, -1:])[..., None]
    return state.transpose(1, 2)


# -----------------------------------------------------------------------------
# modules

def _project(layer, x):
    """A decode step's in/out projection: decode_matvec.linear (its kernel where usable) for a bias-free
    nn.Linear, the layer itself otherwise."""
    return decode_matvec.linear(x, layer.weight) if layer.bias is None else layer(x)


class MambaMixer(nn.Module):
    """What both mixers share: path choice, mask compaction, the cache protocol."""
    _recur_many = None  # steps()'s PyTorch path over T > 1 positions, where a mixer has one

    @staticmethod
    def _kernel_ops(conv_state):
        """True while torch.compile traces a cache-free kernel call: dynamo cannot trace mamba-ssm's Python and
        pybind calls, so the kernels run as the custom ops of nanochat/mamba_ops.py (which need causal-conv1d)."""
        return torch.compiler.is_compiling() and conv_state is None and causal_conv1d_fn is not None

    def _kernel_reason(self, x, what, unsupported=None):
        """Why this call does not run mamba-ssm's kernels (None: it does). A decode step that torch.compile traces
        (the engine's decode='compiled') takes the PyTorch ops under path='auto': inductor fuses them with the
        projections' neighbours, where the kernels are calls it cannot see into (fewer kernels a token)."""
        if self.path not in PATHS:
            raise ValueError(f"{type(self).__name__}.path must be one of {PATHS}, got {self.path!r}")
        if self.path == "torch":
            return "path='torch'"
        if what == "step" and self.path == "auto" and torch.compiler.is_compiling():
            return "a compiled decode step"
        if KERNEL_IMPORT_ERROR is not None:
            return f"mamba_ssm kernels not importable ({KERNEL_IMPORT_ERROR})"
        if not x.is_cuda:
            return "input is not on CUDA"
        return unsupported

    def _use_kernels(self, x, what, unsupported=None):
        """True to run mamba-ssm's kernels for this call; raises if path='kernel' cannot be honoured."""
        reason = self._kernel_reason(x, what, unsupported)
        if reason is not None and self.path == "kernel":
            raise RuntimeError(f"{type(self).__name__}.path='kernel' but {reason}; use path='auto' or 'torch'")
        if reason is None:
            conv = "" if CONV_IMPORT_ERROR is None else f", depthwise conv in PyTorch ({CONV_IMPORT_ERROR})"
            log_once(logger, f"{type(self).__name__} {what}: mamba-ssm kernels{conv}")
        if x.is_cuda and self.path == "auto" and KERNEL_IMPORT_ERROR is not None:  # a WARNING, or an error
            mamba_ops.kernels_missing_on_cuda(f"mamba_ssm kernels not importable ({KERNEL_IMPORT_ERROR})")
        elif reason is None and CONV_IMPORT_ERROR is not None:
            mamba_ops.kernels_missing_on_cuda(f"causal_conv1d not importable ({CONV_IMPORT_ERROR})")
        elif reason is not None:  # once per reason, whichever mixer and call meets it
            log_once(logger, f"Mamba mixers: PyTorch path ({reason})")
        return reason is None

    def step(self, hidden_states, conv_state, ssm_state):
        """One token: (B, 1, d_model) -> (B, 1, d_model); conv_state and ssm_state are updated in place."""
        if hidden_states.shape[1] != 1:
            raise ValueError(f"step takes one token (B, 1, D), got {tuple(hidden_states.shape)}; use forward for more")
        return self.steps(hidden_states, conv_state, ssm_state), conv_state, ssm_state

    def steps(self, hidden_states, conv_state, ssm_state, keep=None):
        """
        T tokens, one decode step each: (B, T, d_model) -> (B, T, d_model), conv_state and ssm_state updated in
        place. What T calls of step compute, position by position (_recur: the conv and the state update), except
        that in_proj and out_proj, most of the mixer's weights, run over the T positions at once: the speculative
        verify pass reads them once, not T times. keep(t, conv_state, ssm_state), if given, is handed the states
        after each position t (the verify pass's rollback points). On the PyTorch path a mixer may compute more of
        the T positions at once (_recur_many: what _recur position by position computes, the reference beside it).
        """
        use_kernels = self._use_kernels(hidden_states, "step")
        u = _project(self.in_proj, hidden_states)  # (B, T, d_in_proj)
        if u.size(1) > 1 and not use_kernels and self._recur_many is not None:
            return _project(self.out_proj, self._recur_many(u, conv_state, ssm_state, keep, hidden_states.dtype))
        ys = []
        for t in range(u.size(1)):
            ys.append(self._recur(u[:, t], conv_state, ssm_state, use_kernels, hidden_states.dtype))
            if keep is not None:
                keep(t, conv_state, ssm_state)
        return _project(self.out_proj, ys[0].unsqueeze(1) if len(ys) == 1 else torch.stack(ys, 1))

    def forward(self, hidden_states, inference_params=None, mask=None, seq_idx=None):
        """hidden_states: (B, L, d_model) -> (B, L, d_model). mask: (B, L) bool, True = real token;
        seq_idx: (B, L) int document ids; inference_params: see the module docstring."""
        batch, seqlen, _ = hidden_states.shape
        for name, t in (("mask", mask), ("seq_idx", seq_idx)):
            if t is not None and t.shape != (batch, seqlen):
                raise ValueError(f"{name} must have shape (batch, seqlen)={(batch, seqlen)}, got {tuple(t.shape)}")
        if mask is not None and mask.dtype != torch.bool:
            raise ValueError(f"mask must be a bool tensor (True = real token), got {mask.dtype}")
        conv_state = ssm_state = None
        cont = False
        if inference_params is not None:
            conv_state, ssm_state = self._get_states_from_cache(inference_params, batch)
            cont = inference_params.seqlen_offset > 0
            if cont and seqlen == 1 and mask is None and seq_idx is None:
                out, _, _ = self.step(hidden_states, conv_state, ssm_state)  # states updated in place
                return out
        h, valid, order = hidden_states, None, None
        if mask is not None:
            h, valid, seq_idx, order = _compact(hidden_states, mask, seq_idx)
        seg = None if seq_idx is None else _segment_ids(seq_idx)
        out = self._mix(h, conv_state, ssm_state, cont, valid, seg)
        return out if mask is None else _uncompact(out, order, mask)

    def _get_states_from_cache(self, inference_params, batch_size, initialize_states=False):
        if self.layer_idx is None:
            raise ValueError(f"{type(self).__name__} needs layer_idx to use inference_params")
        cache = inference_params.key_value_memory_dict
        if self.layer_idx not in cache:
            cache[self.layer_idx] = self.allocate_inference_cache(batch_size, inference_params.max_seqlen)
        conv_state, ssm_state = cache[self.layer_idx]
        if conv_state.shape[0] != batch_size:
            raise ValueError(f"cached states of layer {self.layer_idx} have batch {conv_state.shape[0]}, input has "
                             f"{batch_size}; start a new InferenceParams for a new batch")
        if initialize_states:
            conv_state.zero_()
            ssm_state.zero_()
        return conv_state, ssm_state

    def _conv_step(self, x, conv_state, use_kernels):
        """One token through the depthwise conv + silu, shifting conv_state (B, C, W) in place. x: (B, C)."""
        w = self.conv1d.weight.squeeze(1)  # (C, W)
        if use_kernels and causal_conv1d_update is not None:
            # the kernel wants input, state and weights of one dtype; under autocast x is bf16 while the
            # cache keeps the parameters' dtype, so run in the state's dtype (the torch path does the same math)
            sd = conv_state.dtype
            bias = None if self.conv1d.bias is None else self.conv1d.bias.to(sd)
            return causal_conv1d_update(x.to(sd), conv_state, w.to(sd), bias, self.activation).to(x.dtype)
        f = _compute_dtype(x.dtype)
        conv_state.copy_(torch.roll(conv_state, shifts=-1, dims=-1))
        conv_state[:, :, -1] = x
        out = (conv_state.to(f) * w.to(f)).sum(-1)
        if self.conv1d.bias is not None:
            out = out + self.conv1d.bias.to(f)
        return F.silu(out).to(x.dtype)

    def _conv_steps(self, x, conv_state):
        """The depthwise conv + silu of T positions x (B, T, C) after the history in conv_state (B, C, W): what T
        calls of _conv_step give (the inputs held in the state's dtype), conv_state left as it is. Returns
        (out (B, T, C), windows (B, C, T, W): the conv state after each position)."""
        f = _compute_dtype(x.dtype)
        seq = torch.cat([conv_state, x.transpose(1, 2).to(conv_state.dtype)], dim=-1)  # (B, C, W + T)
        windows = seq.unfold(-1, conv_state.size(-1), 1)[:, :, 1:]
        # reduced in (B, T, C) order, so that x_proj reads rows: out of (B, C, T) transposed gave its matrix product
        # a stride-T operand (the likely cause of an unaligned cuBLAS kernel, 87 us a call at d20 on the H100)
        out = (windows.transpose(1, 2).to(f) * self.conv1d.weight.squeeze(1).to(f)).sum(-1)  # (B, T, C)
        if self.conv1d.bias is not None:
            out = out + self.conv1d.bias.to(f)
        return F.silu(out).to(x.dtype), windows

    @staticmethod
    def _state_steps(ssm_state, decay, inject, C, readout, conv_state, windows, keep):
        """The SSM state update position by position, state = state * decay[:, t] + inject[:, t] (rounded to the
        state's dtype between positions, as step() keeps it), each position read out by the einsum `readout` with
        C[:, t]; returns those stacked (B, T, ...). conv_state ends at the last window; keep(t, conv, ssm) is
        handed each position's states."""
        ys = []
        for t in range(decay.size(1)):
            state = ssm_state.to(decay.dtype) * decay[:, t] + inject[:, t]
            ssm_state.copy_(state)
            ys.append(torch.einsum(readout, state, C[:, t]))
            if keep is not None:
                keep(t, windows[:, :, t], ssm_state)
        conv_state.copy_(windows[:, :, -1])
        return torch.stack(ys, 1)


class Mamba(MambaMixer):
    """Mamba-1 mixer; the arguments, parameters and init of mamba_ssm.modules.mamba_simple.Mamba."""

    def __init__(self, d_model, d_state=16, d_conv=4, expand=2, dt_rank="auto", dt_min=0.001, dt_max=0.1,
                 dt_init="random", dt_scale=1.0, dt_init_floor=1e-4, conv_bias=True, bias=False,
                 use_fast_path=True, layer_idx=None, device=None, dtype=None):
        factory_kwargs = {"device": device, "dtype": dtype}
        super().__init__()
        if dt_init not in ("random", "constant"):
            raise ValueError(f"dt_init must be 'random' or 'constant', got {dt_init!r}")
        self.d_model, self.d_state, self.d_conv, self.expand = d_model, d_state, d_conv, expand
        self.d_inner = int(self.expand * self.d_model)
        self.dt_rank = math.ceil(self.d_model / 16) if dt_rank == "auto" else dt_rank
        self.dt_min, self.dt_max, self.dt_init, self.dt_scale, self.dt_init_floor = dt_min, dt_max, dt_init, dt_scale, dt_init_floor
        self.use_fast_path, self.layer_idx = use_fast_path, layer_idx
        self.activation = "silu"
        self.path = "auto"  # "auto" | "kernel" | "torch", see the module docstring

        self.in_proj = nn.Linear(self.d_model, self.d_inner * 2, bias=bias, **factory_kwargs)
        self.conv1d = nn.Conv1d(self.d_inner, self.d_inner, kernel_size=d_conv, groups=self.d_inner,
                                padding=d_conv - 1, bias=conv_bias, **factory_kwargs)
        self.x_proj = nn.Linear(self.d_inner, self.dt_rank + self.d_state * 2, bias=False, **factory_kwargs)
        self.dt_proj = nn.Linear(self.dt_rank, self.d_inner, bias=True, **factory_kwargs)
        self.dt_proj.bias._no_reinit = True  # a model-level init that zeroes biases must skip this one
        # A_log is fp32 whatever dtype is; D has the default dtype (mamba-ssm: "Keep in fp32")
        self.A_log = nn.Parameter(torch.empty(self.d_inner, self.d_state, device=device, dtype=torch.float32))
        self.A_log._no_weight_decay = True
        self.D = nn.Parameter(torch.empty(self.d_inner, device=device))
        self.D._no_weight_decay = True
        self._init_ssm()  # before out_proj exists: the same order of random draws as mamba-ssm
        self.out_proj = nn.Linear(self.d_inner, self.d_model, bias=bias, **factory_kwargs)

    @torch.no_grad()
    def _init_ssm(self):
        # dt_proj keeps the variance of dt at init; its bias makes softplus(bias) log-uniform in [dt_min, dt_max]
        std = self.dt_rank ** -0.5 * self.dt_scale
        if self.dt_init == "constant":
            nn.init.constant_(self.dt_proj.weight, std)
        else:
            nn.init.uniform_(self.dt_proj.weight, -std, std)
        self.dt_proj.bias.copy_(dt_bias_init(self.d_inner, self.dt_min, self.dt_max, self.dt_init_floor,
                                             self.dt_proj.bias.device, self.dt_proj.bias.dtype))
        # S4D-real: A = -(1..d_state) for every channel
        A = torch.arange(1, self.d_state + 1, dtype=torch.float32, device=self.A_log.device)
        self.A_log.copy_(torch.log(A).expand(self.d_inner, -1))
        self.D.fill_(1.0)

    def reset_parameters(self):
        """Re-run the constructor's init in place (e.g. after building on the meta device)."""
        for m in (self.in_proj, self.conv1d, self.x_proj, self.dt_proj, self.out_proj):
            m.reset_parameters()
        self._init_ssm()

    def _mix(self, h, conv_state, ssm_state, cont, valid, seg):
        unsupported = ("seq_idx (the Mamba-1 CUDA scan has no state resets)" if seg is not None else
                       "chunked prefill (the Mamba-1 CUDA scan takes no initial state)" if cont else None)
        if self._use_kernels(h, "forward", unsupported):
            return self._mix_kernels(h, conv_state, ssm_state, valid)
        f = _compute_dtype(h.dtype)
        x, z = self.in_proj(h).chunk(2, dim=-1)  # (B, L, d_inner) each
        prev = conv_state if cont else None
        if conv_state is not None:
            new_conv_state = conv_state_after(x, prev, valid, seg, self.d_conv)
        x = F.silu(causal_conv(x, self.conv1d, prev, seg))
        dt, B, C = self.x_proj(x).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        # dt straight into the scan's (B, d_inner, L) layout; the bias goes in at fp32, as in the kernel.
        # (Transposing after the softplus instead trips a stride bug in torch.compile's backward.)
        dt = torch.matmul(self.dt_proj.weight, dt.transpose(1, 2))
        delta = F.softplus(dt.to(f) + self.dt_proj.bias.to(f)[:, None])  # (B, d_inner, L)
        if valid is not None:
            delta = delta * valid[:, None, :]  # pads: decay 1, no input
        A = -torch.exp(self.A_log.to(f))  # (d_inner, d_state)
        y, last = selective_scan(x.transpose(1, 2), delta, A, B.transpose(1, 2), C.transpose(1, 2),
                                 self.D, z.transpose(1, 2), initial_state=ssm_state if cont else None,
                                 seq_idx=seg, return_last_state=True)
        if conv_state is not None:
            conv_state.copy_(new_conv_state)
            ssm_state.copy_(last)
        return self.out_proj(y.transpose(1, 2))

    def _mix_kernels(self, h, conv_state, ssm_state, valid):
        """mamba-ssm's own forward: fused mamba_inner_fn when no state is wanted, else conv + selective_scan_fn;
        while torch.compile traces, conv + scan as custom ops (no graph break)."""
        ops = self._kernel_ops(conv_state)
        batch, seqlen, _ = h.shape
        # (B, 2*d_inner, L) with L contiguous, the layout the kernels take
        xz = (self.in_proj.weight @ h.reshape(-1, self.d_model).t()).unflatten(1, (batch, seqlen)).transpose(0, 1)
        if self.in_proj.bias is not None:
            xz = xz + self.in_proj.bias.to(xz.dtype)[:, None]
        A = -torch.exp(self.A_log.float())
        if self.use_fast_path and causal_conv1d_fn is not None and conv_state is None and not ops:
            return mamba_inner_fn(xz, self.conv1d.weight, self.conv1d.bias, self.x_proj.weight, self.dt_proj.weight,
                                  self.out_proj.weight, self.out_proj.bias, A, None, None, self.D.float(),
                                  delta_bias=self.dt_proj.bias.float(), delta_softplus=True)
        x, z = xz.chunk(2, dim=1)  # (B, d_inner, L)
        if conv_state is not None:
            conv_state.copy_(conv_state_after(x.transpose(1, 2), None, valid, None, self.d_conv))
        if causal_conv1d_fn is not None:
            conv = mamba_ops.causal_conv1d if ops else causal_conv1d_fn
            x = conv(x, self.conv1d.weight.squeeze(1), self.conv1d.bias, activation=self.activation)
        else:
            x = F.silu(self.conv1d(x)[..., :seqlen])
        x_dbl = self.x_proj(x.transpose(1, 2).reshape(batch * seqlen, self.d_inner))
        dt, B, C = x_dbl.split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt = (self.dt_proj.weight @ dt.t()).unflatten(1, (batch, seqlen)).transpose(0, 1)  # (B, d_inner, L)
        B = B.unflatten(0, (batch, seqlen)).transpose(1, 2).contiguous()  # (B, d_state, L)
        C = C.unflatten(0, (batch, seqlen)).transpose(1, 2).contiguous()
        delta_bias, softplus = self.dt_proj.bias.float(), True
        if valid is not None and ssm_state is not None:  # dt = 0 on pads, so the state is the last real token's
            dt = (F.softplus(dt.float() + delta_bias[:, None]) * valid[:, None, :]).to(x.dtype)
            delta_bias, softplus = None, False
        if ops:  # no state here: the bias and the softplus go in the kernel, as below
            return self.out_proj(mamba_ops.selective_scan(x, dt, A, B[:, None], C[:, None], self.D.float(), z,
                                                          delta_bias).transpose(1, 2))
        y = selective_scan_fn(x, dt, A, B, C, self.D.float(), z=z, delta_bias=delta_bias, delta_softplus=softplus,
                              return_last_state=ssm_state is not None)
        if ssm_state is not None:
            y, last = y
            ssm_state.copy_(last)
        return self.out_proj(y.transpose(1, 2))

    def _recur(self, xz, conv_state, ssm_state, use_kernels, dtype):
        """One decode position between the projections: xz (B, 2 * d_inner) of in_proj -> y (B, d_inner) for
        out_proj; the depthwise conv and the selective state update, conv_state and ssm_state updated in place.
        On the PyTorch path the same function may run as nanochat/decode_mamba.py's kernels (opt-in)."""
        if not use_kernels and decode_mamba.usable(self, xz, conv_state, ssm_state):
            return decode_mamba.step(self, xz, conv_state, ssm_state)
        f = _compute_dtype(dtype)
        x, z = xz.chunk(2, dim=-1)  # (B, d_inner)
        x = self._conv_step(x, conv_state, use_kernels)
        dt, B, C = self.x_proj(x).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt = F.linear(dt, self.dt_proj.weight)  # (B, d_inner), bias added with the softplus
        if use_kernels:
            A = -torch.exp(self.A_log.float())
            return selective_state_update(ssm_state, x, dt, A, B, C, self.D, z=z, dt_bias=self.dt_proj.bias, dt_softplus=True)
        A = -torch.exp(self.A_log.to(f))
        delta = F.softplus(dt.to(f) + self.dt_proj.bias.to(f))
        state = ssm_state.to(f) * torch.exp(delta[..., None] * A) + (delta * x.to(f))[..., None] * B.to(f)[:, None]
        ssm_state.copy_(state)
        y = torch.einsum("bdn,bn->bd", state, C.to(f)) + self.D.to(f) * x.to(f)
        return (y * F.silu(z.to(f))).to(dtype)

    def _recur_many(self, xz, conv_state, ssm_state, keep, dtype):
        """T decode positions between the projections on the PyTorch path: what T calls of _recur compute, with
        the conv, x_proj and dt_proj over the T positions at once (none of them reads the SSM state) and only the
        state update position by position. xz (B, T, 2 * d_inner) -> y (B, T, d_inner); the states updated in
        place, keep(t, conv_state, ssm_state) handed those after each position (steps' docstring)."""
        f = _compute_dtype(dtype)
        x, z = xz.chunk(2, dim=-1)  # (B, T, d_inner)
        x, windows = self._conv_steps(x, conv_state)
        dt, B, C = self.x_proj(x).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt = F.linear(dt, self.dt_proj.weight)  # (B, T, d_inner)
        A = -torch.exp(self.A_log.to(f))
        delta = F.softplus(dt.to(f) + self.dt_proj.bias.to(f))
        decay = torch.exp(delta[..., None] * A)  # (B, T, d_inner, d_state)
        inject = (delta * x.to(f))[..., None] * B.to(f)[:, :, None]
        y = self._state_steps(ssm_state, decay, inject, C.to(f), "bdn,bn->bd", conv_state, windows, keep)
        y = y + self.D.to(f) * x.to(f)
        return (y * F.silu(z.to(f))).to(dtype)

    def allocate_inference_cache(self, batch_size, max_seqlen, dtype=None, **kwargs):
        """(conv_state (B, d_inner, d_conv), ssm_state (B, d_inner, d_state)), zeros; mamba-ssm's dtypes."""
        device = self.out_proj.weight.device
        conv_state = torch.zeros(batch_size, self.d_inner, self.d_conv, device=device,
                                 dtype=self.conv1d.weight.dtype if dtype is None else dtype)
        ssm_state = torch.zeros(batch_size, self.d_inner, self.d_state, device=device,
                                dtype=self.dt_proj.weight.dtype if dtype is None else dtype)
        return conv_state, ssm_state

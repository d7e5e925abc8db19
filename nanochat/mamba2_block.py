"""
`Mamba2`, the Mamba-2 (SSD) mixer, and its gated RMSNorm. Built on nanochat/mamba_block.py's MambaMixer, whose
docstring holds for it too: mamba-ssm 2.3.2's arguments, parameters and init (`mamba_ssm.modules.mamba2.Mamba2`,
state_dicts load strictly either way), `path` ("auto" | "kernel" | "torch"), mask, seq_idx and the decode cache.
The PyTorch path is the chunked SSD of nanochat/mamba_scan.py (`ssd_chunk_scan`, beside `ssd_reference`).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from nanochat import mamba_ops
from nanochat.mamba_block import (MambaMixer, causal_conv, conv_state_after, dt_bias_init, causal_conv1d_fn,
                                  mamba_chunk_scan_combined, mamba_split_conv1d_scan_combined, selective_state_update)
from nanochat.mamba_scan import _compute_dtype, ssd_chunk_scan


class RMSNormGated(nn.Module):
    """mamba-ssm's gated RMSNorm (ops/triton/layernorm_gated.RMSNorm) in PyTorch, computed in fp32.
    norm_before_gate=False: norm(x * silu(z)) * weight; True: norm(x) * weight * silu(z).
    group_size: normalise over groups of this many channels (None: all of them)."""

    def __init__(self, hidden_size, eps=1e-5, group_size=None, norm_before_gate=True, device=None, dtype=None):
        super().__init__()
        self.eps, self.group_size, self.norm_before_gate = eps, group_size, norm_before_gate
        self.weight = nn.Parameter(torch.empty(hidden_size, device=device, dtype=dtype))
        self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self):
        nn.init.ones_(self.weight)

    def forward(self, x, z=None):
        dtype, f = x.dtype, _compute_dtype(x.dtype)
        x = x.to(f)
        if z is not None and not self.norm_before_gate:
            x = x * F.silu(z.to(f))
        g = x.unflatten(-1, (-1, self.group_size or x.shape[-1]))  # (..., groups, group_size)
        out = (g * torch.rsqrt(g.square().mean(-1, keepdim=True) + self.eps)).flatten(-2) * self.weight.to(f)
        if z is not None and self.norm_before_gate:
            out = out * F.silu(z.to(f))
        return out.to(dtype)


class Mamba2(MambaMixer):
    """Mamba-2 (SSD) mixer; the arguments, parameters and init of mamba_ssm.modules.mamba2.Mamba2.
    in_proj packs [z0, x0, z, xBC, dt]: z0, x0 (d_inner - d_ssm each) are a gated MLP beside the SSM."""

    def __init__(self, d_model, d_state=128, d_conv=4, conv_init=None, expand=2, headdim=64, d_ssm=None,
                 ngroups=1, A_init_range=(1, 16), D_has_hdim=False, rmsnorm=True, norm_before_gate=False,
                 dt_min=0.001, dt_max=0.1, dt_init_floor=1e-4, dt_limit=(0.0, float("inf")), bias=False,
                 conv_bias=True, chunk_size=256, use_mem_eff_path=True, layer_idx=None, process_group=None,
                 sequence_parallel=True, device=None, dtype=None):
        factory_kwargs = {"device": device, "dtype": dtype}
        super().__init__()
        if process_group is not None:
            raise NotImplementedError("Mamba2 here supports process_group=None only (no tensor parallelism)")
        self.d_model, self.d_state, self.d_conv, self.conv_init, self.expand = d_model, d_state, d_conv, conv_init, expand
        self.process_group, self.sequence_parallel, self.world_size, self.local_rank = None, sequence_parallel, 1, 0
        self.d_inner = self.expand * self.d_model
        if self.d_inner != int(self.d_inner):
            raise ValueError(f"expand * d_model must be an integer, got {self.d_inner}")
        self.d_inner = int(self.d_inner)
        self.headdim = headdim
        self.d_ssm = self.d_inner if d_ssm is None else d_ssm
        if self.d_ssm > self.d_inner or self.d_ssm % headdim:
            raise ValueError(f"d_ssm={self.d_ssm} must be a multiple of headdim={headdim} and at most d_inner={self.d_inner}")
        self.ngroups = ngroups
        self.nheads = self.d_ssm // self.headdim
        if self.nheads % ngroups:
            raise ValueError(f"nheads={self.nheads} (d_ssm/headdim) must be a multiple of ngroups={ngroups}")
        if not (A_init_range[0] > 0 and A_init_range[1] >= A_init_range[0]):
            raise ValueError(f"A_init_range must satisfy 0 < lo <= hi, got {A_init_range}")
        self.A_init_range, self.dt_min, self.dt_max, self.dt_init_floor = A_init_range, dt_min, dt_max, dt_init_floor
        self.D_has_hdim, self.rmsnorm, self.norm_before_gate, self.dt_limit = D_has_hdim, rmsnorm, norm_before_gate, dt_limit
        self.activation = "silu"
        self.chunk_size, self.use_mem_eff_path, self.layer_idx = chunk_size, use_mem_eff_path, layer_idx
        self.path = "auto"  # "auto" | "kernel" | "torch", see the module docstring

        d_in_proj = 2 * self.d_inner + 2 * self.ngroups * self.d_state + self.nheads  # [z0, x0, z, xBC, dt]
        self.in_proj = nn.Linear(self.d_model, d_in_proj, bias=bias, **factory_kwargs)
        conv_dim = self.d_ssm + 2 * self.ngroups * self.d_state  # xBC
        self.conv1d = nn.Conv1d(conv_dim, conv_dim, kernel_size=d_conv, groups=conv_dim, padding=d_conv - 1,
                                bias=conv_bias, **factory_kwargs)
        self.dt_bias = nn.Parameter(torch.empty(self.nheads, **factory_kwargs))
        self.dt_bias._no_weight_decay = True
        self.A_log = nn.Parameter(torch.empty(self.nheads, **factory_kwargs))  # in dtype, as mamba-ssm's Mamba2
        self.A_log._no_weight_decay = True
        self.D = nn.Parameter(torch.empty(self.d_ssm if self.D_has_hdim else self.nheads, device=device))  # default dtype
        self.D._no_weight_decay = True
        self._init_ssm()  # same order of random draws as mamba-ssm
        if self.rmsnorm:
            self.norm = RMSNormGated(self.d_ssm, eps=1e-5, norm_before_gate=self.norm_before_gate,
                                     group_size=self.d_ssm // ngroups, **factory_kwargs)
        self.out_proj = nn.Linear(self.d_inner, self.d_model, bias=bias, **factory_kwargs)

    @torch.no_grad()
    def _init_ssm(self):
        if self.conv_init is not None:
            nn.init.uniform_(self.conv1d.weight, -self.conv_init, self.conv_init)
        self.dt_bias.copy_(dt_bias_init(self.nheads, self.dt_min, self.dt_max, self.dt_init_floor,
                                        self.dt_bias.device, self.dt_bias.dtype))
        A = torch.empty(self.nheads, dtype=torch.float32, device=self.A_log.device).uniform_(*self.A_init_range)
        self.A_log.copy_(torch.log(A))
        self.D.fill_(1.0)

    def reset_parameters(self):
        """Re-run the constructor's init in place (e.g. after building on the meta device)."""
        for m in (self.in_proj, self.conv1d, self.out_proj) + ((self.norm,) if self.rmsnorm else ()):
            m.reset_parameters()
        self._init_ssm()

    def forward(self, hidden_states, inference_params=None, mask=None, seq_idx=None, seqlen=None, cu_seqlens=None):
        """As MambaMixer.forward; also mamba-ssm's seqlen (input flattened to (B*L, D))."""
        if cu_seqlens is not None:
            raise NotImplementedError("Mamba2 here does not take cu_seqlens; pack documents with seq_idx (B, L) instead")
        if seqlen is None:
            return super().forward(hidden_states, inference_params, mask, seq_idx)
        out = super().forward(hidden_states.unflatten(0, (-1, seqlen)), inference_params, mask, seq_idx)
        return out.flatten(0, 1)

    def _split_sizes(self, n):
        d_mlp = (n - 2 * self.d_ssm - 2 * self.ngroups * self.d_state - self.nheads) // 2
        return [d_mlp, d_mlp, self.d_ssm, self.d_ssm + 2 * self.ngroups * self.d_state, self.nheads]

    def _D(self):
        return self.D.view(self.nheads, self.headdim) if self.D_has_hdim else self.D

    def _dt(self, dt, f):
        """softplus(dt + dt_bias), clamped to dt_limit, in fp32 (fp64 for fp64 input)."""
        dt = F.softplus(dt.to(f) + self.dt_bias.to(f))
        if tuple(self.dt_limit) != (0.0, float("inf")):
            dt = dt.clamp(min=self.dt_limit[0], max=self.dt_limit[1])
        return dt

    def _mix(self, h, conv_state, ssm_state, cont, valid, seg):
        use_kernels = self._use_kernels(h, "forward")
        seg32 = None if seg is None else seg.to(torch.int32).contiguous()
        ops = use_kernels and self._kernel_ops(conv_state)
        if use_kernels and self.use_mem_eff_path and conv_state is None and not ops:  # one fused kernel, as mamba-ssm
            dt_limit_kwargs = {} if tuple(self.dt_limit) == (0.0, float("inf")) else dict(dt_limit=self.dt_limit)
            return mamba_split_conv1d_scan_combined(
                self.in_proj(h), self.conv1d.weight.squeeze(1), self.conv1d.bias, self.dt_bias,
                -torch.exp(self.A_log.float()), D=self._D(), chunk_size=self.chunk_size, seq_idx=seg32,
                activation=self.activation, rmsnorm_weight=self.norm.weight if self.rmsnorm else None,
                rmsnorm_eps=self.norm.eps if self.rmsnorm else 1e-6, outproj_weight=self.out_proj.weight,
                outproj_bias=self.out_proj.bias, headdim=None if self.D_has_hdim else self.headdim,
                ngroups=self.ngroups, norm_before_gate=self.norm_before_gate, **dt_limit_kwargs)
        f = _compute_dtype(h.dtype)
        zxbcdt = self.in_proj(h)  # (B, L, d_in_proj)
        z0, x0, z, xBC, dt = zxbcdt.split(self._split_sizes(zxbcdt.shape[-1]), dim=-1)
        prev = conv_state if cont else None
        if conv_state is not None:
            new_conv_state = conv_state_after(xBC, prev, valid, seg, self.d_conv)
        if use_kernels and causal_conv1d_fn is not None and prev is None:
            conv = mamba_ops.causal_conv1d if ops else causal_conv1d_fn
            xBC = conv(xBC.transpose(1, 2), self.conv1d.weight.squeeze(1), self.conv1d.bias,
                       activation=self.activation, seq_idx=seg32).transpose(1, 2)
        else:
            xBC = F.silu(causal_conv(xBC, self.conv1d, prev, seg))
        x, B, C = xBC.split([self.d_ssm, self.ngroups * self.d_state, self.ngroups * self.d_state], dim=-1)
        dt = self._dt(dt, f)  # (B, L, nheads)
        if valid is not None:
            dt = dt * valid[..., None]  # pads: decay 1, no input
        args = (x.unflatten(-1, (self.nheads, self.headdim)), dt, -torch.exp(self.A_log.to(f)),
                B.unflatten(-1, (self.ngroups, self.d_state)), C.unflatten(-1, (self.ngroups, self.d_state)))
        kwargs = dict(chunk_size=self.chunk_size, D=self._D(), initial_states=ssm_state if cont else None,
                      z=None if self.rmsnorm else z.unflatten(-1, (self.nheads, self.headdim)), return_final_states=True)
        if ops:
            y = mamba_ops.ssd_scan(*args, D=kwargs["D"], chunk_size=self.chunk_size, seq_idx=seg32)
            if kwargs["z"] is not None:  # the kernel gates inside; here after it, the same function
                y = (y.float() * F.silu(kwargs["z"].float())).to(y.dtype)
        elif use_kernels:
            y, last = mamba_chunk_scan_combined(*args, seq_idx=seg32, **kwargs)
        else:
            y, last = ssd_chunk_scan(*args, seq_idx=seg, **kwargs)
        if conv_state is not None:
            conv_state.copy_(new_conv_state)
            ssm_state.copy_(last)
        y = y.flatten(2)  # (B, L, d_ssm)
        if self.rmsnorm:
            y = self.norm(y, z)
        if x0.shape[-1] > 0:
            y = torch.cat([F.silu(z0) * x0, y], dim=-1)
        return self.out_proj(y)

    def _recur(self, zxbcdt, conv_state, ssm_state, use_kernels, dtype):
        """One decode position between the projections: zxbcdt (B, d_in_proj) of in_proj -> y (B, d_inner) for
        out_proj; the conv, the state update and the gated norm, conv_state and ssm_state updated in place."""
        f = _compute_dtype(dtype)
        z0, x0, z, xBC, dt = zxbcdt.split(self._split_sizes(zxbcdt.shape[-1]), dim=-1)
        xBC = self._conv_step(xBC, conv_state, use_kernels)
        x, B, C = xBC.split([self.d_ssm, self.ngroups * self.d_state, self.ngroups * self.d_state], dim=-1)
        H, P, G, N = self.nheads, self.headdim, self.ngroups, self.d_state
        x, B, C = x.unflatten(-1, (H, P)), B.unflatten(-1, (G, N)), C.unflatten(-1, (G, N))
        dt = self._dt(dt, f)  # (B, nheads); dt_limit applied here too (mamba-ssm's step skips it)
        D = self._D().to(f)
        D = D[:, None].expand(H, P) if D.dim() == 1 else D
        if use_kernels:
            A = (-torch.exp(self.A_log.float()))[:, None, None].expand(H, P, N)
            # dt already holds softplus(dt + dt_bias) clamped to dt_limit; mamba-ssm 2.3.2's kernel reads
            # dt_bias's strides unconditionally, so hand it zeros (stride 0 along headdim, like dt and A)
            zero_bias = dt.new_zeros(H)[:, None].expand(H, P)
            y = selective_state_update(ssm_state, x, dt[..., None].expand(-1, H, P), A, B, C, D,
                                       z=None if self.rmsnorm else z.unflatten(-1, (H, P)),
                                       dt_bias=zero_bias, dt_softplus=False)
        else:
            A = -torch.exp(self.A_log.to(f))
            Bh, Ch = B.to(f).repeat_interleave(H // G, dim=1), C.to(f).repeat_interleave(H // G, dim=1)  # (B, H, N)
            state = (ssm_state.to(f) * torch.exp(dt * A)[..., None, None]
                     + (dt[..., None] * x.to(f))[..., None] * Bh[:, :, None, :])  # (B, H, P, N)
            ssm_state.copy_(state)
            y = torch.einsum("bhpn,bhn->bhp", state, Ch) + D * x.to(f)
            if not self.rmsnorm:
                y = y * F.silu(z.unflatten(-1, (H, P)).to(f))
            y = y.to(dtype)
        y = y.flatten(1)  # (B, d_ssm)
        if self.rmsnorm:
            y = self.norm(y, z)
        if x0.shape[-1] > 0:
            y = torch.cat([F.silu(z0) * x0, y], dim=-1)
        return y

    def _recur_many(self, zxbcdt, conv_state, ssm_state, keep, dtype):
        """T decode positions between the projections on the PyTorch path: what T calls of _recur compute, with
        the conv, dt and the gated norm over the T positions at once (none of them reads the SSM state) and only
        the state update position by position. zxbcdt (B, T, d_in_proj) -> y (B, T, d_inner); the states updated
        in place, keep(t, conv_state, ssm_state) handed those after each position (MambaMixer.steps)."""
        f = _compute_dtype(dtype)
        z0, x0, z, xBC, dt = zxbcdt.split(self._split_sizes(zxbcdt.shape[-1]), dim=-1)
        xBC, windows = self._conv_steps(xBC, conv_state)  # (B, T, conv_dim)
        x, B, C = xBC.split([self.d_ssm, self.ngroups * self.d_state, self.ngroups * self.d_state], dim=-1)
        H, P, G, N = self.nheads, self.headdim, self.ngroups, self.d_state
        x, B, C = x.unflatten(-1, (H, P)).to(f), B.unflatten(-1, (G, N)), C.unflatten(-1, (G, N))
        dt = self._dt(dt, f)  # (B, T, nheads)
        D = self._D().to(f)
        D = D[:, None].expand(H, P) if D.dim() == 1 else D
        A = -torch.exp(self.A_log.to(f))
        Bh, Ch = B.to(f).repeat_interleave(H // G, dim=2), C.to(f).repeat_interleave(H // G, dim=2)  # (B, T, H, N)
        decay = torch.exp(dt * A)[..., None, None]  # (B, T, H, 1, 1)
        inject = (dt[..., None] * x)[..., None] * Bh[:, :, :, None, :]  # (B, T, H, P, N)
        y = self._state_steps(ssm_state, decay, inject, Ch, "bhpn,bhn->bhp", conv_state, windows, keep) + D * x
        if not self.rmsnorm:
            y = y * F.silu(z.unflatten(-1, (H, P)).to(f))
        y = y.to(dtype).flatten(2)  # (B, T, d_ssm)
        if self.rmsnorm:
            y = self.norm(y, z)
        if x0.shape[-1] > 0:
            y = torch.cat([F.silu(z0) * x0, y], dim=-1)
        return y

    def allocate_inference_cache(self, batch_size, max_seqlen, dtype=None, **kwargs):
        """(conv_state (B, conv_dim, d_conv) stored channel-last, ssm_state (B, nheads, headdim, d_state)),
        zeros; mamba-ssm's dtypes and layout."""
        device = self.out_proj.weight.device
        conv_state = torch.zeros(batch_size, self.d_conv, self.conv1d.weight.shape[0], device=device,
                                 dtype=self.conv1d.weight.dtype if dtype is None else dtype).transpose(1, 2)
        ssm_state = torch.zeros(batch_size, self.nheads, self.headdim, self.d_state, device=device,
                                dtype=self.in_proj.weight.dtype if dtype is None else dtype)
        return conv_state, ssm_state

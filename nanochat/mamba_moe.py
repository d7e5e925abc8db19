"""
The Mamba + MoE model (the "Mamba R1" seed API): alternating Mamba mixers and MoE FFNs over float embeddings
(or tokens, with vocab_size), with rotary position information plus learnable positional parameters.
`from nanochat.mamba_moe import create_mamba_moe` is the public entry point; nanochat/moe.py is the MoE FFN alone.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from nanochat.layers import norm
from nanochat.moe import MoE


def apply_rotary(x, pos, base=10000.0):
    """
    Rotate channel pairs (i, i + D/2) of x (B, L, D) by the angle pos * base^(-2i/D) (nanochat's
    rotary convention, here applied to the input embeddings). pos (B, L) long. Odd D: the last channel
    is left as is. The frequencies are computed on the fly, so nothing needs restoring after a load.
    """
    D = x.shape[-1]
    half = D // 2
    inv_freq = base ** (-torch.arange(half, device=x.device, dtype=torch.float32) * 2 / D)  # (D/2,)
    ang = pos.to(torch.float32)[..., None] * inv_freq  # (B, L, D/2)
    cos, sin = ang.cos(), ang.sin()
    x1, x2 = x[..., :half].float(), x[..., half:2 * half].float()
    y = torch.cat([x1 * cos + x2 * sin, x2 * cos - x1 * sin], dim=-1).to(x.dtype)
    return torch.cat([y, x[..., 2 * half:]], dim=-1)


class MambaMoELayer(nn.Module):
    def __init__(self, mixer, moe):
        super().__init__()
        self.mixer, self.moe = mixer, moe

    def forward(self, x, mask=None):
        x = x + self.mixer(norm(x), mask=mask)
        x = x + self.moe(norm(x), mask=mask)
        return x


class MambaMoEModel(nn.Module):
    """
    depth layers of [x = x + Mamba(norm(x)); x = x + MoE(norm(x))], norm = parameter-free RMSNorm,
    and a final norm. Position: the input embeddings are rotated by apply_rotary and get a learnable
    pos_emb (max_seq_len, dim) added; positions count real tokens only (pos = cumsum(mask) - 1), so
    left padding does not shift them. Padding: masked inputs are zeroed, the Mamba mixers skip them,
    the MoE does not route them, and the output there is 0; real positions are the same as without
    the padding (MoE capacity counts real tokens only).
    model(x (B, L, dim) float, mask=None) -> (B, L, dim) when vocab_size is None;
    model(idx (B, L) long, targets=None, mask=None) -> fp32 logits (B, L, V), or with targets the mean
    loss lm_loss + mean over layers of moe.router_loss (aux_loss_coef * aux + router_z_loss_coef * z,
    defaults 1e-2 and 1e-3). After each forward: self.lm_loss (with targets), self.aux_loss and
    self.z_loss (means over layers), self.router_loss.
    """

    def __init__(self, dim, depth, d_state=64, d_conv=4, expand=2, num_experts=8, expert_dim=2048, max_seq_len=2048,
                 vocab_size=None, mamba_version=1, moe_kwargs=None, mamba_kwargs=None, device=None):
        super().__init__()
        from nanochat.mamba_block import Mamba  # the mixers' modules, imported when a model is built
        from nanochat.mamba2_block import Mamba2
        if mamba_version not in (1, 2):
            raise ValueError(f"mamba_version={mamba_version}: use 1 (Mamba) or 2 (Mamba2)")
        self.config = dict(dim=dim, depth=depth, d_state=d_state, d_conv=d_conv, expand=expand, num_experts=num_experts,
                           expert_dim=expert_dim, max_seq_len=max_seq_len, vocab_size=vocab_size,
                           mamba_version=mamba_version, moe_kwargs=dict(moe_kwargs or {}), mamba_kwargs=dict(mamba_kwargs or {}))
        self.dim, self.max_seq_len, self.vocab_size = dim, max_seq_len, vocab_size
        mixer_cls = Mamba if mamba_version == 1 else Mamba2
        self.pos_emb = nn.Parameter(torch.empty(max_seq_len, dim, device=device))
        self.layers = nn.ModuleList([
            MambaMoELayer(mixer_cls(dim, d_state=d_state, d_conv=d_conv, expand=expand, layer_idx=i, device=device,
                                    **(mamba_kwargs or {})),
                          MoE(dim, num_experts, expert_dim, device=device, **(moe_kwargs or {})))
            for i in range(depth)])
        if vocab_size is not None:
            self.wte = nn.Embedding(vocab_size, dim, device=device)
            self.lm_head = nn.Linear(dim, vocab_size, bias=False, device=device)
        self.lm_loss = self.aux_loss = self.z_loss = self.router_loss = None
        self.init_weights()

    @torch.no_grad()
    def init_weights(self):
        # the Mamba mixers keep mamba-ssm's own init (their constructors); the rest as in nanochat
        nn.init.normal_(self.pos_emb, mean=0.0, std=0.02)
        for layer in self.layers:
            layer.moe.init_weights()
        if self.vocab_size is not None:
            nn.init.normal_(self.wte.weight, mean=0.0, std=1.0)
            nn.init.zeros_(self.lm_head.weight)

    def forward(self, inputs, targets=None, mask=None):
        if self.vocab_size is None:
            if not (inputs.ndim == 3 and inputs.shape[-1] == self.dim and inputs.is_floating_point()):
                raise ValueError(f"expected float embeddings (B, L, {self.dim}), got {tuple(inputs.shape)} {inputs.dtype}"
                                 " (build with vocab_size=... to feed token ids)")
            if targets is not None:
                raise ValueError("targets need a model built with vocab_size=...")
        elif inputs.ndim != 2 or inputs.is_floating_point():
            raise ValueError(f"expected token ids (B, L), got {tuple(inputs.shape)} {inputs.dtype}")
        B, L = inputs.shape[:2]
        if L > self.max_seq_len:
            raise ValueError(f"sequence length {L} > max_seq_len={self.max_seq_len}; build the model with a larger max_seq_len")
        if mask is not None and (mask.shape != (B, L) or mask.dtype != torch.bool):
            raise ValueError(f"mask must be a (B, L) = {(B, L)} bool tensor, got {tuple(mask.shape)} {mask.dtype}")

        if mask is None:
            pos = torch.arange(L, device=inputs.device).expand(B, L)
        else:
            pos = (mask.long().cumsum(dim=1) - 1).clamp(min=0)  # (B, L) index among the row's real tokens
        x = self.wte(inputs) if self.vocab_size is not None else inputs  # (B, L, D)
        x = apply_rotary(x, pos) + self.pos_emb[pos].to(x.dtype)
        if mask is not None:
            x = x.masked_fill(~mask[..., None], 0.0)  # whatever sits in the padding never enters
        for layer in self.layers:
            x = layer(x, mask=mask)
        x = norm(x)
        if mask is not None:
            x = x.masked_fill(~mask[..., None], 0.0)

        moes = [layer.moe for layer in self.layers]
        self.aux_loss = torch.stack([m.aux_loss for m in moes]).mean()
        self.z_loss = torch.stack([m.z_loss for m in moes]).mean()
        self.router_loss = torch.stack([m.router_loss for m in moes]).mean()
        if self.vocab_size is None:
            return x
        logits = self.lm_head(x).float()  # (B, L, V)
        if targets is None:
            return logits
        if mask is not None:
            targets = targets.masked_fill(~mask, -1)  # padding is never a target
        self.lm_loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        return self.lm_loss + self.router_loss


def create_mamba_moe(dim, depth, d_state=64, d_conv=4, expand=2, num_experts=8, expert_dim=2048, max_seq_len=2048,
                     vocab_size=None, mamba_version=1, device=None, moe_kwargs=None, mamba_kwargs=None):
    """
    The Mamba + MoE model (see MambaMoEModel), built on `device` (default: CUDA if available, else CPU).
    moe_kwargs go to every MoE (top_k, capacity_factor, drop_tokens, ...), mamba_kwargs to every mixer
    (e.g. headdim for mamba_version=2).
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return MambaMoEModel(dim, depth, d_state=d_state, d_conv=d_conv, expand=expand, num_experts=num_experts,
                         expert_dim=expert_dim, max_seq_len=max_seq_len, vocab_size=vocab_size,
                         mamba_version=mamba_version, moe_kwargs=moe_kwargs, mamba_kwargs=mamba_kwargs, device=device)

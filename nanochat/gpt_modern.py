"""
The dense GPT of today's nanochat (master 92d63d4, 2026), with its state_dict names, so a checkpoint its
base_train writes (model_<step>.pt + meta_<step>.json with model_config) loads strictly and gives its logits.
nanochat/gpt.py stays the Oct-2025 GPT; this is the architecture that came after, read from nanochat's
nanochat/gpt.py and nanochat/flash_attention.py:
- padded vocabulary: wte, lm_head and the value embeddings have vocab_size rounded up to a multiple of 64 rows;
  the logits are cropped back to vocab_size before the soft-cap (15)
- token smearing: after the embedding norm, position t adds smear_lambda * sigmoid(smear_gate(e_t[:24])) * e_{t-1}
  (e = the normalised embedding before smearing; the first position has no predecessor)
- per-layer scalars: before block i the residual is resid_lambdas[i] * x + x0_lambdas[i] * x0, x0 = the smeared
  embedding
- value embeddings on layers i with i % 2 == (n_layer - 1) % 2 (alternating, the last always): a (padded vocab,
  n_kv_head * head_dim) table per layer, mixed into v as v + 3 * sigmoid(ve_gate(x[..., :12])) * ve, one gate per
  KV head, x the block's normalised input
- attention: rotary (theta 100 000) then QK RMSNorm, then q and k each multiplied by 1.2; softmax scale
  1/sqrt(head_dim); sliding windows from window_pattern tiled over the layers (L = sequence_len, S = a quarter of it
  rounded up to a multiple of 128; the last layer always L). A window w lets query i see keys j with i - w <= j <= i
- backout: the residual after layer n_layer // 2 is kept, and backout_lambda times it is subtracted before the
  final norm
- Linear layers keep fp32 master weights and cast them to the activation dtype (CastLinear)
Where nanochat rounds the rotary tables to its compute dtype (bf16 on CUDA), this keeps them fp32; on the CPU
(fp32 compute) the two agree.
"""
import math
from dataclasses import dataclass, asdict

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanochat.flops import flop_table
from nanochat.layers import norm, rotary_inv_freq, rotary_cos_sin, apply_rotary_emb, attention, softcap
from nanochat.modern_layers import (ROTARY_BASE, QK_GAIN, VE_GATE_CHANNELS, SMEAR_CHANNELS, VOCAB_MULTIPLE,
                                    has_value_embeds, layer_windows, window_keep, smear, value_gate, CastLinear)

@dataclass
class ModernConfig:
    """nanochat's GPTConfig of today, field for field (its meta_<step>.json model_config)."""
    sequence_len: int = 2048
    vocab_size: int = 32768
    n_layer: int = 12
    n_head: int = 6
    n_kv_head: int = 6
    n_embd: int = 768
    window_pattern: str = "SSSL"  # tiled over the layers: L full context, S a quarter; the last layer is always L

    def __post_init__(self):
        if self.n_embd % self.n_head or self.n_head % self.n_kv_head:
            raise ValueError(f"n_embd {self.n_embd} must be a multiple of n_head {self.n_head}, and n_head of "
                             f"n_kv_head {self.n_kv_head}")
        if not self.window_pattern or set(self.window_pattern.upper()) - set("SL"):
            raise ValueError(f"window_pattern {self.window_pattern!r} may only use S and L")

    @property
    def head_dim(self):
        return self.n_embd // self.n_head

    @property
    def padded_vocab_size(self):
        return -(-self.vocab_size // VOCAB_MULTIPLE) * VOCAB_MULTIPLE

    def to_dict(self):
        return asdict(self)


class ModernAttention(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        D, hd = config.n_embd, config.head_dim
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, hd
        self.c_q = CastLinear(D, config.n_head * hd, bias=False)
        self.c_k = CastLinear(D, config.n_kv_head * hd, bias=False)
        self.c_v = CastLinear(D, config.n_kv_head * hd, bias=False)
        self.c_proj = CastLinear(D, D, bias=False)
        self.ve_gate = (CastLinear(VE_GATE_CHANNELS, config.n_kv_head, bias=False)
                        if has_value_embeds(layer_idx, config.n_layer) else None)

    def forward(self, x, ve, cos_sin, window):
        B, T, _ = x.shape
        q = self.c_q(x).view(B, T, self.n_head, self.head_dim)
        k = self.c_k(x).view(B, T, self.n_kv_head, self.head_dim)
        v = self.c_v(x).view(B, T, self.n_kv_head, self.head_dim)
        if ve is not None:
            v = v + value_gate(self.ve_gate, x).unsqueeze(-1) * ve.view(B, T, self.n_kv_head, self.head_dim)
        q, k = apply_rotary_emb(q, *cos_sin), apply_rotary_emb(k, *cos_sin)
        q, k = norm(q) * QK_GAIN, norm(k) * QK_GAIN
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, hd)
        keep = None
        if window < T - 1:  # a window shorter than the sequence: the band mask (else plain causal)
            keep = window_keep(torch.arange(T, device=x.device), T, window)
        y = attention(q, k, v, keep=keep)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, -1))


class ModernMLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = CastLinear(config.n_embd, 4 * config.n_embd, bias=False)
        self.c_proj = CastLinear(4 * config.n_embd, config.n_embd, bias=False)

    def forward(self, x):
        return self.c_proj(F.relu(self.c_fc(x)).square())


class ModernBlock(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.attn = ModernAttention(config, layer_idx)
        self.mlp = ModernMLP(config)

    def forward(self, x, ve, cos_sin, window):
        x = x + self.attn(norm(x), ve, cos_sin, window)
        return x + self.mlp(norm(x))


class ModernGPT(nn.Module):
    kind = "modern"

    def __init__(self, config):
        super().__init__()
        self.config = config
        V, D, L = config.padded_vocab_size, config.n_embd, config.n_layer
        self.windows = layer_windows(config.window_pattern, L, config.sequence_len)
        self.backout_layer = L // 2
        self.transformer = nn.ModuleDict({
            "wte": nn.Embedding(V, D),
            "h": nn.ModuleList([ModernBlock(config, i) for i in range(L)]),
        })
        self.lm_head = CastLinear(D, V, bias=False)
        self.resid_lambdas = nn.Parameter(torch.ones(L))
        self.x0_lambdas = nn.Parameter(torch.zeros(L))
        self.smear_gate = CastLinear(SMEAR_CHANNELS, 1, bias=False)
        self.smear_lambda = nn.Parameter(torch.zeros(1))
        self.backout_lambda = nn.Parameter(torch.zeros(1))
        kv_dim = config.n_kv_head * config.head_dim
        self.value_embeds = nn.ModuleDict({str(i): nn.Embedding(V, kv_dim) for i in range(L) if has_value_embeds(i, L)})
        # NOTE: under a meta-device context these are placeholders until init_buffers() runs
        self.rotary_seq_len = config.sequence_len * 10
        self.register_buffer("cos", torch.empty(1, self.rotary_seq_len, 1, config.head_dim // 2), persistent=False)
        self.register_buffer("sin", torch.empty(1, self.rotary_seq_len, 1, config.head_dim // 2), persistent=False)
        if self.lm_head.weight.device.type != "meta":
            self.init_buffers()

    def init_buffers(self):
        device = self.lm_head.weight.device
        inv_freq = rotary_inv_freq(self.config.head_dim, base=ROTARY_BASE, device=device)
        self.cos, self.sin = rotary_cos_sin(self.rotary_seq_len, inv_freq, dtype=torch.float32)

    @torch.no_grad()
    def init_weights(self):
        """nanochat's init of today, in one place: uniform matrices of std 1/sqrt(n_embd) (the MLP's input 0.4x of
        that), zero output projections, a small head, per-layer scalars decaying with depth, gates slightly open."""
        D, L = self.config.n_embd, self.config.n_layer
        bound = math.sqrt(3.0 / D)  # uniform(-b, b) has std b / sqrt(3)
        nn.init.normal_(self.transformer.wte.weight, std=0.8)
        nn.init.normal_(self.lm_head.weight, std=0.001)
        for block in self.transformer.h:
            for lin in (block.attn.c_q, block.attn.c_k, block.attn.c_v):
                nn.init.uniform_(lin.weight, -bound, bound)
            nn.init.uniform_(block.mlp.c_fc.weight, -0.4 * bound, 0.4 * bound)
            nn.init.zeros_(block.attn.c_proj.weight)
            nn.init.zeros_(block.mlp.c_proj.weight)
            if block.attn.ve_gate is not None:
                nn.init.uniform_(block.attn.ve_gate.weight, 0.0, 0.02)
        depth = torch.arange(L, dtype=torch.float32) / max(L - 1, 1)
        self.resid_lambdas.copy_(1.15 - 0.10 * depth)  # a stronger residual early
        self.x0_lambdas.copy_(0.20 - 0.15 * depth)     # more of the embedding early
        nn.init.zeros_(self.smear_lambda)
        nn.init.constant_(self.backout_lambda, 0.2)
        nn.init.uniform_(self.smear_gate.weight, 0.0, 0.02)
        for table in self.value_embeds.values():
            nn.init.uniform_(table.weight, -bound, bound)
        self.init_buffers()
        if self.lm_head.weight.device.type == "cuda":  # as nanochat: the embeddings live in the compute dtype
            self.transformer.wte.to(dtype=torch.bfloat16)
            self.value_embeds.to(dtype=torch.bfloat16)

    def get_device(self):
        return self.lm_head.weight.device

    def num_params(self):
        return sum(p.numel() for p in self.parameters())

    def param_kind(self, name, p):
        """Optimizer groups (optim.classify_params): value-embedding tables are embeddings (AdamW), the smear
        gate a scalar-like parameter; the rest by the default rule."""
        if name.startswith("value_embeds."):
            return "embedding"
        if name.startswith("smear_gate."):
            return "scalar"
        return None

    def forward(self, idx, targets=None, loss_reduction="mean"):
        B, T = idx.shape
        if T > self.rotary_seq_len:
            raise ValueError(f"sequence of {T} tokens exceeds the rotary table ({self.rotary_seq_len})")
        cos_sin = self.cos[:, :T], self.sin[:, :T]
        x = smear(norm(self.transformer.wte(idx)), self.smear_gate, self.smear_lambda)
        x0, x_mid = x, None
        for i, block in enumerate(self.transformer.h):
            x = self.resid_lambdas[i] * x + self.x0_lambdas[i] * x0
            ve = self.value_embeds[str(i)](idx).to(x.dtype) if str(i) in self.value_embeds else None
            x = block(x, ve, cos_sin, self.windows[i])
            if i == self.backout_layer:
                x_mid = x
        x = norm(x - self.backout_lambda.to(x.dtype) * x_mid)
        logits = softcap(self.lm_head(x)[..., :self.config.vocab_size])
        if targets is None:
            return logits
        return F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1,
                               reduction=loss_reduction)

    # FLOPs: nanochat/flops.py's table (all blocks attention + MLP; windows are not yet counted there)
    def forward_flops_per_token(self, context_len):
        return flop_table(self).forward(context_len)

    def estimate_flops(self):
        return flop_table(self).training()

"""
The dense GPT, architecturally identical to nanochat's Oct-2025 release (nanochat-d32), with the
same state_dict names, so its checkpoints load strictly and give the same logits:
- token embedding `transformer.wte` (stored in bf16 by nanochat), no positional embedding
- parameter-free RMSNorm after the embedding, before every sublayer and before the head
- rotary embeddings (theta 10 000, half-split layout: dim i pairs with dim i + head_dim/2),
  cos/sin rounded to bf16 as nanochat does; rotary first, then QK RMSNorm
- GQA through n_kv_head; ReLU^2 MLP of 4x width; no biases anywhere
- untied `lm_head`, logits soft-capped at 15 and returned in fp32

Today's nanochat checkpoints (value embeddings, residual/x0 lambdas, smear, backout, sliding windows) load as
nanochat/gpt_modern.py's ModernGPT (their model_config has window_pattern); a checkpoint with such keys but an
Oct-2025 model_config is refused with a message naming what it found.
"""
from dataclasses import dataclass, asdict

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanochat.flops import flop_table
from nanochat.layers import (norm, rotary_inv_freq, rotary_cos_sin, apply_rotary_emb, attention, softcap,
                             linear_init_std, sample_next_token)


@dataclass
class GPTConfig:
    sequence_len: int = 1024
    vocab_size: int = 50304
    n_layer: int = 12
    n_head: int = 6      # query heads
    n_kv_head: int = 6   # key/value heads (GQA when < n_head)
    n_embd: int = 768

    def to_dict(self):
        return asdict(self)

    @classmethod
    def from_depth(cls, depth, vocab_size=65536, sequence_len=2048):
        """nanochat's depth dial: width 64 * depth, heads of 128 (at least one), as many KV heads."""
        n_embd = 64 * depth
        n_head = max(1, (n_embd + 127) // 128)
        return cls(sequence_len=sequence_len, vocab_size=vocab_size, n_layer=depth, n_head=n_head, n_kv_head=n_head,
                   n_embd=n_embd)


class KVCache:
    """
    Preallocated K/V for every attention layer: (B, H_kv, T_max, D) per layer.
    `pos` counts tokens already stored; insert() appends and returns the full view so far.
    """

    def __init__(self, batch_size, n_kv_head, head_dim, seq_len, n_layer, device=None, dtype=torch.float32):
        self.k = [torch.zeros(batch_size, n_kv_head, seq_len, head_dim, device=device, dtype=dtype) for _ in range(n_layer)]
        self.v = [torch.zeros_like(t) for t in self.k]
        self.pos = 0
        self.max_len = seq_len

    def insert(self, layer, k, v):
        T = k.size(2)
        end = self.pos + T
        if end > self.max_len:
            raise RuntimeError(f"KV cache full: {end} tokens > capacity {self.max_len}")
        self.k[layer][:, :, self.pos:end] = k
        self.v[layer][:, :, self.pos:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def advance(self, T):
        self.pos += T


class CausalSelfAttention(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head = config.n_head
        self.n_kv_head = config.n_kv_head
        self.n_embd = config.n_embd
        self.head_dim = config.n_embd // config.n_head
        if config.n_embd % config.n_head != 0:
            raise ValueError(f"n_embd {config.n_embd} is not a multiple of n_head {config.n_head}")
        if config.n_head % config.n_kv_head != 0:
            raise ValueError(f"n_head {config.n_head} is not a multiple of n_kv_head {config.n_kv_head}")
        self.c_q = nn.Linear(self.n_embd, self.n_head * self.head_dim, bias=False)
        self.c_k = nn.Linear(self.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.c_v = nn.Linear(self.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.c_proj = nn.Linear(self.n_embd, self.n_embd, bias=False)

    def forward(self, x, cos_sin, kv_cache=None):
        B, T, _ = x.shape
        q = self.c_q(x).view(B, T, self.n_head, self.head_dim)
        k = self.c_k(x).view(B, T, self.n_kv_head, self.head_dim)
        v = self.c_v(x).view(B, T, self.n_kv_head, self.head_dim)
        cos, sin = cos_sin
        q, k = apply_rotary_emb(q, cos, sin), apply_rotary_emb(k, cos, sin)
        q, k = norm(q), norm(k)  # QK norm, after rotary (nanochat's order)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, D)
        if kv_cache is not None:
            k, v = kv_cache.insert(self.layer_idx, k, v)
        y = attention(q, k, v)
        y = y.transpose(1, 2).contiguous().view(B, T, -1)
        return self.c_proj(y)


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=False)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=False)

    def forward(self, x):
        return self.c_proj(F.relu(self.c_fc(x)).square())


class Block(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.attn = CausalSelfAttention(config, layer_idx)
        self.mlp = MLP(config)

    def forward(self, x, cos_sin, kv_cache=None):
        x = x + self.attn(norm(x), cos_sin, kv_cache)
        x = x + self.mlp(norm(x))
        return x


class GPT(nn.Module):
    kind = "gpt"

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict({
            "wte": nn.Embedding(config.vocab_size, config.n_embd),
            "h": nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
        })
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # Rotary tables are buffers that are never saved; init_buffers() computes them for real.
        # NOTE: under a meta-device context these are placeholders until init_buffers() runs.
        self.rotary_seq_len = config.sequence_len * 10
        self.register_buffer("cos", torch.empty(1, self.rotary_seq_len, 1, self.head_dim // 2), persistent=False)
        self.register_buffer("sin", torch.empty(1, self.rotary_seq_len, 1, self.head_dim // 2), persistent=False)
        if self.lm_head.weight.device.type != "meta":
            self.init_buffers()

    @property
    def head_dim(self):
        return self.config.n_embd // self.config.n_head

    def init_buffers(self):
        """(Re)compute the rotary tables on the model's device; must run after loading from meta."""
        device = self.lm_head.weight.device
        cos, sin = rotary_cos_sin(self.rotary_seq_len, rotary_inv_freq(self.head_dim, device=device))
        self.cos, self.sin = cos, sin

    def init_weights(self):
        """Fresh initialisation, nanochat's recipe: output projections and the head start at zero."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=linear_init_std(*module.weight.shape))
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, std=1.0)
        nn.init.zeros_(self.lm_head.weight)
        for block in self.transformer.h:
            nn.init.zeros_(block.attn.c_proj.weight)
            nn.init.zeros_(block.mlp.c_proj.weight)
        self.init_buffers()
        if self.transformer.wte.weight.device.type == "cuda":
            self.transformer.wte.to(dtype=torch.bfloat16)  # as nanochat: saves memory, optimizer tolerates it

    def get_device(self):
        return self.lm_head.weight.device

    def forward(self, idx, targets=None, kv_cache=None, loss_reduction="mean"):
        B, T = idx.shape
        T0 = 0 if kv_cache is None else kv_cache.pos
        if T0 + T > self.rotary_seq_len:
            raise ValueError(f"sequence of {T0 + T} tokens exceeds the rotary table ({self.rotary_seq_len})")
        cos_sin = self.cos[:, T0:T0 + T], self.sin[:, T0:T0 + T]
        x = norm(self.transformer.wte(idx))
        for block in self.transformer.h:
            x = block(x, cos_sin, kv_cache)
        if kv_cache is not None:
            kv_cache.advance(T)
        x = norm(x)
        logits = self.lm_head(x.to(self.lm_head.weight.dtype))
        logits = softcap(logits)
        if targets is None:
            return logits
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1),
                               ignore_index=-1, reduction=loss_reduction)

    def new_kv_cache(self, batch_size, seq_len, dtype=None):
        c = self.config
        dtype = dtype or self.lm_head.weight.dtype
        return KVCache(batch_size, c.n_kv_head, self.head_dim, seq_len, c.n_layer, device=self.get_device(), dtype=dtype)

    def num_params(self):
        return sum(p.numel() for p in self.parameters())

    # FLOPs: nanochat/flops.py holds the one table and its convention (this GPT is its all-attention case)
    def forward_flops_per_token(self, context_len):
        return flop_table(self).forward(context_len)

    def estimate_flops(self):
        return flop_table(self).training()

    @torch.inference_mode()
    def generate(self, tokens, max_tokens, temperature=1.0, top_k=None, seed=42):
        """Greedy/sampled continuation of one prompt (list of ids), yielding ids; uses the KV cache."""
        device = self.get_device()
        rng = torch.Generator(device=device).manual_seed(seed) if temperature > 0 else None
        cache = self.new_kv_cache(1, len(tokens) + max_tokens, dtype=torch.float32)
        ids = torch.tensor([tokens], dtype=torch.long, device=device)
        logits = self.forward(ids, kv_cache=cache)[:, -1]
        for _ in range(max_tokens):
            nxt = sample_next_token(logits, rng, temperature, top_k)
            yield nxt.item()
            logits = self.forward(nxt.view(1, 1), kv_cache=cache)[:, -1]


# -----------------------------------------------------------------------------
# Recognising nanochat checkpoint layouts

# key fragments of nanochat releases newer than Oct 2025 that this GPT does not implement
_NEWER_NANOCHAT_FEATURES = {
    "value_embeds": "value embeddings",
    "ve_gate": "value-embedding gates",
    "resid_lambdas": "residual lambdas",
    "x0_lambdas": "x0 (embedding skip) lambdas",
    "smear": "token smearing",
    "backout": "backout",
}


def check_nanochat_state_dict(state_dict, meta_model_config=None):
    """Raise a clear error if a nanochat state_dict uses features this GPT does not implement."""
    found = sorted({desc for key in state_dict for frag, desc in _NEWER_NANOCHAT_FEATURES.items() if frag in key})
    cfg = meta_model_config or {}
    window_pattern = str(cfg.get("window_pattern") or "L")
    if set(window_pattern) - {"L"} or cfg.get("sliding_window") not in (None, 0):
        found.append("sliding-window attention")
    if found:
        raise ValueError(
            "this checkpoint has features newer than the Oct-2025 nanochat GPT but its model_config has no "
            f"window_pattern, which today's nanochat writes (those load as kind 'modern', nanochat/gpt_modern.py); "
            f"features found: {', '.join(found)}. Use an Oct-2025 checkpoint such as karpathy/nanochat-d32, or one "
            "written by today's nanochat with its meta as written."
        )
    unknown = set(cfg) - set(GPTConfig.__dataclass_fields__) - {"window_pattern"}
    if unknown:
        raise ValueError(f"nanochat model_config has fields this GPT does not know: {sorted(unknown)}")

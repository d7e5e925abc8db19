"""
Matryoshka widths: the nested sub-models a HybridGPT can run.

A *width level* is a residual width w (a multiple of head_dim) at which an attention or FFN block
can run: it reads the first w channels of its normalised input, uses the first w/head_dim query
heads (and the KV heads those need under GQA) or the first hidden*w/n_embd MLP/expert units, and
writes only the first w channels of the residual. Mamba mixers always run at full width.

A *width plan* is one width per block. The helpers below build, check and sample plans;
MatryoshkaAttention and MatryoshkaMLP (at the end) are the sliceable sublayers HybridGPT's blocks use.
"""
import math
import random
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanochat import decode_matvec
from nanochat.layers import norm, apply_rotary_emb, attention
from nanochat.modern_layers import VE_GATE_CHANNELS, VE_GATE_RANGE



@dataclass(frozen=True)
class Mode:
    """A named compute mode: one width for every block (snapped down to the model's levels; None = full width) or
    the width predictor's plan (`predicted`), and the exit gates' thresholds on the calibrated probability that
    exiting is safe: exit above exit_threshold, widen the rest of the token below expand_threshold (1.0 / 0.0 =
    off). Explicit thresholds given to the engine replace these defaults."""
    width: int = None
    predicted: bool = False
    exit_threshold: float = 1.0
    expand_threshold: float = 0.0


# the compute modes, cheapest first; every script and the engine read them from here
MODES = {
    "ghost": Mode(width=128),
    "whisper": Mode(width=512),
    "normal": Mode(width=1024),
    "think": Mode(width=None),
    "auto": Mode(predicted=True, exit_threshold=0.95, expand_threshold=0.5),
}


def default_width_levels(n_embd, head_dim, smallest=128):
    """
    Doubling widths from the first multiple of head_dim that is >= min(smallest, n_embd), plus the full
    width. With head_dim 128 and n_embd 2048: [128, 256, 512, 1024, 2048].
    """
    start = head_dim * math.ceil(min(smallest, n_embd) / head_dim)
    levels = []
    w = start
    while w < n_embd:
        levels.append(w)
        w *= 2
    levels.append(n_embd)
    return levels


def validate_levels(levels, n_embd, head_dim):
    if not levels:
        raise ValueError("width_levels is empty")
    if sorted(set(levels)) != list(levels):
        raise ValueError(f"width_levels must be strictly increasing: {levels}")
    bad = [w for w in levels if w % head_dim != 0 or w <= 0 or w > n_embd]
    if bad:
        raise ValueError(f"width levels {bad} are impossible: each must be a positive multiple of head_dim={head_dim} and <= n_embd={n_embd}")
    if levels[-1] != n_embd:
        raise ValueError(f"the last width level must be the full width {n_embd}, got {levels[-1]}")


def expand_plan(width, n_blocks, n_embd):
    """None -> full everywhere; int -> the same width everywhere; sequence -> checked length."""
    if width is None:
        return [n_embd] * n_blocks
    if isinstance(width, int):
        return [width] * n_blocks
    plan = [int(w) for w in width]
    if len(plan) != n_blocks:
        raise ValueError(f"width plan has {len(plan)} entries but the model has {n_blocks} blocks")
    return plan


def check_plan(plan, n_embd, head_dim):
    for i, w in enumerate(plan):
        if w <= 0 or w > n_embd or w % head_dim != 0:
            raise ValueError(f"block {i}: width {w} is impossible (must be a multiple of head_dim={head_dim} in (0, {n_embd}])")


def snap_to_level(width, levels):
    """The largest level <= width (the smallest level if width is below all of them)."""
    if width is None:
        return levels[-1]
    below = [w for w in levels if w <= width]
    return below[-1] if below else levels[0]


def mode_plan(mode, levels, n_blocks):
    """The fixed plan of a named compute mode, snapped to the model's levels (a predicted mode has none)."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose from {tuple(MODES)}")
    if MODES[mode].predicted:
        raise ValueError(f"mode {mode!r} takes its plan from the width predictor, not a fixed width")
    return [snap_to_level(MODES[mode].width, levels)] * n_blocks


def sample_plans(levels, n_blocks, rng, n_random=1, per_block=True):
    """
    MatFormer's sandwich rule: the full plan, the smallest plan, and n_random random plans
    (each block its own random level if per_block, else one random level for all).
    """
    plans = [[levels[-1]] * n_blocks]
    if len(levels) > 1:
        plans.append([levels[0]] * n_blocks)
    for _ in range(n_random):
        if per_block:
            plans.append([rng.choice(levels) for _ in range(n_blocks)])
        else:
            plans.append([rng.choice(levels)] * n_blocks)
    return plans


def plan_rng(seed):
    return random.Random(seed)


# -----------------------------------------------------------------------------
# The sliceable sublayers

def heads_at(w, head_dim, n_head, n_kv_head):
    """(query heads, KV heads) an attention block of n_head / n_kv_head heads of head_dim uses at width w:
    the first w // head_dim query heads and the KV heads their groups read."""
    h = w // head_dim
    return h, -(-h // (n_head // n_kv_head))


class MatryoshkaAttention(nn.Module):
    """nanochat attention (rotary, QK norm, GQA) whose heads can be sliced to a width prefix."""

    def __init__(self, config, layer_idx):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        self.scale = config.softmax_scale
        D = config.n_embd
        self.c_q = nn.Linear(D, self.n_head * self.head_dim, bias=False)
        self.c_k = nn.Linear(D, self.n_kv_head * self.head_dim, bias=False)
        self.c_v = nn.Linear(D, self.n_kv_head * self.head_dim, bias=False)
        self.c_proj = nn.Linear(self.n_head * self.head_dim, D, bias=False)
        # today's nanochat: a value embedding mixed into v by a per-KV-head gate (nanochat/hybrid_modern.py)
        self.value_embed = self.ve_gate = None
        if layer_idx in getattr(config, "ve_blocks", ()):
            self.value_embed = nn.Embedding(config.vocab_size, self.n_kv_head * self.head_dim)
            self.ve_gate = nn.Linear(VE_GATE_CHANNELS, self.n_kv_head, bias=False)

    def mix_value_embed(self, v, xn, ids, a, b):
        """v (B, T, b - a, hd) of KV heads a..b-1 plus their gated value embeddings of tokens ids (B, T); xn the
        normalised input (the gate reads its first channels). No value embeddings: v as it is."""
        if self.value_embed is None:
            return v
        if ids is None:
            raise ValueError("this attention block mixes value embeddings into v: its K/V need the token ids")
        hd = self.head_dim
        ve = F.embedding(ids, self.value_embed.weight[:, a * hd:b * hd]).view(*ids.shape, b - a, hd)
        gate = VE_GATE_RANGE * torch.sigmoid(F.linear(xn[..., :VE_GATE_CHANNELS], self.ve_gate.weight[a:b]))
        return v + gate.unsqueeze(-1).to(v.dtype) * ve.to(v.dtype)

    def heads_at(self, w):
        """(query heads, kv heads) used at width w."""
        return heads_at(w, self.head_dim, self.n_head, self.n_kv_head)

    def project_kv(self, xn, w, cos_sin, ids=None):
        """K, V (B, Hkv_w, T, hd) of the normalised input xn (B, T, >=w) at width w (ids: the tokens, for value
        embeddings)."""
        B, T, _ = xn.shape
        _, hkv = self.heads_at(w)
        x = xn[..., :w]
        k = decode_matvec.linear(x, self.c_k.weight[:hkv * self.head_dim, :w]).view(B, T, hkv, self.head_dim)
        v = decode_matvec.linear(x, self.c_v.weight[:hkv * self.head_dim, :w]).view(B, T, hkv, self.head_dim)
        v = self.mix_value_embed(v, x, ids, 0, hkv)
        k = norm(apply_rotary_emb(k, *cos_sin))
        return k.transpose(1, 2), v.transpose(1, 2)

    def lacked_kv(self, xn, a, need, cos_sin, ids=None):
        """K, V heads a..need-1 (B, need - a, T, hd) of the normalised input xn (B, T, n_embd) at full width: what a
        position stored at a narrower width lacks when a wider query reads it (the rule is in hybrid_gpt's
        module docstring)."""
        B, T, _ = xn.shape
        hd = self.head_dim
        k = decode_matvec.linear(xn, self.c_k.weight[a * hd:need * hd]).view(B, T, need - a, hd)
        v = self.mix_value_embed(decode_matvec.linear(xn, self.c_v.weight[a * hd:need * hd]).view(B, T, need - a, hd), xn, ids, a, need)
        k = norm(apply_rotary_emb(k, *cos_sin))
        return k.transpose(1, 2), v.transpose(1, 2)

    def kv_to_store(self, xn, w, cos_sin, all_heads, ids=None):
        """K, V (B, heads, T, hd) a cache stores for xn (B, T, n_embd) run at width w: its own heads, and with
        all_heads the heads it lacks too (lacked_kv), so that a wider query never waits for a fill."""
        k, v = self.project_kv(xn, w, cos_sin, ids)
        if all_heads and k.size(1) < self.n_kv_head:
            kl, vl = self.lacked_kv(xn, k.size(1), self.n_kv_head, cos_sin, ids)
            k, v = torch.cat([k, kl], 1), torch.cat([v, vl], 1)
        return k, v

    def query_attend(self, xn, w, cos_sin, k, v, keep=None):
        """
        The query side at width w: the queries of xn (B, T, >=w) over k, v (B, hkv_w, Tk, hd) (a cached prefix
        allowed), then the output projection; returns (B, T, w). keep: layers.attention's mask, if any.
        """
        B, T, _ = xn.shape
        h, _ = self.heads_at(w)
        hd = self.head_dim
        q = decode_matvec.linear(xn[..., :w], self.c_q.weight[:h * hd, :w]).view(B, T, h, hd)
        q = norm(apply_rotary_emb(q, *cos_sin)).transpose(1, 2)  # (B, h, T, hd)
        if h % k.size(1) != 0:
            # a width whose query heads do not fill whole GQA groups: give each query head its KV head
            group = self.n_head // self.n_kv_head
            k = k.repeat_interleave(group, dim=1)[:, :h]
            v = v.repeat_interleave(group, dim=1)[:, :h]
        y = attention(q, k, v, scale=self.scale, keep=keep)  # a cache may hold fp32: attention() casts
        return decode_matvec.linear(y.transpose(1, 2).reshape(B, T, h * hd), self.c_proj.weight[:w, :h * hd])

    def forward(self, xn, w, cos_sin, kv_cache=None, ids=None, keep=None):
        """xn: (B, T, n_embd) normalised input; returns (B, T, w). ids: the tokens (value embeddings); keep: a
        window's mask (layers.attention's)."""
        k, v = self.project_kv(xn, w, cos_sin, ids)
        if kv_cache is not None:
            k, v = kv_cache.insert(self.layer_idx, k, v)
        return self.query_attend(xn, w, cos_sin, k, v, keep=keep)

    def forward_per_token(self, xn, widths, cos_sin, ids=None, keep=None):
        """
        xn: (B, T, n_embd) normalised input; widths: (B, T) long, each token's width. Returns (B, T, n_embd)
        (zero beyond each token's width). K/V of a position: its own width's heads at that width, the heads it
        lacks at full width (the rule is in hybrid_gpt's module docstring). A reference path: every level present
        runs over every token and the results are selected, so it costs levels x the static one.
        """
        B, T, D = xn.shape
        levels = sorted(widths.unique().tolist())
        k, v = self.project_kv(xn, D, cos_sin, ids)  # (B, Hkv, T, hd): every head at full width
        for w in levels:
            if w == D:
                continue
            _, hkv = self.heads_at(w)
            kw, vw = self.project_kv(xn, w, cos_sin, ids)  # (B, hkv, T, hd)
            own = (widths == w)[:, None, :, None]  # (B, 1, T, 1) positions whose own width is w
            k = torch.cat([torch.where(own, kw, k[:, :hkv]), k[:, hkv:]], dim=1)
            v = torch.cat([torch.where(own, vw, v[:, :hkv]), v[:, hkv:]], dim=1)
        y = xn.new_zeros(B, T, D)
        for w in levels:
            _, hkv = self.heads_at(w)
            yw = F.pad(self.query_attend(xn, w, cos_sin, k[:, :hkv], v[:, :hkv], keep=keep), (0, D - w))
            y = torch.where((widths == w).unsqueeze(-1), yw, y)
        return y


class MatryoshkaMLP(nn.Module):
    """nanochat's ReLU^2 MLP whose hidden units and channels can be sliced to a prefix."""

    def __init__(self, config):
        super().__init__()
        self.hidden = config.mlp_hidden
        self.n_embd = config.n_embd
        self.c_fc = nn.Linear(config.n_embd, self.hidden, bias=False)
        self.c_proj = nn.Linear(self.hidden, config.n_embd, bias=False)

    def forward(self, x, w):
        """x: (B, T, w) -> (B, T, w)."""
        hw = self.hidden * w // self.n_embd
        h = decode_matvec.linear(x, self.c_fc.weight[:hw, :w], "relu2")
        return decode_matvec.linear(h, self.c_proj.weight[:w, :hw])

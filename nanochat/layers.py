"""
Layers shared by the dense GPT and the hybrid model: parameter-free RMSNorm, rotary tables and their
application, causal (GQA) attention and the single-query attention of the static decode step, the logit
soft-cap, nanochat's linear-init rule and next-token sampling. Every model module imports these from here;
nanochat/gpt.py holds the nanochat-compatible GPT alone.
"""
import math
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch.nn.attention import sdpa_kernel, SDPBackend

from nanochat import decode_attention

LOGIT_SOFTCAP = 15.0
ROTARY_BASE = 10000.0


def norm(x):
    # parameter-free RMSNorm over the last dimension (nanochat's only norm)
    return F.rms_norm(x, (x.size(-1),))


def rotary_inv_freq(head_dim, base=ROTARY_BASE, device=None):
    """Inverse frequencies for the head_dim/2 rotary pairs, fp32."""
    channel = torch.arange(0, head_dim, 2, dtype=torch.float32, device=device)
    return 1.0 / (base ** (channel / head_dim))


def rotary_cos_sin(seq_len, inv_freq, dtype=torch.bfloat16):
    """cos/sin tables of shape (1, T, 1, head_dim/2), rounded to bf16 like the Oct-2025 nanochat (dtype)."""
    t = torch.arange(seq_len, dtype=torch.float32, device=inv_freq.device)
    freqs = torch.outer(t, inv_freq)
    cos, sin = freqs.cos().to(dtype), freqs.sin().to(dtype)
    return cos[None, :, None, :], sin[None, :, None, :]


def apply_rotary_emb(x, cos, sin):
    # x: (B, T, H, D); dim i is rotated together with dim i + D/2 (half-split layout)
    assert x.ndim == 4
    d = x.shape[3] // 2
    x1, x2 = x[..., :d], x[..., d:]
    y1 = x1 * cos + x2 * sin
    y2 = x1 * (-sin) + x2 * cos
    return torch.cat([y1, y2], 3).to(x.dtype)


_NO_CUDNN = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
# Masked attention of at most this many queries a row (a decode step's one, a speculative verify pass's k + 1)
# runs as decode_attention.masked_attention: two batched matrix products with an fp32 softmax between them. Not
# SDPA: with a mask only its memory-efficient kernel runs, and at batch 1 it streams the whole key buffer through
# one block per head (10 blocks on 132 SMs at d20): 1.28 ms a call for one query at 32K keys on the H100, and 49 us
# for a verify pass's 5 queries at 1K keys (0.69 ms of a d20 round; docs/benchmarks.md, session 26), while the
# matrix products run at memory bandwidth.
FEW_QUERIES = 16


def softcap(logits):
    """nanochat's logit soft-cap, in fp32: LOGIT_SOFTCAP * tanh(logits / LOGIT_SOFTCAP)."""
    return LOGIT_SOFTCAP * torch.tanh(logits.float() / LOGIT_SOFTCAP)


def attention(q, k, v, scale=None, keep=None):
    """
    Causal attention of q (B, Hq, Tq, D) over k, v (B, Hkv, Tk, D), GQA allowed; scale None = 1/sqrt(D).
    The first Tk - Tq keys are a cached prefix every query may see; within the new chunk it is causal.
    keep: a bool mask broadcastable to (B, Hq, Tq, Tk), True = may see, replacing that rule (the engine's
    static decode step: a key buffer of fixed size, valid up to a position held on the device).
    k and v may be in another dtype than q (an fp32 cache under bf16 autocast); the output is in q's.
    With keep and at most FEW_QUERIES queries (decode steps, the verify pass): decode_attention.masked_attention
    (FEW_QUERIES says why), or its split-key Triton kernel where decode_attention.PATH is 'triton' and it can
    (decode_attention.usable), or decode_attention.reduced_attention where PATH is 'reduce' and torch.compile
    traces the call; with more, SDPA with the mask.
    """
    Tq, Tk = q.size(2), k.size(2)
    if decode_attention.usable(q, k, v, keep):  # opted in, CUDA, a few queries a KV head, no gradient
        return decode_attention.attend(q, k, v, scale, keep)
    if keep is not None and Tq <= FEW_QUERIES:  # a decode step, a verify pass
        if decode_attention.PATH == "reduce" and torch.compiler.is_compiling():
            return decode_attention.reduced_attention(q, k, v, scale, keep)
        return decode_attention.masked_attention(q, k, v, scale, keep)
    k, v = k.to(q.dtype), v.to(q.dtype)
    gqa = q.size(1) != k.size(1)
    if Tq == Tk and keep is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa, scale=scale)
    # With a cached prefix the key length changes every call, and cuDNN's SDPA backend builds a new plan for
    # each new shape: 3.3 ms of host time per call at batch-1 decode (torch 2.11, H100; 20 layers made a d20
    # decode step 90 ms). The other backends have no per-shape setup. (CUDA only: the CPU's choice is kept.)
    with sdpa_kernel(_NO_CUDNN) if q.is_cuda else nullcontext():
        if keep is not None:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=keep, enable_gqa=gqa, scale=scale)
        if Tq == 1:
            return F.scaled_dot_product_attention(q, k, v, is_causal=False, enable_gqa=gqa, scale=scale)
        prefix = Tk - Tq
        mask = torch.ones(Tq, Tk, dtype=torch.bool, device=q.device).tril(diagonal=prefix)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa, scale=scale)


def linear_init_std(fan_out, fan_in):
    # nanochat's rule (arXiv 2310.17813): 1/sqrt(fan_in), shrunk for matrices wider than tall
    return 1.0 / math.sqrt(fan_in) * min(1.0, math.sqrt(fan_out / fan_in))


def token_probs(logits, temperature=1.0, top_k=None):
    """logits (B, V) -> the sampling distribution (B, V) fp32 at temperature > 0, restricted to the top_k logits."""
    logits = logits.float()
    if top_k is not None:
        v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
        logits = logits.masked_fill(logits < v[:, [-1]], -float("inf"))
    return F.softmax(logits / temperature, dim=-1)


def sample_next_token(logits, rng, temperature=1.0, top_k=None):
    """logits (B, V) -> (B,) token ids; temperature 0 is argmax."""
    if temperature == 0.0:
        return logits.argmax(dim=-1)
    return torch.multinomial(token_probs(logits, temperature, top_k), num_samples=1, generator=rng).squeeze(-1)

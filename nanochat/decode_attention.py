"""
Attention of a few queries over a long key buffer with a mask (the engine's static decode step and the
speculative verify pass), split over the keys: flash-decoding, as a Triton kernel, beside `masked_attention`, its
plain PyTorch reference. The kernel is opt-in (PATH below; measured slower, see there): by default layers.attention
keeps PyTorch's paths (this reference for up to layers.FEW_QUERIES queries, as broadcast sums when compiled; SDPA
with the mask for more), which compute the same function.

Why: batch-1 decode has one query per head. The reference's two batched matrix-vector products, under
torch.compile, give a head's keys to one program: ten programs at d20 on a 132-SM H100, which read K and V at
0.4 TB/s (0.27 ms of a 1.9 ms step at 1K keys; docs/benchmarks.md, session 23). Here every (row, KV head, chunk of
keys) is a program: each streams its chunk once for all the queries of its KV head (a GQA group, the T positions of
a verify pass), keeps an online softmax in fp32 and writes its partial maximum, sum and weighted values; a few
PyTorch ops (which inductor fuses) combine the chunks. A block of keys the mask hides entirely is not read, so a
key bucket's unwritten tail costs nothing.

Numerics: scores and the weighted sum in fp32 (bf16 x bf16 products are exact in fp32 and the tensor cores add
them in fp32; with fp32 inputs the products are IEEE fp32, no TF32), as the reference: only the order of the
additions differs. tests/test_decode_attention.py compares the two (Triton's interpreter on the CPU, the
kernel on CUDA) and compiles the kernel for sm_90 with the argument types eager launches and inductor pass.

PATH: "reduce" (the default, below), "torch" (the reference paths everywhere) or "triton" (the kernel on CUDA where
Triton imports, for calls usable() accepts). Set by the environment variable ADAMBA_DECODE_ATTENTION (read on import)
or set_path() (bench decode's --attention-path), before an Engine compiles or captures a step: a captured graph
keeps its path. The kernel stays opt-in: on the H100, tuned think with it was slower than with the PyTorch path
at 1K, 8K and 32K keys (1.94 / 2.46 / 4.47 against 1.81 / 2.36 / 3.76 ms a token; docs/benchmarks.md, session 26).
"reduce": reduced_attention (the reference's function as broadcast products and sums) in compiled steps, the
reference in eager ones. Why: a session-27 trace of the verify pass (5 queries) found inductor's matrix products
there reading fp32 copies of K and V (about 45 us a block at 1K keys; think's one-query products become
reductions that convert in registers). Alone on an H100 (session 29, in a CUDA graph, d20 shapes) a 5-query call
took 27 us with it against 38 for the reference at 1K keys, and 103 against 373 at 8K; one query about the same.
End to end (session 30, one H200, two calls in a row, tuned d20 at 1K, exit:10, k = 4): speculation 1.24 ms a
token against 1.36 with "torch" (verify pass 2.86 against 3.14 ms), think's generate 2.17 against 2.23: the default
since then.
"""
import math

import torch

from nanochat.common import get_logger, kernel_path_from_env, load_triton, log_once, set_kernel_path

logger = get_logger(__name__)

PATHS = ("torch", "triton", "reduce")
PATH = kernel_path_from_env("ADAMBA_DECODE_ATTENTION", PATHS, default="reduce")
MAX_ROWS = 64    # queries a KV head (GQA group x positions) the kernel takes; more go to layers.attention's paths
BLOCK_N = 64     # keys a program step reads
BF16_DOT = True  # bf16 q and k: their products on the tensor cores (exact in fp32); False: converted to fp32 first
ON_CPU = False   # tests only: take CPU tensors too (Triton's interpreter, TRITON_INTERPRET=1, runs the kernel there)


def masked_attention(q, k, v, scale, keep, sums=False):
    """
    The reference: q (B, Hq, T, D) over k, v (B, Hkv, L, D) with keep broadcastable to (B, Hq, T, L) (True =
    may see; at least one True per query), GQA: query head i reads KV head i // (Hq // Hkv): two batched
    matrix products with an fp32 softmax between them, in fp32; returns (B, Hq, T, D) in q's dtype. With one query
    it is the decode step's PyTorch path (layers.attention). sums: the two products written as broadcast products
    and sums instead (reduced_attention).
    """
    B, Hq, T, D = q.shape
    Hkv, L = k.size(1), k.size(2)
    G = Hq // Hkv  # a KV head's queries are rows g * T + t
    scale = D ** -0.5 if scale is None else scale
    with torch.autocast(device_type=q.device.type, enabled=False):
        qg = q.reshape(B, Hkv, G * T, D).float()
        if sums:
            s = (qg.unsqueeze(3) * k.float().unsqueeze(2)).sum(dim=-1) * scale  # (B, Hkv, G*T, L)
        else:
            s = torch.matmul(qg, k.float().transpose(-1, -2)) * scale  # (B, Hkv, G*T, L)
        if keep.size(1) == 1 and (G == 1 or T == 1):
            m = keep  # broadcasts as it is
        else:
            m = keep.expand(B, Hq, T, L).reshape(B, Hkv, G * T, L)
        p = s.masked_fill(~m, float("-inf")).softmax(dim=-1)
        y = (p.unsqueeze(-1) * v.float().unsqueeze(2)).sum(dim=-2) if sums else torch.matmul(p, v.float())
    return y.reshape(B, Hq, T, D).to(q.dtype)


def reduced_attention(q, k, v, scale, keep):
    """
    masked_attention's function written as broadcast products and sums where the reference has matrix products
    (PATH 'reduce'; the same fp32 arithmetic, another order of additions). Under torch.compile inductor turns each
    into a reduction that reads K and V once in their own dtype and converts them in registers; the reference's
    matrix products of more than one query make fp32 copies of K and V first (a verify pass: two copies a block).
    Eager it would hold (B, Hkv, G*T, L, D) fp32 products, so layers.attention calls it only while compiling.
    """
    return masked_attention(q, k, v, scale, keep, sums=True)


def usable(q, k, v, keep):
    """Whether attend() takes this call: PATH 'triton', a CUDA tensor, the op built (set_path, or on import with
    ADAMBA_DECODE_ATTENTION=triton where CUDA is available), no gradient wanted (the kernel has no backward), at most
    MAX_ROWS queries a KV head and a head size up to 256. Reads module globals only: torch.compile traces it."""
    if PATH != "triton" or keep is None or not (q.is_cuda or ON_CPU) or _op is None:
        return False
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return False
    B, Hq, T, D = q.shape
    return Hq % k.size(1) == 0 and (Hq // k.size(1)) * T <= MAX_ROWS and D <= 256


@torch.compiler.assume_constant_result
def _sm_count(index):
    return torch.cuda.get_device_properties(index).multi_processor_count


def _chunk(n_programs, L, device):
    """Keys a program reads: enough chunks for about two programs an SM, each a multiple of BLOCK_N."""
    sms = _sm_count(device.index if device.index is not None else torch.cuda.current_device()) \
        if device.type == "cuda" else 132
    want = max(1, math.ceil(2 * sms / n_programs))
    return max(BLOCK_N, math.ceil(math.ceil(L / want) / BLOCK_N) * BLOCK_N)


_kernel = None
_op = None


def build():
    """The Triton kernel and the torch.library op around it; None where Triton does not import. Called by
    set_path('triton'), on import with ADAMBA_DECODE_ATTENTION=triton where CUDA is available, and by the CPU tests
    (which run the kernel in Triton's interpreter)."""
    global _kernel, _op
    if _op is not None or not load_triton():
        return _op
    triton, tl = load_triton()

    @triton.jit
    def split_kernel(Q, K, V, Keep, Mo, Lo, Ao,
                     sqb, sqh, sqt, sqd, skb, skh, skl, skd, svb, svh, svl, svd, smb, smh, smt, sml,
                     Hkv, L, scale, CHUNK: tl.constexpr,
                     G: tl.constexpr, T: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr,
                     BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, BF16_QK: tl.constexpr):
        bh = tl.program_id(0)   # row b, KV head h
        c = tl.program_id(1)    # chunk of keys
        n_chunks = tl.num_programs(1)
        b = (bh // Hkv).to(tl.int64)  # b * (its stride) passes 2**31 elements at batch 64, 8 KV heads, 32K keys
        h = bh % Hkv
        r = tl.arange(0, BLOCK_M)          # query r = g * T + t of this KV head
        r_ok = r < G * T
        hq = h * G + r // T
        t = r % T
        d = tl.arange(0, BLOCK_D)
        d_ok = d < D
        q = tl.load(Q + b * sqb + hq[:, None] * sqh + t[:, None] * sqt + d[None, :] * sqd,
                    mask=r_ok[:, None] & d_ok[None, :], other=0.0)
        if not BF16_QK:
            q = q.to(tl.float32)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        for i in range(0, CHUNK, BLOCK_N):  # past L the keys are masked off: nothing is read
            n = c * CHUNK + i + tl.arange(0, BLOCK_N)
            n_ok = n < L
            seen = tl.load(Keep + b * smb + hq[:, None] * smh + t[:, None] * smt + n[None, :] * sml,
                           mask=r_ok[:, None] & n_ok[None, :], other=0) != 0
            if tl.max(tl.max(seen.to(tl.int32), axis=1), axis=0) > 0:  # a block no query may see is not read
                kb = tl.load(K + b * skb + h * skh + n[:, None] * skl + d[None, :] * skd,
                             mask=n_ok[:, None] & d_ok[None, :], other=0.0)
                if BF16_QK:
                    s = tl.dot(q, tl.trans(kb))  # exact bf16 products, fp32 sums
                else:
                    s = tl.dot(q, tl.trans(kb.to(tl.float32)), input_precision="ieee")
                s = tl.where(seen, (s * scale).to(tl.float32), float("-inf"))  # inductor may pass scale as fp64
                m_new = tl.maximum(m_i, tl.max(s, axis=1))
                m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
                alpha = tl.exp(m_i - m_safe)
                p = tl.exp(s - m_safe[:, None])
                l_i = l_i * alpha + tl.sum(p, axis=1)
                vb = tl.load(V + b * svb + h * svh + n[:, None] * svl + d[None, :] * svd,
                             mask=n_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
                acc = acc * alpha[:, None] + tl.dot(p, vb, input_precision="ieee")
                m_i = m_new
        o = (bh * n_chunks + c) * BLOCK_M + r
        tl.store(Mo + o, m_i)
        tl.store(Lo + o, l_i)
        tl.store(Ao + o[:, None] * BLOCK_D + d[None, :], acc)

    _kernel = split_kernel

    @torch.library.triton_op("adamba::split_key_attention", mutates_args=())
    def split_key_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor,
                            scale: float, chunk: int) -> torch.Tensor:
        B, Hq, T, D = q.shape
        Hkv, L = k.size(1), k.size(2)
        G = Hq // Hkv
        BLOCK_M = max(16, triton.next_power_of_2(G * T))
        BLOCK_D = max(16, triton.next_power_of_2(D))
        n_chunks = triton.cdiv(L, chunk)
        mo = torch.empty(B * Hkv, n_chunks, BLOCK_M, device=q.device, dtype=torch.float32)
        lo = torch.empty_like(mo)
        ao = torch.empty(B * Hkv, n_chunks, BLOCK_M, BLOCK_D, device=q.device, dtype=torch.float32)
        bf16 = BF16_DOT and q.dtype == torch.bfloat16 and k.dtype == torch.bfloat16
        torch.library.wrap_triton(split_kernel)[(B * Hkv, n_chunks)](
            q, k, v, keep, mo, lo, ao, *q.stride(), *k.stride(), *v.stride(),
            *[st if n > 1 else 0 for n, st in zip(keep.shape, keep.stride())],
            Hkv, L, scale, CHUNK=chunk, G=G, T=T, D=D, BLOCK_M=BLOCK_M, BLOCK_D=BLOCK_D, BLOCK_N=BLOCK_N,
            BF16_QK=bf16, num_warps=4)
        # combine the chunks: weights exp(m_c - max_c m_c); a chunk that saw nothing has m = -inf, weight 0
        R = G * T
        mo, lo, ao = mo[..., :R], lo[..., :R], ao[..., :R, :D]
        w = torch.exp(mo - mo.amax(dim=1, keepdim=True))
        y = (ao * w[..., None]).sum(dim=1) / (lo * w).sum(dim=1)[..., None]  # (B*Hkv, G*T, D)
        return y.reshape(B, Hq, T, D).to(q.dtype)

    _op = split_key_attention
    return _op


def attend(q, k, v, scale, keep, chunk=None):
    """
    masked_attention's function through the split-key kernel (usable() says when). chunk: keys a program
    reads (a multiple of BLOCK_N; default: about two programs an SM).
    """
    B, Hq, T, D = q.shape
    L = k.size(2)
    scale = D ** -0.5 if scale is None else scale
    chunk = chunk or _chunk(B * k.size(1), L, q.device)
    if chunk % BLOCK_N:
        raise ValueError(f"chunk {chunk}: a multiple of {BLOCK_N}")
    op = _op
    if keep.dim() != 4 or any(n not in (1, m) for n, m in zip(keep.shape, (B, Hq, T, L))):
        raise ValueError(f"keep {tuple(keep.shape)} does not broadcast to (B, Hq, T, L) = {(B, Hq, T, L)}")
    keep = keep.to(torch.uint8)  # the kernel reads it with a stride of 0 where it broadcasts
    with torch.autocast(device_type=q.device.type, enabled=False):
        return op(q, k, v, keep, float(scale), int(chunk))



def set_path(path):
    """PATH = path, validated; 'triton' builds the op, and stops with one line on a CUDA machine where Triton does
    not import (bench decode --attention-path). Call it before an Engine compiles or captures a step."""
    global PATH
    PATH = set_kernel_path("decode attention", path, PATHS, build)


if PATH == "triton" and torch.cuda.is_available() and build() is None:  # ADAMBA_DECODE_ATTENTION=triton
    log_once(logger, "ADAMBA_DECODE_ATTENTION=triton, but Triton does not import: decode attention runs the "
                     "PyTorch reference (masked_attention / SDPA)", level=30)

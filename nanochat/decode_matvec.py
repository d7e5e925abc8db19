"""
Batch-1 (and few-row) matrix products of decode, y = act(x @ W^T) for x (M, K) with M <= MAX_ROWS and a weight
W (N, K) of any strides (a Matryoshka slice W[:n, :k] included), as a Triton kernel beside `matvec_reference`, its
plain PyTorch function. Opt-in (PATH below): on the H100 a d20 step's matrices took 1.54 ms with it (1.20 at
the best of 114 configs) against 1.18 with inductor's tuned reductions (docs/benchmarks.md, session 26).
`linear` is what the decode step's projections call (attention, MLP, the Mamba mixers' in/out projections, the
head); it runs the kernel where usable() says so and F.linear otherwise. `python -m scripts.bench matvec` times
the kernel against cuBLAS (F.linear) and inductor's tuned reductions at the model's shapes; `bench decode
--matvec-path triton` times a step with it.

Why: session 23's profile of tuned think at d20 (docs/benchmarks.md) had inductor's matrix-vector reductions read
the weights at 1.5-1.9 TB/s, 45-57% of an H100's 3.35 TB/s; they are two thirds of the step. Here a program owns
BLOCK_N output columns and streams their weight rows once, for every row of x; it keeps BLOCK_N x BLOCK_K partial
products and reduces them once at the end (one row of x), or sums them on the tensor cores (several rows). With
SPLIT_K > 1 the K axis is shared by SPLIT_K programs, which write fp32 partial sums that PyTorch adds (for a wide
K and few columns: the MLP's down projection).

Numerics: products and sums in fp32 (bf16 x bf16 products are exact in fp32; with fp32 inputs IEEE fp32, no
TF32), rounded once to the output dtype, as cuBLAS's bf16 GEMM: only the order of the additions differs.
"""
import torch
import torch.nn.functional as F

from nanochat.common import autocast_keeps, get_logger, kernel_path_from_env, load_triton, log_once, set_kernel_path

logger = get_logger(__name__)

PATHS = ("torch", "triton")
PATH = kernel_path_from_env("ADAMBA_DECODE_MATVEC", PATHS)
HEAD_PATHS = ("torch", "cublas")
HEAD_PATH = kernel_path_from_env("ADAMBA_DECODE_HEAD", HEAD_PATHS)  # head() below
ON_CPU = False    # tests only: take CPU tensors too (Triton's interpreter, TRITON_INTERPRET=1, runs the kernel there)
MAX_ROWS = 16     # rows of x the kernel takes (a verify pass of k + 1 <= 16 positions)
ACTS = ("none", "relu2")
_kernel = None
_op = None


def matvec_reference(x, w, act="none"):
    """act(x @ w^T) in fp32, rounded to x's dtype: the function the kernel computes."""
    if act not in ACTS:
        raise ValueError(f"act {act!r}: use one of {', '.join(ACTS)}")
    with torch.autocast(device_type=x.device.type, enabled=False):
        y = x.float() @ w.float().t()
        if act == "relu2":
            y = torch.relu(y).square()
    return y.to(x.dtype)


def default_config(M, N, K, sm_count=132):
    """(BLOCK_N, BLOCK_K, SPLIT_K, num_warps) for an (M, K) x (K, N) product. One row: four columns a program and
    up to 2048 of K a load, so a program issues most of its weight reads at once (the matrices of a decode step
    are 1-13 MB: latency, not arithmetic, limits them). Several rows: sixteen columns (the tensor-core tile) and
    256 of K a step. K is split where the programs would not cover the SMs twice."""
    if M == 1:
        block_n, block_k = 4, min(2048, max(16, 1 << (K - 1).bit_length()))
    else:
        block_n, block_k = 16, min(256, max(16, 1 << (K - 1).bit_length()))
    programs = -(-N // block_n)
    split_k = 1
    while programs * split_k < 2 * sm_count and K // (2 * split_k) >= block_k:
        split_k *= 2
    return block_n, block_k, split_k, 8 if block_n * block_k >= 8192 else 4


def build():
    """The Triton kernel and the torch.library op around it; None where Triton does not import."""
    global _kernel, _op
    if _op is not None or not load_triton():
        return _op
    triton, tl = load_triton()

    @triton.jit
    def matvec_kernel(X, W, Y, M, N, K, sxm, sxk, swn, swk, K_PER_SPLIT,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                      ACT: tl.constexpr, PARTIAL: tl.constexpr, DOT_BF16: tl.constexpr):
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = n < N
        k0 = pid_k * K_PER_SPLIT
        w_rows = W + n.to(tl.int64)[:, None] * swn
        if BLOCK_M == 1:
            acc2 = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
            for i in range(0, K_PER_SPLIT, BLOCK_K):
                k = k0 + i + tl.arange(0, BLOCK_K)
                k_ok = (k < K) & (i + tl.arange(0, BLOCK_K) < K_PER_SPLIT)
                xv = tl.load(X + k * sxk, mask=k_ok, other=0.0).to(tl.float32)
                wv = tl.load(w_rows + k[None, :] * swk, mask=n_ok[:, None] & k_ok[None, :], other=0.0,
                             eviction_policy="evict_first").to(tl.float32)
                acc2 += wv * xv[None, :]
            acc = tl.sum(acc2, axis=1)[None, :]  # (1, BLOCK_N)
        else:
            m = tl.arange(0, BLOCK_M)
            m_ok = m < M
            acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
            for i in range(0, K_PER_SPLIT, BLOCK_K):
                k = k0 + i + tl.arange(0, BLOCK_K)
                k_ok = (k < K) & (i + tl.arange(0, BLOCK_K) < K_PER_SPLIT)
                xv = tl.load(X + m[:, None] * sxm + k[None, :] * sxk, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
                wv = tl.load(w_rows + k[None, :] * swk, mask=n_ok[:, None] & k_ok[None, :], other=0.0,
                             eviction_policy="evict_first")
                if DOT_BF16:
                    acc += tl.dot(xv, tl.trans(wv))  # exact bf16 products, fp32 sums
                else:
                    acc += tl.dot(xv.to(tl.float32), tl.trans(wv.to(tl.float32)), input_precision="ieee")
        m = tl.arange(0, BLOCK_M)
        out_ok = (m < M)[:, None] & n_ok[None, :]
        if PARTIAL:  # fp32 partial sums (SPLIT_K, M, N), added by the caller
            tl.store(Y + pid_k * M * N + m[:, None] * N + n[None, :], acc, mask=out_ok)
        else:
            if ACT == 1:
                acc = tl.maximum(acc, 0.0)
                acc = acc * acc
            tl.store(Y + m[:, None] * N + n[None, :], acc.to(Y.dtype.element_ty), mask=out_ok)

    _kernel = matvec_kernel

    @torch.library.triton_op("adamba::matvec", mutates_args=())
    def matvec_op(x: torch.Tensor, w: torch.Tensor, act: int, block_n: int, block_k: int, split_k: int,
                  num_warps: int) -> torch.Tensor:
        M, K = x.shape
        N = w.size(0)
        block_m = 1 if M == 1 else 16
        dot_bf16 = x.dtype == torch.bfloat16 and w.dtype == torch.bfloat16
        k_per_split = triton.cdiv(triton.cdiv(K, split_k), block_k) * block_k
        grid = (triton.cdiv(N, block_n), triton.cdiv(K, k_per_split))
        if grid[1] > 1:
            y = torch.empty(grid[1], M, N, device=x.device, dtype=torch.float32)
        else:
            y = torch.empty(M, N, device=x.device, dtype=x.dtype)
        torch.library.wrap_triton(matvec_kernel)[grid](
            x, w, y, M, N, K, *x.stride(), *w.stride(), k_per_split, BLOCK_M=block_m, BLOCK_N=block_n,
            BLOCK_K=block_k, ACT=act if grid[1] == 1 else 0, PARTIAL=grid[1] > 1, DOT_BF16=dot_bf16,
            num_warps=num_warps)
        if grid[1] == 1:
            return y
        y = y.sum(dim=0)
        if act == 1:
            y = torch.relu(y).square()
        return y.to(x.dtype)

    _op = matvec_op
    return _op


def matvec(x, w, act="none", config=None):
    """
    act(x @ w^T) through the kernel: x (..., K) with at most MAX_ROWS rows in all, w (N, K). config: (BLOCK_N,
    BLOCK_K, SPLIT_K, num_warps), default default_config's. Stops with one line on shapes it does not take.
    """
    if act not in ACTS:
        raise ValueError(f"act {act!r}: use one of {', '.join(ACTS)}")
    if w.dim() != 2 or x.size(-1) != w.size(1):
        raise ValueError(f"matvec: x {tuple(x.shape)} and weight {tuple(w.shape)} do not multiply")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.size(-1))
    M, K = x2.shape
    if not 1 <= M <= MAX_ROWS:
        raise ValueError(f"matvec: {M} rows; the kernel takes 1 to {MAX_ROWS}")
    if x2.dtype != w.dtype:
        raise ValueError(f"matvec: x is {x2.dtype} and the weight {w.dtype}")
    op = build()
    if op is None:
        raise RuntimeError("matvec: Triton does not import on this machine")
    block_n, block_k, split_k, warps = config or default_config(M, w.size(0), K)
    for name, v in (("BLOCK_N", block_n), ("BLOCK_K", block_k)):
        if v < 1 or v & (v - 1):
            raise ValueError(f"matvec: {name}={v}, a power of two")
    if M > 1 and block_n < 16:
        raise ValueError(f"matvec: BLOCK_N={block_n} with {M} rows (the tensor-core path needs 16 or more)")
    if split_k < 1:
        raise ValueError(f"matvec: SPLIT_K={split_k}, 1 or more")
    y = op(x2, w, ACTS.index(act), block_n, block_k, split_k, warps)
    return y.reshape(*lead, w.size(0))


def usable(x, w):
    """Whether linear() runs the kernel: PATH 'triton', CUDA tensors, the op built (set_path, or on import with
    ADAMBA_DECODE_MATVEC=triton where CUDA is available), no gradient wanted (the kernel has no backward), x and w in
    one dtype that autocast (if on) would not change, at most MAX_ROWS rows. Reads module globals: torch.compile
    traces it."""
    if PATH != "triton" or _op is None or not (x.is_cuda or ON_CPU) or not _inference_operands(x, w):
        return False
    return x.dtype in (torch.bfloat16, torch.float32) and 1 <= x.numel() // max(1, x.size(-1)) <= MAX_ROWS


def _inference_operands(x, w):
    """w a matrix, no gradient wanted, x in w's dtype, which autocast (if on) would keep: what usable() and head()
    ask before they take F.linear's place."""
    if w.dim() != 2 or x.dtype != w.dtype or (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad)):
        return False
    return autocast_keeps(x)


def linear(x, w, act="none"):
    """act(F.linear(x, w)) (act: 'none' or 'relu2', ReLU squared): the decode projections' entry. The kernel where
    usable(), else F.linear and PyTorch's ReLU and square, the ops the model ran before (training is unchanged)."""
    if usable(x, w):
        with torch.autocast(device_type=x.device.type, enabled=False):
            return matvec(x, w, act)
    y = F.linear(x, w)
    return F.relu(y).square() if act == "relu2" else y


@torch.library.custom_op("adamba::opaque_linear", mutates_args=())
def opaque_linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """F.linear(x, w) as an operator torch.compile does not look into: inductor calls it as it is (cuBLAS on CUDA)
    and fuses nothing into it. No backward: head() calls it only where no gradient is wanted."""
    return F.linear(x, w)


@opaque_linear.register_fake
def _(x, w):
    return x.new_empty(*x.shape[:-1], w.size(0))


def head(x, w):
    """
    The readout's product x @ w^T (the normed residual times lm_head's weight): linear() unless HEAD_PATH is
    'cublas' (ADAMBA_DECODE_HEAD, set_head_path), torch.compile is tracing the call, no gradient is wanted and x and
    w share a dtype that autocast (if on) keeps; then opaque_linear, the same F.linear kept out of inductor's fusion.
    Why: under decode "tuned" inductor fuses the last block's residual adds, the final norm and the soft-cap into
    the head's reduction (a 168 MB weight at d20, 65,536 outputs), and each of its programs re-reads the residual's
    parts: that kernel took 112 us of a tuned think step on the H100 (session 33's profile) against 58 us for
    cuBLAS's product (session 29).
    """
    if HEAD_PATH == "cublas" and torch.compiler.is_compiling() and _inference_operands(x, w):
        return opaque_linear(x, w)
    return linear(x, w)


def set_head_path(path):
    """HEAD_PATH = path, validated (bench decode --head-path); call it before an Engine compiles a step."""
    global HEAD_PATH
    HEAD_PATH = set_kernel_path("decode head", path, HEAD_PATHS, build=None)  # no kernel to build


def set_path(path):
    """PATH = path, validated; 'triton' builds the op, and stops with one line on a CUDA machine where Triton does
    not import (bench decode --matvec-path). Call it before an Engine compiles or captures a step."""
    global PATH
    PATH = set_kernel_path("decode matvec", path, PATHS, build)


if PATH == "triton" and torch.cuda.is_available() and build() is None:  # ADAMBA_DECODE_MATVEC=triton
    log_once(logger, "ADAMBA_DECODE_MATVEC=triton, but Triton does not import: decode projections run F.linear",
             level=30)

"""
nanochat.decode_attention: the split-key kernel against its PyTorch reference (masked_attention), and the
reference against SDPA with a mask, the path layers.attention takes beyond FEW_QUERIES.
On the CPU the kernel runs in Triton's interpreter (a subprocess with TRITON_INTERPRET=1; skipped where Triton
is not installed) and compiles for sm_90; on CUDA it runs eagerly, under torch.compile and inside a CUDA graph.
Tolerances: fp32 1e-5 (only the order of the additions differs); bf16 outputs within two of bf16's steps of the reference's
(both round an fp32 result to bf16).
"""
import importlib.util

import pytest
import torch
import torch.nn.functional as F

from nanochat import decode_attention as da

from testutil import interpreted
from nanochat.layers import attention

HAS_TRITON = importlib.util.find_spec("triton") is not None

# (B, Hq, Hkv, T, L, D, dtype, chunk, mask): GQA, several queries, ragged rows, head sizes off a power of two,
# chunks that split the keys and chunks the mask hides entirely (skipped by the kernel)
CASES = [
    (1, 4, 4, 1, 300, 32, "float32", 64, "prefix"),
    (2, 6, 2, 3, 200, 48, "float32", 128, "random"),
    (3, 4, 1, 5, 256, 64, "float32", 64, "rows"),
    (1, 4, 4, 5, 256, 64, "bfloat16", 64, "prefix"),
    (2, 2, 2, 1, 130, 16, "bfloat16", None, "random"),
]


def make_case(B, Hq, Hkv, T, L, D, dtype, chunk, mask, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    dt = getattr(torch, dtype)
    q, k, v = (torch.randn(*s, generator=g).to(device=device, dtype=dt) for s in ((B, Hq, T, D), (B, Hkv, L, D), (B, Hkv, L, D)))
    if mask == "prefix":  # the verify pass's: query t sees slots 0 .. L//3 + t
        pos = torch.arange(T) + L // 3
        keep = (torch.arange(L)[None, :] <= pos[:, None]).view(1, 1, T, L)
    elif mask == "rows":  # a different length per row
        n = torch.tensor([L // 5 + 37 * b for b in range(B)])
        keep = (torch.arange(L)[None, :] < n[:, None]).view(B, 1, 1, L)
    else:
        keep = torch.rand(B, 1, T, L, generator=g) < 0.3
        keep[..., 0] = True
    return q, k, v, keep.to(device), chunk


def close(out, ref, dtype):
    diff = (out.float() - ref.float()).abs().max().item()
    if dtype == "float32":
        return diff <= 1e-5, diff
    step = ref.float().abs().max().item() * 2 ** -7  # bf16's spacing at the output's largest magnitude
    return diff <= 2 * step, diff


def test_reference_matches_the_paths_it_replaces():
    for B, Hq, Hkv, T, L, D, dtype, chunk, mask in CASES:
        q, k, v, keep, _ = make_case(B, Hq, Hkv, T, L, D, "float32", chunk, mask)
        ref = da.masked_attention(q, k, v, None, keep)
        old = F.scaled_dot_product_attention(q, k, v, attn_mask=keep, enable_gqa=Hq != Hkv)
        assert (ref - old).abs().max().item() < 1e-5


def test_attention_with_a_mask_takes_few_queries_as_matrix_products(monkeypatch):
    """layers.attention with keep: up to FEW_QUERIES queries a row (decode steps, a verify pass of k + 1 positions)
    run masked_attention (SDPA's memory-efficient kernel took 49 us a call for 5 queries at d20 on the H100), more
    run SDPA with the mask; the two agree (fp32, 1e-5)."""
    from nanochat import layers
    calls, real = [], da.masked_attention
    monkeypatch.setattr(da, "masked_attention", lambda *a: calls.append(a[0].size(2)) or real(*a))
    for T in (1, 5, layers.FEW_QUERIES, layers.FEW_QUERIES + 1):
        q, k, v, keep, _ = make_case(1, 4, 2, T, 300, 32, "float32", None, "prefix")
        out = attention(q, k, v, keep=keep)
        sdpa = F.scaled_dot_product_attention(q, k, v, attn_mask=keep, enable_gqa=True)
        assert (out - sdpa).abs().max().item() < 1e-5
        if T <= layers.FEW_QUERIES:
            assert calls[-1] == T and torch.equal(out, real(q, k, v, None, keep))
        else:
            assert torch.equal(out, sdpa)
    assert calls == [1, 5, layers.FEW_QUERIES]


def test_reduced_attention_is_the_reference(monkeypatch):
    """PATH 'reduce': reduced_attention against masked_attention (fp32 1e-5, bf16 two steps) on every case, and
    layers.attention takes it only while compiling (eager keeps the reference, which holds no (L, D) products)."""
    from nanochat import layers
    for case in CASES:
        q, k, v, keep, _ = make_case(*case)
        ok, diff = close(da.reduced_attention(q, k, v, None, keep), da.masked_attention(q, k, v, None, keep), case[6])
        assert ok, (case, diff)
    monkeypatch.setattr(da, "PATH", "reduce")
    calls, real = [], da.reduced_attention
    monkeypatch.setattr(da, "reduced_attention", lambda *a: calls.append(a[0].size(2)) or real(*a))
    q, k, v, keep, _ = make_case(*CASES[2])
    assert torch.equal(attention(q, k, v, keep=keep), da.masked_attention(q, k, v, None, keep)) and calls == []
    compiled = torch.compile(lambda q, k, v, keep: layers.attention(q, k, v, keep=keep), dynamic=False)
    ok, diff = close(compiled(q, k, v, keep), da.masked_attention(q, k, v, None, keep), "float32")
    assert ok and calls == [5], (diff, calls)


def test_cpu_keeps_the_reference_paths(monkeypatch):
    q, k, v, keep, _ = make_case(*CASES[0])
    assert da.PATH == "reduce" and not da.usable(q, k, v, keep)  # the default (no ADAMBA_DECODE_ATTENTION here)
    assert torch.equal(attention(q, k, v, keep=keep), da.masked_attention(q, k, v, None, keep))  # eager: the reference
    monkeypatch.setattr(da, "PATH", "triton")
    assert not da.usable(q, k, v, keep)  # opted in, but a CPU tensor
    assert torch.equal(attention(q, k, v, keep=keep), da.masked_attention(q, k, v, None, keep))


def test_path_from_the_environment():
    # imported here: the interpreter subprocesses import this file without tests/ on their path
    from engine_testutil import check_path_from_env
    check_path_from_env("decode_attention", "ADAMBA_DECODE_ATTENTION", "flash")


def test_set_path_validates(monkeypatch):
    monkeypatch.setattr(da, "PATH", "torch")  # restored after the test
    with pytest.raises(ValueError, match="decode attention path 'flash': use one of torch, triton, reduce"):
        da.set_path("flash")
    da.set_path("triton")  # a CPU machine: allowed (the CPU keeps PyTorch's paths), built where Triton imports
    assert da.PATH == "triton" and (da._op is not None) == HAS_TRITON


HAS_NVIDIA_BACKEND = HAS_TRITON and importlib.util.find_spec("triton.backends.nvidia") is not None


@pytest.mark.skipif(not HAS_NVIDIA_BACKEND, reason="needs Triton with its NVIDIA backend (the wheel bundles ptxas)")
def test_kernel_compiles_for_sm90_with_the_argument_types_it_is_given():
    """Triton compiles the kernel to a cubin for an H100 (no GPU needed) for each way it is called: bf16 q and K/V
    (the tensor-core dot), fp32 ones, bf16 queries over an fp32 cache (autocast), and the scale as fp32 (an eager
    launch) or fp64 (inductor passes a Python float so: session 24's first GPU call failed there)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    assert da.build() is not None
    consts = {"CHUNK": 128, "G": 1, "T": 1, "D": 128, "BLOCK_M": 16, "BLOCK_D": 128, "BLOCK_N": da.BLOCK_N}
    for q_t, kv_t, scale_t in (("bf16", "bf16", "fp32"), ("bf16", "bf16", "fp64"), ("fp32", "fp32", "fp64"),
                               ("bf16", "fp32", "fp32")):
        bf16 = q_t == kv_t == "bf16"
        sig = {}
        for name in da._kernel.arg_names:
            if name in consts or name == "BF16_QK":
                sig[name] = "constexpr"
            else:
                sig[name] = {"Q": f"*{q_t}", "K": f"*{kv_t}", "V": f"*{kv_t}", "Keep": "*u8", "Mo": "*fp32",
                             "Lo": "*fp32", "Ao": "*fp32", "scale": scale_t}.get(name, "i32")
        src = ASTSource(da._kernel, signature=sig, constexprs=dict(consts, BF16_QK=bf16))
        compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32))
        assert compiled.asm["cubin"], (q_t, kv_t, scale_t)
        assert ("mma" in compiled.asm["ptx"]) == bf16, "the bf16 scores on the tensor cores, the fp32 ones not"


INTERPRETED = r"""
import json, sys
sys.path[:0] = [sys.argv[1], sys.argv[1] + "/tests"]  # tests/ for testutil, which the test module imports
from nanochat import decode_attention as da
from tests.test_decode_attention import CASES, make_case, close
assert da.build() is not None
da.BF16_DOT = False  # the interpreter's bf16 tl.dot returns garbage (numpy has no bf16); CUDA tests the tensor-core dot
out = []
for case in CASES:
    q, k, v, keep, chunk = make_case(*case)
    y = da.attend(q, k, v, None, keep, chunk=chunk)
    ok, diff = close(y, da.masked_attention(q, k, v, None, keep), case[6])
    out.append([ok, diff])
print(json.dumps(out))
"""


@pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed (its interpreter runs the kernel on the CPU)")
def test_kernel_in_triton_interpreter_matches_reference():
    results = interpreted(INTERPRETED, 300)
    for case, (ok, diff) in zip(CASES, results):
        assert ok, f"{case}: max abs diff {diff}"


ENGINE = r"""
import json, sys
sys.path[:0] = [sys.argv[1], sys.argv[1] + "/tests"]
from nanochat import decode_attention as da
from nanochat.engine_static import StaticDecode
from engine_testutil import build, kernel_path_comparer, HAS_MAMBA
from test_engine_modern import modern_hybrid, prompts
assert da.build() is not None
da.BF16_DOT, da.ON_CPU = False, True  # the interpreter: fp32 dots, CPU tensors
StaticDecode.STATIC_MIN_KEYS = 8
compare, out = kernel_path_comparer(da, "attend")
P = [[2, 7, 1, 8, 2, 8], [9, 9, 8, 7, 1, 4]]
for kind in [dict(layer_pattern="A")] + ([dict(layer_pattern="AM"), dict(layer_pattern="MA", mamba_version=2)] if HAS_MAMBA else []):
    model = build(**kind).eval()
    compare(model, prompts=P, max_tokens=10)
    compare(model, prompts=P, max_tokens=10, plan=[16, 32, 16, 48])  # 1 and 3 query heads over 2 KV heads
    compare(model, prompts=P, max_tokens=10, speculate=3, draft="exit:1", fallback=False)
    compare(model, prompts=P[:1], max_tokens=10, speculate=3, draft="plan:64,64,64,32", fallback=False)
compare(modern_hybrid(), prompts=prompts(1), max_tokens=5)  # sliding windows over a ring of key slots
print(json.dumps(out))
"""


@pytest.mark.slow
@pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed (its interpreter runs the kernel on the CPU)")
def test_engine_with_the_kernel_decodes_as_with_pytorch():
    """The engine's static decode step and speculative verify pass with the kernel (Triton's interpreter) against
    PyTorch's attention paths, same model and prompts: think, a narrow plan (query heads that do not fill a GQA
    group), exit and plan drafts at k = 3 over batch 2 and 1, Mamba-1 and Mamba-2 hybrids, and today's-nanochat
    hybrid with sliding windows. The same tokens, logits within 1e-5 (fp32); the kernel ran in every case."""
    for job, same, diff, calls in interpreted(ENGINE, 600):
        assert same and diff <= 1e-5 and calls > 0, (job, same, diff, calls)


@pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed")
def test_attend_validates():
    assert da.build() is not None
    q, k, v, keep, _ = make_case(*CASES[0])
    with pytest.raises(ValueError, match="multiple of"):
        da.attend(q, k, v, None, keep, chunk=100)
    with pytest.raises(ValueError, match="does not broadcast"):
        da.attend(q, k, v, None, keep[..., :-1], chunk=64)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_kernel_on_cuda_eager_compiled_and_in_a_graph(monkeypatch):
    assert da.build() is not None, "Triton does not import on this GPU machine"
    monkeypatch.setattr(da, "PATH", "triton")
    for case in CASES:
        q, k, v, keep, chunk = make_case(*case, device="cuda")
        ref = da.masked_attention(q, k, v, None, keep)
        assert da.usable(q, k, v, keep)
        for name, fn in (("eager", lambda: attention(q, k, v, keep=keep)),
                         ("chunked", lambda: da.attend(q, k, v, None, keep, chunk=chunk))):
            ok, diff = close(fn(), ref, case[6])
            assert ok, f"{case} {name}: {diff}"
        compiled = torch.compile(lambda q, k, v, keep: attention(q, k, v, keep=keep), dynamic=False)
        ok, diff = close(compiled(q, k, v, keep), ref, case[6])
        assert ok, f"{case} compiled: {diff}"
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            attention(q, k, v, keep=keep)
        torch.cuda.current_stream().wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = attention(q, k, v, keep=keep)
        q.copy_(torch.randn_like(q))  # new inputs in place, then replay
        graph.replay()
        ok, diff = close(out, da.masked_attention(q, k, v, None, keep), case[6])
        assert ok, f"{case} graph: {diff}"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_training_keeps_sdpa_on_cuda(monkeypatch):
    monkeypatch.setattr(da, "PATH", "triton")
    q, k, v, keep, _ = make_case(*CASES[0], device="cuda")
    q.requires_grad_(True)
    assert not da.usable(q, k, v, keep)
    attention(q, k, v, keep=keep).sum().backward()
    assert q.grad is not None

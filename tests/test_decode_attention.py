"""
nanochat.decode_attention: the split-key kernel against its PyTorch reference (masked_attention), and the
reference against the paths layers.attention took before (single_query_attention, SDPA with a mask).
On the CPU the kernel runs in Triton's interpreter (a subprocess with TRITON_INTERPRET=1; skipped where Triton
is not installed); on CUDA, eagerly, under torch.compile and inside a CUDA graph.
Tolerances: fp32 1e-5 (only the order of the additions differs); bf16 outputs within two of bf16's steps of the reference's
(both round an fp32 result to bf16).
"""
import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from nanochat import decode_attention as da
from nanochat.layers import attention, single_query_attention

HAS_TRITON = importlib.util.find_spec("triton") is not None
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

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
        if T == 1:
            old = single_query_attention(q, k, v, None, keep)
        else:
            old = F.scaled_dot_product_attention(q, k, v, attn_mask=keep, enable_gqa=Hq != Hkv)
        assert (ref - old).abs().max().item() < 1e-5


def test_cpu_keeps_the_reference_paths():
    q, k, v, keep, _ = make_case(*CASES[0])
    assert not da.usable(q, k, v, keep)
    assert torch.equal(attention(q, k, v, keep=keep), single_query_attention(q, k, v, None, keep))


INTERPRETED = r"""
import json, sys, torch
sys.path.insert(0, sys.argv[1])
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
    env = dict(os.environ, TRITON_INTERPRET="1")
    r = subprocess.run([sys.executable, "-c", INTERPRETED, ROOT], env=env, capture_output=True, text=True,
                       timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    results = json.loads(r.stdout.strip().splitlines()[-1])
    for case, (ok, diff) in zip(CASES, results):
        assert ok, f"{case}: max abs diff {diff}"


@pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed")
def test_attend_validates():
    assert da.build() is not None
    q, k, v, keep, _ = make_case(*CASES[0])
    with pytest.raises(ValueError, match="multiple of"):
        da.attend(q, k, v, None, keep, chunk=100)
    with pytest.raises(ValueError, match="does not broadcast"):
        da.attend(q, k, v, None, keep[..., :-1], chunk=64)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_kernel_on_cuda_eager_compiled_and_in_a_graph():
    assert da.build() is not None, "Triton does not import on this GPU machine"
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
def test_training_keeps_sdpa_on_cuda():
    q, k, v, keep, _ = make_case(*CASES[0], device="cuda")
    q.requires_grad_(True)
    assert not da.usable(q, k, v, keep)
    attention(q, k, v, keep=keep).sum().backward()
    assert q.grad is not None

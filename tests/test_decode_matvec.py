"""
nanochat.decode_matvec: the few-row matrix-product kernel against matvec_reference. On the CPU the kernel runs in
Triton's interpreter (a subprocess with TRITON_INTERPRET=1; skipped where Triton is not installed) and compiles for
sm_90; on CUDA it runs eagerly, under torch.compile and inside a CUDA graph.
Tolerances: fp32 within 2e-6 of the output's largest magnitude (only the order of the additions differs); bf16
within two of bf16's steps there (both round an fp32 result once).
"""
import importlib.util
import os
import subprocess
import sys

import pytest
import torch

from nanochat import decode_matvec as dm

from testutil import interpreted

HAS_TRITON = importlib.util.find_spec("triton") is not None
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (M, N, K, dtype, act, config): one row and several, N and K off the block sizes, split K (fp32 partial sums),
# a weight that is a slice (row stride past K)
CASES = [
    (1, 50, 300, "float32", "none", None),
    (1, 33, 1000, "float32", "relu2", (8, 64, 4, 4)),
    (5, 40, 200, "float32", "relu2", (16, 64, 1, 4)),
    (3, 70, 513, "float32", "none", (16, 128, 2, 4)),
    (16, 24, 96, "float32", "none", (32, 32, 1, 4)),
    (1, 64, 256, "bfloat16", "none", (4, 64, 1, 4)),
    (1, 20, 700, "bfloat16", "relu2", (8, 128, 2, 4)),
]


def make_case(M, N, K, dtype, act, config, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    dt = getattr(torch, dtype)
    x = torch.randn(M, K, generator=g).to(device=device, dtype=dt)
    w = torch.randn(N + 5, K + 3, generator=g).to(device=device, dtype=dt)[:N, :K]  # a Matryoshka-style slice
    return x, w, act, config


def close(out, ref, dtype):
    diff = (out.float() - ref.float()).abs().max().item()
    top = ref.float().abs().max().item()
    return diff <= (2e-6 * top if dtype == "float32" else 2 * 2 ** -7 * top), diff


INTERPRETED = r"""
import json, sys
sys.path[:0] = [sys.argv[1], sys.argv[1] + "/tests"]  # tests/ for testutil, which the test module imports
from nanochat import decode_matvec as dm
from tests.test_decode_matvec import CASES, make_case, close
out = []
for case in CASES:
    x, w, act, config = make_case(*case)
    if case[3] == "bfloat16" and case[0] > 1:
        continue  # the interpreter's bf16 tl.dot is wrong (numpy has no bf16); CUDA tests the tensor-core dot
    ok, diff = close(dm.matvec(x, w, act, config), dm.matvec_reference(x, w, act), case[3])
    out.append([ok, diff])
print(json.dumps(out))
"""


@pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed (its interpreter runs the kernel on the CPU)")
def test_kernel_in_triton_interpreter_matches_reference():
    results = interpreted(INTERPRETED, 600, one_thread=True)
    assert len(results) == len(CASES) and all(ok for ok, _ in results), results


@pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed")
def test_kernel_compiles_for_sm90():
    """Triton compiles each variant the op launches to a cubin for an H100 (no GPU needed): one row (fp32 FMAs),
    several rows (bf16 on the tensor cores, fp32 not), split K (fp32 partial sums)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    assert dm.build() is not None
    for dt, block_m, partial in (("bf16", 1, False), ("bf16", 1, True), ("bf16", 16, False), ("fp32", 16, True),
                                 ("fp32", 1, False)):
        consts = {"BLOCK_M": block_m, "BLOCK_N": 16, "BLOCK_K": 256, "ACT": 1, "PARTIAL": partial,
                  "DOT_BF16": dt == "bf16"}
        sig = {n: "constexpr" if n in consts else {"X": f"*{dt}", "W": f"*{dt}",
                                                    "Y": "*fp32" if partial else f"*{dt}"}.get(n, "i32")
               for n in dm._kernel.arg_names}
        compiled = triton.compile(ASTSource(dm._kernel, signature=sig, constexprs=consts),
                                  target=GPUTarget("cuda", 90, 32))
        assert compiled.asm["cubin"], (dt, block_m, partial)
        assert ("mma" in compiled.asm["ptx"]) == (block_m > 1 and dt == "bf16"), (dt, block_m)


def test_reference_is_linear():
    x, w, _, _ = make_case(3, 20, 40, "float32", "none", None)
    assert torch.allclose(dm.matvec_reference(x, w), torch.nn.functional.linear(x, w), atol=1e-5)
    assert torch.equal(dm.matvec_reference(x, w, "relu2"), torch.relu(dm.matvec_reference(x, w)).square())


def test_default_config_fills_the_card():
    for M, N, K in ((1, 1280, 1280), (1, 5120, 1280), (1, 1280, 5120), (5, 65536, 1280), (1, 112, 2560)):
        bn, bk, sk, warps = dm.default_config(M, N, K)
        assert bn >= (16 if M > 1 else 1) and bk & (bk - 1) == 0 and sk >= 1
        assert -(-N // bn) * sk >= 2 * 132 or K // (2 * sk) < bk, (M, N, K, bn, sk)


def test_head_path_keeps_the_product_apart(monkeypatch):
    """HEAD_PATH 'cublas': head() is F.linear as an opaque operator while compiling (the compiled readout equals the
    eager one, and the operator is called), linear() eager or with a gradient wanted; set_head_path and
    ADAMBA_DECODE_HEAD validate."""
    x, w, _, _ = make_case(3, 40, 64, "float32", "none", None)
    monkeypatch.setattr(dm, "HEAD_PATH", "cublas")
    calls, real = [], dm.opaque_linear
    monkeypatch.setattr(dm, "opaque_linear", lambda a, b: calls.append(a.shape) or real(a, b))
    assert torch.equal(dm.head(x, w), torch.nn.functional.linear(x, w)) and not calls
    readout = torch.compile(lambda a, b: torch.tanh(dm.head(torch.nn.functional.rms_norm(a, (64,)), b) / 15) * 15,
                            dynamic=False)
    ref = torch.tanh(torch.nn.functional.linear(torch.nn.functional.rms_norm(x, (64,)), w) / 15) * 15
    # the product is F.linear either way; inductor's norm and tanh differ from eager's by a few fp32 ulps of 13
    assert torch.allclose(readout(x, w), ref, atol=1e-5, rtol=0) and calls == [(3, 64)]
    calls.clear()
    with torch.enable_grad():
        wg = w.clone().requires_grad_()
        torch.compile(lambda a, b: dm.head(a, b), dynamic=False)(x, wg).sum().backward()
    assert not calls and wg.grad is not None
    monkeypatch.setattr(dm, "HEAD_PATH", "torch")  # the default: linear() while compiling too
    assert torch.allclose(torch.compile(lambda a, b: dm.head(a, b), dynamic=False)(x, w), torch.nn.functional.linear(x, w),
                          atol=1e-5, rtol=0) and not calls
    with pytest.raises(ValueError, match="decode head path 'fused': use one of torch, cublas"):
        dm.set_head_path("fused")
    dm.set_head_path("cublas")
    assert dm.HEAD_PATH == "cublas"
    code = "from nanochat import decode_matvec as m; print(m.HEAD_PATH)"
    for value, ok in (("cublas", True), ("fused", False)):
        r = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, ADAMBA_DECODE_HEAD=value),
                           capture_output=True, text=True, cwd=ROOT)
        assert (r.returncode == 0 and r.stdout.strip() == value) if ok else (
            r.returncode != 0 and "ADAMBA_DECODE_HEAD='fused': use one of torch, cublas" in r.stderr), r.stderr[-300:]


def test_matvec_validates():
    x, w, _, _ = make_case(2, 8, 16, "float32", "none", None)
    with pytest.raises(ValueError, match="act 'gelu'"):
        dm.matvec(x, w, "gelu")
    with pytest.raises(ValueError, match="do not multiply"):
        dm.matvec(x, w.t())
    with pytest.raises(ValueError, match="17 rows"):
        dm.matvec(torch.zeros(17, 16), w)
    with pytest.raises(ValueError, match="x is torch.bfloat16"):
        dm.matvec(x.bfloat16(), w)
    if HAS_TRITON:
        with pytest.raises(ValueError, match="BLOCK_N=8 with 2 rows"):
            dm.matvec(x, w, config=(8, 16, 1, 4))
        with pytest.raises(ValueError, match="BLOCK_K=24"):
            dm.matvec(x, w, config=(16, 24, 1, 4))


def test_path_from_the_environment_and_set_path(monkeypatch):
    # imported here: the interpreter subprocesses import this file without tests/ on their path
    from engine_testutil import check_path_from_env
    check_path_from_env("decode_matvec", "ADAMBA_DECODE_MATVEC", "cublas")
    monkeypatch.setattr(dm, "PATH", "torch")  # restored after the test
    with pytest.raises(ValueError, match="decode matvec path 'cublas': use one of torch, triton"):
        dm.set_path("cublas")
    dm.set_path("triton")  # a CPU machine: allowed (CPU tensors keep F.linear), built where Triton imports
    assert dm.PATH == "triton" and (dm._op is not None) == HAS_TRITON


@pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed")
def test_usable_only_where_the_kernel_computes_the_same(monkeypatch):
    """linear() takes the kernel for few rows without gradients, in one dtype autocast would keep; else F.linear."""
    assert dm.build() is not None
    monkeypatch.setattr(dm, "PATH", "triton")
    monkeypatch.setattr(dm, "ON_CPU", True)
    x, w, _, _ = make_case(2, 8, 16, "float32", "none", None)
    assert dm.usable(x, w) and dm.usable(x.view(1, 2, 16), w)
    assert not dm.usable(torch.zeros(17, 16), w)  # a prefill: more rows than MAX_ROWS
    assert not dm.usable(torch.zeros(0, 16), w)  # no rows
    assert not dm.usable(x.requires_grad_(), w) and dm.usable(x.detach(), w)
    with torch.no_grad():
        assert dm.usable(x, w.requires_grad_())  # evaluation of a trainable weight
    assert not dm.usable(x.bfloat16(), w)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not dm.usable(x.detach(), w.detach())  # autocast would multiply in bf16
    monkeypatch.setattr(dm, "ON_CPU", False)
    assert not dm.usable(x.detach(), w.detach())  # CPU tensors: F.linear
    monkeypatch.setattr(dm, "ON_CPU", True)
    monkeypatch.setattr(dm, "PATH", "torch")
    assert not dm.usable(x.detach(), w.detach())
    y = dm.linear(x.detach(), w.detach(), "relu2")  # F.linear's path: PyTorch's own ops
    assert torch.equal(y, torch.nn.functional.relu(torch.nn.functional.linear(x, w)).square())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA")
@pytest.mark.parametrize("case", CASES)
def test_kernel_on_cuda_eager_compiled_and_in_a_graph(case):
    x, w, act, config = make_case(*case, device="cuda")
    ref = dm.matvec_reference(x, w, act)
    ok, diff = close(dm.matvec(x, w, act, config), ref, case[3])
    assert ok, ("eager", diff)
    compiled = torch.compile(lambda a, b: dm.matvec(a, b, act, config), fullgraph=True)
    ok, diff = close(compiled(x, w), ref, case[3])
    assert ok, ("compiled", diff)
    out = {}
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        dm.matvec(x, w, act, config)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out["y"] = dm.matvec(x, w, act, config)
    g.replay()
    ok, diff = close(out["y"], ref, case[3])
    assert ok, ("graph", diff)


ENGINE = r"""
import json, sys
sys.path[:0] = [sys.argv[1], sys.argv[1] + "/tests"]
from nanochat import decode_matvec as dm
from nanochat.engine_static import StaticDecode
from engine_testutil import build, kernel_path_comparer, HAS_MAMBA
assert dm.build() is not None
dm.ON_CPU = True  # the interpreter: CPU tensors
StaticDecode.STATIC_MIN_KEYS = 8
compare, out = kernel_path_comparer(dm, "matvec")
P = [[2, 7, 1, 8, 2, 8], [9, 9, 8, 7, 1, 4]]
for kind in [dict(layer_pattern="AM"), dict(layer_pattern="MA", mamba_version=2)] if HAS_MAMBA else [dict(layer_pattern="A")]:
    model = build(**kind).eval()
    compare(model, prompts=P, max_tokens=6, plan=[16, 32, 16, 48] if kind["layer_pattern"] == "AM" else None)
    compare(model, prompts=P, max_tokens=6, speculate=3, draft="exit:1", fallback=False)
print(json.dumps(out))
"""


@pytest.mark.slow
@pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed (its interpreter runs the kernel on the CPU)")
def test_engine_with_the_kernel_decodes_as_with_pytorch():
    """The engine's static decode step and speculative verify pass with the projections and the head through the
    kernel (Triton's interpreter) against F.linear, same model and prompts: a narrow plan (sliced weights) on a
    Mamba-1 hybrid, think on a Mamba-2 one, an exit draft at k = 3 on each, batch 2. The same tokens, logits within
    1e-5 (fp32); the kernel ran in every case."""
    for job, same, diff, calls in interpreted(ENGINE, 900):
        assert same and diff <= 1e-5 and calls > 0, (job, same, diff, calls)

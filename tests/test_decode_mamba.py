"""
nanochat.decode_mamba: the two-kernel Mamba-1 decode position against Mamba._recur's PyTorch path, its reference.
On the CPU the kernels run in Triton's interpreter (a subprocess with TRITON_INTERPRET=1; skipped where Triton is not
installed) and compile for sm_90; on CUDA they run eagerly, under torch.compile and inside a CUDA graph.
Tolerances: fp32 outputs and states within 1e-5 of the largest magnitude after four positions in a row (only the
order of x_proj's and dt_proj's additions differs); bf16 within two of bf16's steps of it at each position, from
the reference's states: the kernels round to bf16 where the reference does (conv, x_proj and dt_proj outputs, the
state, the output; to nearest, written out, since Triton's interpreter truncates), so only a rounding that another
order of additions flips can differ (in the interpreter on this project's CPU the bf16 cases come out bit for bit
equal). The conv state, a shift of stored values, must match exactly.
"""
import importlib.util

import pytest
import torch

from nanochat import decode_mamba as dm
from nanochat.mamba_block import Mamba

from testutil import interpreted

HAS_TRITON = importlib.util.find_spec("triton") is not None
HAS_NVIDIA_BACKEND = HAS_TRITON and importlib.util.find_spec("triton.backends.nvidia") is not None

# (d_model, d_state, d_conv, conv bias, weights' dtype, states' dtype, rows, channels a program): channel blocks
# that split d_inner (96 over 16 and 64, a ragged last block), a narrower conv without bias, bf16 with both state dtypes
CASES = [
    (48, 16, 4, True, "float32", "float32", 1, 16),
    (48, 16, 4, True, "float32", "float32", 3, 64),
    (64, 8, 3, False, "float32", "float32", 2, 32),
    (48, 16, 4, True, "bfloat16", "bfloat16", 3, 64),
    (48, 16, 4, True, "bfloat16", "float32", 2, 16),
]


def make_case(d_model, d_state, d_conv, bias, dtype, sdtype, B, block, device="cpu"):
    torch.manual_seed(0)
    m = Mamba(d_model, d_state=d_state, d_conv=d_conv, conv_bias=bias).eval()
    with torch.no_grad():
        m.dt_proj.weight.mul_(3.0)  # dt away from its init: the softplus, the decay and the input all matter
    m = m.to(device=device, dtype=getattr(torch, dtype))
    g = torch.Generator().manual_seed(1)
    sd = getattr(torch, sdtype)
    conv = torch.randn(B, m.d_inner, d_conv, generator=g).to(device=device, dtype=sd)
    ssm = torch.randn(B, m.d_inner, d_state, generator=g).to(device=device, dtype=sd)
    xzs = [torch.randn(B, 2 * m.d_inner, generator=g).to(device=device, dtype=getattr(torch, dtype)) for _ in range(4)]
    return m, conv, ssm, xzs


def compare(case, run, device="cpu"):
    """Positions through run(m, xz, conv, ssm) against the reference (fp32: four in a row; bf16: each of the four
    from the reference's states before it). Returns (ok, worst relative diff)."""
    m, conv, ssm, xzs = make_case(*case, device=device)
    fp32 = case[4] == "float32"
    tol = 1e-5 if fp32 else 2 * 2 ** -8
    c2, s2 = conv.clone(), ssm.clone()
    worst, ok, path = 0.0, True, dm.PATH
    with torch.inference_mode():
        for xz in xzs:
            if not fp32:
                c2.copy_(conv), s2.copy_(ssm)
            dm.PATH = "torch"
            ref = m._recur(xz, conv, ssm, False, xz.dtype)
            dm.PATH = "triton"
            assert dm.usable(m, xz, c2, s2)
            got = run(m, xz, c2, s2)
            for a, b in ((got, ref), (s2, ssm)):
                d = (a.float() - b.float()).abs().max().item() / b.float().abs().max().item()
                worst, ok = max(worst, d), ok and d <= tol
            ok = ok and torch.equal(c2, conv)
    dm.PATH = path
    return ok, worst


INTERPRETED = r"""
import json, sys
sys.path[:0] = [sys.argv[1], sys.argv[1] + "/tests"]  # tests/ for testutil, which the test module imports
from nanochat import decode_mamba as dm
from tests.test_decode_mamba import CASES, compare
assert dm.build() is not None
dm.ON_CPU = True
print(json.dumps([compare(case, lambda m, xz, c, s, b=case[7]: dm.step(m, xz, c, s, block=b)) for case in CASES]))
"""


@pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed (its interpreter runs the kernels on the CPU)")
def test_kernels_in_triton_interpreter_match_reference():
    for case, (ok, diff) in zip(CASES, interpreted(INTERPRETED, 300, one_thread=True)):
        assert ok, f"{case}: worst relative diff {diff}"


ENGINE = r"""
import json, sys
sys.path[:0] = [sys.argv[1], sys.argv[1] + "/tests"]
from nanochat import decode_mamba as dm
from nanochat.engine_static import StaticDecode
from engine_testutil import build, kernel_path_comparer
assert dm.build() is not None
dm.ON_CPU = True
StaticDecode.STATIC_MIN_KEYS = 8
compare, out = kernel_path_comparer(dm, "step")
P = [[2, 7, 1, 8, 2, 8], [9, 9, 8, 7, 1, 4]]
model = build(layer_pattern="AM").eval()
compare(model, prompts=P, max_tokens=8)
compare(model, prompts=P, max_tokens=8, plan=[16, 32, 16, 48])
compare(model, prompts=P, max_tokens=8, speculate=3, draft="exit:1", fallback=False)
print(json.dumps(out))
"""


@pytest.mark.slow
@pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed (its interpreter runs the kernels on the CPU)")
def test_engine_with_the_kernels_decodes_as_with_pytorch():
    """The engine's static decode step with the kernels (Triton's interpreter) against PyTorch's ops, an AM hybrid
    (Mamba-1) over two rows: think, a narrow plan, and an exit draft at k = 3 (its draft steps take the kernels; the
    verify pass's four positions keep PyTorch's). The same tokens, logits within 1e-5 (fp32); the kernels ran."""
    for job, same, diff, calls in interpreted(ENGINE, 600, one_thread=True):
        assert same and diff <= 1e-5 and calls > 0, (job, same, diff, calls)


@pytest.mark.skipif(not HAS_NVIDIA_BACKEND, reason="needs Triton with its NVIDIA backend (the wheel bundles ptxas)")
def test_kernels_compile_for_sm90():
    """Both kernels compile to a cubin for an H100 (no GPU needed) with bf16 and fp32 activations and states."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    assert dm.build() is not None
    conv_k, state_k = dm._kernels
    sm90 = GPUTarget("cuda", 90, 32)
    for act, st in (("bf16", "bf16"), ("bf16", "fp32"), ("fp32", "fp32")):
        flags = {"ACT_BF16": act == "bf16", "ST_BF16": st == "bf16"}
        consts = {"HAS_BIAS": True, "W": 4, "WP": 4, "BLOCK": 64, "RP": 128, **flags}
        ptr = {"XZ": act, "CS": st, "CW": act, "CB": act, "WX": act, "XC": act, "P": "fp32"}
        sig = {n: "constexpr" if n in consts else f"*{ptr[n]}" if n in ptr else "i32" for n in conv_k.arg_names}
        compiled = triton.compile(ASTSource(conv_k, signature=sig, constexprs=consts), target=sm90)
        assert compiled.asm["cubin"], (act, st)
        consts = {"BLOCK": 64, "RP": 128, "RRP": 128, "NP": 16, "NBP": 64, **flags}
        ptr = {"XZ": act, "XC": act, "P": "fp32", "WDT": act, "BDT": act, "ALOG": "fp32", "DD": "fp32", "SS": st,
               "Y": act}
        sig = {n: "constexpr" if n in consts else f"*{ptr[n]}" if n in ptr else "i32" for n in state_k.arg_names}
        compiled = triton.compile(ASTSource(state_k, signature=sig, constexprs=consts), target=sm90)
        assert compiled.asm["cubin"], (act, st)


def test_cpu_and_training_keep_pytorch(monkeypatch):
    """PATH 'torch' by default; opted in, a CPU tensor, a gradient wanted, autocast to another dtype or a mixer whose
    weights differ in dtype from its input still take PyTorch's ops."""
    m, conv, ssm, xzs = make_case(*CASES[0])
    assert dm.PATH == "torch" and not dm.usable(m, xzs[0], conv, ssm)  # the default (no ADAMBA_DECODE_MAMBA here)
    monkeypatch.setattr(dm, "PATH", "triton")
    monkeypatch.setattr(dm, "_op", dm._op or object())  # as if built: what is left is usable()'s own judgement
    assert not dm.usable(m, xzs[0], conv, ssm)  # a CPU tensor
    monkeypatch.setattr(dm, "ON_CPU", True)
    with torch.inference_mode():
        assert dm.usable(m, xzs[0], conv, ssm)
        assert not dm.usable(m, xzs[0].bfloat16(), conv, ssm)  # x in another dtype than the weights
        assert not dm.usable(m, xzs[0], conv.half(), ssm)  # a state the kernels do not store
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert not dm.usable(m, xzs[0], conv, ssm)
    assert not dm.usable(m, xzs[0], conv, ssm)  # grad mode on, trainable weights


def test_path_from_the_environment():
    from engine_testutil import check_path_from_env
    check_path_from_env("decode_mamba", "ADAMBA_DECODE_MAMBA", "cuda")


def test_set_path_and_step_validate(monkeypatch):
    monkeypatch.setattr(dm, "PATH", "torch")
    with pytest.raises(ValueError, match="decode mamba path 'fused': use one of torch, triton"):
        dm.set_path("fused")
    dm.set_path("triton")  # a CPU machine: allowed (the CPU keeps PyTorch's ops), built where Triton imports
    assert dm.PATH == "triton" and (dm._op is not None) == HAS_TRITON
    m, conv, ssm, xzs = make_case(*CASES[0])
    with pytest.raises(ValueError, match="a power of two of at least 16"):
        dm.step(m, xzs[0], conv, ssm, block=24)
    with pytest.raises(ValueError, match="do not fit a mixer of d_inner 96"):
        dm.step(m, xzs[0], conv[:, :-1], ssm)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_kernels_on_cuda_eager_compiled_and_in_a_graph(monkeypatch):
    assert dm.build() is not None, "Triton does not import on this GPU machine"
    for case in CASES:
        ok, diff = compare(case, lambda m, xz, c, s: m._recur(xz, c, s, False, xz.dtype), device="cuda")
        assert ok, f"{case} eager: {diff}"
        compiled = torch.compile(lambda m, xz, c, s: m._recur(xz, c, s, False, xz.dtype), dynamic=False)
        ok, diff = compare(case, compiled, device="cuda")
        assert ok, f"{case} compiled: {diff}"

        def graphed(m, xz, c, s):
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            c0, s0, xin = c.clone(), s.clone(), xz.clone()
            with torch.cuda.stream(side):
                m._recur(xin, c, s, False, xz.dtype)  # warm-up (the states restored below)
            torch.cuda.current_stream().wait_stream(side)
            c.copy_(c0), s.copy_(s0)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = m._recur(xin, c, s, False, xz.dtype)
            c.copy_(c0), s.copy_(s0)  # the capture did not run the kernels, but keep the states exact either way
            graph.replay()
            return out
        ok, diff = compare(case, graphed, device="cuda")
        assert ok, f"{case} graph: {diff}"

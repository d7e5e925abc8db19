"""
nanochat/moe_triton.py (MoE dispatch="triton") against nanochat.moe.moe_reference, the per-expert loop.

On a machine without CUDA these run the Triton kernels under TRITON_INTERPRET=1 (set by conftest.py before the
kernels are defined), which executes every program of the grid in numpy: slow, so the shapes are tiny, but every index,
mask and epilogue of the GPU kernels runs. Its bf16 dot is broken, so there dots take fp32 operands (already
rounded to bf16 where the GPU rounds them). On CUDA the same tests run the compiled kernels (fp32 operands use an
fp32 dot, not TF32). tests/test_gpu_kernels.py checks the CUDA bf16 kernels at training sizes.
Tolerances: fp32 1e-5 (relative to O(1) values; the loop and the kernels sum in different orders);
bf16 against the loop in fp32, 3e-2 of the largest value (bf16 rounding of the hidden activations).
"""
import pytest
import torch

triton = pytest.importorskip("triton", reason="the Triton expert kernels need Triton (pip install -e '.[dev]')")

from nanochat.moe import MoE, moe_reference, triton_supported  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
# the grouped_mm engine's rows past the kept ones are undefined memory; the interpreter's numpy warns when relu^2
# overflows or meets a NaN there (no kernel reads them: the dropped-token tests check their slots are exact zeros)
pytestmark = [pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning"),
              pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")]


GEMMS = ["grouped_mm", "triton"]


def make_moe(D=32, E=4, H=64, seed=0, dtype=torch.float32, router_std=0.5, gemm="triton", **kw):
    torch.manual_seed(seed)
    moe = MoE(D, E, H, dispatch="triton", device=DEV, dtype=dtype, **kw)
    moe.triton_gemm = gemm
    with torch.no_grad():  # nonzero outputs and a router with preferences (so capacity drops happen)
        moe.w_out.normal_(0.0, 0.2)
        moe.router.weight.normal_(0.0, router_std)
    return moe


def skewed_tokens(*shape, seed=1):
    # a shared offset makes every token lean to the same experts (a near-uniform router would drop nothing)
    torch.manual_seed(seed)
    return torch.randn(*shape, device=DEV) + 0.7


def grads(moe, fn, x, g, mask=None):
    moe.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    y = fn(x, mask)
    (y.float() * g).sum().backward()
    return [y.detach().float()] + [t.grad.float().clone() for t in (x, moe.w_in, moe.w_out, moe.router.weight)]


def compare(moe, x, mask=None, rtol=1e-5, atol=1e-5, scale=False):
    g = torch.randn(x.shape, device=DEV)
    got = grads(moe, lambda t, m: moe(t, mask=m), x, g, mask)
    stats = moe.last_stats
    ref = grads(moe, lambda t, m: moe_reference(moe, t, mask=m)[0], x, g, mask)
    _, kept, dropped = moe_reference(moe, x, mask=mask)
    assert stats["tokens_per_expert"].cpu().tolist() == kept.tolist() and stats["dropped"] == dropped
    for name, a, b in zip(("out", "dx", "dw_in", "dw_out", "drouter"), got, ref):
        s = b.abs().max().clamp(min=1e-12) if scale else 1.0
        assert b.abs().max() > 0, name  # every compared quantity is nonzero, so a zero kernel output cannot pass
        torch.testing.assert_close(a / s, b / s, rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")
    return stats


def gemm_runs(gemm, dtype):
    if gemm == "grouped_mm":
        from nanochat.moe import grouped_mm_supported
        ok, why = grouped_mm_supported(dtype, DEV, (16, 32, 64), compiled=False)
        if not ok:
            pytest.skip(f"grouped_mm GEMMs cannot run here: {why}")


@pytest.mark.parametrize("gemm", GEMMS)
@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("drop_tokens", [True, False])
def test_fused_experts_match_loop_fp32(top_k, drop_tokens, gemm):
    gemm_runs(gemm, torch.float32)
    moe = make_moe(top_k=top_k, drop_tokens=drop_tokens, capacity_factor=1.0, min_capacity=1, router_std=1.5, gemm=gemm)
    stats = compare(moe, skewed_tokens(3, 13, 32))
    assert (stats["dropped"] > 0) == drop_tokens  # the skewed router overflows an expert when it can


@pytest.mark.parametrize("gemm", GEMMS)
def test_fused_experts_width_slice_and_mask(gemm):
    # a Matryoshka prefix (w < dim: strided weight slices) with padding (masked tokens are not routed)
    gemm_runs(gemm, torch.float32)
    moe = make_moe(capacity_factor=1.0, min_capacity=1, router_std=1.5, gemm=gemm)
    torch.manual_seed(3)
    mask = torch.rand(3, 13, device=DEV) > 0.3
    stats = compare(moe, skewed_tokens(3, 13, 16), mask=mask)
    assert stats["dropped"] > 0
    assert sum(stats["tokens_per_expert"].tolist()) + stats["dropped"] == int(mask.sum())


@pytest.mark.parametrize("gemm", GEMMS)
def test_fused_experts_bf16(gemm):
    gemm_runs(gemm, torch.bfloat16)
    moe = make_moe(dtype=torch.bfloat16, capacity_factor=1.0, min_capacity=1, router_std=1.5, gemm=gemm)
    compare(moe, skewed_tokens(3, 13, 32).to(torch.bfloat16), rtol=3e-2, atol=3e-2, scale=True)


@pytest.mark.parametrize("gemm", GEMMS)
def test_dropped_tokens_get_exact_zeros(gemm):
    # every token prefers expert 0; capacity 4: tokens 4.. are dropped, their output and their dx are exactly 0
    gemm_runs(gemm, torch.float32)
    moe = make_moe(E=4, capacity_factor=0.25, min_capacity=4, gemm=gemm)
    with torch.no_grad():
        moe.router.weight.zero_()
        moe.router.weight[0].fill_(1.0)
    x = torch.rand(1, 12, 32, device=DEV) + 0.5  # positive: every token scores expert 0 highest
    x.requires_grad_(True)
    y = moe(x)
    y.square().sum().backward()
    assert moe.last_stats["tokens_per_expert"].tolist() == [4, 0, 0, 0] and moe.last_stats["dropped"] == 8
    assert (y[0, 4:] == 0).all() and (y[0, :4].abs().sum(-1) > 0).all()
    assert (x.grad[0, 4:] == 0).all() and (x.grad[0, :4].abs().sum(-1) > 0).all()
    assert (moe.w_in.grad[1:] == 0).all() and (moe.w_out.grad[1:] == 0).all()  # experts that got no rows


@pytest.mark.parametrize("gemm", GEMMS)
def test_no_real_tokens(gemm):
    gemm_runs(gemm, torch.float32)
    moe = make_moe(gemm=gemm)
    x = torch.randn(2, 5, 32, device=DEV, requires_grad=True)
    y = moe(x, mask=torch.zeros(2, 5, dtype=torch.bool, device=DEV))
    y.sum().backward()
    assert (y == 0).all() and (x.grad == 0).all() and (moe.w_in.grad == 0).all()


@pytest.mark.parametrize("gemm", GEMMS)
def test_fused_experts_compile_fullgraph(gemm):
    # the custom ops' fake implementations let dynamo trace the MoE as one graph
    gemm_runs(gemm, torch.float32)
    moe = make_moe(top_k=2, capacity_factor=1.0, min_capacity=1, gemm=gemm)
    x = torch.randn(2, 8, 32, device=DEV)
    compiled = torch.compile(moe, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), moe(x), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("gemm", GEMMS)
def test_custom_ops_opcheck(gemm):
    gemm_runs(gemm, torch.float32)
    from nanochat import moe_triton as mt
    torch.manual_seed(0)
    n, w, h, E, k = 10, 32, 64, 4, 2
    x = torch.randn(n, w, device=DEV, requires_grad=True)
    w_in = (torch.randn(E, h, w, device=DEV) * 0.2).requires_grad_()
    w_out = (torch.randn(E, w, h, device=DEV) * 0.2).requires_grad_()
    gate = torch.rand(n * k, device=DEV, requires_grad=True)
    order = torch.randperm(n * k, device=DEV)
    counts = torch.tensor([6, 5, 0, 9], device=DEV)  # every row kept: no undefined rows in the saved tensors
    if gemm == "triton":
        torch.library.opcheck(mt.moe_experts_fwd, (x, w_in, w_out, gate, order, counts, k, False))
    else:
        torch.library.opcheck(mt.moe_experts_gmm_fwd, (x, w_in, w_out, gate, order, counts, k))


def test_dispatch_choice():
    ok, why = triton_supported(torch.float64, "cuda") if DEV == "cuda" else triton_supported(torch.float32, "cpu")
    assert ok == (DEV == "cpu"), why  # CUDA wants bf16/fp16; a CPU runs them only under the interpreter
    moe = make_moe()
    moe.dispatch = "auto"
    path, _ = moe._pick_path(torch.float32, "cpu", 32, 64)
    assert path != "triton"  # auto never picks the interpreter

"""
Tests for nanochat/moe.py: routing, capacity, losses, dispatch paths vs the per-expert loop,
masking, Matryoshka width slicing, bias balancing, upcycling, the static-shape dispatch (no host sync, garbage
past grouped_mm's groups never leaks). The Mamba + MoE model is tests/test_mamba_moe.py.
All on CPU and small. Tolerances: fp64 paths 1e-10, fp32 paths 1e-5 (relative to O(1) values), 1e-6 where the
fast path does the loop's arithmetic in the loop's order; compiled vs eager 1e-6 fp32, 1e-2 bf16 (observed exact).
"""
import copy
import math

import pytest
import torch
import torch.nn.functional as F

from nanochat.moe import MoE, moe_reference, grouped_mm_supported, permute_rows
from testutil import SyncOps


def crafted_moe(E=4, D=4, H=8, **kw):
    """Router = 10 * I so a one-hot token e_i goes to expert i; positive w_in so kept tokens give nonzero output."""
    torch.manual_seed(0)
    moe = MoE(D, E, H, **kw)
    with torch.no_grad():
        moe.router.weight.copy_(10.0 * torch.eye(E, D))
        moe.w_in.copy_(torch.rand(E, H, D) + 0.1)
        moe.w_out.copy_(torch.randn(E, D, H))
    return moe


def onehot_tokens(experts, D=4):
    # experts: (B, T) long -> (B, T, D) one-hot inputs routed to those experts
    return F.one_hot(experts, D).float()


def random_moe(D=16, E=4, H=32, seed=0, dtype=torch.float32, **kw):
    torch.manual_seed(seed)
    moe = MoE(D, E, H, dtype=dtype, **kw)
    with torch.no_grad():  # nonzero w_out and a router with real preferences
        moe.w_out.normal_(0.0, 0.2)
        moe.router.weight.normal_(0.0, 0.5)
    return moe


def run_with_grad(fn, moe, x, g):
    moe.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    out = fn(x)
    y = out[0] if isinstance(out, tuple) else out
    (y * g).sum().backward()
    return y.detach(), [t.grad.clone() for t in (x, moe.w_in, moe.w_out, moe.router.weight)]


# -----------------------------------------------------------------------------
# capacity and exact drops on crafted routing

def test_capacity_formula():
    moe = MoE(8, 4, 16, capacity_factor=1.5, min_capacity=4)
    assert moe.capacity(40) == 15  # ceil(1.5 * 40 / 4)
    assert moe.capacity(41) == 16  # ceil(15.375)
    assert moe.capacity(6) == 4  # ceil(2.25) = 3 < min_capacity
    assert MoE(8, 4, 16, top_k=2, capacity_factor=1.0).capacity(40) == 20
    assert MoE(8, 4, 16, drop_tokens=False).capacity(40) is None


@pytest.mark.parametrize("dispatch", ["grouped_mm", "bmm"])
def test_min_capacity_binds(dispatch):
    moe = crafted_moe(capacity_factor=1.0, min_capacity=4, dispatch=dispatch)
    x = onehot_tokens(torch.zeros(2, 5, dtype=torch.long))  # all 10 tokens choose expert 0
    y = moe(x).reshape(10, 4)
    # capacity = max(4, ceil(10/4) = 3) = 4: tokens 0..3 kept, 4..9 dropped
    assert moe.last_stats["tokens_per_expert"].tolist() == [4, 0, 0, 0]
    assert moe.last_stats["dropped"] == 6
    assert (y[:4].abs().sum(dim=1) > 0).all()
    assert torch.equal(y[4:], torch.zeros(6, 4))


@pytest.mark.parametrize("dispatch", ["grouped_mm", "bmm"])
@pytest.mark.parametrize("cf,kept,dropped", [(1.5, [15, 12, 8, 0], 5), (1.0, [10, 10, 8, 0], 12)])
def test_capacity_factor_drops_in_token_order(dispatch, cf, kept, dropped):
    moe = crafted_moe(capacity_factor=cf, min_capacity=4, dispatch=dispatch)
    g = torch.Generator().manual_seed(1)
    experts = torch.tensor([0] * 20 + [1] * 12 + [2] * 8)[torch.randperm(40, generator=g)]  # 40 tokens
    x = onehot_tokens(experts.view(4, 10))
    y = moe(x).reshape(40, 4)
    C = moe.capacity(40)
    assert moe.last_stats["tokens_per_expert"].tolist() == kept
    assert moe.last_stats["dropped"] == dropped
    for e in range(4):
        tok = (experts == e).nonzero().squeeze(1)  # in token order
        assert (y[tok[:C]].abs().sum(dim=1) > 0).all()
        assert torch.equal(y[tok[C:]], torch.zeros(max(0, tok.numel() - C), 4))
    y_ref, kept_ref, dropped_ref = moe_reference(moe, x)
    assert kept_ref.tolist() == kept and dropped_ref == dropped
    torch.testing.assert_close(y, y_ref.reshape(40, 4), rtol=1e-5, atol=1e-5)


def test_dropless_keeps_everything():
    moe = crafted_moe(drop_tokens=False)
    y = moe(onehot_tokens(torch.zeros(2, 5, dtype=torch.long))).reshape(10, 4)
    assert moe.last_stats["tokens_per_expert"].tolist() == [10, 0, 0, 0] and moe.last_stats["dropped"] == 0
    assert (y.abs().sum(dim=1) > 0).all()


# -----------------------------------------------------------------------------
# fast paths vs the per-expert loop

def test_dropless_equals_reference_fp64_with_grads():
    moe = random_moe(dtype=torch.float64, drop_tokens=False)
    x = torch.randn(3, 7, 16, dtype=torch.float64)
    g = torch.randn(3, 7, 16, dtype=torch.float64)
    y, gr = run_with_grad(moe, moe, x, g)
    y_ref, gr_ref = run_with_grad(lambda t: moe_reference(moe, t), moe, x, g)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    for a, b in zip(gr, gr_ref):
        assert a.abs().sum() > 0
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("drop_tokens", [True, False])
@pytest.mark.parametrize("dispatch", ["grouped_mm", "bmm"])
def test_batched_dispatch_equals_loop_fp32(top_k, drop_tokens, dispatch):
    moe = random_moe(top_k=top_k, drop_tokens=drop_tokens, capacity_factor=1.0, min_capacity=1, dispatch=dispatch)
    x = torch.randn(4, 9, 16)
    g = torch.randn(4, 9, 16)
    y, gr = run_with_grad(moe, moe, x, g)
    stats = moe.last_stats
    y_ref, gr_ref = run_with_grad(lambda t: moe_reference(moe, t), moe, x, g)
    _, kept_ref, dropped_ref = moe_reference(moe, x)
    assert stats["tokens_per_expert"].tolist() == kept_ref.tolist()
    assert stats["dropped"] == dropped_ref
    if drop_tokens and top_k == 1:
        assert dropped_ref > 0  # the skewed router really overflows some expert
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    for a, b in zip(gr, gr_ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_grouped_mm_support_check():
    ok, why = grouped_mm_supported(torch.float64, "cpu", (16, 32))
    assert not ok and "fp32 or bf16" in why
    ok, _ = grouped_mm_supported(torch.float32, "cpu", (6, 32))  # 24-byte rows
    assert not ok
    moe = random_moe(D=6, H=12, dispatch="grouped_mm")
    with pytest.raises(RuntimeError, match="grouped_mm"):
        moe(torch.randn(1, 3, 6))
    moe.dispatch = "auto"  # falls back to bmm, and says so in the log
    assert moe(torch.randn(1, 3, 6)).shape == (1, 3, 6)


def test_top2_gates_renormalised():
    moe = random_moe(top_k=2)
    _, probs, top_idx, gate = moe.route(torch.randn(10, 16), 16)
    p = probs.gather(1, top_idx)
    torch.testing.assert_close(gate, p / p.sum(dim=1, keepdim=True))
    assert (top_idx[:, 0] == probs.argmax(dim=1)).all()


def test_autocast_router_fp32():
    moe = random_moe()
    x = torch.randn(2, 5, 16)
    y32 = moe(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y16 = moe(x)
        logits, _, _, _ = moe.route(x.reshape(-1, 16), 16)
    assert logits.dtype == torch.float32 and moe.aux_loss.dtype == torch.float32
    assert y16.dtype == torch.bfloat16
    torch.testing.assert_close(y16.float(), y32, rtol=0.05, atol=0.05)


def assert_router_near_fp64(x, W, g, logits):
    """logits = x @ W^T (x bf16, W fp32 leaves, backward(g) already run) against fp64: logits and W.grad within
    2^-14 of sum |x| |W| (|g| |x| for W.grad), where TF32 (11 bits) or a plain bf16 weight is off by about 2^-10;
    x.grad (bf16) within one bf16 rounding (unit roundoff 2^-8) of a sum good to 2^-14. Also used by the CUDA test."""
    x64, W64, g64 = x.detach().double(), W.detach().double(), g.double()
    assert logits.dtype == torch.float32
    ref, scale = x64 @ W64.T, x64.abs() @ W64.abs().T
    assert ((logits.detach().double() - ref).abs() / scale).max() < 2 ** -14
    plain_bf16 = x64 @ W.detach().bfloat16().double().T  # the bound can fail: dropping the lo half breaks it
    assert ((plain_bf16 - ref).abs() / scale).max() > 2 ** -12
    dW_ref, dW_scale = g64.T @ x64, g64.abs().T @ x64.abs()
    assert W.grad.dtype == torch.float32 and ((W.grad.double() - dW_ref).abs() / dW_scale).max() < 2 ** -14
    dx_ref, dx_scale = g64 @ W64, g64.abs() @ W64.abs()
    assert x.grad.dtype == torch.bfloat16
    assert ((x.grad.double() - dx_ref).abs() <= dx_ref.abs() * 2 ** -8 + dx_scale * 2 ** -14).all()


@pytest.mark.slow
def test_split_router_against_fp64():
    # the algorithm of the CUDA bf16 router; on a CPU _bf16_mm runs the same bf16 products in fp32 math
    from nanochat.moe import _RouterLogitsSplit, _split_bf16
    torch.manual_seed(0)
    n, E, w = 512, 8, 256
    x = torch.randn(n, w).bfloat16().requires_grad_()
    W = (torch.randn(E, w) * w ** -0.5).requires_grad_()
    g = torch.randn(n, E)
    logits = _RouterLogitsSplit.apply(x, W)
    logits.backward(g)
    assert_router_near_fp64(x, W, g, logits)
    for split in (_split_bf16, torch.compile(_split_bf16)):  # compiled: inductor must not fold the split away
        hi, lo = split(W.detach())
        assert hi.dtype == lo.dtype == torch.bfloat16
        assert ((hi.double() + lo.double() - W.detach().double()).abs() <= W.detach().double().abs() * 2 ** -15).all()
        assert (lo != 0).float().mean() > 0.9


# -----------------------------------------------------------------------------
# losses by hand

def test_aux_and_z_loss_by_hand():
    moe = MoE(2, 2, 8, drop_tokens=False)
    with torch.no_grad():
        moe.router.weight.copy_(torch.eye(2))
    x = torch.tensor([[[2.0, 0.0], [0.0, 1.0], [3.0, 0.0]]])  # logits = x; top-1: experts 0, 1, 0
    moe(x)
    p = [[math.exp(2) / (math.exp(2) + 1), 1 / (math.exp(2) + 1)],
         [1 / (1 + math.e), math.e / (1 + math.e)],
         [math.exp(3) / (math.exp(3) + 1), 1 / (math.exp(3) + 1)]]
    f = [2 / 3, 1 / 3]
    P = [sum(r[e] for r in p) / 3 for e in range(2)]
    aux = 2 * (f[0] * P[0] + f[1] * P[1])
    z = (math.log(math.exp(2) + 1) ** 2 + math.log(1 + math.e) ** 2 + math.log(math.exp(3) + 1) ** 2) / 3
    assert abs(moe.aux_loss.item() - aux) < 1e-6
    assert abs(moe.z_loss.item() - z) < 1e-5
    assert abs(moe.router_loss.item() - (1e-2 * aux + 1e-3 * z)) < 1e-6
    (moe.aux_loss + moe.z_loss).backward()
    assert moe.router.weight.grad.abs().sum() > 0


def test_aux_loss_is_one_when_balanced():
    moe = MoE(4, 4, 8, top_k=2, drop_tokens=False)
    with torch.no_grad():
        moe.router.weight.zero_()  # uniform probs; ties resolved, but f sums to 1 and P = 1/E
    moe(torch.randn(2, 8, 4))
    assert abs(moe.aux_loss.item() - 1.0) < 1e-6


# -----------------------------------------------------------------------------
# mask

@pytest.mark.parametrize("dispatch", ["grouped_mm", "bmm"])
def test_mask_consumes_no_capacity(dispatch):
    moe = crafted_moe(capacity_factor=2.0, min_capacity=1, dispatch=dispatch)
    x = onehot_tokens(torch.zeros(1, 12, dtype=torch.long))  # everything prefers expert 0
    mask = torch.tensor([[False] * 8 + [True] * 4])
    y = moe(x, mask=mask)[0]
    # n = 4 real tokens -> capacity max(1, ceil(2 * 4 / 4)) = 2 (counting padding would give 6):
    # real tokens 8, 9 kept, 10, 11 dropped, padding routed nowhere
    assert moe.last_stats["tokens_per_expert"].tolist() == [2, 0, 0, 0] and moe.last_stats["dropped"] == 2
    assert torch.equal(y[:8], torch.zeros(8, 4)) and torch.equal(y[10:], torch.zeros(2, 4))
    assert (y[8:10].abs().sum(dim=1) > 0).all()


@pytest.mark.parametrize("dispatch", ["grouped_mm", "bmm"])
def test_padding_does_not_change_real_tokens(dispatch):
    moe = random_moe(capacity_factor=1.0, min_capacity=1, dispatch=dispatch)
    x = torch.randn(2, 6, 16)
    y = moe(x)
    stats, aux, z = moe.last_stats, moe.aux_loss.item(), moe.z_loss.item()
    xp = 100 * torch.randn(2, 9, 16)  # garbage padding: 2 left, 1 right
    xp[:, 2:8] = x
    mask = torch.zeros(2, 9, dtype=torch.bool)
    mask[:, 2:8] = True
    yp = moe(xp, mask=mask)
    assert stats["dropped"] > 0 and moe.last_stats["dropped"] == stats["dropped"]
    torch.testing.assert_close(yp[:, 2:8], y, rtol=0, atol=1e-6)
    assert torch.equal(yp[:, :2], torch.zeros(2, 2, 16)) and torch.equal(yp[:, 8:], torch.zeros(2, 1, 16))
    assert abs(moe.aux_loss.item() - aux) < 1e-6 and abs(moe.z_loss.item() - z) < 1e-6
    y_ref, _, _ = moe_reference(moe, xp, mask=mask)
    torch.testing.assert_close(yp, y_ref, rtol=1e-5, atol=1e-5)


def test_all_masked():
    moe = random_moe()
    y = moe(torch.randn(2, 3, 16), mask=torch.zeros(2, 3, dtype=torch.bool))
    assert torch.equal(y, torch.zeros(2, 3, 16))
    assert moe.aux_loss.item() == 0 and moe.last_stats["tokens_per_expert"].sum() == 0


def test_bad_inputs_raise():
    moe = random_moe()
    with pytest.raises(ValueError, match="dim"):
        moe(torch.randn(1, 2, 32))
    with pytest.raises(ValueError, match="mask"):
        moe(torch.randn(1, 2, 16), mask=torch.ones(1, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="width"):
        moe(torch.randn(1, 2, 16), width=8)


# -----------------------------------------------------------------------------
# Matryoshka width

@pytest.mark.parametrize("dispatch", ["grouped_mm", "bmm"])
def test_width_slicing_equals_prefix_moe(dispatch):
    moe = random_moe(D=16, H=32, capacity_factor=1.0, min_capacity=1, dispatch=dispatch)
    small = MoE(8, 4, 16, capacity_factor=1.0, min_capacity=1, dispatch=dispatch)
    with torch.no_grad():
        small.router.weight.copy_(moe.router.weight[:, :8])
        small.w_in.copy_(moe.w_in[:, :16, :8])
        small.w_out.copy_(moe.w_out[:, :8, :16])
    x = torch.randn(3, 5, 8)
    y = moe(x, width=8)
    stats, aux = moe.last_stats, moe.aux_loss
    y_small = small(x)
    assert stats["tokens_per_expert"].tolist() == small.last_stats["tokens_per_expert"].tolist()
    torch.testing.assert_close(y, y_small, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(aux, small.aux_loss)
    y_ref, _, _ = moe_reference(moe, x)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    xf = torch.randn(3, 5, 16)  # full width: the width argument changes nothing
    assert torch.equal(moe(xf, width=16), moe(xf))


# -----------------------------------------------------------------------------
# bias balancing

def test_bias_balancing_moves_towards_balance():
    torch.manual_seed(0)
    moe = MoE(8, 4, 16, bias_balancing=True, bias_update_rate=0.02, drop_tokens=False)
    with torch.no_grad():
        moe.router.weight.normal_(0.0, 0.3)
        moe.router.weight[0, 0] = 3.0  # expert 0 wins almost whenever channel 0 is positive
    x = torch.randn(4, 32, 8)
    x[..., 0] = x[..., 0].abs() + 0.5
    moe.train()
    loads = []
    for _ in range(40):
        moe(x)
        loads.append(moe.last_stats["tokens_per_expert"].float() / 128)
        moe.update_bias()
    assert loads[0][0] > 0.9  # skewed at the start
    for load in loads[-5:]:  # the sign rule oscillates by one step around balance
        assert load.max() < 0.4 and load.min() > 0.1, load
    assert moe.expert_bias[0] < 0
    # the bias picks experts but never weights them
    _, probs, top_idx, gate = moe.route(x.reshape(-1, 8), 8)
    assert torch.equal(gate, probs.gather(1, top_idx))
    with pytest.raises(RuntimeError, match="no training-mode forward"):
        moe.update_bias()
    assert "expert_bias" in moe.state_dict() and "_load_accum" not in moe.state_dict()


def test_update_bias_needs_flag():
    with pytest.raises(RuntimeError, match="bias_balancing"):
        MoE(8, 4, 16).update_bias()


# -----------------------------------------------------------------------------
# init and upcycling

def test_init_and_meta():
    moe = MoE(64, 4, 256)
    assert torch.equal(moe.w_out, torch.zeros_like(moe.w_out))
    assert abs(moe.w_in.std().item() - 1 / 8) < 0.01
    assert torch.equal(moe(torch.randn(1, 3, 64)), torch.zeros(1, 3, 64))  # a fresh block adds nothing
    meta = MoE(64, 4, 256, device="meta")
    assert meta.w_in.is_meta
    meta.to_empty(device="cpu")
    meta.init_weights()
    assert torch.equal(meta.w_out, torch.zeros_like(meta.w_out)) and meta.w_in.std() > 0


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize("top_k", [1, 2])
def test_upcycling_is_exact(dtype, tol, top_k):
    torch.manual_seed(0)
    D, H = 16, 64
    c_fc = torch.randn(H, D, dtype=dtype) / 4
    c_proj = torch.randn(D, H, dtype=dtype) / 8
    x = torch.randn(2, 7, D, dtype=dtype)
    dense = F.linear(F.relu(F.linear(x, c_fc)).square(), c_proj)
    moe = MoE.from_dense(c_fc, c_proj, num_experts=4, top_k=top_k)
    with torch.no_grad():
        moe.router.weight.normal_(0, 1.0)  # a router with real preferences: spread over experts
    x = x.requires_grad_(True)
    y = moe(x)
    assert (moe.last_stats["tokens_per_expert"] > 0).sum() >= 2
    torch.testing.assert_close(y, dense, rtol=tol, atol=tol)
    (y * torch.randn_like(y)).sum().backward()
    assert moe.router.weight.grad.abs().sum() > 0  # straight-through gate still trains the router
    # the plain Switch gate is NOT the dense function
    plain = MoE.from_dense(c_fc, c_proj, num_experts=4, top_k=top_k, straight_gate=False)
    with torch.no_grad():
        plain.router.weight.copy_(moe.router.weight)
    if top_k == 1:
        assert not torch.allclose(plain(x), dense, atol=1e-3)


# -----------------------------------------------------------------------------
# the expert_dispatch hook (what nanochat.moe_ep installs; its own tests are tests/test_moe_ep.py)

class ReversedDispatch:
    """An expert_dispatch that runs the experts in this process with MoE's public helpers, the expert groups in
    reverse order (rows moved by permute_rows and back), and NaN in the rows past the kept ones."""

    def __init__(self):
        self.runs, self.level_calls = 0, []

    def run(self, moe, xs, kept_counts, cdtype):
        self.runs += 1
        (nk, w), n_kept = xs.shape, int(kept_counts.sum())
        h_w = moe.expert_dim * w // moe.dim
        ends = kept_counts.cumsum(0).tolist()
        order = torch.cat([torch.arange(e - c, e) for e, c in zip(ends[::-1], kept_counts.flip(0).tolist())])
        inverse = torch.empty_like(order).scatter_(0, order, torch.arange(n_kept))
        path, _ = moe.pick_path(cdtype, xs.device, w, h_w)
        ys = moe.run_experts(permute_rows(xs[:n_kept], order, inverse), kept_counts.flip(0),
                             moe.w_in[:, :h_w, :w].flip(0).to(cdtype), moe.w_out[:, :w, :h_w].flip(0).to(cdtype),
                             path, int(kept_counts.max()))
        return torch.cat([permute_rows(ys, inverse, order), ys.new_full((nk - n_kept, w), float("nan"))])

    def levels_for_call(self, moe, levels):
        self.level_calls.append(levels)
        return levels + [moe.dim]


@pytest.mark.parametrize("dispatch", ["grouped_mm", "bmm"])
def test_expert_dispatch_hook_runs_the_experts(dispatch):
    """An installed expert_dispatch computes the expert rows: the MoE's outputs and gradients are those without it
    (NaN in the dropped rows never leaks), and levels_for_call is the dispatch's answer for the sorted levels."""
    ref = random_moe(top_k=2, capacity_factor=1.0, min_capacity=1, dispatch=dispatch)
    hooked = copy.deepcopy(ref)
    hooked.expert_dispatch = ReversedDispatch()
    x, g = torch.randn(2, 8, 16), torch.randn(2, 8, 16)
    y_ref, gr_ref = run_with_grad(ref, ref, x, g)
    y, gr = run_with_grad(hooked, hooked, x, g)
    assert hooked.expert_dispatch.runs == 1 and ref.last_stats["dropped"] > 0
    assert torch.equal(hooked.last_stats["tokens_per_expert"], ref.last_stats["tokens_per_expert"])
    torch.testing.assert_close(y, y_ref, rtol=1e-6, atol=1e-6)
    for a, b in zip(gr, gr_ref):  # x, w_in, w_out, router
        assert a.abs().sum() > 0
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    assert ref.levels_for_call([16, 4, 8]) == [4, 8, 16]
    assert hooked.levels_for_call([8, 4]) == [4, 8, 16] and hooked.expert_dispatch.level_calls == [[4, 8]]


def test_permute_rows_gathers_both_ways():
    x = torch.randn(6, 3, requires_grad=True)
    index = torch.randperm(6)
    y = permute_rows(x, index, torch.argsort(index))
    assert torch.equal(y, x[index])
    g = torch.randn(6, 3)
    y.backward(g)
    assert torch.equal(x.grad, torch.zeros(6, 3).index_add(0, index, g))


# -----------------------------------------------------------------------------
# the static-shape dispatch: no host sync, dropped rows masked, garbage past offs[-1] never leaks

def skewed_moe(top_k, dispatch, dtype=torch.float32, **kw):
    moe = random_moe(top_k=top_k, capacity_factor=1.0, min_capacity=1, dispatch=dispatch, dtype=dtype, **kw)
    with torch.no_grad():
        moe.router.weight.normal_(0.0, 1.0)  # strong preferences: some experts overflow for top-1 and top-2
    return moe


@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("dispatch", ["grouped_mm", "bmm"])
def test_drops_equal_reference_with_grads(top_k, dispatch):
    moe = skewed_moe(top_k, dispatch)
    x, g = torch.randn(4, 16, 16), torch.randn(4, 16, 16)
    y, gr = run_with_grad(moe, moe, x, g)
    stats = moe.last_stats
    y_ref, gr_ref = run_with_grad(lambda t: moe_reference(moe, t), moe, x, g)
    _, kept_ref, dropped_ref = moe_reference(moe, x)
    assert dropped_ref > 0 and isinstance(stats["dropped"], int) and stats["dropped"] == dropped_ref
    assert stats["tokens_per_expert"].tolist() == kept_ref.tolist()
    # fp32, same products and sums in the same order as the loop: exact on the CPU here; 1e-6 leaves room for
    # another BLAS
    torch.testing.assert_close(y, y_ref, rtol=1e-6, atol=1e-6)
    for a, b in zip(gr, gr_ref):  # x, w_in, w_out, router
        assert a.abs().sum() > 0
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dispatch", ["grouped_mm", "bmm"])
def test_capacity_of_all_tokens_drops_nothing(dispatch):
    moe = crafted_moe(capacity_factor=1.0, min_capacity=10, dispatch=dispatch)  # capacity 10 = n: no mask needed
    x = onehot_tokens(torch.zeros(2, 5, dtype=torch.long))  # all 10 tokens choose expert 0
    y = moe(x)
    assert moe.last_stats["tokens_per_expert"].tolist() == [10, 0, 0, 0] and moe.last_stats["dropped"] == 0
    torch.testing.assert_close(y, moe_reference(moe, x)[0], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("top_k,dispatch", [(1, "grouped_mm"), (2, "grouped_mm"), (1, "bmm")])
def test_no_mask_fwd_bwd_has_no_sync_op(top_k, dispatch):
    moe = skewed_moe(top_k, dispatch)
    x = torch.randn(4, 16, 16, requires_grad=True)
    with SyncOps() as ops:
        moe(x).square().sum().backward()
    assert ops.seen == []
    assert moe.last_stats["dropped"] > 0  # reading the stats is where the int is made
    with SyncOps() as ops:  # the detector sees the one sync a mask costs
        moe(x, mask=torch.ones(4, 16, dtype=torch.bool))
    assert any("nonzero" in op for op in ops.seen)


@pytest.mark.parametrize("top_k,dispatch,dtype,drop_tokens", [
    (1, "grouped_mm", torch.bfloat16, True),
    (2, "grouped_mm", torch.bfloat16, True),
    (1, "grouped_mm", torch.bfloat16, False),
    (2, "auto", torch.float32, True),  # fp32 grouped_mm has no meta function under compile: auto picks bmm
])
def test_no_mask_forward_compiles_fullgraph(top_k, dispatch, dtype, drop_tokens):
    """
    One graph (fullgraph=True) with no unbacked symbol: torch 2.13's compiler accepts .item() and nonzero in a
    full graph but gives their results unbacked symbols, so none means no data-dependent value or shape.
    Then aot_eager runs it, and outputs and gradients must match eager.
    """
    from torch._dynamo.backends.registry import lookup_backend
    from torch.fx.experimental.symbolic_shapes import free_unbacked_symbols
    graphs, unbacked = [], set()

    def backend(gm, example_inputs):
        graphs.append(gm)
        for node in gm.graph.nodes:
            if node.meta.get("example_value") is not None:
                unbacked.update(str(u) for u in free_unbacked_symbols(node.meta["example_value"]))
        return lookup_backend("aot_eager")(gm, example_inputs)

    torch._dynamo.reset()
    moe = skewed_moe(top_k, dispatch, dtype=dtype, drop_tokens=drop_tokens)
    x, g = torch.randn(4, 16, 16, dtype=dtype), torch.randn(4, 16, 16, dtype=dtype)
    y, gr = run_with_grad(moe, moe, x, g)
    stats = moe.last_stats
    assert (stats["dropped"] > 0) == drop_tokens
    compiled = torch.compile(moe, fullgraph=True, backend=backend)
    y_c, gr_c = run_with_grad(compiled, moe, x, g)
    assert len(graphs) == 1 and not unbacked, unbacked
    assert moe.last_stats["dropped"] == stats["dropped"]
    assert torch.equal(moe.last_stats["tokens_per_expert"], stats["tokens_per_expert"])
    # aot_eager runs the same kernels as eager: equal up to rounding (observed exact)
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(y_c, y, rtol=tol, atol=tol)
    for a, b in zip(gr_c, gr):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)


def nan_past_offs(grouped_mm):
    """torch._grouped_mm with every row past offs[-1] of its output, and of its input gradient, set to NaN:
    what undefined memory may hold on a GPU. The weight gradient is the real kernel's (it sums group rows only)."""

    class NaNPastOffs(torch.autograd.Function):
        @staticmethod
        def forward(ctx, a, b, offs):
            ctx.save_for_backward(a, b, offs)
            out = grouped_mm(a, b, offs=offs)
            out[int(offs[-1]):] = float("nan")
            return out

        @staticmethod
        def backward(ctx, grad):
            a, b, offs = ctx.saved_tensors
            with torch.enable_grad():
                a_, b_ = a.detach().requires_grad_(), b.detach().requires_grad_()
                ga, gb = torch.autograd.grad(grouped_mm(a_, b_, offs=offs), (a_, b_), grad)
            ga[int(offs[-1]):] = float("nan")
            return ga, gb, None

    return lambda a, b, offs: NaNPastOffs.apply(a, b, offs)


@pytest.mark.parametrize("top_k", [1, 2])
def test_garbage_past_offs_never_leaks(monkeypatch, top_k):
    moe = skewed_moe(top_k, "grouped_mm")
    x, g = torch.randn(4, 16, 16), torch.randn(4, 16, 16)
    y_ref, gr_ref = run_with_grad(lambda t: moe_reference(moe, t), moe, x, g)
    _, _, dropped_ref = moe_reference(moe, x)
    assert dropped_ref > 0  # there are rows past offs[-1]
    monkeypatch.setattr(torch, "_grouped_mm", nan_past_offs(torch._grouped_mm))
    y, gr = run_with_grad(moe, moe, x, g)
    assert moe.last_stats["dropped"] == dropped_ref
    assert torch.isfinite(y).all() and all(torch.isfinite(a).all() for a in gr)
    torch.testing.assert_close(y, y_ref, rtol=1e-6, atol=1e-6)
    for a, b in zip(gr, gr_ref):  # x, w_in, w_out, router
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)

"""
Optimizers: Muon's update is (approximately) orthogonal and points along U V^T of the gradient;
parameters go to the right optimizer, learning rate and weight decay by their kind; schedules.
"""
import math

import pytest
import torch
import torch.nn as nn

from nanochat.optim import (Muon, orthogonalize, setup_optimizers, classify_params, lr_multiplier,
                            set_lr_multiplier, muon_momentum, set_muon_momentum, optimizer_state_dicts,
                            load_optimizer_state_dicts)


@pytest.mark.parametrize("shape", [(32, 64), (48, 48), (64, 32)])
def test_muon_update_is_orthogonal_along_uvt(shape):
    torch.manual_seed(0)
    W = nn.Parameter(torch.randn(*shape))
    W0 = W.detach().clone()
    G = torch.randn(*shape)
    W.grad = G.clone()
    Muon([W], lr=1.0, momentum=0.0).step()
    update = (W0 - W.detach())  # lr=1, momentum 0: the update is the orthogonalised gradient, scaled
    scale = max(1.0, shape[0] / shape[1]) ** 0.5  # tall matrices move by sqrt(rows/cols) more
    s = torch.linalg.svdvals(update / scale)
    assert s.min().item() >= 0.5 and s.max().item() <= 1.5, s
    U, _, Vh = torch.linalg.svd(G, full_matrices=False)
    cos = torch.nn.functional.cosine_similarity((U @ Vh).flatten(), update.flatten(), dim=0)
    assert cos.item() > 0.9


def test_orthogonalize_batches_over_leading_dims():
    """3-D stacked expert weights are orthogonalised one matrix at a time."""
    torch.manual_seed(0)
    G = torch.randn(3, 16, 24)
    X = orthogonalize(G)
    for e in range(3):
        assert torch.allclose(X[e], orthogonalize(G[e]), atol=1e-6)


def _orthogonalize_reference(G, steps=5):
    """The quintic Newton-Schulz iteration written out op by op (what orthogonalize fuses into baddbmm)."""
    a, b, c = 3.4445, -4.7750, 2.0315
    X = G.mT if G.size(-2) > G.size(-1) else G
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    for _ in range(steps):
        A = X @ X.mT
        B = b * A + c * A @ A
        X = a * X + B @ X
    return X.mT if G.size(-2) > G.size(-1) else X


@pytest.mark.parametrize("shape", [(64, 48), (48, 64), (3, 20, 12)])
def test_orthogonalize_equals_the_unfused_iteration(shape):
    """The fused Newton-Schulz (scalings in the GEMM epilogues) computes the plain formula: fp32 on CPU, 1e-5."""
    torch.manual_seed(0)
    G = torch.randn(*shape)
    torch.testing.assert_close(orthogonalize(G), _orthogonalize_reference(G), rtol=1e-5, atol=1e-5)


class FakeConfig:
    n_embd = 192  # AdamW lrs are scaled by (192/768)^-0.5 = 2


class HybridLike(nn.Module):
    """Parameter names as a hybrid Mamba-attention model has them."""

    def __init__(self):
        super().__init__()
        self.config = FakeConfig()
        self.transformer = nn.ModuleDict({"wte": nn.Embedding(50, 16)})
        attn = nn.Module()
        attn.c_q = nn.Linear(16, 16, bias=False)
        mixer = nn.Module()
        mixer.in_proj = nn.Linear(16, 64, bias=False)
        mixer.conv1d = nn.Conv1d(32, 32, kernel_size=4, groups=32, padding=3)  # weight (32, 1, 4) + bias
        mixer.x_proj = nn.Linear(32, 9, bias=False)
        mixer.dt_proj = nn.Linear(1, 32, bias=True)
        mixer.A_log = nn.Parameter(torch.zeros(32, 4))
        mixer.A_log._no_weight_decay = True
        mixer.D = nn.Parameter(torch.ones(32))
        mixer.dt_bias = nn.Parameter(torch.zeros(32))
        mixer.out_proj = nn.Linear(32, 16, bias=False)
        moe = nn.Module()
        moe.w_in = nn.Parameter(torch.randn(4, 16, 32))  # stacked experts: (E, in, out)
        moe.router = nn.Linear(16, 4, bias=False)
        block0, block1 = nn.Module(), nn.Module()
        block0.attn, block1.mixer, block1.moe = attn, mixer, moe
        self.blocks = nn.ModuleList([block0, block1])
        self.lm_head = nn.Linear(16, 50, bias=False)
        self.frozen = nn.Parameter(torch.zeros(4, 4), requires_grad=False)


def test_parameter_kinds_go_to_the_right_optimizer():
    model = HybridLike()
    kinds = {name: kind for kind, items in classify_params(model).items() for name, _ in items}
    expected = {
        "transformer.wte.weight": "embedding",
        "lm_head.weight": "head",
        "blocks.0.attn.c_q.weight": "matrix",
        "blocks.1.mixer.in_proj.weight": "matrix",
        "blocks.1.mixer.x_proj.weight": "matrix",
        "blocks.1.mixer.dt_proj.weight": "matrix",
        "blocks.1.mixer.out_proj.weight": "matrix",
        "blocks.1.moe.w_in": "matrix",
        "blocks.1.mixer.conv1d.weight": "scalar",
        "blocks.1.mixer.conv1d.bias": "scalar",
        "blocks.1.mixer.dt_proj.bias": "scalar",
        "blocks.1.mixer.A_log": "scalar",
        "blocks.1.mixer.D": "scalar",
        "blocks.1.mixer.dt_bias": "scalar",
        "blocks.1.moe.router.weight": "scalar",
    }
    assert kinds == expected  # and the frozen parameter is in no group

    adamw, muon = setup_optimizers(model, matrix_lr=0.03, embedding_lr=0.2, unembedding_lr=0.004,
                                   scalar_lr=0.005, weight_decay=0.1)
    assert isinstance(adamw, torch.optim.AdamW) and isinstance(muon, Muon)
    by_param = {}
    for opt in (adamw, muon):
        for g in opt.param_groups:
            for p in g["params"]:
                assert id(p) not in by_param, "a parameter is in two groups"
                by_param[id(p)] = (opt, g)
    names = dict(model.named_parameters())
    assert len(by_param) == len(expected)
    for name, kind in expected.items():
        opt, g = by_param[id(names[name])]
        if kind == "matrix":
            assert opt is muon and g["lr"] == 0.03
        else:
            assert opt is adamw
            lr = {"embedding": 0.2, "head": 0.004, "scalar": 0.005}[kind] * 2.0
            assert g["lr"] == pytest.approx(lr)
            assert g["weight_decay"] == (0.0 if kind == "scalar" else 0.1), name
        assert g["initial_lr"] == g["lr"]


def test_model_param_kind_override():
    model = HybridLike()
    model.param_kind = lambda name, p: "scalar" if name == "blocks.0.attn.c_q.weight" else None
    kinds = {name: kind for kind, items in classify_params(model).items() for name, _ in items}
    assert kinds["blocks.0.attn.c_q.weight"] == "scalar"
    assert kinds["blocks.1.mixer.in_proj.weight"] == "matrix"
    model.param_kind = lambda name, p: "bogus"
    with pytest.raises(ValueError, match="bogus"):
        classify_params(model)


def test_lr_schedule_shape():
    N = 100
    lrm = [lr_multiplier(s, N, warmup_ratio=0.1, warmdown_ratio=0.2, final_lr_frac=0.1) for s in range(N + 1)]
    # warmup: linear from 1/10 to 1 over steps 0..9
    assert lrm[0] == pytest.approx(0.1) and lrm[9] == pytest.approx(1.0)
    assert all(b > a for a, b in zip(lrm[:9], lrm[1:10]))
    # constant through the start of warmdown (step N - 20)
    assert all(v == 1.0 for v in lrm[10:81])
    # warmdown: strictly decreasing, linear, reaching final_lr_frac at step N
    assert all(b < a for a, b in zip(lrm[80:], lrm[81:]))
    assert lrm[90] == pytest.approx(0.5 * 1.0 + 0.5 * 0.1)
    assert lrm[N] == pytest.approx(0.1)
    # no warmup, no warmdown: constant
    assert {lr_multiplier(s, 10, 0.0, 0.0) for s in range(11)} == {1.0}


def test_set_lr_and_momentum():
    model = HybridLike()
    optimizers = setup_optimizers(model)
    set_lr_multiplier(optimizers, 0.5)
    for opt in optimizers:
        for g in opt.param_groups:
            assert g["lr"] == pytest.approx(0.5 * g["initial_lr"])
    assert muon_momentum(0) == pytest.approx(0.85)
    assert muon_momentum(150) == pytest.approx(0.90)
    assert muon_momentum(300) == muon_momentum(1000) == pytest.approx(0.95)
    set_muon_momentum(optimizers, 0.9)
    assert all(g["momentum"] == 0.9 for g in optimizers[1].param_groups)


def test_optimizer_state_round_trip():
    torch.manual_seed(0)
    model = HybridLike()
    optimizers = setup_optimizers(model)
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.randn_like(p)
    for opt in optimizers:
        opt.step()
    states = optimizer_state_dicts(optimizers)
    fresh = setup_optimizers(HybridLike())
    load_optimizer_state_dicts(fresh, states)
    for a, b in zip(optimizers, fresh):
        sa, sb = a.state_dict(), b.state_dict()
        assert sa["param_groups"] == sb["param_groups"]
        for k in sa["state"]:
            for name, v in sa["state"][k].items():
                assert torch.equal(v, sb["state"][k][name]), (k, name)
    with pytest.raises(ValueError, match="expected 2"):
        load_optimizer_state_dicts(fresh, states[:1])
    assert not math.isnan(sum(p.sum().item() for p in model.parameters()))


def test_stacked_muon_equals_one_matrix_at_a_time():
    """Muon(stack=True) orthogonalises same-shaped matrices of a group together (in chunks of STACK_MAX): the
    parameters after three steps equal stack=False's (fp32 on CPU, 1e-6), with groups of other lr / weight decay, a
    shape of its own, more matrices of one shape than a chunk, and a 3-D expert stack beside them."""
    torch.manual_seed(0)
    shapes = [(24, 16)] * (Muon.STACK_MAX + 3) + [(16, 24), (16, 24), (20, 20)]
    params = [torch.randn(*s) for s in shapes] + [torch.randn(3, 8, 12)]
    grads = [[torch.randn_like(p) for p in params] for _ in range(3)]

    def run(stack):
        ps = [nn.Parameter(p.clone()) for p in params]
        opt = Muon([dict(params=ps[:10]), dict(params=ps[10:], lr=0.05, weight_decay=0.1)], lr=0.02, stack=stack)
        for gs in grads:
            for p, g in zip(ps, gs):
                p.grad = g.clone()
            opt.step()
        return ps
    for a, b in zip(run(True), run(False)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    moved = run(True)
    assert all(not torch.equal(p, q) for p, q in zip(moved, params))

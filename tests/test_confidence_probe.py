"""Controllers: shadow-loss training touches only the controllers, calibration, reliability, plan rule."""
import random

import pytest
import torch

from nanochat.hybrid_gpt import HybridGPT, HybridConfig
from nanochat.confidence_probe import (controller_losses, isotonic_steps, reliability_table, gate_scores,
                                       calibrate_gates, ConfidenceGate, LayerDimPredictor)
from nanochat.checkpoint_manager import save_model, load_model
from testutil import fill_zero_matrices

V = 64


def build(seed=0, **kw):
    base = dict(sequence_len=32, vocab_size=V, n_layer=3, n_head=4, n_kv_head=2, n_embd=64, layer_pattern="A",
                ffn_pattern="D", width_levels=[16, 32, 64], gate_hidden=16, predictor_hidden=16)
    base.update(kw)
    torch.manual_seed(seed)
    model = HybridGPT(HybridConfig(**base))
    model.init_weights()
    fill_zero_matrices(model, 0.3, torch.Generator().manual_seed(seed))
    return model


def test_shadow_losses_train_the_controllers_only():
    model = build()
    model.train()
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(0, V, (4, 16), generator=g)
    targets = torch.randint(0, V, (4, 16), generator=g)
    targets[0, :3] = -1  # ignored positions take part in neither loss
    ctrl_params = list(model.controllers.parameters())
    opt = torch.optim.AdamW(ctrl_params, lr=1e-2)
    kw = dict(n_probes=2, probe_rows=2)

    def losses(seed):
        out = model(idx, targets, return_exits=True)
        return controller_losses(model, idx, targets, out, rng=random.Random(seed), **kw)

    with torch.no_grad():
        lm_before = model(idx, targets).item()
    first = losses(0)
    first_gate, first_pred = first["gate_loss"].item(), first["predictor_loss"].item()
    first["loss"].backward()
    trunk = [n for n, p in model.named_parameters() if not n.startswith("controllers.")]
    assert all(dict(model.named_parameters())[n].grad is None for n in trunk)  # stop-gradient into the trunk
    assert all(p.grad is not None for p in ctrl_params if p.requires_grad)
    assert first["probe_delta"].abs().item() > 1e-4  # narrowing a block changes the loss: there is a signal
    opt.step()
    for step in range(20):
        opt.zero_grad(set_to_none=True)
        losses(step % 3)["loss"].backward()  # three fixed probe draws
        opt.step()
    last = losses(0)
    assert model.training  # the probes' eval() is undone
    assert last["gate_loss"].item() < 0.8 * first_gate
    assert last["predictor_loss"].item() < 0.5 * first_pred
    with torch.no_grad():
        assert model(idx, targets).item() == lm_before  # the trunk was never updated


def test_gate_loss_target_from_loss_margin():
    model = build()
    idx = torch.randint(0, V, (2, 12))
    out = model(idx, idx, return_exits=True)
    res = controller_losses(model, idx, idx, out, gate_target="loss", loss_delta=1e9, n_probes=0)
    assert res["gate_target_rate"].item() == 1.0  # every exit is within an infinite margin
    with pytest.raises(ValueError):
        controller_losses(model, idx, idx, model(idx, idx, return_exits=True), gate_target="vibes")


def pav_reference(p, y):
    """Plain pool-adjacent-violators over sorted samples (ties pooled first), as a list of per-sample values."""
    order = sorted(range(len(p)), key=lambda i: p[i])
    groups = []
    for i in order:
        if groups and groups[-1]["p"] == p[i]:
            groups[-1]["ys"].append(y[i])
        else:
            groups.append({"p": p[i], "ys": [y[i]]})
    blocks = [[sum(g["ys"]), len(g["ys"]), [g["p"]]] for g in groups]
    changed = True
    while changed:
        changed = False
        for k in range(len(blocks) - 1):
            if blocks[k][0] / blocks[k][1] >= blocks[k + 1][0] / blocks[k + 1][1]:
                blocks[k] = [blocks[k][0] + blocks[k + 1][0], blocks[k][1] + blocks[k + 1][1], blocks[k][2] + blocks[k + 1][2]]
                del blocks[k + 1]
                changed = True
                break
    return {pp: b[0] / b[1] for b in blocks for pp in b[2]}


def apply_steps(lo, val, p):
    gate = ConfidenceGate(4, 1, 2, len(lo))
    gate.init_weights()
    gate.calib_lo[0] = torch.tensor(lo)
    gate.calib_val[0] = torch.tensor(val)
    gate.calib_on[0] = True
    return gate.calibrate(p, 0)


def test_isotonic_steps_match_pav_and_keep_the_promise():
    g = torch.Generator().manual_seed(0)
    p = torch.rand(300, generator=g).mul(50).round().div(50)  # ties included
    y = torch.rand(300, generator=g) < p ** 2
    lo, val = isotonic_steps(p, y, max_bins=1000, min_count=1)  # no merging: plain PAV
    ref = pav_reference(p.tolist(), y.float().tolist())
    got = apply_steps(lo, val, p)
    torch.testing.assert_close(got, torch.tensor([ref[x] for x in p.tolist()]), rtol=0, atol=1e-6)
    lo, val = isotonic_steps(p, y, max_bins=8, min_count=20)
    assert len(lo) <= 8 and val == sorted(val) and lo == sorted(lo)
    cal = apply_steps(lo, val, p)
    for tau in (0.3, 0.5, 0.7, 0.9):  # on the fitting data, what passes tau agrees at a rate > tau
        sel = cal > tau
        if sel.any():
            assert y[sel].float().mean().item() > tau


def test_reliability_table_on_synthetic_gates():
    # two gates, overconfident: P(agree | raw score s) = s^3
    g = torch.Generator().manual_seed(0)

    def draw(n):
        s = torch.rand(2, n, generator=g)
        return s, torch.rand(2, n, generator=g) < s ** 3

    s_fit, y_fit = draw(20000)
    s_test, y_test = draw(20000)
    raw = reliability_table(s_test, y_test)
    steps = [isotonic_steps(s_fit[i], y_fit[i]) for i in range(2)]
    cal = torch.stack([apply_steps(*steps[i], s_test[i]) for i in range(2)])
    lines = []
    rows = reliability_table(cal, y_test, print_fn=lines.append)
    assert len(lines) == len(rows) + 1
    rates = [r["exit_rate"] for r in rows]
    assert rates == sorted(rates, reverse=True)  # a higher threshold never exits more
    for r in rows:
        if r["n_exit"] >= 300:
            assert r["precision"] >= r["tau"] - 0.02, r
            assert r["exit_rate"] == pytest.approx(r["n_exit"] / 20000)
    # the raw scores do not keep the promise: that is why there is a calibration
    assert any(r["precision"] < r["tau"] - 0.05 for r in raw if r["n_exit"] >= 300)
    # consistency of the sequential policy with a brute-force count
    tau = 0.6
    first = [next((i for i in range(2) if cal[i, n] > tau), None) for n in range(20000)]
    ex = [n for n in range(20000) if first[n] is not None]
    prec = sum(bool(y_test[first[n], n]) for n in ex) / len(ex)
    row = reliability_table(cal, y_test, thresholds=(tau,))[0]
    assert row["n_exit"] == len(ex) and row["precision"] == pytest.approx(prec)


def test_calibrate_gates_on_model_and_checkpoint_round_trip(tmp_path):
    model = build().eval()
    with torch.no_grad():
        model.controllers.gate.out.weight.normal_(0, 1.0)
    g = torch.Generator().manual_seed(0)
    held = [torch.randint(0, V, (4, 16), generator=g) for _ in range(3)]
    assert not model.controllers.is_calibrated()
    info = calibrate_gates(model, held[:2], min_count=10)
    assert model.controllers.is_calibrated() and info["n_tokens"] == 128
    probs, agree = gate_scores(model, held[:2])
    for tau in (0.5, 0.7, 0.9):  # on the calibration data the promise holds gate by gate
        for i in range(probs.size(0)):
            sel = probs[i] > tau
            if sel.any():
                assert agree[i][sel].float().mean().item() > tau
    save_model(str(tmp_path), 1, model)
    loaded, _ = load_model(str(tmp_path))
    p2, a2 = gate_scores(loaded, held[2:])
    p1, a1 = gate_scores(model, held[2:])
    assert torch.equal(p1, p2) and torch.equal(a1, a2)  # the calibration is checkpointed


def test_predictor_plan_rule():
    pred = LayerDimPredictor(8, 3, [16, 32, 64], 4, 1)
    pred.init_weights()
    delta = torch.tensor([[[0.5, 0.01, 0.0], [0.001, 0.5, 0.0], [0.9, 0.9, 0.0]]])
    plan = pred.plan(delta, 0.02, [True, True, True])
    assert plan.tolist() == [[32, 16, 64]]
    assert pred.plan(delta, 0.02, [True, False, True]).tolist() == [[32, 64, 64]]  # width changes nothing there
    # untrained: every narrowing predicted at 1 nat, so the plan is full width; the full level is always 0
    d = pred(torch.randn(2, 8))
    assert (d[..., -1] == 0).all() and (pred.plan(d, 0.02, [True] * 3) == 64).all()

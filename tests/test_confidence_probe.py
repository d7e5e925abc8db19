"""Controllers: shadow-loss training touches only the controllers, calibration, reliability, plan rule."""
import pytest
import torch

from nanochat.hybrid_gpt import HybridGPT, HybridConfig
from nanochat.confidence_probe import (controller_losses, isotonic_steps, reliability_table, gate_scores,
                                       calibrate_gates, ConfidenceGate, plan_menu, router_labels)
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
    labels = torch.tensor([[1.0, 1.0], [0.0, 1.0], [0.0, 0.0], [1.0, 0.0]])  # per row, per narrow menu plan
    ctrl_params = list(model.controllers.parameters())
    opt = torch.optim.AdamW(ctrl_params, lr=1e-2)

    def losses():
        out = model(idx, targets, return_exits=True)
        return controller_losses(model, idx, targets, out, router_target=labels)

    with torch.no_grad():
        lm_before = model(idx, targets).item()
    first = losses()
    first_gate, first_router = first["gate_loss"].item(), first["predictor_loss"].item()
    first["loss"].backward()
    trunk = [n for n, p in model.named_parameters() if not n.startswith("controllers.")]
    assert all(dict(model.named_parameters())[n].grad is None for n in trunk)  # stop-gradient into the trunk
    assert all(p.grad is not None for p in ctrl_params if p.requires_grad)
    opt.step()
    for step in range(30):
        opt.zero_grad(set_to_none=True)
        losses()["loss"].backward()
        opt.step()
    last = losses()
    assert last["gate_loss"].item() < 0.8 * first_gate
    assert last["predictor_loss"].item() < 0.5 * first_router and last["router_acc"].item() == 1.0
    with torch.no_grad():
        assert model(idx, targets).item() == lm_before  # the trunk was never updated


def test_gate_target_against_the_full_model():
    """Given the full model's top-1, a narrow plan's exit is a positive only where its own final top-1 is the full
    model's too."""
    model = build()
    idx = torch.randint(0, V, (2, 12), generator=torch.Generator().manual_seed(0))
    out = model(idx, idx, width=16, return_exits=True)
    full_top1 = model(idx).argmax(-1)
    same = controller_losses(model, idx, idx, out)["gate_target_rate"].item()
    vs_full = controller_losses(model, idx, idx, out, full_top1=full_top1)["gate_target_rate"].item()
    own = out.logits.argmax(-1)
    expected = (out.exit_agree[:-1] & (own == full_top1)).float().mean().item()
    assert vs_full == pytest.approx(expected) and vs_full <= same and (own != full_top1).any()


def test_gates_learn_only_at_the_exits_a_forward_read_out():
    """model(..., exits=...) reads out some exits (and always the last): their losses and agreement are the full
    readout's entries, and the gates' loss is the BCE of those gates alone (every exit chosen: as with all); a block
    that is no exit stops."""
    import torch.nn.functional as F
    model = build()
    idx = torch.randint(0, V, (2, 12), generator=torch.Generator().manual_seed(0))
    full = model(idx, idx, return_exits=True)
    some = model(idx, idx, return_exits=True, exits=[1])
    assert full.exit_blocks == [0, 1, 2] and some.exit_blocks == [1, 2]
    assert torch.equal(some.exit_losses, full.exit_losses[1:]) and torch.equal(some.exit_agree, full.exit_agree[1:])
    every = model(idx, idx, return_exits=True, exits=[0, 1])
    assert torch.equal(controller_losses(model, idx, idx, every)["gate_loss"],
                       controller_losses(model, idx, idx, full)["gate_loss"])
    got = controller_losses(model, idx, idx, some)
    logits = model.controllers.gate.logits(full.exit_hidden[1], 1)  # gate 1 sits after block 1
    expected = F.binary_cross_entropy_with_logits(logits.flatten(), full.exit_agree[1].float().flatten())
    torch.testing.assert_close(got["gate_loss"], expected)
    assert got["gate_target_rate"].item() == pytest.approx(full.exit_agree[1].float().mean().item())
    with pytest.raises(ValueError, match="not exit blocks"):
        model(idx, idx, return_exits=True, exits=[5])


def test_router_labels():
    full = torch.tensor([[1, 2, 3, 4], [1, 2, 3, 4]])
    narrow = [torch.tensor([[9, 2, 3, 4], [1, 2, 9, 4]]), torch.tensor([[1, 2, 3, 4], [1, 2, 3, 9]])]
    valid = torch.tensor([[True] * 4, [True, True, True, False]])
    # prompt = first 2 positions: row 0 differs only in the prompt; row 1's last position carries no loss
    assert router_labels(narrow, full, valid, 2).tolist() == [[1.0, 1.0], [0.0, 1.0]]
    assert router_labels(narrow, full, valid, 0).tolist() == [[0.0, 1.0], [0.0, 1.0]]


def test_gate_loss_target_from_loss_margin():
    model = build()
    idx = torch.randint(0, V, (2, 12))
    out = model(idx, idx, return_exits=True)
    res = controller_losses(model, idx, idx, out, gate_target="loss", loss_delta=1e9)
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


def test_router_menu_and_plan_rule():
    model = build(predictor_after=1)
    c, pred = model.config, model.controllers.predictor
    assert plan_menu(c) == [[64, 16, 16], [64, 32, 32], [64, 64, 64]] == pred.menu  # cheapest first, full last
    logits = torch.logit(torch.tensor([[0.99, 0.995], [0.5, 0.985], [0.1, 0.2]]))
    assert pred.plan(logits, 0.02).tolist() == [[64, 16, 16], [64, 32, 32], [64, 64, 64]]
    assert pred.plan(logits, 0.6).tolist() == [[64, 16, 16], [64, 16, 16], [64, 64, 64]]
    # epsilon None: the router's own threshold (calibrate_gates sets it); untrained, every plan is predicted to miss
    assert pred.threshold.item() == pytest.approx(pred.UNCALIBRATED_THRESHOLD)
    assert (pred.plan(pred(torch.randn(2, 64))) == 64).all()
    model.controllers.set_operating_point(0.6, 0.9, 0.3)
    assert pred.plan(logits).tolist() == pred.plan(logits, 0.4).tolist()
    assert model.controllers.operating_point() == pytest.approx({"router": 0.6, "exit": 0.9, "widen": 0.3})
    assert build().controllers.operating_point() is None


def test_growth_keeps_the_controllers_function():
    """surgery.grow grows the gates and router like the trunk: on the grown model they give what they gave."""
    from nanochat.surgery import grow
    model = build(predictor_after=1, layer_pattern="A").eval()
    with torch.no_grad():
        for p in model.controllers.parameters():
            p.normal_(0, 0.5)
    model.controllers.set_operating_point(0.7, 0.9, 0.3)
    state, config, info = grow(model.state_dict(), model.config, 128, width_levels=[16, 32, 64, 128])
    grown = HybridGPT(config)
    grown.load_state_dict(state)
    grown.eval()
    assert info["controllers_grown"]
    idx = torch.randint(0, V, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        old, new = model(idx, return_exits=True), grown(idx, return_exits=True)
        for g in range(len(model.controllers.gate_blocks)):
            torch.testing.assert_close(grown.controllers.gate.prob(new.exit_hidden[g], g),
                                       model.controllers.gate.prob(old.exit_hidden[g], g), rtol=1e-4, atol=1e-5)
        pooled_old = model.controllers.predictor.pool(model.prefix_hidden(idx, 1))
        pooled_new = grown.controllers.predictor.pool(grown.prefix_hidden(idx, 1))
        lo, ln = model.controllers.predictor(pooled_old), grown.controllers.predictor(pooled_new)
    torch.testing.assert_close(ln[:, :2], lo, rtol=1e-4, atol=1e-5)  # levels 16 and 32 keep their rows
    assert (torch.sigmoid(ln[:, 2]) < 0.05).all()  # the old full width is a new menu entry: predicted to miss
    assert grown.controllers.operating_point() is None  # calibration describes the old model: cleared

"""nanochat.adaptive_train: the plans of a step cover every uniform and menu plan, distillation and the masked means,
and one micro-batch trains the router only on steps that ran its menu."""
import dataclasses
import random

import pytest
import torch

import copy

from nanochat.adaptive_train import (step_plans, plan_label, distill_kl, masked_mean, train_micro_batch, cycle_plans,
                                     distinct_plans)
from nanochat.confidence_probe import plan_menu
from nanochat.hybrid_gpt import HybridGPT, HybridConfig
from testutil import fill_zero_matrices

V = 64


def build():
    torch.manual_seed(0)
    model = HybridGPT(HybridConfig(sequence_len=16, vocab_size=V, n_layer=3, n_head=4, n_kv_head=2, n_embd=64,
                                   layer_pattern="A", ffn_pattern="D", width_levels=[16, 32, 64], gate_hidden=8,
                                   predictor_hidden=8, exit_stride=1))
    model.init_weights()
    fill_zero_matrices(model, 0.3, torch.Generator().manual_seed(0))
    return model


def test_two_consecutive_steps_cover_every_uniform_and_menu_plan():
    c = build().config
    menu = plan_menu(c)
    for step in range(6):
        seen = step_plans(c, True, random.Random(0), step=step) + step_plans(c, True, random.Random(0), step=step + 1)
        for w, m in zip(c.width_levels, menu):
            assert [w] * c.n_layer in seen and m in seen
        assert step_plans(c, True, random.Random(0), step=step)[0] == [64, 64, 64]
    assert step_plans(c, False, random.Random(0)) == [[64, 64, 64]]
    extra = step_plans(c, True, random.Random(0), n_random=2, per_block=True, step=1)
    assert len(extra) == 5 and extra[1:3] == menu[:-1]
    assert [plan_label(p, c) for p in step_plans(c, True, random.Random(0), step=0)] == ["w64", "w16", "w32"]
    assert plan_label([16, 64, 32], c) == "m37"


def test_distill_kl_and_masked_mean():
    g = torch.Generator().manual_seed(0)
    full, narrow = torch.randn(2, 5, V, generator=g), torch.randn(2, 5, V, generator=g)
    valid = torch.ones(2, 5, dtype=torch.bool)
    assert distill_kl(full, full, valid).item() == pytest.approx(0.0, abs=1e-6)
    kl = distill_kl(narrow, full, valid)
    assert kl.item() > 0
    p, logq = torch.softmax(full, -1), torch.log_softmax(narrow, -1)
    ref = (p * (torch.log(p) - logq)).sum(-1).mean()
    assert kl.item() == pytest.approx(ref.item(), rel=1e-5)
    valid[0] = False  # masked positions count nowhere: changing them changes nothing
    narrow2 = narrow.clone()
    narrow2[0] += 5 * torch.randn(5, V, generator=g)
    assert distill_kl(narrow, full, valid).item() == pytest.approx(distill_kl(narrow2, full, valid).item())
    assert masked_mean(torch.ones(3, 2, 5), valid).tolist() == [1.0, 1.0, 1.0]


def test_micro_batch_trains_router_on_menu_steps_only():
    model = build().train()
    x, y = torch.randint(0, V, (2, 4, 16), generator=torch.Generator().manual_seed(1))
    y[:, ::2] = -1  # every other target carries no loss
    for step, router_trains in ((0, False), (1, True)):
        model.zero_grad(set_to_none=True)
        plans = step_plans(model.config, True, random.Random(0), step=step)
        sums = train_micro_batch(model, model, x, y, plans, model.controllers, exit_weight=0.1, distill_weight=1.0,
                                 backward=lambda objective, i: objective.backward())
        assert len(sums) == len(plans) + 4 and sums[len(plans)] > 0  # distillation KL of the narrow plans
        assert (model.controllers.predictor.out.weight.grad is not None) == router_trains
        assert model.controllers.gate.fc.weight.grad is not None and model.lm_head.weight.grad is not None


def test_cycle_schedule_runs_full_and_one_narrow_plan_covering_all_in_turn():
    c = build().config
    menu = plan_menu(c)
    cycle = cycle_plans(c)
    want = [p for w, m in zip(c.width_levels[:-1], menu[:-1]) for p in ([[w] * c.n_layer, m] if m != [w] * c.n_layer else [m])]
    assert cycle == want and len(cycle) == 4  # the menu's plans keep block 0 full here: they differ from the uniform
    for start in range(3):
        steps = [step_plans(c, True, random.Random(0), step=s, schedule="cycle") for s in range(start, start + len(cycle))]
        assert all(len(p) == 2 and p[0] == [64] * c.n_layer for p in steps)
        assert sorted(map(tuple, (p[1] for p in steps))) == sorted(map(tuple, cycle))  # every one, once a cycle
    with pytest.raises(ValueError, match="plan schedule 'all'"):
        step_plans(c, True, random.Random(0), schedule="all")
    one = dataclasses.replace(c, width_levels=[c.n_embd])  # full width the only level: nothing narrower to cycle
    assert cycle_plans(one) == [] and step_plans(one, True, random.Random(0), step=3, schedule="cycle") == [[64] * c.n_layer]


def test_distinct_plans_counts_the_graphs_a_compiled_run_meets():
    """fractal_train --compile raises dynamo's recompile limit to distinct_plans: every plan any step of either
    schedule runs (random uniform plans included) is counted, and per-block random plans are unbounded (None)."""
    c = build().config
    for schedule in ("every", "cycle"):
        for n_random in (0, 2):
            rng = random.Random(0)
            seen = {tuple(map(tuple, [p]))[0] for s in range(40)
                    for p in step_plans(c, True, rng, n_random=n_random, step=s, schedule=schedule)}
            assert len(seen) == distinct_plans(c, True, n_random) == 5
    assert distinct_plans(c, False) == 1 and distinct_plans(c, True, 2, per_block=True) is None
    one = dataclasses.replace(c, width_levels=[c.n_embd])
    assert distinct_plans(one, True) == 1


def test_router_learns_only_the_menu_columns_a_step_ran():
    model = build().train()
    x, y = torch.randint(0, V, (2, 4, 16), generator=torch.Generator().manual_seed(1))
    menu = plan_menu(model.config)[:-1]
    for j in range(len(menu)):
        model.zero_grad(set_to_none=True)
        train_micro_batch(model, model, x, y, [[64] * 3, menu[j]], model.controllers, exit_weight=0.1,
                          distill_weight=1.0, backward=lambda objective, i: objective.backward())
        g = model.controllers.predictor.out.weight.grad  # (menu columns, hidden)
        assert g[j].abs().sum() > 0 and all(g[i].abs().sum() == 0 for i in range(len(menu)) if i != j)


def test_anchor_distils_full_width_from_a_frozen_model():
    """KL(anchor || full) on the full plan: an anchor equal to the model adds no gradient (the KL's gradient vanishes
    where the two agree); another anchor changes the full plan's gradients."""
    model = build().train()
    x, y = torch.randint(0, V, (2, 4, 16), generator=torch.Generator().manual_seed(1))
    plans = [[64] * 3, [32] * 3]

    def grads(anchor):
        model.zero_grad(set_to_none=True)
        train_micro_batch(model, model, x, y, plans, None, distill_weight=1.0, anchor=anchor, anchor_weight=1.0,
                          backward=lambda objective, i: objective.backward())
        return model.lm_head.weight.grad.clone()
    plain = grads(None)
    same = copy.deepcopy(model).eval().requires_grad_(False)
    assert torch.allclose(grads(same), plain, atol=1e-6)
    other = copy.deepcopy(same)
    with torch.no_grad():
        other.lm_head.weight.mul_(-1.0)
    assert (grads(other) - plain).abs().max() > 1e-3


def test_rotating_exits_read_every_exit_equally_often():
    """--exit-readouts N: pass c reads N of the exits before the last, in turn; over the rotation's period every exit
    is read equally often; 0 or N >= their number reads them all (None)."""
    from nanochat.adaptive_train import rotating_exits, exit_rotation_period
    from nanochat.hybrid_gpt import HybridConfig
    config = HybridConfig(n_layer=16, n_head=2, n_kv_head=2, n_embd=64, exit_stride=2)  # exits 1, 3, .., 15
    early = config.exit_blocks()[:-1]
    assert len(early) == 7
    for n in (1, 2, 3, 6):
        period = exit_rotation_period(config, n)
        assert period == 7  # 7 is prime: every set differs until the rotation comes round
        counts = {j: 0 for j in early}
        for c in range(period):
            chosen = rotating_exits(config, n, c)
            assert len(chosen) == n == len(set(chosen)) and set(chosen) <= set(early)
            for j in chosen:
                counts[j] += 1
        assert set(counts.values()) == {n}
        assert rotating_exits(config, n, period) == rotating_exits(config, n, 0)
    assert rotating_exits(config, 0, 3) is None and rotating_exits(config, 7, 3) is None
    assert exit_rotation_period(config, 0) == exit_rotation_period(config, 9) == 1
    config4 = HybridConfig(n_layer=8, n_head=2, n_kv_head=2, n_embd=64, exit_stride=2)  # exits 1, 3, 5 before the last
    assert exit_rotation_period(config4, 2) == 3 and exit_rotation_period(config4, 3) == 1
    config12 = HybridConfig(n_layer=14, n_head=2, n_kv_head=2, n_embd=64, exit_stride=2)  # 6 exits before the last
    assert exit_rotation_period(config12, 2) == 3 and exit_rotation_period(config12, 4) == 3

"""Learn-then-Test (nanochat.risk_control) on synthetic losses: p-values, the fallback, and the guarantee itself
checked over many seeded repetitions."""
import math
import random

import pytest
import torch

from nanochat.risk_control import binom_cdf, risk_pvalue, min_units, learn_then_test, describe


def test_binomial_tail_and_pvalues():
    n, p = 40, 0.1
    brute = [sum(math.comb(n, i) * p ** i * (1 - p) ** (n - i) for i in range(k + 1)) for k in range(n + 1)]
    assert all(binom_cdf(k, n, p) == pytest.approx(brute[k], rel=1e-9) for k in range(n + 1))
    assert binom_cdf(-1, n, p) == 0.0 and binom_cdf(n, n, p) == 1.0
    assert risk_pvalue([0] * 300, 0.01) == pytest.approx(0.99 ** 300)
    assert risk_pvalue([1, 0, 0, 0], 0.5) == pytest.approx(binom_cdf(1, 4, 0.5))
    # bounded losses: Bentkus' e * binomial tail at ceil(sum), never below the binary p-value of the same sum
    assert risk_pvalue([0.5, 0.5, 0.0, 0.0], 0.5) == pytest.approx(min(1.0, math.e * binom_cdf(1, 4, 0.5)))
    assert min_units(0.01, 0.1) == 230 and 0.99 ** 230 <= 0.1 < 0.99 ** 229


def test_every_setting_risky_returns_the_full_width_fallback():
    g = random.Random(0)
    losses = [[int(g.random() < 0.05) for _ in range(2000)] for _ in range(5)]  # true risk 0.05 everywhere
    res = learn_then_test(losses, [5, 4, 3, 2, 1], alpha=0.01, delta=0.1)
    assert res.chosen is None and res.validated == [] and "cannot be shown" in res.reason
    assert "keeping full width" in describe(res, 0.01, 0.1)


def test_too_few_units_says_so_and_keeps_full_width():
    losses = [[0] * 200, [0] * 200]  # not one disagreement, but 200 < min_units(0.01, 0.1) = 230
    res = learn_then_test(losses, [2, 1], alpha=0.01, delta=0.1)
    assert res.chosen is None and not res.feasible and "too few" in res.reason
    # per stratum: enough units in all, but one stratum too small
    strata = ["a"] * 150 + ["b"] * 50
    res = learn_then_test([[0] * 200], [1], alpha=0.02, delta=0.1, strata=strata)
    assert not res.feasible and res.n_test == {"a": 150, "b": 50}


def test_fixed_sequence_stops_at_the_first_failure_and_picks_the_cheapest_validated():
    n = 1000
    safe, risky = [0] * n, [1] * 50 + [0] * (n - 50)
    losses = [safe, safe, risky, safe]  # the 4th is cheap and safe but comes after a failure: not validated
    res = learn_then_test(losses, [4, 3, 2, 1], alpha=0.01, delta=0.1)
    assert res.validated == [0, 1] and res.chosen == 1
    # a stratum that breaks the promise fails the configuration, though the pooled rate would pass
    strata = ["easy"] * 800 + ["hard"] * 200 + ["x"] * 0
    bad_hard = [0] * 800 + [1] * 10 + [0] * 190
    assert risk_pvalue(bad_hard, 0.02) < 0.1  # pooled: 10 / 1000 looks fine at alpha = 0.02
    res = learn_then_test([safe, bad_hard], [2, 1], alpha=0.02, delta=0.1, strata=strata)
    assert res.validated == [0] and res.chosen == 0


def test_learn_part_orders_the_configurations():
    g = random.Random(1)
    risks = [0.03, 0.0, 0.002]  # given order starts with the risky one; the learn part puts it last
    losses = [[int(g.random() < r) for _ in range(3000)] for r in risks]
    learn = [i % 3 == 0 for i in range(3000)]
    res = learn_then_test(losses, [1.0, 3.0, 2.0], alpha=0.01, delta=0.1, learn=learn)
    assert res.order[-1] == 0 and set(res.validated) == {1, 2} and res.chosen == 2
    assert learn_then_test(losses, [1.0, 3.0, 2.0], alpha=0.01, delta=0.1).chosen is None  # given order: stops at 0


def test_the_guarantee_holds_over_repetitions():
    """Configurations cheaper as they get riskier (true risks around alpha). Over 400 seeded repetitions, the chosen
    configuration's risk, measured on fresh data, is <= alpha in >= 1 - delta of them; choosing the cheapest
    configuration whose empirical risk is <= alpha (no test) breaks that rate, so the check can fail."""
    alpha, delta, n, reps = 0.02, 0.1, 600, 400
    risks = torch.tensor([0.0, 0.005, 0.01, 0.015, 0.019, 0.022, 0.026, 0.035, 0.05])
    costs = [1.0 - 0.1 * i for i in range(len(risks))]
    strata = [i % 2 for i in range(n)]
    learn = [i % 4 == 0 for i in range(n)]
    fresh_n = 200_000
    ok_ltt = ok_naive = 0
    for rep in range(reps):
        g = torch.Generator().manual_seed(rep)
        draws = (torch.rand(len(risks), n, generator=g) < risks[:, None]).int().tolist()
        res = learn_then_test(draws, costs, alpha, delta, strata=strata, learn=learn)
        fresh = (torch.rand(fresh_n, generator=g) < (risks[res.chosen] if res.chosen is not None else 0.0)).float()
        ok_ltt += fresh.mean().item() <= alpha
        emp = [sum(d) / n for d in draws]
        naive = min((c for c in range(len(risks)) if emp[c] <= alpha), key=lambda c: costs[c])
        ok_naive += risks[naive].item() <= alpha
    assert ok_ltt / reps >= 1 - delta
    assert ok_naive / reps < 1 - delta  # without the test the promise is broken


def test_router_grid_and_grid_losses():
    """The router grid adds quantiles of the learn units' probabilities (never the test units'); grid_losses reads
    each configuration's outcome from the run of the plan the router picks at that threshold, and lists the
    configurations conservative first (no exits before exits, within each the router from NEVER down)."""
    from nanochat.operating_point import router_grid, grid_losses, NEVER, ROUTER_THRESHOLDS, EXIT_SETTINGS
    probs = torch.tensor([[0.999991, 0.5], [0.999995, 0.6], [0.2, 0.99], [0.3, 0.7]])
    learn = [True, True, False, False]
    grid = router_grid(probs, learn, n_quantiles=3)
    assert grid[0] == NEVER and grid == sorted(grid, reverse=True) and set(ROUTER_THRESHOLDS) <= set(grid)
    assert any(0.99999 < g < 0.999995 for g in grid)  # between the learn units' probabilities
    assert not any(0.2 < g < 0.30001 for g in grid if g not in ROUTER_THRESHOLDS)  # test units' values: not used
    outcomes = {(m, e, w): ([f"m{m}"] * 4, [0.2 * (m + 1)] * 4) for m in range(3) for e, w in EXIT_SETTINGS}
    outcomes[(2, 1.0, 0.0)] = (["m0", "m0", "full", "full"], [1.0] * 4)  # the reference
    configs, losses, costs = grid_losses(probs, outcomes, lambda a, b: float(a != b), learn)
    assert configs[0] == (NEVER, 1.0, 0.0) and [c[1:] for c in configs[:len(grid)]] == [(1.0, 0.0)] * len(grid)
    c = configs.index((0.98, 1.0, 0.0))  # plan 0 for units 0 and 1, plan 1 for unit 2, full for unit 3
    assert losses[c] == [0.0, 0.0, 1.0, 0.0] and costs[c] == pytest.approx((0.2 + 0.2 + 0.4 + 1.0) / 4)
    assert losses[configs.index((NEVER, 1.0, 0.0))] == [0.0] * 4  # full width is its own reference


def test_ties_in_learn_risk_keep_the_given_order():
    losses = [[0] * 900, [0] * 900, [0] * 900]
    learn = [i % 3 == 0 for i in range(900)]
    res = learn_then_test(losses, [1.0, 0.5, 2.0], alpha=0.01, delta=0.1, learn=learn)
    assert res.order == [0, 1, 2] and res.chosen == 1

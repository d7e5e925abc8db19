"""
Learn-then-Test (Angelopoulos, Bates et al. 2021): pick an operating point of adaptive compute with a guarantee.

Setting: configurations c (a router threshold with exit / widen thresholds), each with a loss per held-out unit (a
prompt): 1 if the unit's answer differs from full width's (binary), or the fraction of its tokens that differ
(bounded in [0, 1]). Each c gets the null hypothesis H_c: risk(c) = E[loss] > alpha, and a p-value from the units
(iid draws): binary losses the exact binomial tail P(Bin(n, alpha) <= k); bounded ones Bentkus' bound
min(1, e * P(Bin(n, alpha) <= ceil(n * mean))). With strata (e.g. task difficulties), H_c is "some stratum has risk >
alpha" and its p-value the largest stratum p-value (intersection-union: valid without a multiplicity correction).

Fixed-sequence testing: the configurations are ordered before the test units are seen, from conservative to
aggressive; test in that order at level delta and stop at the first p-value > delta. Every configuration before the
stop is validated, and with probability >= 1 - delta all validated configurations have risk <= alpha at once, so
the cheapest of them may be chosen. The order comes from a separate "learn" part of the units (empirical risk
ascending, ties in the caller's order, which should run from conservative to aggressive), as LTT recommends; with no
learn part, the caller's order is used.

If nothing is validated (every configuration risky, or too few units for the requested alpha: even zero losses
cannot reach p <= delta below min_units(alpha, delta) units) the answer is the fallback, full width, and says why.
"""
import math
from dataclasses import dataclass, field


def binom_cdf(k, n, p):
    """P(Bin(n, p) <= k), summed in log space (stable for n in the tens of thousands)."""
    if k < 0:
        return 0.0
    if k >= n:
        return 1.0
    if p <= 0.0:
        return 1.0
    if p >= 1.0:
        return 0.0
    lp, lq = math.log(p), math.log1p(-p)
    terms = [math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) + i * lp + (n - i) * lq
             for i in range(int(k) + 1)]
    top = max(terms)
    return min(1.0, math.exp(top) * sum(math.exp(t - top) for t in terms))


def risk_pvalue(losses, alpha):
    """p-value of H: E[loss] > alpha from iid losses in [0, 1] (see the module docstring)."""
    n = len(losses)
    if n == 0:
        return 1.0
    total = float(sum(losses))
    if all(x in (0, 1, 0.0, 1.0, True, False) for x in losses):
        return binom_cdf(int(round(total)), n, alpha)
    return min(1.0, math.e * binom_cdf(math.ceil(total - 1e-12), n, alpha))


def min_units(alpha, delta):
    """The fewest units with which zero losses give a p-value <= delta: (1 - alpha)^n <= delta."""
    return math.ceil(math.log(delta) / math.log1p(-alpha))


@dataclass
class LTTResult:
    chosen: int            # index of the chosen configuration, or None: the full-width fallback
    validated: list        # indices validated by fixed-sequence testing, in test order
    order: list            # the test order (indices)
    pvalues: dict          # index -> p-value of the configurations tested
    n_test: dict           # stratum -> units in the test part
    feasible: bool         # every stratum has at least min_units(alpha, delta) test units
    reason: str            # why nothing was validated ('' when something was)
    empirical_risk: dict = field(default_factory=dict)  # index -> stratum -> mean loss on the test part


def learn_then_test(losses, costs, alpha, delta, strata=None, learn=None):
    """
    losses: per configuration, a list of per-unit losses in [0, 1] (all configurations over the same units);
    costs: per configuration, its mean compute (lower is cheaper); strata: per unit a label (None: one stratum);
    learn: per unit True where it only orders the configurations (None: no learn part, the given order is tested).
    Returns an LTTResult; chosen is the cheapest validated configuration.
    """
    if not 0 < alpha < 1 or not 0 < delta < 1:
        raise ValueError(f"need 0 < alpha < 1 and 0 < delta < 1, got alpha={alpha}, delta={delta}")
    n = len(losses[0]) if losses else 0
    if any(len(l) != n for l in losses) or len(costs) != len(losses):
        raise ValueError("every configuration needs one loss per unit and a cost")
    strata = [0] * n if strata is None else list(strata)
    learn = [False] * n if learn is None else list(learn)
    test_units = [i for i in range(n) if not learn[i]]
    learn_units = [i for i in range(n) if learn[i]]
    labels = sorted(set(strata[i] for i in test_units), key=str)
    by_stratum = {s: [i for i in test_units if strata[i] == s] for s in labels}
    n_test = {s: len(u) for s, u in by_stratum.items()}
    need = min_units(alpha, delta)
    feasible = bool(by_stratum) and min(n_test.values()) >= need
    if learn_units:
        def learn_risk(c):
            return sum(losses[c][i] for i in learn_units) / len(learn_units)
        order = sorted(range(len(losses)), key=lambda c: (learn_risk(c), c))  # ties: the given order
    else:
        order = list(range(len(losses)))
    res = LTTResult(None, [], order, {}, n_test, feasible, "")
    if not feasible:
        res.reason = (f"too few calibration units for alpha={alpha}, delta={delta}: {min(n_test.values(), default=0)} "
                      f"in the smallest stratum, at least {need} are needed even with no disagreement")
        return res
    for c in order:
        res.empirical_risk[c] = {s: sum(losses[c][i] for i in u) / len(u) for s, u in by_stratum.items()}
        p = max(risk_pvalue([losses[c][i] for i in u], alpha) for u in by_stratum.values())
        res.pvalues[c] = p
        if p > delta:
            break
        res.validated.append(c)
    if res.validated:
        res.chosen = min(res.validated, key=lambda c: (costs[c], res.order.index(c)))
    else:
        res.reason = (f"no configuration reached p <= {delta} (the first in the order had p = "
                      f"{res.pvalues[order[0]]:.3g}): the risk cannot be shown to be <= {alpha}")
    return res


def describe(res, alpha, delta, configs=None, costs=None):
    """One paragraph: the guarantee and the operating point (or the fallback and why)."""
    units = ", ".join(f"{s}: {n}" for s, n in res.n_test.items())
    if res.chosen is None:
        return (f"Learn-then-Test at alpha={alpha}, delta={delta} ({units} test units): nothing validated, keeping "
                f"full width. {res.reason}")
    c = res.chosen
    point = configs[c] if configs is not None else c
    cost = f", mean compute {costs[c]:.3f} of full width" if costs is not None else ""
    return (f"guarantee: with probability >= {1 - delta:.3g}, the rate of outputs that differ from full width is <= "
            f"{alpha} (per stratum; Learn-then-Test, fixed-sequence binomial tests on {units} held-out units; "
            f"{len(res.validated)} configurations validated). Operating point: {point}{cost}; p-value "
            f"{res.pvalues[c]:.3g}; measured disagreement on the test part "
            + ", ".join(f"{s} {r:.4f}" for s, r in res.empirical_risk[c].items()))

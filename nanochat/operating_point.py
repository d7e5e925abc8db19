"""
auto's operating point (router threshold, exit threshold, widen threshold) chosen jointly by Learn-then-Test
(nanochat.risk_control) on held-out units, from what the engine really decodes.

The grid: router thresholds x EXIT_SETTINGS, the router thresholds being ROUTER_THRESHOLDS and, where a learn part is
given, quantiles of the router's probabilities on the learn units (router_grid: its probabilities crowd near 1, where a
fixed grid has no point between the easy and the hard prompts; the learn part never enters the tests, so a grid
drawn from it keeps the guarantee). The router's choice depends on its threshold and the prompt only, so the
engine runs each menu plan (confidence_probe.plan_menu) once per exit setting over all units, and a configuration's
outcome per unit is read from the run of the plan the router picks for that unit at that threshold. A unit's loss
is 1 where its answer differs from the full model's (full plan, no exits, no widening) or, for free text, the
fraction of its teacher-forced tokens whose top-1 differs; its compute is the engine's FLOPs over the full model's.

The thresholds keep their meaning: exit_threshold / widen_threshold act on the gates' calibrated per-token
probability that the exit readout has the full model's top-1 (confidence_probe.calibrate_gates), the router's
threshold on its predicted probability that a plan gives the full model's answer. Those are per-token or per-prompt
estimates; the guarantee is the operating point's: with probability >= 1 - delta over the calibration draw, the rate
of outputs that differ from full width is <= alpha (per stratum).
"""
import torch

from nanochat.risk_control import learn_then_test, describe

NEVER = 1.01  # a router threshold no probability reaches: always the full plan
ROUTER_THRESHOLDS = (NEVER, 0.999, 0.995, 0.99, 0.98, 0.95, 0.9, 0.8, 0.7, 0.5, 0.3, 0.0)
EXIT_SETTINGS = ((1.0, 0.0), (1.0, 0.5), (0.99, 0.5), (0.95, 0.5), (0.9, 0.5))  # (exit, widen), off first


def router_logits(model, prompts):
    """(N, n_menu - 1) the router's logit per narrow menu plan for each prompt (list of id lists), read as the engine
    reads it: mean of norm(residual) after predictor_after full-width blocks over the prompt's positions (prompts of
    one length in one batch). With grad enabled, the gradient reaches the predictor only (prefix_hidden has none)."""
    predictor, device = model.controllers.predictor, model.get_device()
    rows, by_len = [None] * len(prompts), {}
    for i, p in enumerate(prompts):
        by_len.setdefault(len(p), []).append(i)
    for ids in by_len.values():
        x = torch.tensor([prompts[i] for i in ids], device=device)
        logits = predictor(predictor.pool(model.prefix_hidden(x, model.config.predictor_after)))
        for k, i in enumerate(ids):
            rows[i] = logits[k]
    return torch.stack(rows)


@torch.no_grad()
def router_probs(model, prompts):
    """(N, n_menu - 1) probability per narrow menu plan for each prompt (router_logits through the sigmoid), on the
    CPU."""
    return torch.sigmoid(router_logits(model, prompts)).float().cpu()


def choices(probs, threshold):
    """(N,) menu index the router picks at `threshold` (the rule of LayerDimPredictor.choice)."""
    ok = torch.cat([probs >= threshold, torch.ones(probs.size(0), 1, dtype=torch.bool)], 1)
    return ok.float().argmax(1)


def router_grid(probs, learn=None, n_quantiles=24):
    """Router thresholds, most conservative first: ROUTER_THRESHOLDS and, given learn (per unit bool), n_quantiles
    quantiles of each narrow plan's probabilities on the learn units (just above each, so the quantile's unit falls
    below it)."""
    grid = set(ROUTER_THRESHOLDS)
    if learn is not None and any(learn):
        p = probs[torch.tensor(learn)].double()
        qs = torch.linspace(0, 1, n_quantiles, dtype=torch.float64)
        for j in range(p.size(1)):
            grid |= {min(1.0, float(v) + 1e-9) for v in torch.quantile(p[:, j], qs).tolist()}
    return sorted(grid, reverse=True)


def grid_losses(probs, outcomes, compare, learn=None):
    """
    probs (N, n_menu - 1) router probabilities; outcomes[(menu index, exit, widen)] = (outputs per unit, compute
    fraction per unit) from the engine; compare(output, reference) -> loss in [0, 1]; learn: per unit whether it
    belongs to the learn part (router_grid). The reference is the full plan without exits or widening. Returns
    (configs [(router, exit, widen)], losses per config, mean compute per config), from conservative to aggressive:
    exit settings in order, within each the router thresholds from NEVER down.
    """
    full = probs.size(1)
    reference = outcomes[(full, 1.0, 0.0)][0]
    configs, losses, costs = [], [], []
    grid = router_grid(probs, learn)
    picks = {lam: choices(probs, lam).tolist() for lam in grid}
    for exit_t, widen_t in EXIT_SETTINGS:  # conservative first: every router threshold without exits, then with
        for lam in grid:
            pick = picks[lam]
            runs = [outcomes[(m, exit_t, widen_t)] for m in range(full + 1)]
            configs.append((lam, exit_t, widen_t))
            losses.append([compare(runs[m][0][u], reference[u]) for u, m in enumerate(pick)])
            costs.append(sum(runs[m][1][u] for u, m in enumerate(pick)) / len(pick))
    return configs, losses, costs


def choose_and_apply(model, configs, losses, costs, alpha, delta, strata=None, learn=None, print_fn=print):
    """Learn-then-Test over the grid, then the chosen point (or full width: router NEVER, exits off) is written into
    model.controllers. Returns the record scripts store in the checkpoint meta ("guarantee")."""
    res = learn_then_test(losses, costs, alpha, delta, strata=strata, learn=learn)
    names = [{"router": c[0], "exit": c[1], "widen": c[2]} for c in configs]
    text = describe(res, alpha, delta, names, costs)
    print_fn(text)
    point = names[res.chosen] if res.chosen is not None else {"router": NEVER, "exit": 1.0, "widen": 0.0}
    model.controllers.set_operating_point(point["router"], point["exit"], point["widen"])
    return {"alpha": alpha, "delta": delta, "statement": text, "operating_point": point,
            "fallback_full_width": res.chosen is None, "reason": res.reason, "feasible": res.feasible,
            "n_test_units": res.n_test, "n_validated": len(res.validated),
            "pvalue": res.pvalues.get(res.chosen) if res.chosen is not None else None,
            "calibration_disagreement": res.empirical_risk.get(res.chosen) if res.chosen is not None else None,
            "calibration_compute": costs[res.chosen] if res.chosen is not None else None,
            "grid": {"router": sorted({c[0] for c in configs}, reverse=True), "exit_widen": [list(e) for e in EXIT_SETTINGS]}}


@torch.no_grad()
def teacher_forced_outcomes(engine, rows, prompt_len, decode_tokens, plan, exit_threshold, widen_threshold):
    """Free text: rows (N, P + K) long; each row prefilled with its first P tokens at `plan` (one width per block)
    and the thresholds, then K engine steps each fed the row's next true token. Returns (per row the K top-1 ids as a
    tuple, per row the FLOPs that ran over the full model's at the same contexts)."""
    model, P, K = engine.model, prompt_len, decode_tokens
    st, logits, flops, full = engine.prefill(rows[:, :P], plan=plan, exit_threshold=exit_threshold,
                                             expand_threshold=widen_threshold, max_len=P + K)
    flops, full = flops.clone(), full.clone()
    tops = [logits.argmax(-1).cpu()]
    for i in range(K - 1):
        logits, _, _, _, step_flops = engine.step(st, rows[:, P + i])
        flops += step_flops
        full += model.forward_flops_per_token(st.pos)
        tops.append(logits.argmax(-1).cpu())
    top = torch.stack(tops, 1)  # (N, K)
    return [tuple(r) for r in top.tolist()], (flops / full).tolist()


def token_disagreement(output, reference):
    """The fraction of positions whose top-1 differs (a bounded loss for free text)."""
    return sum(a != b for a, b in zip(output, reference)) / len(reference)

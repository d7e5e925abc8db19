"""
Adaptive-compute controllers of a HybridGPT: the width predictor, the exit gates, their training signal
("shadow loss") and the calibration that makes a gate threshold mean what it says.

LayerDimPredictor (the compute router): once per prompt, from the mean of norm(x) over the prompt's positions
    after the first config.predictor_after blocks (run at full width), the probability that each plan of a menu
    ordered by cost (plan_menu: one plan per width level, the plans fractal_train trains) gives the full model's
    answer; the plan is the cheapest whose probability reaches the router threshold (calibrated by Learn-then-Test,
    nanochat.risk_control). Per-block choices against a per-block loss budget were measured not to compose
    (single-block deltas summed to twice the uniform plan's cost), hence whole plans.
ConfidenceGate: at each gated exit (config.exit_blocks() but the last), the probability per token that
    exiting there is safe: sigmoid(w . relu(W norm(h) + e_gate) + b_gate), h the residual after the exit
    block (detached in training). It reads only the hidden state, so a check costs 2*D*H + 2*H FLOPs,
    not an lm_head matmul. calibrated probabilities go through a per-gate isotonic step map fitted on
    held-out data (calibrate_gates), stored as buffers, so they are checkpointed with the weights.

Training signal, controller_losses(): see its docstring. Gate target (CALM's consistency oracle): the exit
readout's top-1 equals the final readout's top-1 ("agree"), or the exit's loss is within loss_delta of the
final loss ("loss"). Router target (router_labels): per row and narrow plan, whether that plan's top-1 equals
the full model's on every loss-bearing token after the prompt, from the same training step's forwards.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanochat.layers import norm, linear_init_std

DEFAULT_THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99)


def width_matters(config):
    """Per block: does its width change anything (attention mixer or an FFN)?"""
    return [config.mixer_kind(j) == "A" or config.ffn_kind(j) != "N" for j in range(config.n_layer)]


class ConfidenceGate(nn.Module):
    """One small MLP shared by all gated exits, with a per-gate embedding and bias."""

    def __init__(self, n_embd, n_gates, hidden, calib_bins):
        super().__init__()
        self.n_embd, self.n_gates, self.hidden = n_embd, n_gates, hidden
        self.fc = nn.Linear(n_embd, hidden, bias=False)
        self.gate_embed = nn.Parameter(torch.zeros(n_gates, hidden))
        self.out = nn.Linear(hidden, 1, bias=False)
        self.out_bias = nn.Parameter(torch.zeros(n_gates))
        # isotonic map per gate: step s covers raw probabilities >= calib_lo[g, s]; unused steps have lo 2.0
        self.register_buffer("calib_lo", torch.zeros(n_gates, calib_bins))
        self.register_buffer("calib_val", torch.zeros(n_gates, calib_bins))
        self.register_buffer("calib_on", torch.zeros(n_gates, dtype=torch.bool))

    @torch.no_grad()
    def init_weights(self):
        nn.init.normal_(self.fc.weight, std=linear_init_std(*self.fc.weight.shape))
        nn.init.zeros_(self.gate_embed)
        nn.init.zeros_(self.out.weight)  # p = 0.5 everywhere until trained
        nn.init.zeros_(self.out_bias)
        self.calib_lo.fill_(2.0)
        self.calib_val.zero_()
        self.calib_on.zero_()

    def logits(self, h, gate=None):
        """
        h (..., D) residual after the exit block. gate: the gate index (int) for every row of h, or None when
        h's first dim runs over all gates (G, ...), or a list of gate indices that h's first dim runs over.
        Returns raw logits (...) in fp32.
        """
        z = self.fc(norm(h))
        if gate is None or isinstance(gate, list):
            n = self.n_gates if gate is None else len(gate)
            if h.size(0) != n:
                raise ValueError(f"h has {h.size(0)} entries in dim 0 but there are {n} gates")
            shape = (n,) + (1,) * (h.dim() - 2)
            emb, bias = (self.gate_embed, self.out_bias) if gate is None else (self.gate_embed[gate],
                                                                              self.out_bias[gate])
            emb, bias = emb.view(*shape, self.hidden), bias.view(shape)
        else:
            emb, bias = self.gate_embed[gate], self.out_bias[gate]
        return (self.out(F.relu(z + emb)).squeeze(-1) + bias).float()

    def calibrate(self, p, gate):
        """Raw probabilities p (...) of one gate -> calibrated (identity until calibrate_gates has run). Both are
        computed and one is picked on the device: reading calib_on on the host would cost a sync per check."""
        lo = self.calib_lo[gate].to(p.dtype)
        s = (torch.searchsorted(lo, p.contiguous(), right=True) - 1).clamp(min=0)
        return torch.where(self.calib_on[gate], self.calib_val[gate].to(p.dtype)[s], p)

    def prob(self, h, gate, calibrated=True):
        """P(exit is safe) per row of h (..., D) at gate index `gate`."""
        p = torch.sigmoid(self.logits(h, gate))
        return self.calibrate(p, gate) if calibrated else p

    def flops_per_check(self):
        return 2 * self.n_embd * self.hidden + 2 * self.hidden


def plan_menu(config, matters=None):
    """The router's menu, cheapest first: per width level w the plan with the first config.predictor_after blocks at
    full width (the engine runs them so before the router has read the prompt) and every later block whose width
    matters at w; the last plan is the full model. fractal_train trains exactly these plans (any plan the router may
    pick was trained)."""
    matters = width_matters(config) if matters is None else matters
    full = config.n_embd
    return [[full if (j < config.predictor_after or not matters[j]) else w for j in range(config.n_layer)]
            for w in config.width_levels]


class LayerDimPredictor(nn.Module):
    """
    The compute router: prompt -> per menu plan (plan_menu, cheapest first, the full plan last) the logit of
    P(this plan gives the full model's answer), trained by BCE on labels measured in training (router_labels).
    Output (B, n_levels - 1): the full plan needs no prediction (it is the full model). plan() returns per-layer
    widths upfront (the engine's contract): the cheapest plan whose probability is >= the threshold.
    `threshold` (a buffer, checkpointed) is the operating point scripts.calibrate_gates chooses by Learn-then-Test;
    until then it holds UNCALIBRATED_THRESHOLD and the controllers say they are uncalibrated.
    """
    UNCALIBRATED_THRESHOLD = 0.98

    def __init__(self, n_embd, n_layer, levels, hidden, read_after, menu):
        super().__init__()
        self.n_embd, self.n_layer, self.levels, self.hidden = n_embd, n_layer, list(levels), hidden
        self.read_after = read_after
        self.menu = [list(p) for p in menu]
        self.fc = nn.Linear(n_embd, hidden, bias=False)
        self.out = nn.Linear(hidden, len(levels) - 1, bias=True)
        self.register_buffer("threshold", torch.tensor(self.UNCALIBRATED_THRESHOLD))

    @torch.no_grad()
    def init_weights(self):
        nn.init.normal_(self.fc.weight, std=linear_init_std(*self.fc.weight.shape))
        nn.init.zeros_(self.out.weight)
        # untrained, every narrow plan is predicted to miss (p ~ 0.02): the plan stays at full width
        nn.init.constant_(self.out.bias, -4.0)
        self.threshold.fill_(self.UNCALIBRATED_THRESHOLD)

    @staticmethod
    def pool(x, mask=None):
        """Mean of norm(x) over positions (B, T, D) -> (B, D); mask (B, T) bool picks the positions."""
        xn = norm(x.detach()).float()
        if mask is None:
            return xn.mean(1)
        m = mask.to(xn.dtype).unsqueeze(-1)
        return (xn * m).sum(1) / m.sum(1).clamp(min=1.0)

    def forward(self, pooled):
        """(B, D) pooled prompt -> (B, n_levels - 1) fp32 logits, one per narrow menu plan, cheapest first."""
        return self.out(F.relu(self.fc(pooled.to(self.fc.weight.dtype)))).float()

    def choice(self, logits, threshold=None):
        """(B,) index into the menu: the cheapest plan with sigmoid(logit) >= threshold (default: the buffer), else
        the full plan."""
        threshold = self.threshold if threshold is None else threshold
        ok = torch.cat([torch.sigmoid(logits) >= threshold, torch.ones_like(logits[:, :1], dtype=torch.bool)], 1)
        return ok.float().argmax(-1)

    def plan(self, logits, epsilon=None, matters=None):
        """(B, n_layer) long widths of the chosen menu plans. epsilon: the allowed probability that the plan's answer
        differs from the full model's (threshold 1 - epsilon); None: the calibrated threshold (the buffer). matters:
        the engine's argument, already in the menu (kept for its call)."""
        menu = torch.tensor(self.menu, device=logits.device)
        return menu[self.choice(logits, None if epsilon is None else 1.0 - epsilon)]

    def flops(self):
        return 2 * self.n_embd * self.hidden + 2 * self.hidden * (len(self.levels) - 1)


class AdaptiveControllers(nn.Module):
    """The router (LayerDimPredictor) and the exit gates of one HybridGPT (its `controllers` submodule), and the
    operating point calibrate_gates chose: auto mode's exit and widen thresholds (op_thresholds) beside the router's
    threshold, valid where op_on."""

    def __init__(self, config):
        super().__init__()
        self.gate_blocks = config.exit_blocks()[:-1]  # the last exit is the model's output: no gate
        self.matters = width_matters(config)
        self.gate = ConfidenceGate(config.n_embd, len(self.gate_blocks), config.gate_hidden, config.calib_bins)
        self.predictor = LayerDimPredictor(config.n_embd, config.n_layer, config.width_levels,
                                           config.predictor_hidden, config.predictor_after,
                                           plan_menu(config, self.matters))
        self.register_buffer("op_thresholds", torch.tensor([1.0, 0.0]))  # exit, widen
        self.register_buffer("op_on", torch.tensor(False))

    def init_weights(self):
        self.gate.init_weights()
        self.predictor.init_weights()
        with torch.no_grad():
            self.op_thresholds[0].fill_(1.0)  # scalars: under a meta-device context (speedrun's plan) too
            self.op_thresholds[1].fill_(0.0)
            self.op_on.fill_(False)

    def is_calibrated(self):
        return bool(self.gate.calib_on.all())

    def operating_point(self):
        """{router, exit, widen} thresholds of auto mode chosen by calibration, or None (uncalibrated: one host read)."""
        if not bool(self.op_on):
            return None
        exit_t, widen_t = self.op_thresholds.tolist()
        return {"router": float(self.predictor.threshold), "exit": exit_t, "widen": widen_t}

    @torch.no_grad()
    def set_operating_point(self, router, exit_threshold, widen_threshold):
        self.predictor.threshold.fill_(router)
        self.op_thresholds[0].fill_(float(exit_threshold))
        self.op_thresholds[1].fill_(float(widen_threshold))
        self.op_on.fill_(True)


def grow_controllers(state, config, new_config, residual_scale):
    """
    The controllers' state grown with the model (nanochat.surgery.grow): both MLPs read norm(residual), which growth
    turns into [residual_scale * old, 0], so their input matrices keep the old columns / residual_scale and get zero
    columns for the new channels: gates and router compute what they computed. The router's rows follow their width
    level; a level that is new to the menu (the old full width) gets a fresh row (predicted to miss, so its plan is
    not chosen until phase 3 trains it). Calibration and the operating point are cleared: they describe the old
    model (calibrate the grown one).
    """
    fresh = AdaptiveControllers(new_config)
    fresh.init_weights()
    out = {f"controllers.{k}": v.detach().clone() for k, v in fresh.state_dict().items()}
    D, D2 = config.n_embd, new_config.n_embd
    for name in ("gate.fc.weight", "predictor.fc.weight"):
        w = state[f"controllers.{name}"]
        grown = torch.zeros(w.size(0), D2, dtype=w.dtype)
        grown[:, :D] = w.float() / residual_scale
        out[f"controllers.{name}"] = grown
    for name in ("gate.gate_embed", "gate.out.weight", "gate.out_bias"):
        out[f"controllers.{name}"] = state[f"controllers.{name}"].clone()
    old_rows = {w: i for i, w in enumerate(config.width_levels[:-1])}
    for i, w in enumerate(new_config.width_levels[:-1]):
        if w in old_rows:
            out["controllers.predictor.out.weight"][i] = state["controllers.predictor.out.weight"][old_rows[w]]
            out["controllers.predictor.out.bias"][i] = state["controllers.predictor.out.bias"][old_rows[w]]
    return out


# -----------------------------------------------------------------------------
# Training signal

def router_labels(plan_top1, full_top1, valid, prompt_len):
    """
    Per row, per narrow plan: 1.0 where the plan's top-1 equals the full model's top-1 on every loss-bearing position
    after the prompt (positions >= prompt_len with valid), else 0.0. plan_top1: list over the narrow menu plans of
    (B, T); full_top1 (B, T); valid (B, T) bool. Rows with no such position are labelled 1 (nothing to miss).
    Returns (B, n_plans) float.
    """
    later = valid[:, prompt_len:]
    return torch.stack([((top[:, prompt_len:] == full_top1[:, prompt_len:]) | ~later).all(1) for top in plan_top1],
                       1).float()


def controller_losses(model, idx, targets, out, full_top1=None, router_target=None, gate_target="agree",
                      loss_delta=0.1, prompt_frac=0.5, mask=None, router_columns=None):
    """
    Shadow losses of the controllers for one forward. Gradients reach only model.controllers: the gates read
    out.exit_hidden detached, the router reads a no-grad prefix.

    out: the HybridOutput of model(idx, targets, width=plan, return_exits=True) (any static plan).
    Gates: BCE over every gated exit and every token with a target != -1 (and mask); target "agree": the exit
        readout's top-1 equals out's final top-1 and, given full_top1 (B, T), that equals the full model's top-1
        (exiting in a narrow plan is safe only where it still gives the full model's token); "loss": the exit's
        loss is within loss_delta of the final loss.
    Router (given router_target (B, n_narrow_plans) from router_labels): the first P = prompt_frac * T positions play
        the prompt (mean-pooled after config.predictor_after full-width blocks); BCE of its logits on the labels.
        router_columns: the menu plans (indices) router_target's columns label, when not all of them.
    Returns dict: loss (add it to the trainer's loss), gate_loss, predictor_loss (router BCE, 0 without labels), and
        detached metrics gate_acc, gate_target_rate, router_acc, router_target_rate.
    """
    if gate_target not in ("agree", "loss"):
        raise ValueError(f"gate_target must be 'agree' or 'loss', got {gate_target!r}")
    if targets is None or out.exit_agree is None or (gate_target == "loss" and out.exit_losses is None):
        raise ValueError("controller_losses needs targets and out = model(idx, targets, return_exits=True)")
    if not hasattr(model, "controllers"):
        raise ValueError("this model has no controllers: build it with HybridConfig(adaptive=True)")
    c, ctrl = model.config, model.controllers
    B, T = idx.shape
    valid = targets != -1 if mask is None else (targets != -1) & mask
    res = {}

    # ---- gates (those whose exit this forward read out: every one unless model(..., exits=...) chose some)
    gated = [g for g, j in enumerate(ctrl.gate_blocks) if j in out.exit_blocks]
    rows = [out.exit_blocks.index(ctrl.gate_blocks[g]) for g in gated]  # their entries in out's exit lists
    G = len(gated)
    if G > 0:
        hs = torch.stack([out.exit_hidden[r] for r in rows]).detach()  # (G, B, T, D)
        logits = ctrl.gate.logits(hs, None if G == len(ctrl.gate_blocks) else gated)  # (G, B, T)
        if gate_target == "agree":
            y = out.exit_agree[rows]
            if full_top1 is not None:
                y = y & (out.logits.argmax(-1) == full_top1).unsqueeze(0)
        else:
            y = (out.exit_losses[rows] - out.exit_losses[-1:]).detach() <= loss_delta
        m = valid.unsqueeze(0).expand(G, B, T)
        res["gate_loss"] = F.binary_cross_entropy_with_logits(logits[m], y[m].float())
        res["gate_acc"] = ((logits[m] > 0) == y[m]).float().mean().detach()
        res["gate_target_rate"] = y[m].float().mean().detach()
    else:
        res["gate_loss"] = ctrl.gate.out_bias.sum() * 0.0

    # ---- router
    P = int(T * prompt_frac)
    if not 1 <= P < T:
        raise ValueError(f"prompt_frac={prompt_frac} leaves no prompt or no continuation in T={T} tokens")
    if router_target is not None and router_target.size(1) > 0:
        prompt_mask = None if mask is None else mask[:, :P]
        pooled = ctrl.predictor.pool(model.prefix_hidden(idx[:, :P], c.predictor_after, prompt_mask), prompt_mask)
        logits = ctrl.predictor(pooled)
        if router_columns is not None:
            logits = logits[:, list(router_columns)]
        res["predictor_loss"] = F.binary_cross_entropy_with_logits(logits, router_target)
        res["router_acc"] = ((logits > 0) == (router_target > 0.5)).float().mean().detach()
        res["router_target_rate"] = router_target.mean().detach()
    else:
        res["predictor_loss"] = ctrl.predictor.out.bias.sum() * 0.0
    res["loss"] = res["gate_loss"] + res["predictor_loss"]
    return res


# -----------------------------------------------------------------------------
# Calibration and reliability

def _batch_parts(batch):
    if torch.is_tensor(batch):
        return batch, None
    idx, targets = batch
    return idx, targets


@torch.no_grad()
def gate_scores(model, batches, width=None, calibrated=True):
    """
    Teacher-forced gate probabilities on held-out data. batches: iterable of idx (B, T) or (idx, targets);
    tokens whose target is -1 are left out. For each gated exit: the gate's probability (calibrated or raw)
    and whether that exit's readout top-1 equals the final top-1 of the forward at `width` (default full:
    "the full model"). Returns probs (G, N) fp32, agree (G, N) bool.
    """
    ctrl = model.controllers
    G = len(ctrl.gate_blocks)
    probs, agree = [], []
    for batch in batches:
        idx, targets = _batch_parts(batch)
        out = model(idx, width=width, return_exits=True)
        keep = torch.ones_like(idx, dtype=torch.bool) if targets is None else targets != -1
        p = torch.stack([ctrl.gate.prob(out.exit_hidden[g], g, calibrated) for g in range(G)])  # (G, B, T)
        probs.append(p[:, keep].float().cpu())
        agree.append(out.exit_agree[:G][:, keep].cpu())
    return torch.cat(probs, 1), torch.cat(agree, 1)


def isotonic_steps(p, y, max_bins=32, min_count=20):
    """
    A non-decreasing step map from raw scores p (N,) to P(y) on (p, y): pool-adjacent-violators on the
    data sorted by p (equal scores share a step), then adjacent steps are merged, left to right, until
    each holds >= max(min_count, N / max_bins) samples. Every step's value is the mean of y over its
    samples, so on this data the samples of the steps valued > tau agree at a rate > tau for every tau
    (what makes a calibrated threshold mean what it says). Returns (lo, val): each step's smallest score
    and its value, as float lists.
    """
    if p.numel() == 0:
        raise ValueError("no samples to calibrate on")
    order = torch.argsort(p)
    ps, ys = p[order].tolist(), y[order].float().tolist()
    blocks = []  # [sum_y, count, lo]
    i, N = 0, len(ps)
    while i < N:
        j, s = i, 0.0
        while j < N and ps[j] == ps[i]:
            s += ys[j]
            j += 1
        blocks.append([s, j - i, ps[i]])
        while len(blocks) > 1 and blocks[-2][0] / blocks[-2][1] >= blocks[-1][0] / blocks[-1][1]:
            s2, n2, _ = blocks.pop()
            blocks[-1][0] += s2
            blocks[-1][1] += n2
        i = j
    need = max(min_count, math.ceil(N / max_bins))
    merged = []
    for b in blocks:
        if merged and merged[-1][1] < need:
            merged[-1][0] += b[0]
            merged[-1][1] += b[1]
        else:
            merged.append(list(b))
    if len(merged) > 1 and merged[-1][1] < need:
        s2, n2, _ = merged.pop()
        merged[-1][0] += s2
        merged[-1][1] += n2
    while len(merged) > max_bins:  # N / max_bins rounding can leave one step too many
        k = min(range(len(merged) - 1), key=lambda t: merged[t][1] + merged[t + 1][1])
        merged[k][0] += merged[k + 1][0]
        merged[k][1] += merged[k + 1][1]
        del merged[k + 1]
    return [b[2] for b in merged], [b[0] / b[1] for b in merged]


@torch.no_grad()
def calibrate_gates(model, batches, width=None, min_count=20):
    """
    Fit each gate's isotonic map (isotonic_steps) on held-out batches (see gate_scores) and store it in the
    gate's buffers; from then on gate.prob(..., calibrated=True) returns the calibrated probability.
    Evaluate with reliability_table on OTHER held-out batches. Returns {"n_tokens", "steps": per gate}.
    """
    gate = model.controllers.gate
    probs, agree = gate_scores(model, batches, width, calibrated=False)
    K = gate.calib_lo.size(1)
    steps = []
    for g in range(gate.n_gates):
        lo, val = isotonic_steps(probs[g], agree[g], max_bins=K, min_count=min_count)
        S = len(lo)
        gate.calib_lo[g] = torch.tensor(lo + [2.0] * (K - S), dtype=gate.calib_lo.dtype)
        gate.calib_val[g] = torch.tensor(val + [val[-1]] * (K - S), dtype=gate.calib_val.dtype)
        gate.calib_on[g] = True
        steps.append(S)
    return {"n_tokens": probs.size(1), "steps": steps}


def reliability_table(probs, agree, thresholds=DEFAULT_THRESHOLDS, print_fn=None):
    """
    The exit policy on teacher-forced data: a token exits at the first gated exit whose probability is > tau.
    probs, agree: (G, N) from gate_scores. Per tau: exit_rate (fraction of tokens that exit before the last
    block), precision (fraction of exited tokens whose exit readout agrees with the full model's top-1; nan
    if none exit), n_exit. print_fn (e.g. print) also prints the table. Returns a list of dicts.
    """
    if probs.shape != agree.shape or probs.dim() != 2:
        raise ValueError(f"probs and agree must both be (G, N), got {tuple(probs.shape)} and {tuple(agree.shape)}")
    G, N = probs.shape
    rows = []
    for tau in thresholds:
        fire = probs > tau  # (G, N)
        exited = fire.any(0) if G else torch.zeros(N, dtype=torch.bool)
        n_exit = int(exited.sum())
        precision = float("nan")
        if n_exit:
            first = fire.float().argmax(0)  # first gate that fires
            precision = agree[first, torch.arange(N)][exited].float().mean().item()
        rows.append({"tau": tau, "exit_rate": n_exit / max(N, 1), "precision": precision, "n_exit": n_exit})
    if print_fn is not None:
        print_fn(f"{'tau':>6} {'exit rate':>10} {'precision':>10} {'exited':>8}   ({N} tokens)")
        for r in rows:
            print_fn(f"{r['tau']:6.2f} {r['exit_rate']:10.3f} {r['precision']:10.3f} {r['n_exit']:8d}")
    return rows

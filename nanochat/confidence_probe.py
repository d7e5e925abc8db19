"""
Adaptive-compute controllers of a HybridGPT: the width predictor, the exit gates, their training signal
("shadow loss") and the calibration that makes a gate threshold mean what it says.

LayerDimPredictor: once per prompt, from the mean of norm(x) over the prompt's positions after the first
    config.predictor_after blocks (run at full width), predicts for every block j and width level l the
    loss increase (nats/token, on the text that follows) of running block j at level l with every other
    block at full width. Output (B, n_layer, n_levels); the full level's column is 0 by definition.
    Plan rule: per block, the smallest level whose predicted increase is < epsilon (so epsilon is a
    per-block budget; the rule assumes the increases of narrowing several blocks roughly add up).
    Blocks where width changes nothing (Mamba mixer with no FFN) always get the full width.
ConfidenceGate: at each gated exit (config.exit_blocks() but the last), the probability per token that
    exiting there is safe: sigmoid(w . relu(W norm(h) + e_gate) + b_gate), h the residual after the exit
    block (detached in training). It reads only the hidden state, so a check costs 2*D*H + 2*H FLOPs,
    not an lm_head matmul. calibrated probabilities go through a per-gate isotonic step map fitted on
    held-out data (calibrate_gates), stored as buffers, so they are checkpointed with the weights.

Training signal, controller_losses(): see its docstring. Gate target (CALM's consistency oracle): the exit
readout's top-1 equals the final readout's top-1 ("agree"), or the exit's loss is within loss_delta of the
final loss ("loss"). Predictor target: measured on a few sampled (block, level) probes per call.
"""
import math
import random

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
        h's first dim runs over all gates (G, ...). Returns raw logits (...) in fp32.
        """
        z = self.fc(norm(h))
        if gate is None:
            if h.size(0) != self.n_gates:
                raise ValueError(f"h has {h.size(0)} entries in dim 0 but there are {self.n_gates} gates")
            shape = (self.n_gates,) + (1,) * (h.dim() - 2)
            emb, bias = self.gate_embed.view(*shape, self.hidden), self.out_bias.view(shape)
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


class LayerDimPredictor(nn.Module):
    """Prompt -> predicted loss increase (B, n_layer, n_levels) of running each block at each level."""

    def __init__(self, n_embd, n_layer, levels, hidden, read_after):
        super().__init__()
        self.n_embd, self.n_layer, self.levels, self.hidden = n_embd, n_layer, list(levels), hidden
        self.read_after = read_after
        self.fc = nn.Linear(n_embd, hidden, bias=False)
        self.out = nn.Linear(hidden, n_layer * len(levels), bias=True)

    @torch.no_grad()
    def init_weights(self):
        nn.init.normal_(self.fc.weight, std=linear_init_std(*self.fc.weight.shape))
        nn.init.zeros_(self.out.weight)
        # untrained, it predicts a 1-nat loss for any narrowing: the plan stays at full width
        nn.init.constant_(self.out.bias, 1.0)

    @staticmethod
    def pool(x, mask=None):
        """Mean of norm(x) over positions (B, T, D) -> (B, D); mask (B, T) bool picks the positions."""
        xn = norm(x.detach()).float()
        if mask is None:
            return xn.mean(1)
        m = mask.to(xn.dtype).unsqueeze(-1)
        return (xn * m).sum(1) / m.sum(1).clamp(min=1.0)

    def forward(self, pooled):
        delta = self.out(F.relu(self.fc(pooled.to(self.fc.weight.dtype)))).float()
        delta = delta.view(-1, self.n_layer, len(self.levels))
        full = torch.zeros_like(delta[..., -1:])
        return torch.cat([delta[..., :-1], full], dim=-1)  # the full level costs nothing by definition

    def plan(self, delta, epsilon, matters):
        """(B, n_layer) long widths: per block the smallest level whose predicted increase is < epsilon."""
        levels = torch.tensor(self.levels, device=delta.device)
        ok = delta < epsilon  # (B, n, L); the full level is always ok (0 < epsilon needs epsilon > 0)
        ok[..., -1] = True
        first = ok.float().argmax(-1)  # index of the first ok level
        plan = levels[first]
        plan[:, [j for j, m in enumerate(matters) if not m]] = levels[-1]
        return plan

    def flops(self):
        return 2 * self.n_embd * self.hidden + 2 * self.hidden * self.n_layer * len(self.levels)


class AdaptiveControllers(nn.Module):
    """The width predictor and the exit gates of one HybridGPT (its `controllers` submodule)."""

    def __init__(self, config):
        super().__init__()
        self.gate_blocks = config.exit_blocks()[:-1]  # the last exit is the model's output: no gate
        self.matters = width_matters(config)
        self.gate = ConfidenceGate(config.n_embd, len(self.gate_blocks), config.gate_hidden, config.calib_bins)
        self.predictor = LayerDimPredictor(config.n_embd, config.n_layer, config.width_levels,
                                           config.predictor_hidden, config.predictor_after)

    def init_weights(self):
        self.gate.init_weights()
        self.predictor.init_weights()

    def is_calibrated(self):
        return bool(self.gate.calib_on.all())


# -----------------------------------------------------------------------------
# Training signal

def controller_losses(model, idx, targets, out, gate_target="agree", loss_delta=0.1, n_probes=2, probe_rows=4,
                      prompt_frac=0.5, mask=None, rng=None):
    """
    Shadow losses of the controllers for one batch. Gradients reach only model.controllers: the gate reads
    out.exit_hidden detached, the predictor reads a no-grad prefix, targets are measured without grad.

    out: the HybridOutput of model(idx, targets, width=plan, return_exits=True) on the same batch (any
        static plan; the gates then learn agreement with that plan's final readout).
    Gate: BCE over every gated exit and every token with a target != -1; target = out.exit_agree
        (gate_target "agree") or exit loss <= final loss + loss_delta ("loss").
    Predictor: the first P = prompt_frac * T positions play the prompt (mean-pooled after
        config.predictor_after full-width blocks); on the first probe_rows rows, n_probes random pairs
        (block j, level l < full) are each measured by one no-grad forward with block j at l and the rest at
        full width: target = mean per-token loss increase over positions >= P against the full-width
        forward (out's own losses when out ran at full width, else one more no-grad forward). Loss: MSE of
        the predicted increase. Cost per call: (n_probes + 0 or 1) no-grad forwards of probe_rows rows and
        predictor_after blocks of all rows.
    NOTE: the probes run model.eval() forwards, which overwrite each MoE's aux_loss: use out.aux_loss.
    Returns dict: loss (gate_loss + predictor_loss, add it to the trainer's loss), gate_loss, predictor_loss,
        and detached metrics gate_acc, gate_target_rate, predictor_mae, probe_delta (mean measured increase).
    """
    if gate_target not in ("agree", "loss"):
        raise ValueError(f"gate_target must be 'agree' or 'loss', got {gate_target!r}")
    if targets is None or out.exit_agree is None or (gate_target == "loss" and out.exit_losses is None):
        raise ValueError("controller_losses needs targets and out = model(idx, targets, return_exits=True)")
    if not hasattr(model, "controllers"):
        raise ValueError("this model has no controllers: build it with HybridConfig(adaptive=True)")
    c, ctrl = model.config, model.controllers
    rng = rng or random
    B, T = idx.shape
    valid = targets != -1 if mask is None else (targets != -1) & mask
    res = {}

    # ---- gates
    G = len(ctrl.gate_blocks)
    if G > 0:
        hs = torch.stack(out.exit_hidden[:G]).detach()  # (G, B, T, D)
        logits = ctrl.gate.logits(hs)  # (G, B, T)
        if gate_target == "agree":
            y = out.exit_agree[:G]
        else:
            y = (out.exit_losses[:G] - out.exit_losses[-1:]).detach() <= loss_delta
        m = valid.unsqueeze(0).expand(G, B, T)
        res["gate_loss"] = F.binary_cross_entropy_with_logits(logits[m], y[m].float())
        res["gate_acc"] = ((logits[m] > 0) == y[m]).float().mean().detach()
        res["gate_target_rate"] = y[m].float().mean().detach()
    else:
        res["gate_loss"] = ctrl.gate.out_bias.sum() * 0.0

    # ---- predictor
    P = int(T * prompt_frac)
    if not 1 <= P < T:
        raise ValueError(f"prompt_frac={prompt_frac} leaves no prompt or no continuation in T={T} tokens")
    levels = c.width_levels
    probes = [(j, l) for j in range(c.n_layer) if ctrl.matters[j] for l in range(len(levels) - 1)]
    if probes and n_probes > 0:
        R = min(probe_rows, B)
        later = valid[:R, P:].float()  # (R, T - P) positions whose loss the plan affects
        was_training = model.training
        model.eval()
        with torch.no_grad():
            def token_losses(plan):
                return model(idx[:R], targets[:R], width=plan, mask=None if mask is None else mask[:R],
                             loss_reduction="none").view(R, T)[:, P:].float()
            if out.plan is not None and all(w == c.n_embd for w in out.plan) and out.exit_losses is not None:
                base = out.exit_losses[-1][:R, P:].detach().float()
            else:
                base = token_losses(None)
            chosen = rng.sample(probes, min(n_probes, len(probes)))
            measured = []
            for j, l in chosen:
                plan = [c.n_embd] * c.n_layer
                plan[j] = levels[l]
                measured.append(((token_losses(plan) - base) * later).sum(1) / later.sum(1).clamp(min=1.0))  # (R,)
            pooled = ctrl.predictor.pool(model.prefix_hidden(idx[:R], c.predictor_after,
                                                             None if mask is None else mask[:R])[:, :P],
                                         None if mask is None else mask[:R, :P])
        model.train(was_training)
        delta = ctrl.predictor(pooled)  # (R, n, L)
        pred = torch.stack([delta[:, j, l] for j, l in chosen], 1)  # (R, n_probes)
        target = torch.stack(measured, 1)
        res["predictor_loss"] = F.mse_loss(pred, target)
        res["predictor_mae"] = (pred - target).abs().mean().detach()
        res["probe_delta"] = target.mean().detach()
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

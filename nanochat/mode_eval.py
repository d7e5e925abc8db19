"""
Teacher-forced forwards in a compute mode (nanochat.matryoshka.MODES), for evaluations that score whole sequences
at once: CORE (nanochat/core_eval.py) and bits per byte (scripts/base_eval.py).

A mode picks one width plan per row, then the whole row runs at that plan:
- ghost, whisper, normal, think: the mode's fixed width, snapped down to the model's width levels
  (matryoshka.mode_plan); on a small model several modes can land on the same level (ghost = 128 and full width
  = 256 leave whisper and normal at full width).
- auto: the width predictor's plan, read from the row's prompt only, as the engine plans at prefill
  (engine._predict_plan): the residual after the first config.predictor_after blocks (always full width) is
  pooled over the prompt's positions, and the router picks the cheapest menu plan whose probability of keeping
  the full model's answer reaches its threshold (plan_epsilon None: the calibrated threshold in the checkpoint).
  Tokens after the prompt do not change the plan: the blocks are causal, so the prompt's residuals do not see them.

Exit gates do not act here: a teacher-forced forward runs every block for every token, so auto's exits and
widening (which decide per decoded token) are off, and its compute fraction counts the width plan only. The
decode-time cost with gates is what scripts.bench adaptive measures.

compute_fraction: forward FLOPs per token at the row's plan over full width's, both from the one FLOP table
(nanochat/flops.py via model.forward_flops_per_token) at the mean causal context of the sequence (T / 2, as
fractal_train's evaluation counts it). The predictor's own FLOPs (two small matmuls per prompt) are not in it.

A dense GPT (kinds gpt and modern) has no widths: it runs think only, at compute fraction 1.
"""
import torch

from nanochat.matryoshka import MODES, mode_plan as fixed_mode_plan


def is_hybrid(model):
    return getattr(model, "kind", None) == "hybrid"


def has_router(model):
    """A hybrid with the width predictor and gates (config.adaptive): the one kind of model that runs auto."""
    return is_hybrid(model) and getattr(model, "controllers", None) is not None


def default_modes(model):
    """Every mode for a hybrid with controllers; think only for a dense GPT or a hybrid without them."""
    return tuple(MODES) if has_router(model) else ("think",)


def check_mode(model, mode):
    """Raise a one-line ValueError when `model` cannot run `mode`."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose from {', '.join(MODES)}")
    if not is_hybrid(model) and mode != "think":
        raise ValueError(f"mode {mode!r} needs a hybrid checkpoint's width levels; this {getattr(model, 'kind', '?')} "
                         f"model (dense GPT) runs only 'think'")
    if MODES[mode].predicted and not has_router(model):
        raise ValueError(f"mode {mode!r} needs the width predictor, which this hybrid checkpoint lacks "
                         f"(config.adaptive=False); run fractal_train phase 2 first, or choose fixed modes")


def prompt_mask(prompt_len, B, T, device):
    """(B, T) bool: True on each row's prompt positions. prompt_len: an int for every row, or B ints."""
    lens = torch.as_tensor(prompt_len, dtype=torch.long, device=device).reshape(-1)
    if lens.numel() not in (1, B):
        raise ValueError(f"prompt_len must be one int or one per row ({B}), got {lens.numel()} values")
    lens = lens.expand(B)
    if bool(((lens < 1) | (lens > T)).any()):
        raise ValueError(f"prompt lengths must be in [1, {T}] (the sequence's length), got {lens.tolist()}")
    return torch.arange(T, device=device)[None, :] < lens[:, None]


@torch.no_grad()
def predicted_plan(model, idx, prompt_len, plan_epsilon=None):
    """(B, n_layer) long: the width predictor's plan for each row of idx (B, T), read from its first prompt_len
    tokens (an int or B ints) after config.predictor_after full-width blocks."""
    c, predictor = model.config, model.controllers.predictor
    B, T = idx.shape
    mask = prompt_mask(prompt_len, B, T, idx.device)
    x = model.prefix_hidden(idx, c.predictor_after)  # (B, T, D); position t saw tokens <= t only
    plan = predictor.plan(predictor(predictor.pool(x, mask)), plan_epsilon, model.controllers.matters)
    plan[:, :c.predictor_after] = c.n_embd  # those blocks ran at full width to read the prompt (engine's rule)
    return plan.long()


def mode_plan(model, idx, mode, prompt_len, plan_epsilon=None):
    """
    (plan, compute_fraction) of each row of idx (B, T) in `mode`: plan (B, n_layer) long on idx's device, None for
    a dense GPT; compute_fraction (B,) float64 on the CPU. prompt_len (an int or B ints) matters to auto only.
    """
    check_mode(model, mode)
    B, T = idx.shape
    if not is_hybrid(model):
        return None, torch.ones(B, dtype=torch.float64)
    c = model.config
    if MODES[mode].predicted:
        plan = predicted_plan(model, idx, prompt_len, plan_epsilon)
    else:
        plan = torch.tensor(fixed_mode_plan(mode, c.width_levels, c.n_layer), device=idx.device).expand(B, -1).clone()
    full = model.forward_flops_per_token(T / 2)
    cost = {}  # distinct plans (most batches hold one): FLOPs from the table once each
    for row in plan.tolist():
        cost.setdefault(tuple(row), model.forward_flops_per_token(T / 2, list(row)) / full)
    return plan, torch.tensor([cost[tuple(row)] for row in plan.tolist()], dtype=torch.float64)


def width_arg(model, plan):
    """The model's width argument for a (B, n_layer) plan: None at full width, one list when every row shares it
    (the blocks then slice once), else the per-row tensor."""
    if plan is None or bool((plan == model.config.n_embd).all()):
        return None
    if bool((plan == plan[:1]).all()):
        return plan[0].tolist()
    return plan


def mode_logits(model, idx, mode, prompt_len, plan_epsilon=None):
    """(logits (B, T, V) fp32, compute_fraction (B,)) of idx (B, T) run teacher forced in `mode`."""
    plan, frac = mode_plan(model, idx, mode, prompt_len, plan_epsilon)
    w = width_arg(model, plan)
    logits = model(idx) if w is None else model(idx, width=w)
    return logits.float(), frac


def mode_loss(model, x, y, mode, prompt_len, plan_epsilon=None):
    """(per-token losses (B, T) in nats, 0 where y is -1; compute_fraction (B,)) of inputs x and targets y (B, T) in
    `mode`. The model computes the loss itself (its chunked readout, no (B, T, V) logits kept)."""
    plan, frac = mode_plan(model, x, mode, prompt_len, plan_epsilon)
    w = width_arg(model, plan)
    kw = {} if w is None else {"width": w}
    loss = model(x, y, loss_reduction="none", **kw)
    return loss.reshape(x.shape).float(), frac


def mode_loss_fn(model, mode, prompt_len, plan_epsilon=None, fractions=None):
    """A `model(x, y, loss_reduction="none")` callable in `mode`, for nanochat.loss_eval.evaluate_bpb. fractions: a
    list that each call's compute fractions (B,) are appended to."""
    def loss_fn(x, y, loss_reduction="none"):
        if loss_reduction != "none":
            raise ValueError(f"a mode's loss function gives per-token losses only, got loss_reduction={loss_reduction!r}")
        loss, frac = mode_loss(model, x, y, mode, prompt_len, plan_epsilon)
        if fractions is not None:
            fractions.append(frac)
        return loss
    return loss_fn


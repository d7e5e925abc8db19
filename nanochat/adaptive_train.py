"""
What one micro-batch of scripts.fractal_train runs: the step's width plans, each a forward + backward, and the
losses that make every width good and train the controllers on the tokens that carry the loss.

Plans of a step (step_plans): full width first, then one plan per narrow width level, cheapest first, then
--n-random-plans random ones. The narrow plans alternate: on even steps the uniform plans (every block at the level:
the named modes ghost/whisper/normal), on odd steps the router's menu plans (confidence_probe.plan_menu: the first
predictor_after blocks stay full, as auto runs them). So every plan a mode or the router can run is trained at least
every second step, and no width level depends on being drawn (a random per-block plan is a given uniform one with
probability (1/L)^n_layer, which left mid widths untrained). With --plan-schedule cycle a step runs full width and
one narrow plan, the uniform and menu plans of every level in turn (cycle_plans): two passes per micro-batch instead
of one per level, each narrow plan trained once a cycle. The router learns the columns of the menu plans a step ran.

Objective of one plan on one micro-batch (targets -1 carry no loss anywhere, e.g. a task's non-answer tokens):
    CE(plan)
  + anchor_weight * KL(anchor || full)  full width only, from a frozen model (fractal_train --anchor-weight: the
                                        phase's input checkpoint), mean over the loss-bearing tokens
  + distill_weight * KL(full || plan)   narrow plans only, against this micro-batch's full-width logits (detached),
                                        mean over the loss-bearing tokens (distill_kl)
  + exit_weight * mean over the exit readouts before the last block of their CE (mean over loss-bearing tokens)
  + MoE router losses(plan)
  + gate BCE (controllers): every gated exit of this plan, target "the exit readout's top-1 is the full model's"
  + router BCE (controllers, on the last plan's pass of a step that ran the menu plans): per row and narrow menu
    plan, whether the plan gave the full model's top-1 on every loss-bearing token after the first half of the row
    (confidence_probe.router_labels), read from the first half (the prompt) pooled over its positions.
The losses are means over plans (the caller's backward scales by 1 / number of plans).
"""
import math

import torch
import torch.nn.functional as F

from nanochat.common import autocast_context
from nanochat.confidence_probe import plan_menu, router_labels, controller_losses, gate_scores
from nanochat.loss_eval import all_reduce_sums, evaluate_bpb
from nanochat.matryoshka import sample_plans


def narrow_plans(config, step):
    """The narrow plans of a step, cheapest first: uniform on even steps, the router's menu on odd ones."""
    if step % 2:
        return plan_menu(config)[:-1]
    return [[w] * config.n_layer for w in config.width_levels[:-1]]


def cycle_plans(config):
    """The narrow plans --plan-schedule cycle takes one per step, in turn: per width level, cheapest first, its uniform
    plan, then the router's menu plan where that differs. Every one of them trains once every len(...) steps."""
    out = []
    for w, menu_plan in zip(config.width_levels[:-1], plan_menu(config)[:-1]):
        out += [[w] * config.n_layer] + ([menu_plan] if menu_plan != [w] * config.n_layer else [])
    return out


SCHEDULES = ("every", "cycle")


def distinct_plans(config, matryoshka, n_random=0, per_block=False):
    """How many different plans a run's steps meet, each one graph of a compiled model: full width, and with
    matryoshka every narrow uniform and menu plan (both schedules go through all of cycle_plans; random plans of one
    width for all blocks are among them). None when random per-block plans (--sample-dim) make it unbounded."""
    if not matryoshka:
        return 1
    if n_random and per_block:
        return None
    return 1 + len(cycle_plans(config))


def schedule_period(config, schedule):
    """Steps after which step_plans' plans repeat under `schedule`: 2 for every (uniform plans, then the menu's),
    the length of cycle_plans for cycle (1 when full width is the only level)."""
    return max(1, len(cycle_plans(config))) if schedule == "cycle" else 2


def step_plans(config, matryoshka, rng, n_random=0, per_block=False, step=0, schedule="every"):
    """The plans of one step: [full] without matryoshka, else full width, then the narrow plans (schedule "every":
    narrow_plans(config, step), one per level; "cycle": the step's one plan of cycle_plans(config)), then n_random
    random plans drawn with rng (per block or one width for all)."""
    if schedule not in SCHEDULES:
        raise ValueError(f"plan schedule {schedule!r}: choose from {', '.join(SCHEDULES)}")
    full = [config.n_embd] * config.n_layer
    if not matryoshka:
        return [full]
    randoms = sample_plans(config.width_levels, config.n_layer, rng, n_random, per_block)[2:] if n_random else []
    if schedule == "cycle":
        cycle = cycle_plans(config)  # empty when full width is the only level: nothing narrower to train
        return [full] + ([cycle[step % len(cycle)]] if cycle else []) + randoms
    return [full] + narrow_plans(config, step) + randoms


def rotating_exits(config, per_pass, counter):
    """The exit blocks that pass number `counter` reads out when each pass reads `per_pass` of the exits before the
    last, in turn (LayerSkip's rotation: over len / gcd passes every exit is read equally often); None (every exit)
    when per_pass is 0 or covers them all. The last block's readout is the model's output: always read."""
    if not per_pass:
        return None
    early = exit_blocks_of(config)[:-1]
    if per_pass >= len(early):
        return None
    return sorted(early[(counter * per_pass + i) % len(early)] for i in range(per_pass))


def exit_rotation_period(config, per_pass):
    """Passes after which rotating_exits repeats (the distinct sets of exits it reads): 1 when every exit is read."""
    if not per_pass:
        return 1
    early = len(exit_blocks_of(config)) - 1
    return 1 if per_pass >= early else early // math.gcd(early, per_pass)


def exit_blocks_of(config):
    if not hasattr(config, "exit_blocks"):
        raise ValueError("--exit-readouts rotates a hybrid's exit readouts: a dense GPT has none")
    return config.exit_blocks()


def width_kwargs(model, plan):
    """The forward's width argument for a plan; a dense GPT (scripts.chat_sft trains one) has a single width."""
    return {} if model.kind == "gpt" else {"width": plan}


def plan_flops(model, context_len, plan):
    """Forward FLOPs per token of a plan at a context length (the one FLOP table; a dense GPT: its only width)."""
    return model.forward_flops_per_token(context_len, **width_kwargs(model, plan))


def plan_label(plan, config):
    """'w64' for the menu plan of level 64 (or the uniform plan 64), 'm48' (mean width) for any other plan."""
    if not hasattr(config, "width_levels"):
        return "full"
    for w, menu_plan in zip(config.width_levels, plan_menu(config)):
        if list(plan) == menu_plan or list(plan) == [w] * config.n_layer:
            return f"w{w}"
    return f"m{round(sum(plan) / len(plan))}"


def masked_mean(values, valid):
    """Mean of values (..., B, T) over the positions where valid (B, T), per leading index; 0 where none is valid."""
    v = valid.to(values.dtype)
    return (values * v).sum((-2, -1)) / v.sum().clamp(min=1.0)


def distill_kl(logits, full_logits, valid):
    """KL(full || narrow) per token, mean over valid (B, T) positions; full_logits is the teacher (no gradient)."""
    logp = F.log_softmax(logits.float(), -1)
    logq = F.log_softmax(full_logits.detach().float(), -1)
    kl = (logq.exp() * (logq - logp)).sum(-1)  # (B, T)
    return masked_mean(kl, valid)


def train_micro_batch(model, train_model, x, y, plans, controllers=None, exit_weight=0.0, distill_weight=0.0,
                      prompt_frac=0.5, backward=None, anchor=None, anchor_weight=0.0, exit_readouts=0, micro_index=0):
    """
    Forward + backward of every plan on one micro-batch (full width first, then the narrow plans, then any random
    ones); the router learns, for each of its menu's narrow plans among them, whether it gave the full model's top-1.
    backward(objective, plan_index) runs the backward (the caller scales and syncs). Returns [CE per plan..., KL sum
    over narrow plans, MoE router loss (mean over plans), gate loss (mean over plans), router loss], detached floats
    as a tensor. anchor (a frozen model, e.g. the run's input checkpoint): the full-width plan also learns
    anchor_weight * KL(anchor || full) on the loss-bearing tokens. exit_readouts (fractal_train --exit-readouts): each
    plan's forward reads out that many exits before the last, pass micro_index * len(plans) + i of the rotation
    (rotating_exits; 0: every exit); the exit loss is the mean over those, and the gates learn at those.
    """
    has_moe = "E" in getattr(model.config, "ffn_pattern", "")
    menu = plan_menu(model.config)[:-1] if len(plans) > 1 else []
    # the narrow plans that are router menu plans (first occurrences), by position in plans -> their menu column
    columns = {}
    for i, p in enumerate(plans[1:], 1):
        if list(p) in menu and menu.index(list(p)) not in columns.values():
            columns[i] = menu.index(list(p))
    valid = y != -1
    want_exits = exit_weight > 0 or controllers is not None
    sums = torch.zeros(len(plans) + 4, device=x.device)
    full_logits = full_top1 = None
    plan_top1 = []
    for i, plan in enumerate(plans):
        if want_exits:
            exits = rotating_exits(model.config, exit_readouts, micro_index * len(plans) + i)
            out = train_model(x, y, width=plan, return_exits=True, exits=exits)
            logits, ce = out.logits, out.loss
        elif len(plans) > 1 or anchor is not None:  # the logits: a teacher or a student of distillation
            out, logits = None, train_model(x, width=plan)
            ce = F.cross_entropy(logits.view(-1, logits.size(-1)), y.reshape(-1), ignore_index=-1)
        else:
            out, logits, ce = None, None, train_model(x, y, **width_kwargs(model, plan))
        objective = ce
        if i == 0:
            if anchor is not None:
                with torch.no_grad():
                    anchor_logits = anchor(x, **width_kwargs(anchor, plan))
                objective = objective + anchor_weight * distill_kl(logits, anchor_logits, valid)
            if len(plans) > 1:
                full_logits = logits.detach()
                full_top1 = full_logits.argmax(-1)
        else:
            if distill_weight > 0:
                kl = distill_kl(logits, full_logits, valid)
                objective = objective + distill_weight * kl
                sums[len(plans)] += kl.detach().float()
            if i in columns:
                plan_top1.append(logits.detach().argmax(-1))
        if out is not None and exit_weight > 0 and out.exit_losses.size(0) > 1:
            objective = objective + exit_weight * masked_mean(out.exit_losses[:-1], valid).mean()
        if has_moe:  # read now: the router's prefix forward overwrites each MoE's losses
            router = model.moe_aux_loss()
            objective = objective + router
            sums[-3] += router.detach().float() / len(plans)
        if controllers is not None:
            last = i == len(plans) - 1
            target = router_labels(plan_top1, full_top1, valid, int(x.size(1) * prompt_frac)) \
                if last and plan_top1 else None
            cl = controller_losses(model, x, y, out, full_top1=None if i == 0 else full_top1, router_target=target,
                                   prompt_frac=prompt_frac, router_columns=list(columns.values()))
            objective = objective + cl["loss"]
            sums[-2] += cl["gate_loss"].detach().float() / len(plans)
            sums[-1] += cl["predictor_loss"].detach().float()
        sums[i] += ce.detach().float()
        backward(objective, i)
    return sums


def evaluate_widths(model, controllers, batches, token_bytes, T, exit_threshold=0.9, plan_epsilon=None):
    """Val metrics of this rank's batches, summed over ranks. bpb_w<w>: bits per byte at each width level. With
    controllers, bpb_pred: each row at the width predictor's plan (read from its first T/2 tokens); compute_pred: that
    plan's forward FLOPs per token over the full width's (mean over rows); exit_rate / exit_precision: teacher forced, at
    full width, a token exits at the first gate whose (raw, uncalibrated) probability is > exit_threshold; precision =
    its exit readout's top-1 agrees with the final top-1 (confidence_probe.gate_scores)."""
    model.eval()
    dev, full_flops = token_bytes.device, model.forward_flops_per_token(T / 2)
    frac = torch.zeros(2, dtype=torch.float64, device=dev)  # sum of compute fractions, rows

    def at_predicted_plan(x, y, loss_reduction="none"):
        pooled = controllers.predictor.pool(model.prefix_hidden(x, model.config.predictor_after)[:, :T // 2])
        plan = controllers.predictor.plan(controllers.predictor(pooled), plan_epsilon, controllers.matters)  # (B, n_layer)
        for row in plan.tolist():
            frac[0] += model.forward_flops_per_token(T / 2, row) / full_flops
            frac[1] += 1
        return model(x, y, width=plan, loss_reduction=loss_reduction)

    with autocast_context(dev.type):
        levels = getattr(model.config, "width_levels", None)  # a dense GPT: its one width
        res = {f"bpb_w{w}": evaluate_bpb(model, batches, len(batches), token_bytes, forward_kwargs={"width": w})
               for w in levels} if levels else {"bpb": evaluate_bpb(model, batches, len(batches), token_bytes)}
        if controllers is not None:
            res["bpb_pred"] = evaluate_bpb(at_predicted_plan, batches, len(batches), token_bytes)
            probs, agree = gate_scores(model, batches, calibrated=False)  # (G, N) each
            fire = probs > exit_threshold
            exited = fire.any(0)
            first = fire.float().argmax(0)
            good = agree[first, torch.arange(agree.size(1))] & exited
            counts = torch.tensor([exited.numel(), exited.sum().item(), good.sum().item()], dtype=torch.float64, device=dev)
            all_reduce_sums(frac, counts)
            res["compute_pred"] = (frac[0] / frac[1]).item()
            res["exit_rate"] = (counts[1] / counts[0]).item()
            res["exit_precision"] = (counts[2] / counts[1]).item() if counts[1] > 0 else float("nan")
    model.train()
    return res

"""
Evaluation on held-out (test-split) problems with nanochat.engine.Engine, the generation code users run:
greedy decoding from the prompt "<|bos|>question" until the newline token, exact match of the completion.

Per problem and compute setting we keep what the engine reports for the tokens that row really used (the
prompt step and every decode step up to and including the one that produced the newline; rows that
finished early are not charged for the steps the batch ran after them):
    flops / full_flops   the engine's FLOP accounting (what ran vs the full model on the same tokens)
    exit_block           per decode step, the block after which the token's residual froze
    widths               per token, the width of every block it ran
    plan                 auto mode: the width predictor's plan (one width per block)
Exit precision: a token that exited is compared with the full model's top-1 at the same position, from a
teacher-forced full-width, no-exit forward of the sequence the adaptive run produced.
"""
import copy

import torch

from nanochat.engine import Engine
from nanochat.matryoshka import MODES, mode_plan
from nanochat.confidence_probe import gate_scores, reliability_table
from tiny_experiment.tasks import DIFFICULTIES, encode_problem, exact_match

MAX_TOKENS = 6  # the longest completion is '=', two digits, newline: 4 tokens
NAMED_MODES = tuple(m for m, mode in MODES.items() if not mode.predicted)  # ghost, whisper, normal, think


def prompts_of(tokenizer, problems):
    bos = tokenizer.get_bos_token_id()
    return [[bos] + encode_problem(tokenizer, p)[0] for p in problems]


def newline_id(tokenizer):
    newline = tokenizer.encode("\n")
    if len(newline) != 1:
        raise ValueError("the newline must be one token to stop on it")
    return newline[0]


def generate_rows(engine, tokenizer, problems, plan, newline, batch_size=256, **thresholds):
    """
    Run the engine over `problems` (grouped by prompt length, as it needs equal lengths) at `plan` (a mode
    name or a list of widths), with the engine's exit_threshold / expand_threshold if given. Returns one dict per
    problem, in order.
    """
    model = engine.model
    prompts = prompts_of(tokenizer, problems)
    rows = [None] * len(problems)
    by_len = {}
    for i, p in enumerate(prompts):
        by_len.setdefault(len(p), []).append(i)
    for ids in by_len.values():
        for start in range(0, len(ids), batch_size):
            chunk = ids[start:start + batch_size]
            res = engine.generate_batch([prompts[i] for i in chunk], MAX_TOKENS, plan=plan, temperature=0.0,
                                        stop_tokens=(newline,), **thresholds)
            full_top1 = None
            if plan == "auto" and len(res.steps) > 1:
                idx, _, _ = res.reference_inputs()
                with torch.inference_mode():
                    full_top1 = model(idx.to(model.get_device())).argmax(-1).cpu()  # (B, Tp + K - 1)
            Tp = len(prompts[chunk[0]])
            for b, i in enumerate(chunk):
                rows[i] = row_record(res, b, Tp, newline, full_top1, model.config.n_layer if not engine.dense else None)
                rows[i]["correct"] = exact_match(tokenizer.decode(res.tokens[b]), problems[i])
                rows[i]["text"] = tokenizer.decode(res.tokens[b])
    return rows


def row_record(res, b, Tp, newline, full_top1, n_layer):
    """What row b of a GenerationResult used, up to its newline (see the module docstring)."""
    last = len(res.steps) - 1
    for k, s in enumerate(res.steps):
        if s.tokens[b] == newline:
            last = k
            break
    steps = res.steps[:last + 1]
    rec = {"flops": sum(float(s.flops[b]) for s in steps), "full_flops": sum(float(s.full_flops[b]) for s in steps),
           "n_prompt": Tp, "exit_blocks": [], "token_widths": [], "widened": [], "exit_agree": [], "plan": None}
    if n_layer is None:  # dense GPT: no widths, no exits
        return rec
    rec["token_widths"].append((Tp, res.prompt_widths[b].float().mean().item()))
    if res.plan is not None:
        rec["plan"] = res.plan[b].tolist()
    for k in range(1, len(steps)):
        s = steps[k]
        eb = int(s.exit_block[b])
        rec["exit_blocks"].append(eb)
        rec["token_widths"].append((1, s.widths[b, :eb + 1].float().mean().item()))
        rec["widened"].append(bool(s.widened[b]))
        if eb < n_layer - 1 and full_top1 is not None:
            rec["exit_agree"].append(bool(full_top1[b, Tp + k - 1] == s.tokens[b]))
    return rec


def summarize(rows, n_layer):
    """Accuracy, compute fraction, exits and widths over a list of row records."""
    n = len(rows)
    out = {"accuracy": sum(r["correct"] for r in rows) / n,
           "compute_fraction": sum(r["flops"] for r in rows) / sum(r["full_flops"] for r in rows),
           "flops_per_problem": sum(r["flops"] for r in rows) / n}
    if n_layer is None:
        return out
    exits = [e for r in rows for e in r["exit_blocks"]]
    agree = [a for r in rows for a in r["exit_agree"]]
    tw = [tw for r in rows for tw in r["token_widths"]]
    out["mean_exit_layer"] = sum(e + 1 for e in exits) / len(exits) if exits else float("nan")
    out["exit_rate"] = sum(e < n_layer - 1 for e in exits) / len(exits) if exits else float("nan")
    out["n_decode_tokens"] = len(exits)
    out["n_exited"] = len(agree)
    out["exit_precision"] = sum(agree) / len(agree) if agree else float("nan")
    out["widen_rate"] = sum(w for r in rows for w in r["widened"]) / len(exits) if exits else float("nan")
    out["mean_width"] = sum(c * w for c, w in tw) / sum(c for c, _ in tw)
    plans = [r["plan"] for r in rows if r["plan"] is not None]
    if plans:
        out["predicted_mean_width"] = sum(sum(p) / len(p) for p in plans) / len(plans)
        out["plan_by_block"] = [sum(p[j] for p in plans) / len(plans) for j in range(len(plans[0]))]
    return out


def evaluate_model(model, tokenizer, test, dense_model=None):
    """
    test: {difficulty: [Problem]} (test split). Runs: every named mode, every width level as a fixed plan,
    auto (predictor + gates at the engine's default thresholds); the dense pretrained GPT (think) if given.
    Returns {"settings": {name: {difficulty: summary}}, "mode_levels": {mode: level}}.
    """
    newline = newline_id(tokenizer)
    engine = Engine(model)
    c = model.config
    problems = [p for d in DIFFICULTIES for p in test[d]]
    diff_of = [d for d in DIFFICULTIES for _ in test[d]]
    settings, texts = {}, {}

    def run(name, plan, eng, n_layer):
        rows = generate_rows(eng, tokenizer, problems, plan, newline)
        texts[name] = [r["text"] for r in rows]
        settings[name] = {d: summarize([r for r, dd in zip(rows, diff_of) if dd == d], n_layer) for d in DIFFICULTIES}
        settings[name]["all"] = summarize(rows, n_layer)
        print(f"eval {name:>8}: " + " | ".join(f"{d} acc {settings[name][d]['accuracy']:.3f} compute "
                                                f"{settings[name][d]['compute_fraction']:.3f}" for d in DIFFICULTIES), flush=True)

    run("auto", "auto", engine, c.n_layer)
    for w in c.width_levels:
        run(f"w{w}", [w] * c.n_layer, engine, c.n_layer)
    if dense_model is not None:
        run("dense", "think", Engine(dense_model), None)
    # a named mode is its level's fixed plan with the gates off: the same generations as that level's pass
    mode_levels = {m: mode_plan(m, c.width_levels, c.n_layer)[0] for m in NAMED_MODES}
    for m in NAMED_MODES:
        print(f"eval {m:>8}: = w{mode_levels[m]}", flush=True)
    settings = {**{m: copy.deepcopy(settings[f"w{mode_levels[m]}"]) for m in NAMED_MODES}, **settings}
    # what the guarantee bounds, measured on the test split: auto's answers that differ from full width's
    full = texts[f"w{c.width_levels[-1]}"]
    disagreement = {d: sum(a != f for a, f, dd in zip(texts["auto"], full, diff_of) if dd == d) / len(test[d])
                    for d in DIFFICULTIES}
    print("eval auto vs full width, answers that differ: " + " | ".join(f"{d} {v:.4f}" for d, v in disagreement.items()))
    return {"settings": settings, "mode_levels": mode_levels, "level_names": [f"w{w}" for w in c.width_levels],
            "auto_disagreement": disagreement}


def teacher_forced_reliability(model, tokenizer, test):
    """
    The gates on the test problems, teacher forced at full width: every position where a decode-time gate
    would decide ('=' and the answer digits as inputs). reliability_table rows per threshold.
    """
    by_len = {}
    for d in DIFFICULTIES:
        for p in test[d]:
            q, c = encode_problem(tokenizer, p)
            ids = [tokenizer.get_bos_token_id()] + q + c
            n_q = 1 + len(q)
            tgt = [ids[t + 1] if t >= n_q else -1 for t in range(len(ids) - 1)]  # inputs '=' and the digits
            by_len.setdefault(len(ids), []).append((ids[:-1], tgt))
    batches = [(torch.tensor([r[0] for r in rows]), torch.tensor([r[1] for r in rows])) for rows in by_len.values()]
    probs, agree = gate_scores(model, batches)
    return reliability_table(probs, agree)

"""
Chat benchmarks per compute mode: accuracy and the compute each mode spent on them.

    python -m scripts.chat_eval --checkpoint=<chat_sft out-dir>                       # every task, every mode
    python -m scripts.chat_eval --checkpoint=<dir> --tasks=ARC-Easy,GSM8K --modes=think,auto --max-problems=200
    python -m scripts.chat_eval --checkpoint=<dir> --data=easy.jsonl,hard.jsonl --max-new-tokens=8   # your own files

Tasks (tasks.CHAT_EVAL_TASKS: ARC-Easy, ARC-Challenge, MMLU, GSM8K, HumanEval, SpellingBee; their data:
`python -m scripts.fetch_tasks`) are scored as nanochat scores them:
- categorical (ARC, MMLU): the prompt is the conversation up to <|assistant_start|>; the answer is the letter whose
  token has the highest logit at that position (one prefill, no sampling);
- generative (GSM8K, HumanEval, SpellingBee): the engine generates the assistant turn (greedy unless --temperature)
  until <|assistant_end|>; a python tool call (<|python_start|> expr <|python_end|>) is answered by the calculator
  (tasks.tools) and generation continues after the output; the task's own scorer judges the text.
Every mode runs through the engine (nanochat.engine), so `auto` uses the width router, the exit gates and the
checkpoint's calibrated operating point, exactly as scripts.generate does. compute_fraction is the engine-counted
FLOPs of what ran over the full model's FLOPs for the same tokens (prefills after a tool call included, in both).
--data: local jsonl files of conversations (tasks.ExactAnswers), each a generative task named after its file: the
assistant's last turn is the reference, and the generated turn must equal it (whitespace stripped). With --data and
no --tasks, only the files are evaluated.
ChatCORE (with every task of CHAT_EVAL_TASKS): the mean over tasks of (accuracy - random baseline) / (1 - baseline).

Output: a table (task x mode: accuracy, compute fraction), one JSON line, --out-json (the same, atomically), --plot (a
PNG of accuracy against compute, one marker per mode and task), and the run report's chat_eval stage.
"""
import argparse
import json
import os

import torch

from nanochat.common import compute_init, compute_cleanup, autodetect_device_type, print0, run_script, add_runtime_args
from nanochat.engine import Engine
from nanochat.mode_eval import default_modes
from nanochat import checkpoint_manager as cm
from nanochat import run_report

MAX_TOOL_CALLS = 4  # per answer: a generation that keeps calling the tool stops after this many
BATCH_SEED_STRIDE = 7919  # between the seeds of one generate_turns call's engine batches


# -----------------------------------------------------------------------------
# Answering: one categorical pick, or a generated turn with tool calls

@torch.inference_mode()
def pick_letters(engine, tokenizer, conversations, mode):
    """Per conversation: (the letter with the highest logit after <|assistant_start|>, flops, full flops)."""
    model, out = engine.model, []
    for conv in conversations:
        ids = torch.tensor([tokenizer.render_for_completion(conv)], dtype=torch.long)
        letter_ids = [tokenizer.encode(letter) for letter in conv["letters"]]
        if any(len(t) != 1 for t in letter_ids):
            raise ValueError(f"answer letters {conv['letters']} are not one token each in this tokenizer")
        if engine.dense:
            logits = model(ids.to(model.get_device()))[:, -1]
            flops = full = engine.flops.prefill(ids.size(1))
        else:
            _, logits, f, fu = engine.prefill(ids, plan=mode, max_len=ids.size(1))
            flops, full = float(f[0]), float(fu[0])
        scores = logits[0, [t[0] for t in letter_ids]]
        out.append((conv["letters"][int(scores.argmax())], float(flops), float(full)))
    engine.release()  # workspaces were sized to each prompt
    return out


@torch.inference_mode()
def generate_turns(engine, tokenizer, prompts, mode, max_new_tokens, temperature=0.0, top_k=None, seed=0,
                   batch_size=32, tool=None, **thresholds):
    """
    Per prompt (token lists): (the generated turn's ids, flops, full flops). mode: a mode name or a plan (one width per
    block), thresholds: the engine's exit_threshold / expand_threshold if given. Rows of one length run as a batch; a row
    that stops on <|python_end|> gets the tool's answer (tool(expr) -> str or None) as <|output_start|> .. <|output_end|>
    and goes on in the next round (a prefill of its whole context), at most MAX_TOOL_CALLS times.
    """
    sp = tokenizer.encode_special
    end, bos, py_start, py_end = sp("<|assistant_end|>"), tokenizer.get_bos_token_id(), sp("<|python_start|>"), sp("<|python_end|>")
    stops = {end, bos} | ({py_end} if tool else set())
    rows = [{"ids": list(p), "n_prompt": len(p), "flops": 0.0, "full": 0.0, "calls": 0, "done": False} for p in prompts]
    batches = 0  # each engine batch of this call samples with its own seed (seed + BATCH_SEED_STRIDE x its number)
    while True:
        todo = [i for i, r in enumerate(rows) if not r["done"]]
        if not todo:
            break
        by_len = {}
        for i in todo:
            by_len.setdefault(len(rows[i]["ids"]), []).append(i)
        for length, group in by_len.items():
            for start in range(0, len(group), batch_size):
                chunk = group[start:start + batch_size]
                budget = max_new_tokens - min(len(rows[i]["ids"]) - rows[i]["n_prompt"] for i in chunk)
                res = engine.generate_batch([rows[i]["ids"] for i in chunk], max(budget, 1), plan=mode,
                                            temperature=temperature, top_k=top_k, seed=seed + BATCH_SEED_STRIDE * batches,
                                            stop_tokens=tuple(sorted(stops)), **thresholds)
                batches += 1
                for b, i in enumerate(chunk):
                    r, toks = rows[i], res.tokens[b]
                    limit = max_new_tokens - (len(r["ids"]) - r["n_prompt"])
                    stopped = res.steps[len(toks)].tokens[b] if len(toks) < len(res.steps) else None  # its stop token
                    used = len(toks) + (stopped is not None)  # the step that produced the stop token ran too
                    if len(toks) > limit:
                        toks, used, stopped = toks[:limit], limit, None
                    r["flops"] += sum(float(s.flops[b]) for s in res.steps[:used])
                    r["full"] += sum(float(s.full_flops[b]) for s in res.steps[:used])
                    r["ids"] += toks
                    room = len(r["ids"]) - r["n_prompt"] < max_new_tokens
                    if stopped == py_end and room and r["calls"] < MAX_TOOL_CALLS:
                        call = r["ids"][max((k for k, t in enumerate(r["ids"]) if t == py_start), default=len(r["ids"])) + 1:]
                        answer = tool(tokenizer.decode(call))
                        r["ids"] += [py_end, sp("<|output_start|>")] + tokenizer.encode(answer or "") + [sp("<|output_end|>")]
                        r["calls"] += 1
                    else:
                        r["done"] = True
        engine.release()  # the next round's prompts have other lengths: fresh workspaces
    return [(r["ids"][r["n_prompt"]:], r["flops"], r["full"]) for r in rows]


def evaluate_task(engine, tokenizer, task, mode, indices, max_new_tokens=512, temperature=0.0, top_k=None, seed=0,
                  batch_size=32, tool="calculator"):
    """{"accuracy", "compute_fraction", "n", "skipped", ...} of the task's items `indices` at `mode`. Items whose prompt
    does not fit the model's context are skipped and counted. tool: "calculator" answers python tool calls
    (tasks.tools.calculator), None generates without tools."""
    context = engine.model.config.sequence_len
    convs, skipped = [], 0
    for i in indices:
        conv = task[i]
        if len(tokenizer.render_for_completion(conv)) + (1 if task.eval_type == "categorical" else max_new_tokens) > context:
            skipped += 1
            continue
        convs.append(conv)
    if not convs:
        raise ValueError(f"{task.name}: none of {len(indices)} items fits the model's context of {context} tokens")
    if task.eval_type == "categorical":
        answers = pick_letters(engine, tokenizer, convs, mode)
        correct = [int(letter == conv["messages"][-1]["content"]) for (letter, _, _), conv in zip(answers, convs)]
    else:
        if tool == "calculator":
            from tasks.tools import calculator as tool
        prompts = [tokenizer.render_for_completion(c) for c in convs]
        answers = generate_turns(engine, tokenizer, prompts, mode, max_new_tokens, temperature, top_k, seed, batch_size,
                                 tool=tool)
        correct = [int(task.evaluate(conv, tokenizer.decode(ids))) for (ids, _, _), conv in zip(answers, convs)]
    flops, full = sum(a[1] for a in answers), sum(a[2] for a in answers)
    return {"accuracy": sum(correct) / len(correct), "compute_fraction": flops / full, "n": len(correct),
            "skipped": skipped, "correct": correct, "flops": flops, "full_flops": full}


def chatcore(results, baselines):
    """Per mode: the mean over tasks of the centred accuracy, or None unless every task in baselines was run."""
    out = {}
    for mode in next(iter(results.values())):
        if set(baselines) <= set(results):
            out[mode] = sum((results[t][mode]["accuracy"] - b) / (1 - b) for t, b in baselines.items()) / len(baselines)
    return out


# -----------------------------------------------------------------------------
# Reporting

def format_table(results, modes):
    """Task x mode: accuracy (compute fraction)."""
    head = f"{'task':<16}" + "".join(f"{m:>18}" for m in modes)
    lines = [head, "-" * len(head)]
    for task, per_mode in results.items():
        lines.append(f"{task:<16}" + "".join(f"{per_mode[m]['accuracy']:>10.4f} ({per_mode[m]['compute_fraction']:.2f})"
                                             for m in modes))
    return "\n".join(lines)


def plot(results, path):
    """accuracy against compute fraction: one marker per (task, mode), the modes of a task joined in compute order."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for task, per_mode in results.items():
        pts = sorted((v["compute_fraction"], v["accuracy"], m) for m, v in per_mode.items())
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", linestyle=":", label=task)
        for x, y, m in pts:
            ax.annotate(m, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("compute fraction (engine-counted FLOPs / full model's)")
    ax.set_ylabel("accuracy")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def get_args(argv=None):
    p = argparse.ArgumentParser(description="Chat benchmarks per compute mode (accuracy and engine-counted compute)")
    p.add_argument("--checkpoint", type=str, required=True, help="checkpoint dir or model_<step>.pt (tokenizer beside it)")
    p.add_argument("--tasks", type=str, default=None,
                   help="comma-separated task names (default tasks.CHAT_EVAL_TASKS, or none with --data)")
    p.add_argument("--data", type=str, default=None,
                   help="comma-separated local jsonl files of conversations, each scored by exact match of the last "
                        "assistant turn (a task named after the file)")
    p.add_argument("--modes", type=str, default=None, help="comma-separated modes (default: all the checkpoint can run)")
    p.add_argument("--max-problems", type=int, default=0, help="per task, the first N items (0 = all)")
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=32, help="generated rows per engine batch (rows of one length)")
    p.add_argument("--device", type=str, default="", help="cuda|cpu|mps (empty = autodetect)")
    p.add_argument("--out-json", type=str, default=None, help="write the results here (atomic)")
    p.add_argument("--plot", type=str, default=None, help="PNG of accuracy against compute")
    p.add_argument("--report-stage", type=str, default="chat_eval", help="the run report's stage name for these results")
    add_runtime_args(p)
    return p.parse_args(argv)


def main(argv=None):
    import tasks
    args = get_args(argv)
    if args.max_problems < 0 or args.max_new_tokens < 1 or args.batch_size < 1:
        raise ValueError("--max-problems must be >= 0, --max-new-tokens and --batch-size >= 1")
    names = args.tasks.split(",") if args.tasks else ([] if args.data else list(tasks.CHAT_EVAL_TASKS))
    files = [f for f in args.data.split(",") if f] if args.data else []
    ddp, rank, _, world_size, device = compute_init(args.device or autodetect_device_type())
    model, tokenizer, meta = cm.load_model_and_tokenizer(args.checkpoint, device=device)
    model.eval()
    can = list(default_modes(model))
    modes = args.modes.split(",") if args.modes else can
    bad = [m for m in modes if m not in can]
    if bad:
        raise ValueError(f"modes {bad} do not run on this checkpoint ({cm.model_kind_of(meta)}; it runs {can})")
    task_objs = {name: tasks.get_task(name, "test") for name in names}  # loads (or says how to fetch) before any work
    for path in files:
        task = tasks.get_task("ExactAnswers", "test", path=path)
        if task.name in task_objs:
            raise ValueError(f"--data {path}: a task named {task.name!r} is already evaluated (rename the file)")
        task_objs[task.name] = task
    if not task_objs:
        raise ValueError("nothing to evaluate: give --tasks or --data")
    engine = Engine(model)
    results = {}
    for name, task in task_objs.items():
        n = len(task) if not args.max_problems else min(args.max_problems, len(task))
        indices = list(range(rank, n, world_size))
        results[name] = {}
        for mode in modes:
            r = evaluate_task(engine, tokenizer, task, mode, indices, args.max_new_tokens, args.temperature, args.top_k,
                              args.seed, args.batch_size)
            if ddp:
                r = merge_ranks(r)
            for key in ("correct", "flops", "full_flops"):
                r.pop(key)
            results[name][mode] = r
            print0(f"{name:<14} {mode:<8} accuracy {r['accuracy']:.4f} | compute {r['compute_fraction']:.3f} | "
                   f"n {r['n']} (skipped {r['skipped']})")
    core = chatcore(results, {t: tasks.RANDOM_BASELINE[t] for t in tasks.CHAT_EVAL_TASKS})
    out = {"checkpoint": cm.resolve_checkpoint(args.checkpoint)[0], "step": meta.get("checkpoint_step"),
           "tasks": results, "chatcore": core, "modes": modes}
    if rank == 0:
        print0(format_table(results, modes))
        if core:
            print0("ChatCORE " + " | ".join(f"{m} {v:.4f}" for m, v in core.items()))
        print0(json.dumps(out))
        if args.out_json:
            cm.atomic_json_save(out, os.path.abspath(args.out_json))
        if args.plot:
            plot(results, args.plot)
            print0(f"plot: {args.plot}")
        run_report.record(args.report_stage, {"checkpoint": out["checkpoint"], "tasks": results, "chatcore": core})
    compute_cleanup()
    return out


def merge_ranks(r):
    """Sum a rank's counts over the ranks: accuracy and compute fraction of all items."""
    import torch.distributed as dist
    t = torch.tensor([sum(r["correct"]), r["n"], r["skipped"], r["flops"], r["full_flops"]], dtype=torch.float64)
    dist.all_reduce(t)
    return {"accuracy": t[0].item() / t[1].item(), "compute_fraction": t[3].item() / t[4].item(), "n": int(t[1]),
            "skipped": int(t[2]), "correct": [], "flops": t[3].item(), "full_flops": t[4].item()}


if __name__ == "__main__":
    run_script(main)

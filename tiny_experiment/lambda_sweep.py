"""
chat_rl's compute cost swept on a finished tiny_experiment run: the accuracy / compute curve over lambda.

    python -m tiny_experiment.lambda_sweep --out DIR [--lambdas 0,0.25,0.5,1,2] [--router-only] [--threads 1] [--overwrite]

DIR is a tiny_experiment output with its chat stage (results.json["chat"]). For each lambda, the chat stage's RL
step runs again from DIR/chat_final with that compute cost and everything else as the run had it (its settings and
seed, from results.json): chat_rl, the gates and auto's operating point recalibrated on calib-split conversations,
every mode scored on the same test problems. The row at the run's own lambda repeats its chat["rl"] block.

Output: a table (lambda, RL's training compute first -> last, auto's accuracy and compute per difficulty and
overall, think's accuracy), DIR/lambda_sweep.json (written atomically), DIR/lambda_sweep.png (auto's accuracy
against its compute, one point per lambda, the SFT checkpoint's auto and think beside them). Checkpoints go to
DIR/lambda_sweep/<lambda>/. --router-only: RL updates the router alone (the model's learning rates 0), into
DIR/lambda_sweep_router_only* instead.
"""
import argparse
import dataclasses
import json
import os
import shutil

import torch

from nanochat.common import UserError, expand_path, add_runtime_args, run_script
from nanochat import checkpoint_manager as cm
from tiny_experiment import chat, pipeline
from tiny_experiment.tasks import DIFFICULTIES, split_problems, sample_eval

SWEEP_DIR, SWEEP_JSON, SWEEP_PNG = "lambda_sweep", "lambda_sweep.json", "lambda_sweep.png"


def parse_lambdas(text):
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"--lambdas {text!r}: give comma-separated numbers, e.g. 0,0.25,0.5,1") from None
    if not values or any(v < 0 for v in values) or len(set(values)) != len(values):
        raise UserError(f"--lambdas {text!r}: give distinct numbers >= 0")
    return values


def get_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m tiny_experiment.lambda_sweep",
                                description="chat_rl's compute cost swept on a finished tiny_experiment run")
    p.add_argument("--out", type=str, required=True, help="a tiny_experiment output directory with its chat stage")
    p.add_argument("--lambdas", type=str, default="0,0.25,0.5,1,2", help="compute costs, comma-separated")
    p.add_argument("--threads", type=int, default=1, help="torch threads (as tiny_experiment's)")
    p.add_argument("--router-only", action="store_true",
                   help="RL trains the router alone (the model's learning rates 0); outputs get a _router_only suffix")
    p.add_argument("--overwrite", action="store_true", help="replace a previous sweep in --out")
    add_runtime_args(p, threads=False)
    return p.parse_args(argv)


def load_run(out):
    """(results, Settings, seed) of a finished tiny_experiment run with its chat stage."""
    path = os.path.join(out, "results.json")
    if not os.path.isfile(path):
        raise UserError(f"{path} does not exist: run `python -m tiny_experiment --out {out}` first")
    with open(path) as f:
        results = json.load(f)
    if not results.get("chat"):
        raise UserError(f"{path} has no chat stage (run without --no-chat): nothing to sweep from")
    fields = {f.name for f in dataclasses.fields(pipeline.Settings)}
    unknown = set(results["settings"]) - fields
    if unknown:
        raise UserError(f"{path} holds settings this code does not know ({', '.join(sorted(unknown))}): rerun the pipeline")
    settings = dataclasses.replace(pipeline.Settings(), **results["settings"])
    if not settings.chat_rl_steps:
        raise UserError(f"{path}: the run's chat_rl_steps is 0, so there is no RL stage to sweep")
    return results, settings, results["args"]["seed"]


def row_of(lam, block):
    """The table's and the JSON's numbers of one RL block (or of the SFT checkpoint's chat block, lam None)."""
    auto, think = block["modes"]["auto"], block["modes"]["think"]
    return {"lambda": lam, "auto_accuracy": auto["accuracy"], "auto_compute": auto["compute_fraction"],
            "think_accuracy": think["accuracy"],
            "auto_by_difficulty": {d: block["difficulties"][d]["auto"] for d in DIFFICULTIES},
            "train_compute": block.get("train", {}).get("compute"), "train_accuracy": block.get("train", {}).get("accuracy"),
            "operating_point": block["guarantee"].get("operating_point"), "checkpoint": block.get("checkpoint")}


def format_table(rows):
    cols = [f"{d} auto acc (compute)" for d in DIFFICULTIES]
    head = f"{'lambda':>7} | {'RL train compute':>16} | {'auto acc':>8} {'compute':>7} | " + " | ".join(cols) + " | think acc"
    lines = [head, "-" * len(head)]
    for r in rows:
        tc = r["train_compute"]
        train = f"{tc['first']:.3f} -> {tc['last']:.3f}" if tc else "-"
        lam = "SFT" if r["lambda"] is None else f"{r['lambda']:g}"
        per = [f"{r['auto_by_difficulty'][d]['accuracy']:.3f} ({r['auto_by_difficulty'][d]['compute_fraction']:.3f})"
               .rjust(len(c)) for d, c in zip(DIFFICULTIES, cols)]
        lines.append(f"{lam:>7} | {train:>16} | {r['auto_accuracy']:>8.4f} {r['auto_compute']:>7.3f} | " + " | ".join(per)
                     + f" | {r['think_accuracy']:>9.4f}")
    return "\n".join(lines)


def plot(rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4.2))
    swept = [r for r in rows if r["lambda"] is not None]
    ax.plot([r["auto_compute"] for r in swept], [r["auto_accuracy"] for r in swept], marker="o", label="auto after chat_rl")
    for r in swept:
        ax.annotate(f"λ={r['lambda']:g}", (r["auto_compute"], r["auto_accuracy"]), fontsize=8, xytext=(3, 3),
                    textcoords="offset points")
    sft = [r for r in rows if r["lambda"] is None]
    if sft:
        ax.scatter([sft[0]["auto_compute"]], [sft[0]["auto_accuracy"]], marker="s", color="gray", label="auto, SFT (no RL)")
        ax.axhline(sft[0]["think_accuracy"], color="gray", linestyle=":", label="think, SFT")
    ax.set_xlabel("auto's compute fraction (engine-counted FLOPs / full model's)")
    ax.set_ylabel("accuracy (test problems, all difficulties)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    args = get_args(argv)
    out = expand_path(args.out)
    lambdas = parse_lambdas(args.lambdas)
    results, settings, seed = load_run(out)
    chat_final = os.path.join(out, "chat_final")
    cm.resolve_checkpoint(chat_final)  # one line if the run's chat checkpoint is gone
    suffix = "_router_only" if args.router_only else ""
    settings = dataclasses.replace(settings, chat_rl_router_only=args.router_only)
    sweep_dir = os.path.join(out, SWEEP_DIR + suffix)
    if os.path.exists(sweep_dir):
        if not args.overwrite:
            raise UserError(f"{sweep_dir} exists: pass --overwrite to replace that sweep")
        shutil.rmtree(sweep_dir)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        splits = split_problems(seed)
        test = sample_eval(splits, "test", settings.eval_problems, seed)
        rows = [row_of(None, results["chat"])]
        for lam in lambdas:
            d, timer = os.path.join(sweep_dir, f"{lam:g}"), pipeline.Timer()
            block = chat.rl_stage(timer, chat_final, os.path.join(d, "rl"), os.path.join(d, "final"), splits,
                                  dataclasses.replace(settings, chat_rl_compute_cost=lam), seed, test)
            rows.append(dict(row_of(lam, block), stages=timer.stages))
            print(f"lambda {lam:g}: auto {rows[-1]['auto_accuracy']:.4f} at compute {rows[-1]['auto_compute']:.3f}",
                  flush=True)
    finally:
        torch.set_num_threads(threads)
    report = {"run": out, "seed": seed, "rl_steps": settings.chat_rl_steps, "run_lambda": settings.chat_rl_compute_cost,
              "router_only": args.router_only, "rows": rows}
    json_path, png_path = (os.path.join(out, f.replace(".", suffix + ".")) for f in (SWEEP_JSON, SWEEP_PNG))
    cm.atomic_json_save(report, json_path)
    plot(rows, png_path)
    print(format_table(rows))
    print(f"sweep in {json_path} and {png_path}")
    return report


if __name__ == "__main__":
    run_script(main)

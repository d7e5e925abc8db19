"""
The whole Adamba pipeline at toy scale on a CPU, with numbers measured on held-out problems.

    python -m tiny_experiment [--out DIR] [--seed N] [--quick] [--threads N] [--overwrite] [--no-chat]
                              [--plan-schedule every|cycle] [--mamba 1|2] [--exit-stride N] [--exit-readouts N]

Stages (tiny_experiment/pipeline.py): task corpus -> tokenizer -> dense GPT pretraining -> surgery ->
phase 1 -> phase 2 -> growth -> phase 3 -> gate calibration; then evaluation (tiny_experiment/evaluate.py)
with nanochat.engine on test-split problems no training or calibration step has seen (checked); then the chat
stage (tiny_experiment/chat.py: SFT, recalibration, chat_eval per mode, chat_rl; --no-chat skips it); and the
report (tiny_experiment/report.py): a table on stdout, DIR/results.json, DIR/compute_vs_accuracy.png,
DIR/width_by_block.png. --quick runs the same stages smaller and shorter (for tests: its numbers are not
results).
"""
import argparse
import dataclasses
import json
import os
import random
import shutil
import time

import torch

from nanochat.common import get_base_dir, expand_path, add_runtime_args, run_script
from nanochat import checkpoint_manager as cm
from nanochat.run_report import json_safe
from nanochat.adaptive_train import SCHEDULES
from tiny_experiment import pipeline, evaluate, report, chat
from tiny_experiment.tasks import DIFFICULTIES, split_problems, check_disjoint, sample_eval

RESULTS = "results.json"


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m tiny_experiment", description="Adamba's whole pipeline at toy scale on a CPU, evaluated on held-out problems")
    p.add_argument("--out", type=str, default=None, help="output directory (default <base_dir>/tiny_experiment)")
    p.add_argument("--seed", type=int, default=0, help="seed of the splits, corpus, init and every sampler")
    p.add_argument("--quick", action="store_true", help="a smaller, shorter run for tests (its numbers are not results)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (1: these matmuls are tiny, and on shared cores 2 threads ran ~10x slower)")
    p.add_argument("--overwrite", action="store_true", help="delete a previous tiny_experiment run in --out first")
    p.add_argument("--plan-schedule", type=str, default="every", choices=SCHEDULES,
                   help="phases 2, 3 and chat SFT: every width level each step (default), or full width and one "
                        "narrow plan a step in turn (scripts.fractal_train --plan-schedule)")
    p.add_argument("--mamba", type=int, default=2, choices=(1, 2),
                   help="Mamba version of the blocks surgery adds (default 2: on CPU its chunked scan is the faster "
                        "path here; the speedrun uses 1)")
    p.add_argument("--exit-stride", type=int, default=None, help="surgery's --exit-stride: an exit readout (and a gate) "
                   "after every Nth block (default 2: three gated exits in the 8 blocks)")
    p.add_argument("--exit-readouts", type=int, default=0, help="phases 2, 3 and chat SFT: exits (before the last) "
                   "each pass reads out, in turn (scripts.fractal_train --exit-readouts; 0: every exit)")
    p.add_argument("--no-chat", action="store_true", help="stop after the base pipeline's evaluation (no chat stage: "
                   "about half of the CPU time)")
    add_runtime_args(p, threads=False)  # --debug, --require-kernels (read by run_script); --threads is above
    return p.parse_args(argv)


def prepare_out(out, overwrite):
    if os.path.isdir(out) and os.listdir(out):
        if not overwrite:
            raise SystemExit(f"{out} is not empty; pass --overwrite to replace a previous run, or another --out")
        if not os.path.exists(os.path.join(out, "data")) and not os.path.exists(os.path.join(out, RESULTS)):
            raise SystemExit(f"{out} does not look like a tiny_experiment output (no data/ or {RESULTS}); not deleting it")
        shutil.rmtree(out)
    os.makedirs(out, exist_ok=True)


def heldout_check(train_pages, calib_pages, test):
    """The test questions appear in no training or calibration page (not just in another split's list)."""
    seen = {p.question for _, page in train_pages + calib_pages for p in page}
    test_q = {p.question for d in DIFFICULTIES for p in test[d]}
    overlap = sorted(seen & test_q)
    if overlap:
        raise AssertionError(f"held-out test questions occur in the training/calibration corpus: {overlap[:5]}")
    return {"test_questions": len(test_q), "corpus_questions": len(seen), "overlap": len(overlap)}


def main(argv=None):
    args = parse_args(argv)
    if args.exit_stride is not None and args.exit_stride < 1:
        raise SystemExit(f"--exit-stride {args.exit_stride}: use a stride >= 1 (blocks between exit readouts)")
    if args.exit_readouts < 0:
        raise SystemExit(f"--exit-readouts {args.exit_readouts}: use 0 (every exit) or the exits a pass reads")
    out = expand_path(args.out) or os.path.join(get_base_dir(), "tiny_experiment")
    prepare_out(out, args.overwrite)
    settings = pipeline.quick_settings() if args.quick else pipeline.Settings()
    settings = dataclasses.replace(settings, plan_schedule=args.plan_schedule, mamba_version=args.mamba,
                                   exit_readouts=args.exit_readouts,
                                   exit_stride=settings.exit_stride if args.exit_stride is None else args.exit_stride)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return run(args, out, settings)
    finally:
        torch.set_num_threads(threads)


def run(args, out, settings):
    t0, load0 = time.time(), os.getloadavg()
    seed = args.seed
    random.seed(seed)
    torch.manual_seed(seed)
    timer = pipeline.Timer()
    paths = {k: os.path.join(out, k) for k in ("data", "tokenizer", "base", "hybrid", "phase1", "phase2", "grown",
                                              "phase3", "final")}

    # ---- data: fixed splits by question hash, corpus from train/calib, test sample checked against both
    splits = split_problems(seed)
    split_sizes = check_disjoint(splits)
    test = sample_eval(splits, "test", settings.eval_problems, seed)
    train_pages, calib_pages = timer("corpus", pipeline.write_corpus, paths["data"], splits, settings, seed)
    heldout = heldout_check(train_pages, calib_pages, test)
    print(f"splits {split_sizes} | held-out check: {heldout}")
    tokenizer = timer("tokenizer", pipeline.train_tokenizer, paths["data"], paths["tokenizer"], settings)

    # ---- training: pretrain, surgery, phases, growth
    pre = timer("pretrain", pipeline.pretrain, tokenizer, paths["tokenizer"], train_pages, paths["base"], settings, seed)
    create = timer("surgery", pipeline.surgery_create, paths["base"], paths["hybrid"], settings, seed)
    p1 = timer("phase1", pipeline.fractal_phase, 1, paths["hybrid"], paths["phase1"], paths["data"],
               settings.phase1_steps, settings, seed)
    p2 = timer("phase2", pipeline.fractal_phase, 2, p1["checkpoint"], paths["phase2"], paths["data"],
               settings.phase2_steps, settings, seed)
    grow = timer("grow", pipeline.surgery_grow, p2["checkpoint_dir"], paths["grown"], settings, seed)
    p3 = timer("phase3", pipeline.fractal_phase, 3, paths["grown"], paths["phase3"], paths["data"],
               settings.phase3_steps, settings, seed)
    final = timer("calibrate", pipeline.calibrate_and_save, p3["checkpoint"], paths["final"], tokenizer,
                  calib_pages, splits, settings, seed)

    # ---- evaluation on the test split with the engine, the final checkpoint loaded as scripts.generate loads it
    model, tokenizer, meta = cm.load_model_and_tokenizer(final["checkpoint_dir"])
    dense, _ = cm.load_model(paths["base"])
    ev = timer("evaluate", evaluate.evaluate_model, model, tokenizer, test, dense)
    reliability = evaluate.teacher_forced_reliability(model, tokenizer, test)
    chat_block = None if args.no_chat else chat.run_chat_stage(timer, final["checkpoint_dir"], out, splits, settings, seed,
                                                               settings.eval_problems)

    c = model.config
    results = {
        "difficulties": report.difficulty_block(ev),
        "gate_loss": {"first": p3["gate_loss"][0], "last": p3["gate_loss"][-1], "phase": 3,
                      "phase2": {"first": p2["gate_loss"][0], "last": p2["gate_loss"][-1]}},
        "predictor_loss": {"phase2": {"first": p2["predictor_loss"][0], "last": p2["predictor_loss"][-1]},
                           "phase3": {"first": p3["predictor_loss"][0], "last": p3["predictor_loss"][-1]}},
        "surgery_max_abs_dlogit": [create["max_abs_dlogit"], grow["max_abs_dlogit"]],
        "final_checkpoint": final["checkpoint"],
        "seconds": None,
        "mode_levels": ev["mode_levels"],
        "definitions": report.DEFINITIONS,
        "overall": {name: s["all"] for name, s in ev["settings"].items()},
        "teacher_forced_reliability": reliability,
        "model": {"n_layer": c.n_layer, "n_embd": c.n_embd, "n_head": c.n_head, "layer_pattern": c.layer_pattern,
                  "ffn_pattern": c.ffn_pattern, "width_levels": c.width_levels, "exit_blocks": c.exit_blocks(),
                  "grown_from": c.grown_from, "num_params": model.num_params(), "vocab_size": c.vocab_size},
        "layer_kinds": [c.mixer_kind(j) + c.ffn_kind(j) for j in range(c.n_layer)],
        "training": {"pretrain_loss": {"first": pre["losses"][0], "last": pre["losses"][-1]},
                     "phase_loss": {f"phase{i}": {"first": h["loss"][0], "last": h["loss"][-1]}
                                    for i, h in ((1, p1), (2, p2), (3, p3))}},
        "calibration": final["calibration"],
        "guarantee": dict(final["guarantee"], test_disagreement=ev["auto_disagreement"],
                          holds_on_test={d: v <= final["guarantee"]["alpha"] for d, v in ev["auto_disagreement"].items()}),
        "chat": chat_block,
        "data": {"split_sizes": split_sizes, "heldout": heldout, "eval_problems_per_difficulty": settings.eval_problems},
        "settings": settings.to_dict(),
        "args": vars(args),
        "stages": timer.stages,
        "threads": torch.get_num_threads(),
        "loadavg": {"start": load0, "end": os.getloadavg()},
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
    results["targets"] = report.check_targets(results)
    results["issue28_targets"] = report.issue28_targets(results)
    results["issue30_targets"] = report.issue30_targets(results) if chat_block else {}
    results["plots"] = report.make_plots(results, out)
    results["seconds"] = round(time.time() - t0, 1)
    results["cpu_seconds"] = round(sum(s["cpu_s"] for s in timer.stages.values()), 1)
    with open(os.path.join(out, RESULTS), "w") as f:
        json.dump(json_safe(results), f, indent=2, allow_nan=False)  # strict JSON: nan (e.g. no exits) -> null
    report.print_table(results)
    print(f"\n{results['guarantee']['statement']}\nmeasured on the test split (answers that differ from full width): "
          + ", ".join(f"{d} {v:.4f}" for d, v in ev["auto_disagreement"].items()))
    for name, t in {**results["issue28_targets"], **results["issue30_targets"]}.items():
        print(f"target {name}: {'pass' if t['pass'] else 'MISS'} ({t['detail']})")
    print(f"\n{results['seconds']:.0f}s wall ({results['cpu_seconds']:.0f}s cpu in the timed stages, {results['threads']} "
          f"thread(s), load average {load0[0]:.1f} -> {results['loadavg']['end'][0]:.1f}) | results in {out}/{RESULTS}")
    return results


if __name__ == "__main__":
    run_script(main)

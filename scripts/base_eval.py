"""
Evaluate a base checkpoint per compute mode: CORE (nanochat/core_eval.py) and, with --bpb, bits per byte on the
val split of the parquet shards.

    python -m scripts.base_eval --checkpoint=<dir> [--modes ghost,think,auto] [--max-per-task 100] [--bpb]
    torchrun --standalone --nproc_per_node=8 -m scripts.base_eval --checkpoint=<dir> --bpb
    python -m scripts.base_eval --download-only       # fetch the CORE bundle into <base_dir>/eval_bundle

Any model kind loads (nanochat's dense GPTs, ModernGPT, hybrids). Modes (nanochat.matryoshka.MODES) default to
ghost, whisper, normal, think and auto for a hybrid with the width predictor, think for a dense GPT or a hybrid
without it; a mode the checkpoint cannot run stops with one line. Each mode runs teacher forced
(nanochat/mode_eval.py): a fixed width plan, or auto's plan read from each item's prompt (the tokens before the
continuation being scored; for bpb the first half of each row); the exit gates do not act in a teacher-forced
forward. compute_fraction = forward FLOPs at the mode's plans over full width's (the FLOP table), the mean over
the forward rows of CORE (an item's options are one row each).

Under torchrun each task's items are split over the ranks (every world_size-th item) and the counts summed, as
nanochat does; bpb reads each rank's share of the val split. Output: a table (task x mode: centered accuracy, then
CORE and the compute fraction), one JSON line {"core": {mode: {"core", "compute_fraction", "tasks": {label:
{"accuracy", "centered", "items"}}}}, "bpb": {mode: bpb}, "env": {...}}, and the same in --out-json.
"""
import os
import json
import argparse

import torch
import torch.distributed as dist

from nanochat.common import (compute_init, compute_cleanup, print0, autodetect_device_type, autocast_context,
                             expand_path, add_runtime_args, run_script)
from nanochat import checkpoint_manager as cm
from nanochat import core_eval, run_report
from nanochat.mode_eval import default_modes, check_mode, mode_logits, mode_loss_fn
from nanochat.loss_eval import all_reduce_sums, evaluate_bpb
from nanochat.dataset import get_data_dir, split_parquet_files
from nanochat.dataloader import tokenizing_distributed_data_loader
from nanochat.tokenizer import compute_token_bytes
from scripts.bench_common import environment, print_table


def get_args(argv=None):
    p = argparse.ArgumentParser(description="CORE and bits per byte of a base checkpoint, per compute mode")
    p.add_argument("--checkpoint", type=str, default=None, help="checkpoint dir or model_<step>.pt (tokenizer.pkl beside it)")
    p.add_argument("--step", type=int, default=None, help="the checkpoint step (default: the latest)")
    p.add_argument("--modes", type=str, default=None,
                   help="comma-separated compute modes (default: every mode for a hybrid with the width predictor, "
                        "else think)")
    p.add_argument("--plan-epsilon", type=float, default=None,
                   help="auto: the router's accepted probability of missing the full model's answer (default: its "
                        "calibrated threshold)")
    p.add_argument("--max-per-task", type=int, default=-1, help="items per CORE task, a fixed subsample (-1 = all)")
    p.add_argument("--bundle-dir", type=str, default=None, help="the CORE bundle (default <base_dir>/eval_bundle)")
    p.add_argument("--download-only", action="store_true", help="fetch the CORE bundle and stop")
    p.add_argument("--no-core", action="store_true", help="skip CORE (with --bpb: bits per byte only)")
    p.add_argument("--bpb", action="store_true", help="also val bits per byte per mode")
    p.add_argument("--data-dir", type=str, default=None, help="parquet shards for --bpb (default <base_dir>/base_data)")
    p.add_argument("--bpb-tokens", type=int, default=40 * 524288, help="val tokens per mode for --bpb, all ranks")
    p.add_argument("--device-batch-size", type=int, default=16, help="rows per forward for --bpb")
    p.add_argument("--device", type=str, default="", help="cuda|cpu|mps (empty = autodetect)")
    p.add_argument("--out-json", type=str, default=None, help="also write the results here (atomically)")
    p.add_argument("--report-stage", type=str, default="base_eval", help="the run report's stage name for these results")
    add_runtime_args(p)  # --debug, --threads, --require-kernels (read by run_script)
    args = p.parse_args(argv)
    if not args.download_only and not args.checkpoint:
        p.error("--checkpoint is required (or --download-only)")
    if args.max_per_task == 0 or args.max_per_task < -1:
        p.error("--max-per-task must be -1 (all) or >= 1")
    if args.no_core and not args.bpb:
        p.error("--no-core leaves nothing to do without --bpb")
    if args.bpb_tokens < 1 or args.device_batch_size < 1:
        p.error("--bpb-tokens and --device-batch-size must be >= 1")
    return args


def parse_modes(arg, model):
    """The modes to run, each checked against the model (a one-line ValueError for one it cannot run)."""
    modes = default_modes(model) if arg is None else tuple(m.strip() for m in arg.split(",") if m.strip())
    if not modes:
        raise ValueError("--modes is empty")
    for mode in modes:
        check_mode(model, mode)
    return modes


def evaluate_core(args, model, tokenizer, modes, bundle_dir, device, rank, world_size):
    """{mode: {"core", "compute_fraction", "tasks"}}: every task scored in every mode on the same items."""
    tasks = core_eval.load_tasks(bundle_dir)
    max_len = model.config.sequence_len
    frac = {m: torch.zeros(2, dtype=torch.float64, device=device) for m in modes}  # sum of fractions, rows

    def forward_in(mode):
        def forward(ids, prompt_lens):
            with autocast_context(device.type):
                logits, f = mode_logits(model, ids, mode, prompt_lens, args.plan_epsilon)
            frac[mode] += torch.tensor([f.sum().item(), f.numel()], dtype=torch.float64, device=device)
            return logits
        return forward

    accuracy, n_items = {m: {} for m in modes}, {}
    for task in tasks:
        data = core_eval.load_task_data(bundle_dir, task, args.max_per_task)
        n_items[task.label] = len(data)
        items = core_eval.prepare_task(tokenizer, task, data, max_len, rank, world_size)
        for mode in modes:
            accuracy[mode][task.label] = core_eval.evaluate_task(forward_in(mode), task, items, len(data), device)
        print0(f"{task.label} ({task.task_type}, {task.num_fewshot}-shot, {len(data)} items) | " +
               " | ".join(f"{m} {accuracy[m][task.label]:.4f}" for m in modes))
    out = {}
    for mode in modes:
        all_reduce_sums(frac[mode])
        per_task = {}
        for task in tasks:
            acc = accuracy[mode][task.label]
            per_task[task.label] = {"accuracy": acc, "centered": core_eval.centered_accuracy(acc, task.random_baseline),
                                    "items": n_items[task.label]}
        out[mode] = {"core": core_eval.core_metric({k: v["centered"] for k, v in per_task.items()}),
                     "compute_fraction": (frac[mode][0] / frac[mode][1]).item(), "tasks": per_task}
    return out


def evaluate_bpb_per_mode(args, model, tokenizer, modes, device, world_size):
    """{mode: val bpb}: the same val rows (the split's first --bpb-tokens tokens) in every mode; auto plans each row
    from its first half."""
    T, B = model.config.sequence_len, args.device_batch_size
    steps = args.bpb_tokens // (B * T * world_size)
    if steps < 1:
        raise ValueError(f"--bpb-tokens={args.bpb_tokens} is less than one batch of {B * T * world_size} tokens "
                         f"(--device-batch-size x sequence_len {T} x {world_size} ranks)")
    token_bytes = compute_token_bytes(tokenizer).to(device)
    out = {}
    for mode in modes:
        batches = tokenizing_distributed_data_loader(tokenizer, B, T, "val", data_dir=args.data_dir, device=device)
        with autocast_context(device.type):
            out[mode] = evaluate_bpb(mode_loss_fn(model, mode, T // 2, args.plan_epsilon), batches, steps, token_bytes)
        print0(f"bpb {mode}: {out[mode]:.4f}")
    return out


def print_results(core, bpb, modes):
    if core:
        rows = [{"task": label, **{m: core[m]["tasks"][label]["centered"] for m in modes}} for label in core[modes[0]]["tasks"]]
        rows.append({"task": "CORE", **{m: core[m]["core"] for m in modes}})
        rows.append({"task": "compute fraction", **{m: core[m]["compute_fraction"] for m in modes}})
        print_table("CORE: centered accuracy per task and mode (0 = chance, 1 = all right)", rows,
                    [("task", "task", "")] + [(m, m, ".4f") for m in modes])
    if bpb:
        print_table("val bits per byte", [{"metric": "bpb", **bpb}], [("metric", "", "")] + [(m, m, ".4f") for m in modes])


def main(argv=None):
    args = get_args(argv)
    bundle_dir = expand_path(args.bundle_dir) or core_eval.default_bundle_dir()
    if args.download_only:
        core_eval.ensure_bundle(bundle_dir)
        print(f"CORE bundle: {bundle_dir}")
        return {"bundle_dir": bundle_dir}
    if args.bpb:
        args.data_dir = get_data_dir(args.data_dir)
        split_parquet_files("val", args.data_dir)  # no data: stop now, saying how to get it
    ddp, rank, _, world_size, device = compute_init(args.device or autodetect_device_type())
    if not args.no_core:
        if rank == 0:  # one download; the other ranks wait for it
            core_eval.ensure_bundle(bundle_dir)
        if ddp:
            dist.barrier()
    model, tokenizer, meta = cm.load_model_and_tokenizer(args.checkpoint, device, step=args.step)
    modes = parse_modes(args.modes, model)
    print0(f"model {meta['checkpoint_dir']} (step {meta['checkpoint_step']}, {model.kind}) | modes {', '.join(modes)} | "
           f"{'CORE bundle ' + bundle_dir if not args.no_core else 'no CORE'}{' | bpb ' + args.data_dir if args.bpb else ''}")
    core = {} if args.no_core else evaluate_core(args, model, tokenizer, modes, bundle_dir, device, rank, world_size)
    bpb = evaluate_bpb_per_mode(args, model, tokenizer, modes, device, world_size) if args.bpb else {}
    result = {"core": core, "bpb": bpb,
              "env": {"checkpoint": meta["checkpoint_dir"], "step": meta["checkpoint_step"], "model_kind": model.kind,
                      "max_per_task": args.max_per_task, "ranks": world_size, **environment(device)}}
    if rank == 0:
        print_results(core, bpb, modes)
        print(json.dumps(result))
        run_report.record(args.report_stage, {"checkpoint": meta["checkpoint_dir"], "modes": {
            m: {k: v for k, v in (("core", core.get(m, {}).get("core")), ("bpb", bpb.get(m)),
                                  ("compute_fraction", core.get(m, {}).get("compute_fraction"))) if v is not None}
            for m in modes}})
        if args.out_json:
            out = expand_path(args.out_json)
            os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
            cm.atomic_json_save(result, out)
    compute_cleanup()
    return result


if __name__ == "__main__":
    run_script(main)

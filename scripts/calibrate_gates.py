"""
Calibrate a trained hybrid's exit gates on held-out text, choose auto's operating point with a guarantee, and save
the calibrated checkpoint.

    python -m scripts.calibrate_gates --checkpoint=<phase 3 out-dir> --out-dir=<final> [--risk 0.01 --delta 0.1]

A gate's raw score is not a probability: `--exit-threshold 0.95` means what it says only after each gate's
isotonic map (nanochat.confidence_probe.calibrate_gates) has been fitted on tokens the model did not train on.
This fits the maps on part of the val split (--val-part, default 1/2: the val row groups 1, 3, 5, ...), prints
the exit rate and precision per threshold on the other part (0/2, which scripts.bench adaptive scores by
default), and saves the model with the maps to --out-dir, with the tokenizer. The source checkpoint is not
touched. Teacher forced at full width: a token's label is whether the gate's exit readout has the full
model's top-1.

Then the operating point (nanochat.operating_point): --ltt-rows further rows of the same val part (packed from
documents the gates were not fitted on), each --prompt-len + --decode-tokens long, are decoded by the engine teacher forced for
every menu plan and exit setting; Learn-then-Test (every third row orders the grid, the rest tests it) picks the router
threshold and the exit / widen thresholds jointly so that, with probability >= 1 - --delta, the rate of decoded
tokens whose top-1 differs from full width's is <= --risk (a row's loss is its fraction of differing tokens; Bentkus'
binomial bound). It prints the guarantee and the operating point and stores both in the meta (calibration.guarantee);
auto then runs at that point. Too few rows for the requested risk: it says so and auto keeps full width.
"""
import os
import math
import argparse

import torch

from nanochat.common import autodetect_device_type, autocast_context, expand_path, add_runtime_args, run_script
from nanochat.checkpoint_manager import load_model_and_tokenizer, save_model, copy_tokenizer_files, list_steps
from nanochat.confidence_probe import calibrate_gates, gate_scores, reliability_table
from nanochat.dataloader import tokenizing_distributed_data_loader
from nanochat.dataset import get_data_dir
from nanochat.engine import Engine
from nanochat import run_report
from nanochat.operating_point import (router_probs, grid_losses, choose_and_apply, teacher_forced_outcomes,
                                      token_disagreement, EXIT_SETTINGS)


def parse_part(text):
    """'r/n' -> (r, n): the val row groups r, r + n, r + 2n, ... (nanochat.dataloader's rank sharding)."""
    try:
        r, n = (int(s) for s in text.split("/"))
    except ValueError:
        raise ValueError(f"a val part is 'r/n' with integers (e.g. 1/2), got {text!r}") from None
    if not 0 <= r < n:
        raise ValueError(f"val part {text!r}: need 0 <= r < n")
    return r, n


def parts_overlap(a, b):
    """Whether two val parts (r, n) share a row group: some i = r1 mod n1 = r2 mod n2 (Chinese remainders)."""
    return (a[0] - b[0]) % math.gcd(a[1], b[1]) == 0


def val_batches(tokenizer, data_dir, part, B, T, n_tokens, device):
    """Up to n_tokens (whole (B, T) batches) of the val split's part; at least one batch."""
    r, n = part
    loader = tokenizing_distributed_data_loader(tokenizer, B, T, "val", data_dir=data_dir, device=device, rank=r, world_size=n)
    out = []
    for x, y, _ in loader:
        out.append((x, y))
        if len(out) * B * T >= n_tokens:
            break
    if not out:
        raise ValueError(f"val part {r}/{n} of {data_dir} holds less than one batch of {B} x {T} tokens")
    return out


def get_args(argv=None):
    p = argparse.ArgumentParser(description="Fit the exit gates' calibration on held-out text and save the checkpoint")
    p.add_argument("--checkpoint", type=str, required=True, help="hybrid checkpoint directory (latest step) or model_<step>.pt")
    p.add_argument("--out-dir", type=str, required=True, help="where the calibrated checkpoint goes (not the source)")
    p.add_argument("--data-dir", type=str, default=None, help="parquet shards (default <base_dir>/base_data)")
    p.add_argument("--tokenizer-dir", type=str, default=None, help="default: the checkpoint directory")
    p.add_argument("--val-part", type=str, default="1/2", help="val row groups to fit on: r/n = groups r, r+n, ...")
    p.add_argument("--eval-part", type=str, default="0/2", help="val row groups for the reliability table ('' = none)")
    p.add_argument("--tokens", type=int, default=262144, help="tokens to fit on (and at most as many to report on)")
    p.add_argument("--seq-len", type=int, default=None, help="default: the checkpoint's sequence_len")
    p.add_argument("--batch", type=int, default=8, help="rows per forward")
    p.add_argument("--min-count", type=int, default=20, help="tokens per isotonic step at least")
    p.add_argument("--device", type=str, default=None, help="cuda|cpu (default: autodetect)")
    p.add_argument("--overwrite", action="store_true", help="allow an --out-dir that already holds checkpoints")
    p.add_argument("--risk", type=float, default=0.01, help="alpha: the rate of tokens that may differ from full width")
    p.add_argument("--delta", type=float, default=0.1, help="the guarantee holds with probability >= 1 - delta")
    p.add_argument("--ltt-rows", type=int, default=1024, help="held-out rows that choose the operating point")
    p.add_argument("--prompt-len", type=int, default=64, help="operating point: prompt tokens of each row")
    p.add_argument("--decode-tokens", type=int, default=16, help="operating point: teacher-forced decode steps per row")
    add_runtime_args(p)  # --debug, --threads, --require-kernels (read by run_script)
    args = p.parse_args(argv)
    args.val_part = parse_part(args.val_part)
    args.eval_part = parse_part(args.eval_part) if args.eval_part else None
    if args.eval_part and parts_overlap(args.eval_part, args.val_part):
        raise ValueError(f"--eval-part {args.eval_part} shares row groups with --val-part {args.val_part}: the table "
                         "would score tokens the gates were fitted on")
    if min(args.tokens, args.batch, args.min_count, args.ltt_rows, args.prompt_len, args.decode_tokens) < 1:
        raise ValueError("--tokens, --batch, --min-count, --ltt-rows, --prompt-len and --decode-tokens must be >= 1")
    if not (0 < args.risk < 1 and 0 < args.delta < 1):
        raise ValueError(f"need 0 < --risk < 1 and 0 < --delta < 1, got {args.risk} and {args.delta}")
    return args


def doc_refs(tokenizer, data_dir, part, B, T, n_batches):
    """The documents (shard, row group, doc) that the first n_batches (B, T) batches of the val part were packed from."""
    loader = tokenizing_distributed_data_loader(tokenizer, B, T, "val", data_dir=data_dir, rank=part[0],
                                                world_size=part[1], with_doc_refs=True)
    refs = set()
    for _, (_, _, _, used) in zip(range(n_batches), loader):
        refs |= {tuple(ref) for row in used for ref, _ in row}
    return refs


def operating_point(args, model, tokenizer, data_dir, device, fit_refs):
    """Learn-then-Test on --ltt-rows rows of the val part packed from documents the gates were not fitted on."""
    P, K = args.prompt_len, args.decode_tokens
    L = P + K
    r, n = args.val_part
    loader = tokenizing_distributed_data_loader(tokenizer, 1, L - 1, "val", data_dir=data_dir, device=device, rank=r,
                                                world_size=n, with_doc_refs=True)
    rows = []
    for x, y, _, used in loader:
        if not any(tuple(ref) in fit_refs for ref, _ in used[0]):
            rows.append(torch.cat([x[:, :1], y], 1))
        if len(rows) == args.ltt_rows:
            break
    if not rows:
        raise ValueError(f"val part {r}/{n} has no rows left for the operating point outside the fit documents")
    rows = torch.cat(rows)
    print(f"operating point: {rows.size(0)} rows of {P} + {K} tokens of val part {r}/{n} (no fit document); "
          f"alpha {args.risk}, delta {args.delta}")
    engine = Engine(model)
    with autocast_context(device.type):
        probs = router_probs(model, rows[:, :P].tolist())
        outcomes = {(m, e, w): teacher_forced_outcomes(engine, rows, P, K, plan, e, w)
                    for m, plan in enumerate(model.controllers.predictor.menu) for e, w in EXIT_SETTINGS}
    learn = [i % 3 == 0 for i in range(rows.size(0))]
    configs, losses, costs = grid_losses(probs, outcomes, token_disagreement, learn)
    guarantee = choose_and_apply(model, configs, losses, costs, args.risk, args.delta, learn=learn)
    guarantee["units"] = (f"{rows.size(0)} rows of val part {r}/{n} outside the fit documents; loss: the fraction of {K} "
                          f"teacher-forced tokens whose top-1 differs from full width's")
    return guarantee


def main(argv=None):
    args = get_args(argv)
    device = torch.device(args.device or autodetect_device_type())
    model, tokenizer, meta = load_model_and_tokenizer(args.checkpoint, device, tokenizer_dir=args.tokenizer_dir)
    src = meta["checkpoint_dir"]
    out_dir = expand_path(args.out_dir)
    if os.path.realpath(out_dir) == os.path.realpath(src):
        raise ValueError(f"--out-dir is the source checkpoint {src}: write the calibrated model elsewhere")
    if os.path.isdir(out_dir) and list_steps(out_dir) and not args.overwrite:
        raise ValueError(f"{out_dir} already holds checkpoints (steps {list_steps(out_dir)}); pass --overwrite or another --out-dir")
    if not hasattr(model, "controllers"):
        raise ValueError(f"{src} has no exit gates (a dense GPT, or a hybrid with adaptive=False): nothing to calibrate")
    T = args.seq_len or model.config.sequence_len
    data_dir = get_data_dir(args.data_dir)
    fit = val_batches(tokenizer, data_dir, args.val_part, args.batch, T, args.tokens, device)
    with autocast_context(device.type):  # bf16 on CUDA, as scripts.generate decodes; a no-op on CPU
        info = calibrate_gates(model, fit, min_count=args.min_count)
    print(f"calibrated {len(info['steps'])} gates (after blocks {list(model.controllers.gate_blocks)}) on "
          f"{info['n_tokens']:,} tokens of val part {args.val_part[0]}/{args.val_part[1]} of {data_dir}; "
          f"isotonic steps per gate {info['steps']}")
    table = None
    if args.eval_part:
        held = val_batches(tokenizer, data_dir, args.eval_part, args.batch, T, args.tokens, device)
        with autocast_context(device.type):
            probs, agree = gate_scores(model, held, calibrated=True)
        print(f"exit policy with the calibrated gates on val part {args.eval_part[0]}/{args.eval_part[1]} "
              f"(precision: exit readout top-1 = full model's):")
        table = reliability_table(probs, agree, print_fn=print)
    fit_refs = doc_refs(tokenizer, data_dir, args.val_part, args.batch, T, len(fit))
    guarantee = operating_point(args, model, tokenizer, data_dir, device, fit_refs)
    step = meta["checkpoint_step"]
    keep = {k: meta[k] for k in ("phase", "lineage", "surgery", "source") if k in meta}
    calibration = {"data": f"{data_dir} val part {args.val_part[0]}/{args.val_part[1]}", "data_dir": data_dir,
                   "val_part": list(args.val_part), "seq_len": T, "from_checkpoint": src, **info, "guarantee": guarantee}
    if table is not None:
        calibration["reliability"] = {"part": f"{args.eval_part[0]}/{args.eval_part[1]}",
                                      "rows": [{k: (None if v != v else v) for k, v in r.items()} for r in table]}
    save_model(out_dir, step, model, extra_meta=dict(keep, calibration=calibration))
    copy_tokenizer_files(meta["tokenizer_dir"], out_dir, overwrite=True)
    print(f"saved the calibrated checkpoint to {out_dir} (step {step})")
    run_report.record(f"calibrate_{os.path.basename(os.path.normpath(out_dir))}", {
        "checkpoint": out_dir, "guarantee": guarantee, "n_tokens": info["n_tokens"]})
    return {"checkpoint_dir": out_dir, "step": step, "calibration": calibration}


if __name__ == "__main__":
    run_script(main)

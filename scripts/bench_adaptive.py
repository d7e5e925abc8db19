"""
Adaptive decode on a trained checkpoint: for each compute mode, batch-1 decode speed and the loss of what the
decode steps predict on held-out text, so that 'auto' is measured against full width ('think') on the same
tokens. Flags: python -m scripts.bench adaptive --help (timing and output: scripts.bench's docstring).

Held-out rows come from part of the data's val split (--val-part, default the row groups scripts.calibrate_gates
does not fit the gates on), packed the way training packs it (nanochat.dataloader), each --prompt-len +
--decode-tokens + 1 tokens long. Each row is prefilled with its first --prompt-len tokens; then
--decode-tokens engine steps each take the row's next true token (teacher forcing), and each step's logits are
scored against the token after it. So the loss is the decode path's own: with the predictor's widths, the
gates' exits and widening, exactly as scripts.generate would run them. Every mode sees the same rows.

A first untimed pass over the rows captures the CUDA graphs their steps need; the timed pass reports the mean
time per step (step plus the sync that makes its logits readable), so tokens/s = 1000 / ms at batch 1. In both
passes the modes take turns row by row, so a change in the machine's speed during the run reaches them alike.
"""
import os
import time
from contextlib import nullcontext

import torch
import torch.nn.functional as F

from nanochat.common import autocast_context, synchronize as sync
from scripts.bench_common import progress, print_table, target, finish


def heldout_rows(tokenizer, data_dir, part, n_rows, length, device):
    """(n_rows, length) long: the first rows of input tokens that the val split's part (r, n) packs at length. The
    loader's targets are not used: on shards with loss spans they are -1 outside the spans, not tokens."""
    from scripts.calibrate_gates import val_batches
    batches = val_batches(tokenizer, data_dir, part, 1, length, n_rows * length, device)
    if len(batches) < n_rows:
        raise ValueError(f"val part {part[0]}/{part[1]} holds only {len(batches)} rows of {length} tokens; lower "
                         f"--rows, --prompt-len or --decode-tokens")
    return torch.cat([x for x, _ in batches[:n_rows]]).long()


def decode_row(args, engine, row, mode, actx, device, acc):
    """Teacher-forced decode of one (1, P + K + 1) row in `mode`, adding per-step numbers to the lists in acc."""
    model = engine.model
    P, K = args.prompt_len, args.decode_tokens
    thresholds = dict(exit_threshold=args.exit_threshold, expand_threshold=args.expand_threshold) if mode == "auto" else {}
    with torch.inference_mode(), actx:
        st, _, _, _ = engine.prefill(row[:, :P], plan=mode, plan_epsilon=args.plan_epsilon, max_len=P + K, **thresholds)
    for i in range(K):
        sync(device)
        t0 = time.perf_counter()
        with torch.inference_mode(), actx:
            logits, exit_block, _, wid, flops = engine.step(st, row[:, P + i])
        sync(device)
        acc["ms"].append((time.perf_counter() - t0) * 1e3)
        acc["path"].add(engine.last_path)
        acc["nll"].append(F.cross_entropy(logits.float(), row[:, P + i + 1], reduction="sum"))
        acc["top1"].append(logits.argmax(-1))
        # FLOPs of this step over the full model's at the context it attended (st.pos is one past it)
        acc["frac"].append(flops.item() / model.forward_flops_per_token(st.pos))
        acc["block"].append(int(exit_block.item()))
        acc["widened"].append(bool(wid.item()))


def decode_modes(args, engine, rows, modes, actx, device):
    """Every row in every mode, row by row with the modes taking turns (so drift in the machine's speed reaches
    them alike), twice: the first pass untimed. Returns one result dict per mode; agree_think = the fraction of
    steps whose top-1 equals think's, when think ran."""
    n = engine.model.config.n_layer
    for _pass in ("untimed", "timed"):  # what the last pass accumulates is reported
        acc = {m: {k: (set() if k == "path" else []) for k in ("ms", "path", "nll", "top1", "frac", "block", "widened")}
               for m in modes}
        for r in range(rows.size(0)):
            for mode in modes:
                decode_row(args, engine, rows[r:r + 1], mode, actx, device, acc[mode])
    out = []
    for mode in modes:
        a = acc[mode]
        steps = len(a["ms"])
        ms = sum(a["ms"]) / steps
        row = {"mode": mode, "rows": rows.size(0), "prompt": args.prompt_len, "steps": steps,
               "loss": torch.stack(a["nll"]).sum().item() / steps, "ms": ms, "tok_per_s": 1e3 / ms,
               "compute_frac": sum(a["frac"]) / steps, "exit_rate": sum(b < n - 1 for b in a["block"]) / steps,
               "blocks_frac": sum(b + 1 for b in a["block"]) / (steps * n), "widen_rate": sum(a["widened"]) / steps,
               "path": "+".join(sorted(a["path"]))}
        if mode != "think" and "think" in acc:
            row["agree_think"] = (torch.cat(a["top1"]) == torch.cat(acc["think"]["top1"])).double().mean().item()
        progress(row)
        out.append(row)
    return out


def cmd_adaptive(args, device):
    from nanochat.engine import Engine
    from nanochat.dataset import get_data_dir
    from nanochat.checkpoint_manager import load_model_and_tokenizer
    from scripts.calibrate_gates import parse_part, parts_overlap
    part = parse_part(args.val_part)
    modes = args.modes.split(",")
    if "think" in modes:  # the reference the other modes are compared with comes first in the table
        modes = ["think"] + [m for m in modes if m != "think"]
    model, tokenizer, meta = load_model_and_tokenizer(args.checkpoint, device, tokenizer_dir=args.tokenizer_dir)
    c = model.config
    if not hasattr(c, "layer_pattern"):
        raise SystemExit(f"{args.checkpoint} holds a dense GPT: bench adaptive compares a hybrid's compute modes")
    P, K = args.prompt_len, args.decode_tokens
    if P < 1 or K < 1 or args.rows < 1:
        raise SystemExit("--prompt-len, --decode-tokens and --rows must be >= 1")
    if P + K > c.sequence_len:
        raise SystemExit(f"--prompt-len + --decode-tokens = {P + K} exceeds the checkpoint's sequence_len "
                         f"{c.sequence_len}: held-out loss beyond the trained length says little")
    bf16 = args.weights == "bf16"
    actx = nullcontext() if bf16 else autocast_context(device.type)  # a no-op on CPU
    model.eval()
    if bf16:
        model = model.to(torch.bfloat16)
    engine = Engine(model, decode=args.engine_decode)
    data_dir = get_data_dir(args.data_dir)
    rows_t = heldout_rows(tokenizer, data_dir, part, args.rows, P + K + 1, device)
    results = decode_modes(args, engine, rows_t, modes, actx, device)
    cal = meta.get("calibration") or {}
    overlap = None  # unknown: the calibration (if any) did not record its data as scripts.calibrate_gates does
    if "val_part" in cal:
        overlap = (os.path.realpath(cal["data_dir"]) == os.path.realpath(data_dir)
                   and parts_overlap(tuple(cal["val_part"]), part))
    by = {r["mode"]: r for r in results}
    targets = []
    if "think" in by and "auto" in by:
        a, t = by["auto"], by["think"]
        targets = [target("auto / think decode tokens/s (batch 1)", a["tok_per_s"] / t["tok_per_s"], 1.5, ">="),
                   target("auto / think held-out loss (teacher-forced decode)", a["loss"] / t["loss"], 1.01, "<=")]
        guarantee = cal.get("guarantee")
        if guarantee is not None:  # the calibrated promise, checked on these rows: tokens whose top-1 is not think's
            targets.append(target(f"auto's tokens with another top-1 than think (alpha of the guarantee, delta "
                                  f"{guarantee['delta']})", 1.0 - a["agree_think"], guarantee["alpha"], "<="))
    wdesc = "bf16 weights" if bf16 else "fp32 weights" + (", bf16 autocast" if device.type == "cuda" else "")
    print_table(f"adaptive decode on {meta['checkpoint_dir']} (step {meta['checkpoint_step']}), batch 1, {wdesc}: "
                f"{args.rows} held-out rows (val part {args.val_part} of {data_dir}), prompt {P}, {K} teacher-forced steps each", results,
                [("mode", "mode", ""), ("path", "step", ""), ("loss", "loss (nats)", ".4f"), ("agree_think", "top-1 = think", ".3f"),
                 ("ms", "ms/token", ".2f"), ("tok_per_s", "tokens/s", ",.1f"), ("compute_frac", "FLOPs vs full", ".3f"),
                 ("exit_rate", "exit rate", ".3f"), ("blocks_frac", "blocks run", ".3f"), ("widen_rate", "widened", ".3f")])
    if overlap:
        print(f"  NOTE: val part {args.val_part} shares row groups with the part the gates were calibrated on "
              f"({cal['val_part'][0]}/{cal['val_part'][1]}): these rows are not held out from the calibration")
    print(f"  n_embd {c.n_embd}, {c.n_layer} blocks ({c.layer_pattern}/{c.ffn_pattern}), levels {c.width_levels}, "
          f"gates after blocks {list(model.controllers.gate_blocks) if hasattr(model, 'controllers') else '-'}; "
          f"auto: exit {args.exit_threshold} / widen {args.expand_threshold} (None: the checkpoint's operating point "
          f"{cal.get('guarantee', {}).get('operating_point', '- uncalibrated, 0.95 / 0.5')})")
    spec_rows = []
    if args.speculate:
        from scripts.bench_speculate import checkpoint_rows, CHECKPOINT_COLUMNS
        spec_rows = checkpoint_rows(args, engine, rows_t[:, :P], actx, device, args.draft.split(";"))
        print_table(f"self-speculative decoding on {meta['checkpoint_dir']}: greedy, batch 1, {args.rows} held-out "
                    f"prompts of {P} tokens, {K + 1} tokens each", spec_rows, CHECKPOINT_COLUMNS)
        for r in spec_rows:
            if r["k"]:
                targets.append(target(f"{r['what']} k={r['k']} / think tokens/s", r["vs_think"],
                                      0.95 if "fallback" in r["what"] else 1.5, ">="))
    return finish("adaptive", args, device, {"rows": results, "targets": targets, "checkpoint": meta["checkpoint_dir"],
                                             "speculative": spec_rows,
                                             "step": meta["checkpoint_step"], "data_dir": data_dir,
                                             "calibrated": bool(cal), "rows_overlap_calibration": overlap})


def add_args(sub, decode_paths):
    a = sub.add_parser("adaptive", help="a trained checkpoint's modes: held-out decode loss and tokens/s at batch 1")
    a.add_argument("--checkpoint", type=str, required=True, help="hybrid checkpoint directory (latest step) or model_<step>.pt")
    a.add_argument("--tokenizer-dir", type=str, default=None, help="default: the checkpoint directory")
    a.add_argument("--data-dir", type=str, default=None, help="parquet shards whose val split is held out (default <base_dir>/base_data)")
    a.add_argument("--val-part", type=str, default="0/2", help="val row groups r/n = groups r, r+n, ... (default 0/2: "
                   "the half scripts.calibrate_gates does not fit on)")
    a.add_argument("--modes", type=str, default="think,normal,whisper,ghost,auto", help="think runs first: the reference")
    a.add_argument("--rows", type=int, default=8, help="held-out rows (one prefill each)")
    a.add_argument("--prompt-len", type=int, default=256, help="prefilled tokens of each row")
    a.add_argument("--decode-tokens", type=int, default=64, help="teacher-forced decode steps per row")
    a.add_argument("--exit-threshold", type=float, default=None, help="auto: exit when the gate > this (default 0.95)")
    a.add_argument("--expand-threshold", type=float, default=None, help="auto: widen when the gate < this (default 0.5)")
    a.add_argument("--plan-epsilon", type=float, default=None, help="auto: the probability the router may accept that its plan's answer differs from full width (threshold 1 - this; default: the calibrated threshold)")
    a.add_argument("--engine-decode", type=str, default="auto", choices=decode_paths, help="as bench decode")
    a.add_argument("--weights", type=str, default="fp32", choices=("fp32", "bf16"),
                   help="fp32 weights under bf16 autocast (scripts.generate's setting), or bf16 weights and caches")
    a.add_argument("--speculate", type=int, default=0, help="also greedy generation from the held-out prompts with "
                   "self-speculative decoding, k = 1..K, against think (scripts/bench_speculate.py)")
    a.add_argument("--draft", type=str, default="plan:ghost", help="with --speculate: drafts separated by ';' "
                   "(plan:<mode or widths>, exit:<block>)")
    return a


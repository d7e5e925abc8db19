"""
Continue a prompt with a checkpoint, in one of the compute modes.

    python -m scripts.generate --checkpoint PATH --prompt "The capital of France" --mode auto --max-tokens 64
    python -m scripts.generate --checkpoint PATH --prompt "Hi" --mode ghost --temperature 0.8 --show-compute

Modes: ghost / whisper / normal (every block at 128 / 512 / 1024 channels, snapped down to the model's
width levels), think (full width), auto (the width predictor's plan from the prompt, per-token exit and
widening by the gates). Exit/expand thresholds default to 0.95 / 0.5 in auto and off elsewhere.
A dense nanochat GPT checkpoint runs in mode think only.
The tokenizer comes from --tokenizer-dir, else the checkpoint directory's tokenizer.pkl
(checkpoint_manager.load_model_and_tokenizer, which also checks that it fits the model's vocabulary).
--speculate K (mode think): self-speculative decoding with K drafted tokens per round from --draft (a narrow plan
such as plan:ghost, or an early exit exit:N); the text is mode think's, --show-compute adds the acceptance.
--stop TEXT (repeatable; backslash escapes such as \\n work) ends the text before TEXT's first occurrence;
a TEXT that is one token also stops the generation there.
"""
import argparse

from nanochat.common import autodetect_device_type, autocast_context, add_runtime_args, run_script
from nanochat.checkpoint_manager import load_model_and_tokenizer
from nanochat.engine import Engine, MODES, DECODE_PATHS


def compute_report(model, steps, row=0, decode=None):
    """
    Lines describing, for one row, the forward that produced each generated token (token 0: the prompt's;
    token k: the forward of token k-1): its exit block, the mean width of the blocks it ran, whether the
    gate widened it, its FLOPs and their share of the full model's; then the totals.
    decode: the tokenizer's decode (ids -> str) to show the tokens' text.
    """
    n = model.config.n_layer
    lines = ["each row: the forward that produced the token (row 0: the whole prompt)",
             f"{'#':>4} {'token':<16} {'exit':>6} {'width':>6} {'widened':>7} {'FLOPs':>10} {'of full':>8}"]
    used = full = 0.0
    for k, s in enumerate(steps):
        t = s.tokens[row]
        text = repr(decode([t]))[:16] if decode else str(t)
        f, ff = float(s.flops[row]), float(s.full_flops[row])
        if s.source == "prompt":
            lines.append(f"{k:4d} {text:<16} {'prompt':>6} {'':>6} {'':>7} {f:10.3g} {100 * f / ff:7.1f}%")
            prompt_used, prompt_full = f, ff
            continue
        eb = int(s.exit_block[row])
        w = s.widths[row, :eb + 1].float().mean().item()
        lines.append(f"{k:4d} {text:<16} {eb + 1:>3}/{n:<2} {w:6.0f} {'yes' if s.widened[row] else '':>7} "
                     f"{f:10.3g} {100 * f / ff:7.1f}%")
        used, full = used + f, full + ff
    if steps and steps[0].source == "prompt":
        lines.append(f"prompt: {prompt_used:.4g} FLOPs vs full model {prompt_full:.4g} ({100 * prompt_used / prompt_full:.1f}%)")
    if full > 0:
        lines.append(f"decode: {used:.4g} FLOPs vs full model {full:.4g} ({100 * used / full:.1f}%) over {len(steps) - 1} tokens")
    return lines

def add_generation_args(parser):
    parser.add_argument("--checkpoint", type=str, required=True, help="checkpoint directory (latest step) or model_<step>.pt")
    parser.add_argument("--mode", type=str, default="think", choices=MODES, help="compute mode")
    parser.add_argument("--max-tokens", type=int, default=128, help="tokens to generate")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=None, help="sample from the top k tokens only")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--exit-threshold", type=float, default=None, help="exit when the gate > this (default: 0.95 in auto, off otherwise)")
    parser.add_argument("--expand-threshold", type=float, default=None, help="widen when the gate < this (default: 0.5 in auto, off otherwise)")
    parser.add_argument("--plan-epsilon", type=float, default=None, help="auto: the probability the router may accept that its plan's answer differs from full width (threshold 1 - this; default: the calibrated threshold)")
    parser.add_argument("--show-compute", action="store_true", help="print each token's exit block, width and FLOPs")
    parser.add_argument("--tokenizer-dir", type=str, default=None, help="default: the checkpoint directory")
    parser.add_argument("--device", type=str, default=None, help="cuda|cpu|mps (default: autodetect)")
    parser.add_argument("--decode", type=str, default="auto", choices=DECODE_PATHS,
                        help="decode step (nanochat.engine.Engine): auto = CUDA graphs on CUDA, eager elsewhere; compiled "
                        "= graphs of torch.compile'd segments (fewer kernels, but minutes of compiling first); tuned = compiled with "
                        "inductor's coordinate-descent tuning (matrix-vector products as tuned Triton kernels; longer compile)")
    parser.add_argument("--speculate", type=int, default=0, help="self-speculative decoding: K drafted tokens per round, "
                        "verified by the full model (mode think only; the output is think's)")
    parser.add_argument("--draft", type=str, default="plan:ghost", help="with --speculate: plan:<mode or widths> (a "
                        "narrow plan with its own caches) or exit:<block> (an early exit sharing the first blocks)")
    parser.add_argument("--stop", type=str, action="append", default=[],
                        help="end the text before this string (repeatable; backslash escapes: --stop '\\n')")
    add_runtime_args(parser)  # --debug, --threads, --require-kernels (read by run_script)


def check_generation_args(args):
    """Stop on values that would generate nothing or loop on nothing; turn --stop's escapes into characters."""
    if args.max_tokens < 1:
        raise SystemExit(f"--max-tokens={args.max_tokens}: generate at least 1 token")
    args.stop = [s.encode("latin-1", "backslashreplace").decode("unicode_escape") for s in args.stop]
    if any(not s for s in args.stop):
        raise SystemExit("--stop '' would stop before the first token: give a non-empty string")
    if args.speculate < 0:
        raise SystemExit(f"--speculate={args.speculate}: draft K >= 1 tokens per round (0: off)")
    if args.speculate and (args.mode != "think" or args.exit_threshold is not None or args.expand_threshold is not None):
        raise SystemExit("--speculate gives mode think's output: use --mode think without exit/expand thresholds")


def stop_token_ids(tokenizer, stops):
    """The --stop strings that are one token each: the engine stops a row there (longer ones are cut afterwards)."""
    return tuple(ids[0] for ids in (tokenizer.encode(s) for s in stops) if len(ids) == 1)


def cut_at_stop(tokenizer, tokens, stops):
    """
    (text, n): the decoded text before the first occurrence of any stop string, and the number of tokens before
    the one that completed it (as a stop token, that one is dropped); with no stop string in the text, the whole
    text and len(tokens).
    """
    text = tokenizer.decode(tokens)
    cuts = [text.find(s) for s in stops if s in text]
    if not cuts:
        return text, len(tokens)
    n = next(k for k in range(1, len(tokens) + 1) if any(s in tokenizer.decode(tokens[:k]) for s in stops)) - 1
    return text[:min(cuts)], n


def load_from_args(args):
    """(model, tokenizer, meta) of add_generation_args' --checkpoint, --tokenizer-dir and --device."""
    return load_model_and_tokenizer(args.checkpoint, args.device or autodetect_device_type(),
                                    tokenizer_dir=args.tokenizer_dir)


def check_mode(model, args):
    """Fail before generating on flag combinations the model cannot run; warn on an uncalibrated gate."""
    engine = Engine(model, decode=args.decode)
    plan = args.mode
    try:
        engine.resolve(plan, args.exit_threshold, args.expand_threshold)
        if getattr(args, "speculate", 0):
            from nanochat.speculative_rules import Draft
            if engine.dense:
                raise ValueError("a dense GPT has no narrow widths or exits to draft with")
            Draft.parse(args.draft, model.config.n_layer)
    except ValueError as e:
        raise SystemExit(f"--mode {args.mode}{' --speculate' if getattr(args, 'speculate', 0) else ''}: {e}")
    ctrl = getattr(model, "controllers", None)
    gating = (args.mode == "auto" or (args.exit_threshold is not None and args.exit_threshold < 1.0)
              or (args.expand_threshold is not None and args.expand_threshold > 0.0))
    if gating and not ctrl.is_calibrated():
        print("WARNING: the exit gates are not calibrated (confidence_probe.calibrate_gates): thresholds are raw scores")
    if args.mode == "auto" and ctrl.operating_point() is None:
        print("WARNING: no calibrated operating point (scripts.calibrate_gates --risk/--delta): auto runs the default "
              "thresholds with no guarantee of keeping the full model's answers")
    return engine


def guarantee_report(meta):
    """The calibrated operating point's guarantee from the checkpoint meta, or a warning that there is none."""
    g = (meta.get("calibration") or {}).get("guarantee")
    if g is None:
        return "WARNING: uncalibrated checkpoint: auto's thresholds carry no guarantee (run scripts.calibrate_gates)"
    return f"{g['statement']}\noperating point: {g['operating_point']}"


def main(argv=None):
    parser = argparse.ArgumentParser(description="Generate text with a checkpoint in a compute mode")
    add_generation_args(parser)
    parser.add_argument("--prompt", type=str, required=True)
    parser.add_argument("--num-samples", type=int, default=1, help="rows generated together from the prompt")
    args = parser.parse_args(argv)
    check_generation_args(args)
    if not args.prompt:
        raise SystemExit("--prompt is empty: give the text to continue")
    if args.num_samples < 1:
        raise SystemExit(f"--num-samples={args.num_samples}: generate at least 1 row")

    model, tokenizer, meta = load_from_args(args)
    engine = check_mode(model, args)
    spec = f" | speculate {args.speculate} draft {args.draft}" if args.speculate else ""
    print(f"{meta.get('model_kind', 'gpt')} model from {meta['checkpoint_dir']} step {meta['checkpoint_step']} | mode {args.mode}{spec}")
    prompt = tokenizer.encode(args.prompt, prepend="<|bos|>")
    with autocast_context(model.get_device().type):  # bf16 on CUDA, as nanochat; fp32 elsewhere
        res = engine.generate_batch([prompt] * args.num_samples, args.max_tokens, plan=args.mode,
                                    exit_threshold=args.exit_threshold, expand_threshold=args.expand_threshold,
                                    temperature=args.temperature, top_k=args.top_k, seed=args.seed,
                                    plan_epsilon=args.plan_epsilon, speculate=args.speculate, draft=args.draft,
                                    stop_tokens=(tokenizer.get_bos_token_id(), *stop_token_ids(tokenizer, args.stop)))
    if args.show_compute and args.mode == "auto":
        print(guarantee_report(meta))
    for b, toks in enumerate(res.tokens):
        text, n = cut_at_stop(tokenizer, toks, args.stop)
        print(("" if args.num_samples == 1 else f"--- sample {b}\n") + args.prompt + text)
        if args.show_compute:
            if res.plan is not None:
                print("width plan: " + " ".join(str(w) for w in res.plan[b].tolist()))
            for line in compute_report(model, res.steps[:max(1, n)], row=b, decode=tokenizer.decode):
                print(line)
    if args.show_compute and args.speculate:
        print(engine.spec_stats.summary())
    return res


if __name__ == "__main__":
    run_script(main)

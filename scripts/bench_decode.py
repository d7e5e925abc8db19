"""
Decode benchmark: prefill/decode tokens/s and KV + SSM cache memory (measured, counted, analytic), dense GPT
vs hybrid modes. Flags: python -m scripts.bench decode --help (timing and output: scripts.bench's docstring).
"""
import math
import time
import statistics
from contextlib import nullcontext

import torch

from nanochat.common import autocast_context, synchronize as sync
from scripts.bench_common import (free_memory, error_text, progress, top_kernels, print_profile, print_table, target,
                                  finish, bench_configs, build_model)


# -----------------------------------------------------------------------------
# decode: prefill and per-token decode, cache memory (measured, counted, analytic)

def cache_bytes_analytic(config, B, L, nbytes, narrow):
    """KV + SSM cache bytes of nanochat.engine's caches for a HybridGPT (GPTConfig: plain K/V).
    narrow: whether positions are stored with fewer KV heads than n_kv_head in every attention block (the
    engine then keeps each block's normalised inputs, to fill the lacked heads; see stores_narrow_kv).
    Returns dict kv, xn (those stored block inputs, else 0), heads (int16 head counts), ssm."""
    hd = config.n_embd // config.n_head
    if not hasattr(config, "layer_pattern"):
        return {"kv": config.n_layer * 2 * B * config.n_kv_head * L * hd * nbytes, "xn": 0, "heads": 0, "ssm": 0}
    n_attn = sum(config.mixer_kind(j) == "A" for j in range(config.n_layer))
    n_mamba = config.n_layer - n_attn
    d_inner = config.expand * config.n_embd
    if config.mamba_version == 1:
        per = d_inner * (config.d_conv + config.d_state)
    else:
        conv_dim = d_inner + 2 * config.mamba_ngroups * config.d_state
        per = conv_dim * config.d_conv + d_inner * config.d_state
    return {"kv": n_attn * 2 * B * config.n_kv_head * L * hd * nbytes,
            "xn": n_attn * B * L * config.n_embd * nbytes if narrow else 0,
            "heads": n_attn * B * L * 2, "ssm": n_mamba * B * per * nbytes}


def stores_narrow_kv(config, mode):
    """Whether decoding in `mode` stores positions with fewer KV heads than n_kv_head (what makes the engine
    keep block inputs). A fixed mode's plan has one width for every block: it does so in all attention
    blocks or in none. 'auto' never does: widening is on (threshold 0.5), so the engine writes every
    position's lacked heads along with its own ones (nanochat.engine's docstring)."""
    from nanochat.matryoshka import mode_plan, heads_at
    if not hasattr(config, "layer_pattern") or mode in ("-", "think", "auto"):
        return False
    return any(heads_at(w, config.head_dim, config.n_head, config.n_kv_head)[1] < config.n_kv_head
               for j, w in enumerate(mode_plan(mode, config.width_levels, config.n_layer)) if config.mixer_kind(j) == "A")


def tensor_bytes(ts):
    return sum(t.numel() * t.element_size() for t in ts)


def engine_cache_bytes(kind, state):
    """Bytes of the cache tensors a prefill allocated: GPT KVCache, or the engine's K/V, head counts,
    Mamba states and stored block inputs (c.xn holds only the blocks that allocated them)."""
    if kind == "gpt":
        return tensor_bytes(state.k + state.v)
    c = state.cache
    return tensor_bytes([*c.k.values(), *c.v.values(), *c.xn.values(), *c.heads.values()]
                        + [t for pair in state.ssm.values() for t in pair])


def decode_one(args, device, model, engine, kind, mode, L, actx):
    """Prefill a (B, L) prompt (median of --prefill-reps after one warmup), then --decode-tokens greedy steps, each
    timed with the sync that ends it; then Engine.generate (generate_ms: from its first token, the prefill's, to
    its last, per token after the first)."""
    B, max_len = args.batch, L + args.decode_tokens + 8  # + the profiled steps
    prompt = torch.randint(0, model.config.vocab_size, (B, L), device=device)
    row = {}
    prefill_ms = []
    for _ in range(args.prefill_reps + 1):  # the first is warmup
        state = logits = None  # the previous rep's cache must be gone before `before` is read
        if engine is not None:
            engine.release()  # the engine keeps its last cache on CUDA (for its graphs): drop it too
        free_memory(device)
        before = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
        sync(device)
        t0 = time.perf_counter()
        with torch.inference_mode(), actx:
            if kind == "gpt":
                state = model.new_kv_cache(B, max_len)
                logits = model(prompt, kv_cache=state)[:, -1].clone()  # not a view that keeps (B, T, V) alive
            else:
                state, logits, _, _ = engine.prefill(prompt, plan=mode, max_len=max_len)
        sync(device)
        prefill_ms.append((time.perf_counter() - t0) * 1e3)
        after = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    row["prefill_ms"] = statistics.median(prefill_ms[1:])
    row["prefill_tok_per_s"] = B * L / row["prefill_ms"] * 1e3
    if device.type == "cuda":  # what stays allocated after prefill: the caches and the (B, V) logits
        row["cache_measured_MiB"] = (after - before - logits.numel() * logits.element_size()) / 2**20
    row["cache_counted_MiB"] = engine_cache_bytes(kind, state) / 2**20

    def one(tok):
        with torch.inference_mode(), actx:
            if kind == "gpt":
                return model(tok[:, None], kv_cache=state)[:, -1], None
            lg, _, _, _, flops = engine.step(state, tok)
            paths.add(engine.last_path)
            return lg, flops
    tok = logits.argmax(-1)
    times, fracs, paths = [], [], set()
    for _ in range(args.decode_tokens):
        t0 = time.perf_counter()
        lg, flops = one(tok)
        tok = lg.argmax(-1)
        sync(device)  # per-token latency as a user sees it: the step, then the next token on the host side
        times.append((time.perf_counter() - t0) * 1e3)
        if flops is not None:  # FLOPs fraction, outside the timed region: the full model at this context
            fracs.append((flops.double().mean() / model.forward_flops_per_token(state.pos)).item())
    warm = min(2, len(times) - 1)
    row["decode_ms"] = statistics.median(times[warm:])
    row["decode_tok_per_s"] = B / row["decode_ms"] * 1e3
    if kind != "gpt":
        row["compute_frac"] = statistics.mean(fracs)
        row["path"] = "+".join(sorted(paths))
    if args.profile and mode in ("-", "think"):  # before generate(), whose prefill replaces this state's cache
        row["profile"] = top_kernels(lambda: one(tok), device, n=args.profile_top, steps=4)
    # Engine.generate, greedy: what scripts.generate runs, with the next step queued before each token is read
    # back. The same max_len, so a hybrid reuses the workspace and graphs of the steps above.
    ids, n_gen, t_first = prompt.tolist(), max_len - L, None
    with torch.inference_mode(), actx:
        for _ in engine.generate(ids, n_gen, plan="think" if kind == "gpt" else mode):
            t_first = t_first or time.perf_counter()  # the first token is the prefill's: time from there on
    sync(device)
    row["generate_ms"] = (time.perf_counter() - t_first) * 1e3 / (n_gen - 1)
    return row


def set_mixer_path(model, path):
    """Every Mamba mixer of a hybrid on `path` (MambaMixer.path: auto, kernel or torch); a dense GPT has none."""
    from nanochat.mamba_block import MambaMixer
    for m in model.modules():
        if isinstance(m, MambaMixer):
            m.path = path


def cmd_decode(args, device):
    from nanochat import decode_attention, decode_mamba, decode_matvec
    from nanochat.engine import Engine
    decode_attention.set_path(args.attention_path or decode_attention.PATH)
    decode_mamba.set_path(args.mamba_step_path or decode_mamba.PATH)
    decode_matvec.set_path(args.matvec_path or decode_matvec.PATH)
    decode_matvec.set_head_path(args.head_path or decode_matvec.HEAD_PATH)
    # default as scripts.generate: fp32 weights under bf16 autocast on CUDA; the caches take the weights' dtype
    bf16 = args.weights == "bf16"
    actx = nullcontext() if bf16 else autocast_context(device.type)  # autocast_context is a no-op on CPU
    nbytes = 2 if bf16 else 4
    contexts = [int(s) for s in args.contexts.split(",")]
    if args.speculate and not 1 <= args.speculate_from <= args.speculate:
        raise ValueError(f"--speculate-from {args.speculate_from}: use 1 .. --speculate ({args.speculate})")
    # the rotary tables hold 10 x sequence_len positions: size them for the longest context
    seq = max(args.seq_len, math.ceil((max(contexts) + args.decode_tokens + 8) / 10))
    configs = bench_configs(args, seq, exit_stride=args.exit_stride)
    D = configs["dense"][1].n_embd
    names = args.models.split(",")  # bench_configs stopped at a name it does not know
    if args.speculate and "hybrid" not in names:
        raise ValueError("--speculate times the 'hybrid' model: keep it in --models")
    modes = {"dense": ["-"], "hybrid": args.modes.split(","),  # narrow modes add the stored block inputs (stores_narrow_kv)
             "hybrid-eq": ["think"], "hybrid-grown": ["think"]}
    specs = [(name, kind, config, modes[name]) for name, (kind, config) in configs.items() if name in names]
    B = args.batch
    rows, targets, spec_rows = [], [], []
    for name, kind, config, modes in specs:
        model = engine = None
        if not args.memory_only:
            torch.manual_seed(args.seed)
            model = build_model(kind, config, device).eval()
            if bf16:
                model = model.to(torch.bfloat16)
            set_mixer_path(model, args.mixer_path)
            engine = Engine(model, decode=args.engine_decode)
        for L in contexts:
            for mode in modes:
                row = {"model": name, "mode": mode, "context": L, "batch": B}
                analytic = cache_bytes_analytic(config, B, L + args.decode_tokens + 8, nbytes, stores_narrow_kv(config, mode))
                row.update(cache_analytic_MiB=sum(analytic.values()) / 2**20,
                           kv_ssm_analytic_MiB=(analytic["kv"] + analytic["ssm"]) / 2**20)
                if not args.memory_only:
                    try:
                        row.update(decode_one(args, device, model, engine, kind, mode, L, actx))
                    except Exception as e:  # noqa: BLE001 -- reported in the table and the JSON, the other rows still run
                        row["error"] = error_text(e)
                        del e
                        free_memory(device)
                progress(row)
                rows.append(row)
            if args.speculate and name == "hybrid" and not args.memory_only:
                from scripts.bench_speculate import speculate_rows
                for row in speculate_rows(args, device, model, engine, name, L, actx):
                    progress(row)
                    spec_rows.append(row)
        del model, engine
    L = max(contexts)
    by = {(r["model"], r["mode"], r["context"]): r for r in rows}
    d = by.get(("dense", "-", L))
    for name in ("hybrid", "hybrid-eq"):
        h = by.get((name, "think", L))
        if d is None or h is None:  # --models without dense, or without this hybrid (or think)
            continue
        for key, what in (("cache_measured_MiB", "allocated"), ("cache_counted_MiB", "cache tensors"),
                          ("cache_analytic_MiB", "formula")):
            if key in h and key in d:
                targets.append(target(f"{name} cache / dense cache at context {L} ({what})", h[key] / d[key], 0.5, "<="))
        targets.append(target(f"{name} K/V + SSM alone / dense (formula, without the head counts)",
                              h["kv_ssm_analytic_MiB"] / d["cache_analytic_MiB"], 0.5, "<=", "(what the layer pattern allows)"))
    wdesc = "bf16 weights and caches" if bf16 else "fp32 weights and caches" + (", bf16 autocast" if device.type == "cuda" else "")
    print_table(f"decode, batch {B}, {wdesc}, depth {args.depth} (width {D}), Mamba-{args.mamba} ({args.mixer_path} path), "
                f"attention {'split-key Triton kernel' if decode_attention.PATH == 'triton' and device.type == 'cuda' else 'PyTorch'}"
                f"{', broadcast sums when compiled' if decode_attention.PATH == 'reduce' else ''}, "
                f"projections {'decode_matvec kernel' if decode_matvec.PATH == 'triton' and device.type == 'cuda' and bf16 else 'F.linear'}"
                f"{', head through cuBLAS when compiled' if decode_matvec.HEAD_PATH == 'cublas' else ''}"
                f"{', Mamba-1 steps in decode_mamba kernels' if decode_mamba.PATH == 'triton' and device.type == 'cuda' else ''}, "
                f"{args.decode_tokens} decode steps, exits every {args.exit_stride} blocks", rows,
                [("model", "model", ""), ("mode", "mode", ""), ("path", "step", ""), ("context", "context", "d"), ("prefill_ms", "prefill ms", ".1f"),
                 ("prefill_tok_per_s", "prefill tok/s", ",.0f"), ("decode_ms", "ms/token", ".2f"),
                 ("decode_tok_per_s", "decode tok/s", ",.1f"), ("generate_ms", "generate ms/token", ".2f"),
                 ("compute_frac", "FLOPs vs full", ".2f"),
                 ("cache_measured_MiB", "cache MiB (alloc)", ",.1f"), ("cache_counted_MiB", "cache MiB (tensors)", ",.1f"),
                 ("cache_analytic_MiB", "cache MiB (formula)", ",.1f"), ("kv_ssm_analytic_MiB", "K/V+SSM MiB", ",.1f")])
    print("  'hybrid' = what scripts.surgery makes (one Mamba block after each attention block); 'hybrid-eq' = as many"
          " blocks as the dense model. Fresh weights: 'auto' follows an untrained width predictor and gates.\n"
          "  Cache: K/V, int16 head counts and Mamba states; fixed modes whose plan stores fewer KV heads than the"
          " model has add each attention block's normalised inputs (B x T x n_embd); 'auto' stores every head.")
    for r in rows:
        if "profile" in r:
            print_profile(f"{r['model']} {r['mode']} decode step, context {r['context']}", r["profile"])
    if spec_rows:
        from scripts.bench_speculate import COLUMNS, speculate_targets
        print_table(f"self-speculative decoding vs think, batch {B}, {wdesc}, greedy, {args.decode_tokens} tokens "
                    f"(fresh weights: acceptance is chance's; the 'at a' columns model a draft accepted at rate a)",
                    spec_rows, COLUMNS)
        targets += speculate_targets(spec_rows)
        for r in spec_rows:
            if "profile" in r:
                print_profile(f"{r['model']} {r['what']} k={r['k']}, one round (a generation's kernels less its prefill's, over its rounds), "
                              f"context {r['context']}", r["profile"])
    return finish("decode", args, device, {"rows": rows, "targets": targets, "speculative": spec_rows})

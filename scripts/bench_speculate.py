"""
Speculative decoding rows of `python -m scripts.bench decode --speculate K [--draft D]` (nanochat/speculative.py):
for each hybrid model and context, Engine.generate with speculation against mode think, greedy, batch --batch:
tokens/s of both, acceptance, draft-step and verify-pass ms (the device waited for after the drafts), the host
time between rounds (the timed generation's: from a round's one device read, when the device has nothing queued,
to the next round's first draft queued, which on the graph path comes before the tokens are handed out); and for
k = 1..K the tokens/s that the measured draft-step and verify times give at acceptance 0.5, 0.7 and 0.9 (no trained
draft exists at bench scale: fresh weights accept what chance gives). Memory-bandwidth utilisation of think:
bytes of weights and cache read per token / time per token / the GPU's peak bandwidth. Think's and speculation's
ms/token are the fastest of REPS generations. Where rounds were queued ahead (an exit draft on the static path: the
next round queued whole before this one's read), k = K also gets a row with none queued ahead (Engine.spec_ahead
off: each round begun after the last one's read), the same graphs, for the comparison.
"""
import time

import torch

from scripts.bench_common import progress, top_kernels

from nanochat.common import synchronize as sync

# peak DRAM bandwidth (bytes/s) by device name, for memory-bandwidth utilisation (SXM parts; PCIe ones read less)
PEAK_BANDWIDTH = (("H200", 4.8e12), ("H100", 3.35e12), ("A100", 2.04e12))
ACCEPTANCES = (0.5, 0.7, 0.9)
REPS = 3  # think's and speculation's ms/token: the fastest of this many timed generations (the fallback's: one)


def peak_bandwidth(device):
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((bw for key, bw in PEAK_BANDWIDTH if key in name), None)


def bytes_per_step(model, state, context):
    """Bytes a full-width decode step reads for all its rows: every weight once (of the embedding, one row per
    token), each attention block's K and V up to `context`, each Mamba block's conv and SSM states (read and
    written back)."""
    B = next(iter(state.cache.k.values())).size(0) if state.cache.layers else 1
    wte = model.transformer.wte.weight
    weights = sum(p.numel() * p.element_size() for n, p in model.named_parameters()
                  if p is not wte and not n.startswith("controllers."))
    weights += B * wte[0].numel() * wte.element_size()
    kv = sum(t[:, :, :context].numel() * t.element_size() for j in state.cache.layers
             for t in (state.cache.k[j], state.cache.v[j]))
    ssm = sum(2 * t.numel() * t.element_size() for pair in state.ssm.values() for t in pair)
    return weights + kv + ssm


def expected_tokens_per_round(alpha, k):
    """Tokens a round gives when each drafted token is accepted with probability alpha independently: the accepted
    prefix plus the verifier's own token, (1 - alpha^(k+1)) / (1 - alpha)."""
    return (1 - alpha ** (k + 1)) / (1 - alpha)


def between_ms(stats):
    """Mean host time between rounds (ms) of a generation's SpecStats, None where no interval was timed."""
    return stats.between_s / stats.betweens * 1e3 if stats.betweens else None


def timed_generate(engine, prompt, n, actx, device, reps=1, **kw):
    """Seconds per token of Engine.generate after its first (the prefill's) token, the fastest of `reps`
    generations; engine.spec_stats is the last one's."""
    best = None
    for _ in range(reps):
        t_first = None
        with torch.inference_mode(), actx:
            for _ in engine.generate(prompt, n, **kw):
                t_first = t_first or time.perf_counter()
        sync(device)
        s = (time.perf_counter() - t_first) / (n - 1)
        best = s if best is None else min(best, s)
    return best


def round_profile(engine, prompt, n, kw, actx, device, top=16):
    """The device kernels (CPU ops on a CPU) of one speculative round: a generation of n tokens profiled, less a
    generation of one token (its prefill), divided by the rounds; rows as bench_common.top_kernels'."""
    def kernels(count):
        with torch.inference_mode(), actx:
            rows = top_kernels(lambda: engine.generate_batch(prompt, count, **kw), device, n=10 ** 6, steps=1)
        return {r["name"]: r for r in rows[:-1]}
    full = kernels(n)
    rounds = max(1, engine.spec_stats.rounds)
    prefill = kernels(1)
    out = []
    for name, r in full.items():
        p = prefill.get(name, {"ms_per_call": 0.0, "count_per_call": 0.0})
        out.append({"name": name, "ms_per_call": (r["ms_per_call"] - p["ms_per_call"]) / rounds,
                    "count_per_call": (r["count_per_call"] - p["count_per_call"]) / rounds})
    total = sum(r["ms_per_call"] for r in out) or 1.0
    out.sort(key=lambda r: r["ms_per_call"], reverse=True)
    rows = [dict(r, pct=100 * r["ms_per_call"] / total) for r in out[:top]]
    rows.append({"name": f"(total of all {len(out)} kinds)", "ms_per_call": total, "pct": 100.0,
                 "count_per_call": sum(r["count_per_call"] for r in out)})
    return rows


def speculate_rows(args, device, model, engine, name, L, actx):
    """The rows for one hybrid model at context L (see the module docstring), yielded one by one as each is
    measured (a timeout during a later k's compiles keeps the earlier rows). warmup_s: the wall time of the
    row's first, untimed generation (its graphs captured or compiled)."""
    B, n = args.batch, args.decode_tokens
    prompt = torch.randint(0, model.config.vocab_size, (B, L), device=device).tolist()
    t0 = time.perf_counter()
    timed_generate(engine, prompt, n, actx, device)  # warm-up: graphs captured, kernels chosen
    warmup_s = time.perf_counter() - t0
    think_s = timed_generate(engine, prompt, n, actx, device, reps=REPS)
    bw, per_step = peak_bandwidth(device), bytes_per_step(model, engine.state, L)
    yield {"model": name, "context": L, "what": "think", "k": 0, "ms_per_token": think_s * 1e3,
           "tok_per_s": B / think_s, "GB_per_step": per_step / 1e9,
           "mbu": None if bw is None else per_step / think_s / bw, "warmup_s": warmup_s}
    for k in range(args.speculate_from, args.speculate + 1):
        kw = dict(speculate=k, draft=args.draft, fallback=False)
        # the drafts and the verify timed apart (a sync after the drafts), then the plain speed of the same run
        with torch.inference_mode(), actx:
            t0 = time.perf_counter()
            engine.generate_batch(prompt, n, **kw)  # warm-up for this k
            sync(device)
            warmup_s = time.perf_counter() - t0
            engine.spec_sync = True
            engine.generate_batch(prompt, n, **kw)
            engine.spec_sync = False
        st = engine.spec_stats
        spec_s = timed_generate(engine, prompt, n, actx, device, reps=REPS, **kw)
        st2 = engine.spec_stats
        draft_ms, verify_ms = st.draft_s / max(1, st.rounds * k) * 1e3, st.verify_s / max(1, st.rounds) * 1e3
        row = {"model": name, "context": L, "what": f"speculate {args.draft}", "k": k, "ms_per_token": spec_s * 1e3,
               "tok_per_s": B / spec_s, "vs_think": think_s / spec_s, "acceptance": st2.acceptance,
               "draft_ms": draft_ms, "verify_ms": verify_ms,
               "between_ms": between_ms(st2), "warmup_s": warmup_s}
        round_ms = k * draft_ms + verify_ms
        for a in ACCEPTANCES:  # what a draft accepted at rate a would give, from these step times
            row[f"tok_s_at_{a}"] = B * expected_tokens_per_round(a, k) / round_ms * 1e3
        if args.profile and k == args.speculate:
            row["profile"] = round_profile(engine, prompt, n, kw, actx, device)
        yield row
        if st2.ahead and k == args.speculate:  # the same rounds, each read before the next is queued
            engine.spec_ahead = False
            try:
                slow_s = timed_generate(engine, prompt, n, actx, device, reps=REPS, **kw)
            finally:
                engine.spec_ahead = True
            st3 = engine.spec_stats
            yield {"model": name, "context": L, "what": f"speculate {args.draft}, none queued ahead", "k": k,
                   "ms_per_token": slow_s * 1e3, "tok_per_s": B / slow_s, "vs_think": think_s / slow_s,
                   "acceptance": st3.acceptance, "between_ms": between_ms(st3)}
    # the setting scripts.generate uses: k = K with the fallback on (plain steps once speculation measures slower)
    kw = dict(speculate=args.speculate, draft=args.draft, fallback=True)
    timed_generate(engine, prompt, n, actx, device, **kw)  # warm-up: the plain steps' and rounds' shapes
    spec_s = timed_generate(engine, prompt, n, actx, device, **kw)
    st = engine.spec_stats
    yield {"model": name, "context": L, "what": f"speculate {args.draft}, fallback", "k": args.speculate,
           "ms_per_token": spec_s * 1e3, "tok_per_s": B / spec_s, "vs_think": think_s / spec_s,
           "acceptance": st.acceptance, "fell_back": st.fell_back_at is not None}


def checkpoint_rows(args, engine, prompts, actx, device, drafts):
    """A trained checkpoint (bench adaptive --speculate K): greedy generation of --decode-tokens tokens from each
    held-out prompt (batch 1), think against speculation for every draft in `drafts` and k = 1..K; tokens/s over all
    prompts, acceptance, and whether the tokens were think's. Each setting is timed paired with think: per prompt,
    think's generation and the setting's back to back (which goes first alternates), each after a 2-token warm-up of
    the prompt's shapes, and x think is the ratio of the paired sums, so that a drift of the machine's speed falls on
    both (think's own runs a minute apart differed by 12% on an H100 host). Each setting first runs one whole
    generation untimed (its graphs captured; with the fallback, the engine's memory of it, as when serving). The think
    row is every paired think run together. Each setting's row is printed (bench_common.progress) once measured.
    """
    n = args.decode_tokens + 1
    ids = [p.tolist() for p in prompts]  # (P,) each

    def gen(p, count, kw):
        with torch.inference_mode(), actx:
            return engine.generate_batch([p], count, **kw)

    def timed(p, kw):  # (seconds, tokens, (accepted, drafted)) of one generation after its shapes' warm-up
        gen(p, 2, kw)
        sync(device)
        t0 = time.perf_counter()
        res = gen(p, n, kw)
        sync(device)
        st = engine.spec_stats if kw else None
        return time.perf_counter() - t0, res.tokens[0], (st.accepted, st.drafted) if st is not None else (0, 0)

    gen(ids[0], n, {})  # think's graphs
    rows, think_all, think_out = [], 0.0, None
    for draft in drafts:
        for k in list(range(1, args.speculate + 1)) + ["fallback"]:
            kw = dict(speculate=args.speculate if k == "fallback" else k, draft=draft, fallback=k == "fallback")
            gen(ids[0], n, kw)
            spec_s = think_s = 0.0
            outs, thinks, acc = [], [], [0, 0]
            for i, p in enumerate(ids):
                for which in ((kw, {}) if i % 2 else ({}, kw)):
                    secs, tokens, (a, d) = timed(p, which)
                    if which:
                        spec_s, acc = spec_s + secs, [acc[0] + a, acc[1] + d]
                        outs.append(tokens)
                    else:
                        think_s += secs
                        thinks.append(tokens)
            think_out = think_out or thinks
            think_all += think_s
            rows.append({"what": f"speculate {draft}" + (", fallback" if k == "fallback" else ""), "k": kw["speculate"],
                         "tok_per_s": len(ids) * n / spec_s, "think_tok_per_s": len(ids) * n / think_s,
                         "vs_think": think_s / spec_s, "acceptance": acc[0] / max(1, acc[1]),
                         "same_tokens": outs == thinks == think_out})
            progress(rows[-1])  # printed once measured: a timeout in a later setting keeps it
    return [{"what": "think", "k": 0, "tok_per_s": len(ids) * n * len(rows) / think_all if rows else None}] + rows


CHECKPOINT_COLUMNS = [("what", "decode", ""), ("k", "k", "d"), ("tok_per_s", "tok/s", ",.1f"),
                      ("think_tok_per_s", "paired think tok/s", ",.1f"), ("vs_think", "x think", ".2f"),
                      ("acceptance", "acceptance", ".3f"), ("same_tokens", "tokens = think", "")]


def speculate_targets(rows):
    """The speculative decoding issue's targets, per context: >= 1.5x think where acceptance allows (the best k),
    never below 0.95x think with the fallback on; think's memory-bandwidth utilisation >= 50% at context 1024."""
    from scripts.bench_common import target
    out = []
    for L in sorted({r["context"] for r in rows}):
        at = [r for r in rows if r["context"] == L]
        spec = [r for r in at if r["k"] and "fallback" not in r["what"] and "queued ahead" not in r["what"]]
        if spec:
            best = max(spec, key=lambda r: r["vs_think"])
            out.append(target(f"speculative / think tok/s at context {L} (best k = {best['k']}, acceptance "
                              f"{best['acceptance']:.2f})", best["vs_think"], 1.5, ">="))
        for r in at:
            if "fallback" in r["what"]:
                out.append(target(f"speculative with fallback / think tok/s at context {L}", r["vs_think"], 0.95, ">="))
            if r["what"] == "think" and L == 1024:
                out.append(target("think memory-bandwidth utilisation at context 1024", r["mbu"], 0.5, ">="))
    return out


COLUMNS = [("model", "model", ""), ("context", "context", "d"), ("what", "decode", ""), ("k", "k", "d"),
           ("ms_per_token", "ms/token", ".2f"), ("tok_per_s", "tok/s", ",.1f"), ("vs_think", "x think", ".2f"),
           ("acceptance", "acceptance", ".2f"), ("draft_ms", "draft step ms", ".2f"), ("verify_ms", "verify ms", ".2f"),
           ("between_ms", "host between rounds ms", ".2f"), ("GB_per_step", "GB/step", ".3f"), ("mbu", "MBU", ".1%")] + [(f"tok_s_at_{a}", f"tok/s at {a}", ",.0f") for a in ACCEPTANCES]

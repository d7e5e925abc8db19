"""
Speculative decoding rows of `python -m scripts.bench decode --speculate K [--draft D]` (nanochat/speculative.py):
for each hybrid model and context, Engine.generate with speculation against mode think, greedy, batch --batch:
tokens/s of both, acceptance, draft-step and verify-pass ms (the device waited for after the drafts); and for
k = 1..K the tokens/s that the measured draft-step and verify times give at acceptance 0.5, 0.7 and 0.9 (no trained
draft exists at bench scale: fresh weights accept what chance gives). Memory-bandwidth utilisation of think:
bytes of weights and cache read per token / time per token / the GPU's peak bandwidth.
"""
import time

import torch

from nanochat.common import synchronize as sync

# peak DRAM bandwidth (bytes/s) by device name, for memory-bandwidth utilisation (SXM parts; PCIe ones read less)
PEAK_BANDWIDTH = (("H200", 4.8e12), ("H100", 3.35e12), ("A100", 2.04e12))
ACCEPTANCES = (0.5, 0.7, 0.9)


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


def timed_generate(engine, prompt, n, actx, device, **kw):
    """Seconds per token of Engine.generate after its first (the prefill's) token; and the engine's spec stats."""
    t_first = None
    with torch.inference_mode(), actx:
        for _ in engine.generate(prompt, n, **kw):
            t_first = t_first or time.perf_counter()
    sync(device)
    return (time.perf_counter() - t_first) / (n - 1)


def speculate_rows(args, device, model, engine, name, L, actx):
    """The rows for one hybrid model at context L (see the module docstring)."""
    B, n = args.batch, args.decode_tokens
    prompt = torch.randint(0, model.config.vocab_size, (B, L), device=device).tolist()
    timed_generate(engine, prompt, n, actx, device)  # warm-up: graphs captured, kernels chosen
    think_s = timed_generate(engine, prompt, n, actx, device)
    bw, per_step = peak_bandwidth(device), bytes_per_step(model, engine.state, L)
    rows = [{"model": name, "context": L, "what": "think", "k": 0, "ms_per_token": think_s * 1e3,
             "tok_per_s": B / think_s, "GB_per_step": per_step / 1e9,
             "mbu": None if bw is None else per_step / think_s / bw}]
    for k in range(1, args.speculate + 1):
        kw = dict(speculate=k, draft=args.draft, fallback=False)
        # the drafts and the verify timed apart (a sync after the drafts), then the plain speed of the same run
        with torch.inference_mode(), actx:
            engine.generate_batch(prompt, n, **kw)  # warm-up for this k
            engine.spec_sync = True
            engine.generate_batch(prompt, n, **kw)
            engine.spec_sync = False
        st = engine.spec_stats
        spec_s = timed_generate(engine, prompt, n, actx, device, **kw)
        st2 = engine.spec_stats
        draft_ms, verify_ms = st.draft_s / max(1, st.rounds * k) * 1e3, st.verify_s / max(1, st.rounds) * 1e3
        row = {"model": name, "context": L, "what": f"speculate {args.draft}", "k": k, "ms_per_token": spec_s * 1e3,
               "tok_per_s": B / spec_s, "vs_think": think_s / spec_s, "acceptance": st2.acceptance,
               "draft_ms": draft_ms, "verify_ms": verify_ms}
        round_ms = k * draft_ms + verify_ms
        for a in ACCEPTANCES:  # what a draft accepted at rate a would give, from these step times
            row[f"tok_s_at_{a}"] = B * expected_tokens_per_round(a, k) / round_ms * 1e3
        rows.append(row)
    # the setting scripts.generate uses: k = K with the fallback on (plain steps once speculation measures slower)
    kw = dict(speculate=args.speculate, draft=args.draft, fallback=True)
    timed_generate(engine, prompt, n, actx, device, **kw)  # warm-up: the plain steps' and rounds' shapes
    spec_s = timed_generate(engine, prompt, n, actx, device, **kw)
    st = engine.spec_stats
    rows.append({"model": name, "context": L, "what": f"speculate {args.draft}, fallback", "k": args.speculate,
                 "ms_per_token": spec_s * 1e3, "tok_per_s": B / spec_s, "vs_think": think_s / spec_s,
                 "acceptance": st.acceptance, "fell_back": st.fell_back_at is not None})
    return rows


def checkpoint_rows(args, engine, prompts, actx, device, drafts):
    """A trained checkpoint (bench adaptive --speculate K): greedy generation of --decode-tokens tokens from each
    held-out prompt (batch 1), think against speculation for every draft in `drafts` and k = 1..K; tokens/s over all
    prompts, acceptance, and whether the tokens were think's. Each setting first runs one whole generation untimed;
    think runs first and last, and the faster of the two is the reference.
    """
    n = args.decode_tokens + 1
    ids = [p.tolist() for p in prompts]  # (P,) each

    def run(**kw):
        total, outs, acc = 0.0, [], [0, 0]
        with torch.inference_mode(), actx:  # one whole generation first: every graph of the setting captured (and
            engine.generate_batch([ids[0]], n, **kw)  # with the fallback, the engine's memory of it, as when serving)
        for p in ids:
            with torch.inference_mode(), actx:
                res = engine.generate_batch([p], 2, **kw)  # warm-up of this prompt's shapes (graphs)
                sync(device)
                t0 = time.perf_counter()
                res = engine.generate_batch([p], n, **kw)
                sync(device)
            total += time.perf_counter() - t0
            outs.append(res.tokens[0])
            if kw.get("speculate"):
                acc[0] += engine.spec_stats.accepted
                acc[1] += engine.spec_stats.drafted
        return total, outs, acc

    think_s, think_out, _ = run()
    rows = []
    for draft in drafts:
        for k in list(range(1, args.speculate + 1)) + ["fallback"]:
            kw = dict(speculate=args.speculate if k == "fallback" else k, draft=draft, fallback=k == "fallback")
            spec_s, out, acc = run(**kw)
            rows.append({"what": f"speculate {draft}" + (", fallback" if k == "fallback" else ""), "k": kw["speculate"],
                         "seconds": spec_s, "tok_per_s": len(ids) * n / spec_s,
                         "acceptance": acc[0] / max(1, acc[1]), "same_tokens": out == think_out})
    # think again after them: the faster of its two runs is the reference (a machine's clocks and caches settle)
    think_again_s, _, _ = run()
    think_best = min(think_s, think_again_s)
    for r in rows:
        r["vs_think"] = think_best / r.pop("seconds")
    return [{"what": "think", "k": 0, "tok_per_s": len(ids) * n / think_best,
             "think_runs_tok_per_s": [len(ids) * n / think_s, len(ids) * n / think_again_s]}] + rows


CHECKPOINT_COLUMNS = [("what", "decode", ""), ("k", "k", "d"), ("tok_per_s", "tok/s", ",.1f"), ("vs_think", "x think", ".2f"),
                      ("acceptance", "acceptance", ".3f"), ("same_tokens", "tokens = think", "")]


def speculate_targets(rows):
    """The speculative decoding issue's targets, per context: >= 1.5x think where acceptance allows (the best k),
    never below 0.95x think with the fallback on; think's memory-bandwidth utilisation >= 50% at context 1024."""
    from scripts.bench_common import target
    out = []
    for L in sorted({r["context"] for r in rows}):
        at = [r for r in rows if r["context"] == L]
        spec = [r for r in at if r["k"] and "fallback" not in r["what"]]
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
           ("GB_per_step", "GB/step", ".3f"), ("mbu", "MBU", ".1%")] + [(f"tok_s_at_{a}", f"tok/s at {a}", ",.0f") for a in ACCEPTANCES]

"""
The speculative generation loop (Engine.generate(..., speculate=k)): rounds of speculative.Speculator, plain steps
where they serve better (the probes, the last token, after the fallback), the fallback's judgement and the engine's
memory of it. Rounds are pipelined on the static path: the device works on the next round (exit drafts: the whole
of it; plan drafts: its first draft step) while the host reads this one's tokens and hands them out.
"""
import time
from dataclasses import replace

import torch

from nanochat.engine_state import TokenStep, start_host_copy
from nanochat.layers import sample_next_token
from nanochat.speculative import Speculator
from nanochat.speculative_rules import Draft, SpecStats, SpecMemory, PROBE_STEPS, JUDGE_ROUNDS, RETRY_OVERHEAD, \
    retry_share

def generate(engine, prompts, max_tokens, speculate, draft, temperature=0.0, top_k=None, seed=42, stop_tokens=(),
             fallback=True):
    """Engine.generate(..., speculate=k, draft=...) for a hybrid model: yields TokenStep per generated position,
    the tokens and logits mode think gives. engine.spec_stats holds what speculation did. Every round drafts k
    (one shape for the CUDA graphs; tokens past max_tokens are dropped); a last single token is a plain step (unless
    a round queued ahead, below, gives it).
    Plain steps are pipelined as Engine.generate's think loop is (the next step is queued before the host waits
    for this token), and a plan draft does not step with them: it catches up on the tokens it missed before its
    next round (not charged to that round's time). With fallback, the first PROBE_STEPS decode tokens are plain, and the time from one resumption of
    this generator to the next (what the caller sees per token, its own work included) is the yardstick: the
    faster of the second and third probes (the first may capture graphs; after the last no step is queued).
    Rounds are timed the same way, from the resumption before the round to the one after its last token. Once
    JUDGE_ROUNDS rounds that captured no CUDA graphs have run, speculation stops for the rest of the generation
    when the last (up to three) of them gave tokens slower than the yardstick (from then on the draft is not
    stepped). The engine remembers it (SpecMemory): its next generations with this draft, k and batch size are plain
    think generations (Engine.generate's own loop, timed as the caller sees them), until their time reaches what the
    attempt lost / the retry share (RETRY_OVERHEAD, halved for each retry in a row that fell back again:
    speculative_rules.retry_share); the next one speculates again and is judged afresh (a retry too short to be judged
    leaves the memory as it was). What an attempt lost: the whole generation's time against a plain generation of as
    many tokens (the remembered ones' mean time to the first token + their mean time per later token), which counts
    the draft's prefill, the probes and the rounds; for the first attempt, with no plain generation to compare, what
    its rounds lost against the probes' plain steps. Retries so cost about RETRY_OVERHEAD of the plain decoding
    between them, and less once retries have fallen back in a row. On the static path an exit draft's next round
    is queued whole before this round's read (Speculator.queue_ahead) whenever the generation needs tokens after
    this round's last; a round so queued is always read and handed out (it has moved the verifier's caches), also
    when the fallback stops speculating after the round before it; only a stop token or max_tokens leaves it unread,
    as think's loop leaves its one step too many. A plan draft's next round has its first draft queued before this
    round's tokens are handed out; one that the fallback's decision leaves unfinished is dropped
    (Speculator.abandon): its draft step changed nothing the plain steps read."""
    model = engine.model
    c = model.config
    if engine.dense:
        raise ValueError("speculative decoding drafts with the model's own narrow widths or early exits: a dense GPT "
                         "checkpoint has neither")
    if speculate < 1:
        raise ValueError(f"speculate must be >= 1 drafted tokens per round, got {speculate}")
    if not isinstance(draft, Draft):
        draft = Draft.parse(draft, c.n_layer)
    name = f"plan:{draft.plan}" if draft.kind == "plan" else f"exit:{draft.exit_block}"
    memo_key = (name, speculate, len(prompts))
    memo = engine.spec_memory.get(memo_key)  # a SpecMemory where an earlier attempt measured slower
    t0, first, tokens = time.perf_counter(), None, 0  # this generation's time as the caller sees it, its tokens
    if fallback and memo is not None and memo.plain_s < memo.need_s:
        # remembered: plain think decoding, the engine's own pipelined loop (no draft, no probes, no per-token sync)
        engine.spec_stats = SpecStats(k=speculate, draft=name, fell_back_at=0, remembered=True,
                                      retry_after=1 / retry_share(memo.failures))
        try:
            for ts in engine.generate(prompts, max_tokens, "think", temperature=temperature, top_k=top_k, seed=seed,
                                      stop_tokens=stop_tokens):
                first, tokens = time.perf_counter() - t0 if first is None else first, tokens + 1
                yield ts
        finally:
            memo.add_plain(first or 0.0, time.perf_counter() - t0, max(0, tokens - 1))
        return
    engine.spec_memory.pop(memo_key, None)  # a retry (memo given) speculates and is judged afresh
    engine.spec_stats = SpecStats(k=speculate, draft=name)
    try:
        for ts in _speculate(engine, prompts, max_tokens, speculate, draft, name, temperature, top_k, seed,
                             stop_tokens, fallback, memo_key):
            tokens += 1
            yield ts
    finally:
        new = engine.spec_memory.get(memo_key)
        if memo is not None and not engine.spec_stats.judged and new is None:
            engine.spec_memory[memo_key] = memo  # not judged: the next generation retries
        elif memo is not None and new is not None and memo.generations:  # a retry that fell back: priced whole,
            lost = time.perf_counter() - t0 - memo.plain_cost(max(0, tokens - 1))  # the plain prices kept, and the
            failures = memo.failures + 1  # share of the decode time the next retries may cost halved
            engine.spec_memory[memo_key] = replace(memo, plain_s=0.0, failures=failures,
                                                   need_s=max(new.need_s * RETRY_OVERHEAD, lost) / retry_share(failures))


def _speculate(engine, prompts, max_tokens, speculate, draft, name, temperature, top_k, seed, stop_tokens, fallback,
               memo_key):
    """generate()'s speculative generation (see there)."""
    model = engine.model
    c = model.config
    dev = model.get_device()
    cuda = dev.type == "cuda"
    ids = torch.tensor(prompts, dtype=torch.long, device=dev)
    B, T = ids.shape
    rng = torch.Generator(device=dev).manual_seed(seed) if temperature > 0 else None
    max_len = T + max_tokens + 2 * (speculate + 1)  # room for a round queued ahead of one that ends near max_tokens
    st, logits, flops, full = engine.prefill(ids, "think", max_len=max_len)
    engine.state = st
    spec = Speculator(engine, st, ids, draft, speculate, temperature, top_k, rng, max_len)
    stats = engine.spec_stats

    def n_graphs():  # CUDA graphs captured so far on the verifier's and the draft's workspaces
        return len(st.ws.graphs) + (len(spec.dst.ws.graphs) if spec.dst is not None else 0)
    n, stop = c.n_layer, torch.tensor(sorted(stop_tokens), dtype=torch.long)
    widths = torch.full((B, n), c.n_embd, dtype=torch.long)
    no_exit, no_wide = torch.full((B,), n - 1, dtype=torch.long), torch.zeros(B, dtype=torch.bool)

    def step(tok, lg, fl, pos, source):
        """The TokenStep of a token read from the logits at input position pos (its context: pos + 1 positions)."""
        full = torch.full((B,), float(engine.flops.forward(pos + 1)), dtype=torch.float64)
        return TokenStep(tok.tolist(), lg.float(), no_exit, widths, no_wide, fl, full, source)

    tok = sample_next_token(logits, rng, temperature, top_k)
    yield TokenStep(tok.tolist(), logits.float(), no_exit, st.prompt_widths.clone(), no_wide, flops + spec.dflops, full,
                    "prompt")
    mark = time.perf_counter()  # when this generator last resumed after a yield
    emitted, done = 1, torch.isin(tok.cpu(), stop)
    speculating, plain_steps = True, 0
    owed = []  # tokens the verifier consumed in plain steps that a plan draft has not (it catches up before a round)
    pending = None  # a plain step already queued on tok: (position, logits, FLOPs)
    host_tok = torch.empty(B, dtype=torch.long, pin_memory=cuda)
    returned = None  # when the last round returned, until a plain step intervenes

    def plain_next(e=None):  # whether the token after e emitted ones (default: so far) comes from a plain step
        e = emitted if e is None else e
        return not speculating or max_tokens - e < 2 or (fallback and plain_steps < PROBE_STEPS)

    def queue_plain(tok):
        if speculating and spec.dst is not None:
            owed.append(tok)
        pos = st.pos
        return (pos,) + spec.plain_step(tok)

    early = None  # (position, graphs) of a round begun before the last one's tokens were handed out
    ahead = None  # (queued round, whether it captured graphs): queued whole before the last round's read
    while emitted < max_tokens and not bool(done.all()):
        if ahead is None and plain_next():
            pos, lg, fl = pending if pending is not None else queue_plain(tok)
            pending, returned = None, None
            probing = fallback and speculating and plain_steps < PROBE_STEPS
            tok = sample_next_token(lg, rng, temperature, top_k)
            copied = start_host_copy(tok, host_tok)
            emitted, plain_steps = emitted + 1, plain_steps + 1
            if emitted < max_tokens and plain_next():  # pipelined: the device runs the next step while the host waits
                pending = queue_plain(tok)
            queued = pending is not None
            if copied is not None:
                copied.synchronize()
            yield step(host_tok, lg, fl, pos, "decode")
            now = time.perf_counter()
            if probing and plain_steps > 1 and queued:  # steady pipelining: not the first (graphs may be captured,
                # nothing was queued before it) nor the last (the round's work follows it, not a queued step)
                stats.think_step_s = now - mark if stats.think_step_s is None else min(now - mark, stats.think_step_s)
            mark = now
            done = done | torch.isin(host_tok, stop)
            continue
        caught_up = []
        if ahead is not None:  # queued while the last round was read: it begins where that one ended
            (q, captured), ahead, pos = ahead, None, st.pos
        else:
            if early is not None:  # its first draft ran while the last round's tokens were handed out
                (pos, graphs), early = early, None
            else:
                caught_up = [engine.step(spec.dst, t)[4] for t in owed]  # the plan draft consumes what the verifier did
                if owed:
                    owed.clear()
                    mark = time.perf_counter()  # a one-off per plain stretch: not charged to the round judged
                pos, graphs = st.pos, n_graphs()
                if returned is not None:  # the GPU waits through this (the round's one device read came before it)
                    stats.between_s += time.perf_counter() - returned
                    stats.betweens += 1
                spec.begin(tok, speculate)
            q = spec.queue()
            captured = n_graphs() > graphs
        if speculating and emitted + speculate + 1 < max_tokens and spec.can_run_ahead(B, speculate):  # wanted
            # whatever this round accepts (a round near the end begins after the read: none is queued in vain)
            graphs = n_graphs()
            ahead = (spec.queue_ahead(q), n_graphs() > graphs)
            stats.ahead += 1
        tokens, lg, fl, m, tok = spec.collect(q)
        returned = time.perf_counter()
        fl = fl + sum(caught_up)
        out, done_after = 0, done  # the round's tokens that are handed out: known before the first is
        while out <= m and emitted + out < max_tokens and not bool(done_after.all()):
            done_after, out = done_after | torch.isin(tokens[:, out], stop), out + 1
        if (ahead is None and emitted + out < max_tokens and not bool(done_after.all())
                and not plain_next(emitted + out) and spec.can_begin_early(B, speculate)):  # the next round's first
            stats.between_s += time.perf_counter() - returned  # draft, queued now: the device drafts while the host
            stats.betweens += 1  # hands out these tokens
            early = (st.pos, n_graphs())
            spec.begin(tok, speculate, early=True)
        for i in range(out):
            yield step(tokens[:, i], lg[:, i], fl / (m + 1), pos + i, "speculative")
            emitted, done = emitted + 1, done | torch.isin(tokens[:, i], stop)
            stats.emitted += 1
        now = time.perf_counter()
        stats.round_log.append((out, now - mark, captured))
        mark = now
        recent = [(n_, t_) for n_, t_, c_ in stats.round_log if not c_][-3:]
        if fallback and speculating and len(recent) >= JUDGE_ROUNDS and stats.think_step_s is not None:
            stats.judged = True
            if sum(n_ for n_, _ in recent) * stats.think_step_s < sum(t_ for _, t_ in recent):
                stats.fell_back_at, speculating = emitted, False  # its tokens came slower than plain steps
                # what this generation's rounds lost against plain steps (graph captures included): a retry waits
                # for 1 / RETRY_OVERHEAD times that much plain decoding (generate() prices a retry's loss whole)
                lost = sum(t_ - n_ * stats.think_step_s for n_, t_, _ in stats.round_log)
                engine.spec_memory[memo_key] = SpecMemory(max(0.0, lost) / RETRY_OVERHEAD)
                if early is not None:  # the round begun early is dropped: it changed nothing plain steps read
                    early = spec.abandon()  # (one queued ahead is read and handed out first: it moved the caches)

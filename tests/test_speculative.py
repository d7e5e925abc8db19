"""Self-speculative decoding (nanochat/speculative.py): greedy output is mode think's token for token, the sampling
rule gives think's distribution exactly, and rollback returns KV and Mamba states to those of plain decoding."""
import pytest
import torch

from nanochat.engine import Engine
from nanochat.engine_static import StaticDecode
from nanochat.layers import token_probs
from nanochat.speculative import rollback, Speculator
from nanochat.speculative_rules import Draft, accept, accept_prob, residual, retry_share, JUDGE_ROUNDS, PROBE_STEPS, \
    RETRY_HALVINGS, RETRY_OVERHEAD

from engine_testutil import HAS_MAMBA, HAS_MOE, build

KINDS = [dict(layer_pattern="A")]
if HAS_MAMBA:
    KINDS += [dict(layer_pattern="AM"), dict(layer_pattern="MA", mamba_version=2)]
if HAS_MOE:
    KINDS += [dict(layer_pattern="AM" if HAS_MAMBA else "A", ffn_pattern="ED", capacity_factor=1.0)]
# a draft plan that agrees with the full model part of the time (only the last block narrow), and early exits
DRAFTS = [(d, k) for d in ("plan:64,64,64,32", "exit:1") for k in (1, 3, 6)] + [("plan:48", 3), ("exit:2", 3)]
PROMPTS = [[[3, 1, 4, 1, 5, 9]], [[2, 7, 1, 8, 2, 8], [9, 9, 8, 7, 1, 4], [5, 5, 5, 5, 5, 5]]]


def kind_id(k):
    return "-".join(f"{v}" for v in k.values())


@pytest.mark.parametrize("kind", KINDS, ids=kind_id)
def test_greedy_speculation_is_think_token_for_token(kind):
    model = build(**kind).eval()
    eng = Engine(model, decode="eager")
    seen_partial = False
    for prompts in PROMPTS:
        ref = eng.generate_batch(prompts, 12)
        for draft, k in DRAFTS:
            res = eng.generate_batch(prompts, 12, speculate=k, draft=draft, fallback=False)
            assert res.tokens == ref.tokens, (draft, k)
            for a, b in zip(res.steps, ref.steps):  # each token read from think's logits
                torch.testing.assert_close(a.logits, b.logits, rtol=0, atol=1e-4)
            stats = eng.spec_stats
            assert stats.rounds > 0 and stats.emitted >= 10  # of 11 decode tokens (the last may be a plain step)
            seen_partial |= any(0 < m < k for m in stats.accepted_hist)
    assert seen_partial  # rollback to the middle of a round was exercised, not only all-or-nothing


@pytest.mark.parametrize("kind", KINDS, ids=kind_id)
@pytest.mark.parametrize("draft", ["plan:64,64,64,32", "exit:1"])
def test_static_rounds_equal_eager_think(kind, draft, monkeypatch):
    """decode='static': the drafts and the verify pass run the static functions a CUDA graph captures (a plan draft
    steps its own static segments; an exit draft's blocks and the verify pass run over StaticVerifyCache); tokens and
    logits are think's, and the rounds took the static path. Every round after the first is queued whole before the
    last one's read (an exit draft: Speculator.queue_ahead) or begins early (a plan draft: its first draft queued
    before the last round's tokens are handed out), batch 1 and 3."""
    monkeypatch.setattr(StaticDecode, "STATIC_MIN_KEYS", 8)  # cross key buckets within 20 tokens
    model = build(**kind).eval()
    eng = Engine(model, decode="static")
    calls, begins = [], []
    real, real_exit, real_begin = Speculator._verify_static, Speculator._exit_static, Speculator.begin
    monkeypatch.setattr(Speculator, "_verify_static", lambda self, *a: calls.append("verify") or real(self, *a))
    monkeypatch.setattr(Speculator, "_exit_static",
                        lambda self, *a, **kw: calls.append("exit") or real_exit(self, *a, **kw))
    monkeypatch.setattr(Speculator, "begin", lambda self, t0, k, early=False, ahead=False:
                        begins.append("ahead" if ahead else "early" if early else "after")
                        or real_begin(self, t0, k, early, ahead))
    for prompts, ks in (([[2, 7, 1, 8]], (1, 4, 4)), ([[2, 7, 1, 8], [9, 9, 8, 7], [5, 5, 5, 5]], (3,))):
        ref = Engine(model, decode="eager").generate_batch(prompts, 20)
        for k in ks:
            begins.clear()
            res = eng.generate_batch(prompts, 20, speculate=k, draft=draft, fallback=False)
            assert res.tokens == ref.tokens
            for a, b in zip(res.steps, ref.steps):
                torch.testing.assert_close(a.logits, b.logits, rtol=0, atol=1e-4)
            stats = eng.spec_stats
            later = "ahead" if draft.startswith("exit") else "early"
            assert begins[0] == "after" and len(begins) == stats.rounds  # no round queued and left unread
            assert stats.ahead == begins.count("ahead")
            # an exit draft's round is queued ahead when the generation needs tokens past the last round's k+1;
            # later ones (each gives at least one token: at most k+1) begin early, as a plan draft's do
            assert set(begins[1:]) <= {later, "early"}, begins
            assert len(begins) - 1 - begins.count(later) <= (k + 1 if later == "ahead" else 0), begins
    assert "verify" in calls and ("exit" in calls) == draft.startswith("exit")  # the rounds ran static


@pytest.mark.parametrize("draft", ["plan:64,64,64,32", "exit:1"])
def test_static_rounds_count_the_eager_rounds_flops(draft, monkeypatch):
    """The FLOPs each token of a speculative generation reports are the same whether its rounds ran the static
    functions (the host's account of an exit draft's positions made at once, in collect) or the eager ones (counted
    as they run), with the same rounds accepted."""
    monkeypatch.setattr(StaticDecode, "STATIC_MIN_KEYS", 8)
    model = build(layer_pattern="AM" if HAS_MAMBA else "A").eval()
    runs = {}
    for path in ("eager", "static"):
        eng = Engine(model, decode=path)
        res = eng.generate_batch([[2, 7, 1, 8], [9, 9, 8, 7]], 14, speculate=3, draft=draft, fallback=False)
        runs[path] = ([s.flops.tolist() for s in res.steps], list(eng.spec_stats.accepted_hist), res.tokens)
    assert runs["static"][1:] == runs["eager"][1:] and runs["static"][1]  # the same rounds and tokens
    assert runs["static"][0] == runs["eager"][0]


@pytest.mark.parametrize("draft", ["plan:64,64,64,32", "exit:1"])
def test_a_stop_token_ends_speculation_and_the_next_generation_is_thinks(draft, monkeypatch):
    """A stop token inside a round ends the generation there (think's tokens up to it), also when the next round was
    already queued ahead (static path, exit draft) and is left unread, as think's loop leaves its one step too many;
    the engine's next generation, on the same workspace and buffers, is think's token for token."""
    monkeypatch.setattr(StaticDecode, "STATIC_MIN_KEYS", 8)
    model = build(layer_pattern="AM" if HAS_MAMBA else "A").eval()
    prompts = [[2, 7, 1, 8]]
    ref = Engine(model, decode="eager").generate_batch(prompts, 20)
    eng = Engine(model, decode="static")
    stop = ref.tokens[0][9]
    cut = ref.tokens[0].index(stop)
    res = eng.generate_batch(prompts, 20, stop_tokens=(stop,), speculate=3, draft=draft, fallback=False)
    assert res.tokens == [ref.tokens[0][:cut]] and len(res.steps) == cut + 1  # the stop token's step is the last
    assert eng.spec_stats.ahead > 0 or draft.startswith("plan")
    again = eng.generate_batch(prompts, 20, speculate=3, draft=draft, fallback=False)
    assert again.tokens == ref.tokens
    for a, b in zip(again.steps, ref.steps):
        torch.testing.assert_close(a.logits, b.logits, rtol=0, atol=1e-4)


@pytest.mark.parametrize("draft", ["plan:64,64,64,32", "exit:1"])
def test_a_fallback_drops_a_round_begun_early(draft, monkeypatch):
    """On the static path, a clock on which rounds cost 10 s and plain steps 1 s: the fallback judges after the
    second round, whose successor is under way. A plan draft's has begun early (its first draft step queued): it is
    dropped and plain steps follow from the verifier's state, which that draft step left alone. An exit draft's was
    queued whole (it moved the verifier's caches): it is read and handed out, then plain steps follow. Either way
    the tokens stay think's."""
    import nanochat.speculative as spec_mod
    model = build(layer_pattern="AM" if HAS_MAMBA else "A").eval()
    ref = Engine(model, decode="eager").generate_batch([[3, 1, 4]], 24)
    eng = Engine(model, decode="static")
    clock = {"t": 0.0}
    monkeypatch.setattr(spec_mod.time, "perf_counter", lambda: clock["t"])
    real_collect, real_step, real_abandon = Speculator.collect, Engine.step, Speculator.abandon
    dropped = []

    def collect(self, q):
        clock["t"] += 10.0
        return real_collect(self, q)

    def step(self, st, tokens, plan=None):
        clock["t"] += 1.0
        return real_step(self, st, tokens, plan)
    monkeypatch.setattr(Speculator, "collect", collect)
    monkeypatch.setattr(Engine, "step", step)
    monkeypatch.setattr(Speculator, "abandon", lambda self: dropped.append(self._r.pos) or real_abandon(self))
    res = eng.generate_batch([[3, 1, 4]], 24, speculate=3, draft=draft, fallback=True)
    stats = eng.spec_stats
    queued = draft.startswith("exit")  # the round after the judged one was queued whole, so it is read
    assert stats.fell_back_at is not None and stats.rounds == JUDGE_ROUNDS + queued and len(dropped) == 1 - queued
    assert stats.ahead == queued * JUDGE_ROUNDS and len(stats.round_log) == stats.rounds
    assert res.tokens == ref.tokens
    for a, b in zip(res.steps, ref.steps):  # the plain steps after the drop read the states think's did
        torch.testing.assert_close(a.logits, b.logits, rtol=0, atol=1e-5)


def test_a_round_begun_before_the_weights_changed_drafts_again(monkeypatch):
    """Weights written between begin() and finish() (while the generator hands out tokens): when finish()'s check
    finds the graphs stale (StaticDecode.refresh True, as on CUDA after such a write), an exit draft's first step
    runs again, so the verifier reads blocks 0..N of position 0 as the new weights give them: the round equals one
    begun after the write. Off CUDA no graph is stale (refresh False), so the check is made to report it here."""
    monkeypatch.setattr(StaticDecode, "STATIC_MIN_KEYS", 8)
    model = build(layer_pattern="AM" if HAS_MAMBA else "A").eval()
    prompts, k, t0 = torch.tensor([[2, 7, 1, 8]]), 3, torch.tensor([5])
    w = model.transformer.h[0].attn.c_v.weight  # block 0's values at position 0: what every later query reads
    old = w.detach().clone()
    new = old + 0.5 * torch.randn(old.shape, generator=torch.Generator().manual_seed(1))

    def round_(write_between):
        eng = Engine(model, decode="static")
        st, _, _, _ = eng.prefill(prompts, "think", max_len=32)
        eng.spec_stats = type("S", (), {"rounds": 0, "drafted": 0, "accepted": 0, "accepted_hist": [],
                                        "draft_s": 0.0, "verify_s": 0.0})()
        spec = Speculator(eng, st, prompts, Draft.parse("exit:1", model.config.n_layer), k, 0.0, None, None, 32)
        stale = []
        monkeypatch.setattr(StaticDecode, "refresh", lambda self, ws: bool(stale and stale.pop()))
        with torch.no_grad():
            if not write_between:
                w.copy_(new)
            spec.begin(t0, k)
            if write_between:
                w.copy_(new)
                stale.append(True)  # the write the graphs' version check would find
        tokens, logits, _, m, _ = spec.finish()
        with torch.no_grad():
            w.copy_(old)
        return tokens, logits, {j: [t.clone() for t in s] for j, s in st.ssm.items()}
    a, b = round_(True), round_(False)
    assert a[0].tolist() == b[0].tolist()
    torch.testing.assert_close(a[1], b[1], rtol=0, atol=1e-6)
    for j in a[2]:
        for x, y in zip(a[2][j], b[2][j]):
            torch.testing.assert_close(x, y, rtol=0, atol=1e-6)


def test_sampled_acceptance_keeps_drafts_past_m_and_draws_the_rest_on_the_device():
    """accept() with sampling, on distributions sure of one token each (so its draws are determined): m is the
    batch's shortest accepted prefix; a row that accepted past m keeps its draft there, a row rejected at m draws
    from the residual; with every draft accepted, the bonus comes from v_k. m stays a device tensor (no host read)."""
    V, k = 6, 3

    def sure(tokens):  # (B, T) -> logits with all the mass on these tokens
        return torch.full((*tokens.shape, V), -60.0).scatter_(-1, tokens[..., None], 60.0)
    d = torch.tensor([[1, 2, 3], [1, 2, 3]])
    q = token_probs(sure(d).view(-1, V), 1.0, None).view(2, k, V)
    v = sure(torch.tensor([[1, 2, 3, 5], [1, 4, 3, 0]]))  # row 0 takes every draft; row 1 wants 4 at position 1
    g = torch.Generator().manual_seed(0)
    m, nxt = accept(v, d, q, 1.0, None, g)
    assert isinstance(m, torch.Tensor) and m.dim() == 0
    assert int(m) == 1 and nxt.tolist() == [2, 4]  # row 0 keeps its draft at 1; row 1 draws the residual there
    m, nxt = accept(v[:1], d[:1], q[:1], 1.0, None, g)
    assert int(m) == 3 and nxt.tolist() == [5]  # all accepted: the bonus, from v_k


def test_compiled_rounds_equal_eager_think(monkeypatch):
    """decode='compiled': the rounds' static functions (the exit draft's blocks, the verify pass) run through
    torch.compile (aot_eager here: no compiler toolchain needed), as the engine's own segments; tokens and logits are
    think's, and every frame dynamo saw compiled (none left to run uncompiled)."""
    from torch._dynamo.utils import counters
    monkeypatch.setattr(StaticDecode, "STATIC_MIN_KEYS", 8)
    model = build(**KINDS[-1]).eval()
    ref = Engine(model, decode="eager").generate_batch([[2, 7, 1, 8]], 20)
    eng = Engine(model, decode="compiled", compile_backend="aot_eager")
    compiled = []
    real = StaticDecode.compiled
    monkeypatch.setattr(StaticDecode, "compiled", lambda self, fn: compiled.append(getattr(fn, "__name__", "")) or real(self, fn))
    counters.clear()
    for _ in range(2):  # the second generation replays what the first compiled
        res = eng.generate_batch([[2, 7, 1, 8]], 20, speculate=3, draft="exit:1", fallback=False)
        assert res.tokens == ref.tokens
        for a, b in zip(res.steps, ref.steps):
            torch.testing.assert_close(a.logits, b.logits, rtol=0, atol=1e-4)
    assert "<lambda>" in compiled  # the rounds' functions went through torch.compile
    assert counters["frames"]["ok"] == counters["frames"]["total"] > 0


def test_exit_draft_compiles_once_for_every_position(monkeypatch):
    """decode='compiled': an exit draft's blocks compile once per key bucket for the k readout positions (the
    position is a device index, not a constant dynamo would specialise on) and once for position k (no readout),
    beside one verify pass, and the rollback once for every accepted count: at d20, each compile of blocks is a
    minute under decode='tuned'."""
    torch._dynamo.reset()  # compiles counted from nothing (earlier tests compiled the same functions)
    monkeypatch.setattr(StaticDecode, "STATIC_MIN_KEYS", 8)
    model = build(**KINDS[-1]).eval()
    ref = Engine(model, decode="eager").generate_batch([[2, 7, 1, 8]], 20)
    graphs, keys = [], []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward
    real = Speculator._run

    def run(self, key, fn):
        before = len(graphs)
        out = real(self, key, fn)
        keys.extend([key] * (len(graphs) - before))
        return out
    monkeypatch.setattr(Speculator, "_run", run)
    eng = Engine(model, decode="compiled", compile_backend=backend)
    res = eng.generate_batch([[2, 7, 1, 8]], 20, speculate=4, draft="exit:1", fallback=False)
    assert res.tokens == ref.tokens
    rollbacks = [key for key in keys if key[0] == "rollback"]
    assert len(rollbacks) == 1  # the accepted count is a device index too: one rollback for every round
    assert len(set(eng.spec_stats.accepted_hist)) > 1  # ... of rounds that accepted different counts
    buckets = {key[-1] for key in keys if key[0] != "rollback"}
    assert len(buckets) == 2  # positions 5.. in bucket 16, then the cache's end (29)
    for L in buckets:
        got = sorted((key[0], key[3]) for key in keys if key[0] != "rollback" and key[-1] == L)
        assert got == [("exit", 0), ("exit", 4), ("verify", 2)], (L, got)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kind", KINDS, ids=kind_id)
@pytest.mark.parametrize("draft", ["plan:64,64,64,32", "exit:1"])
@pytest.mark.parametrize("decode", ["graph", "compiled"])
def test_graph_speculation_equals_eager_on_cuda(kind, draft, decode, monkeypatch):
    """On CUDA (decode='graph', and 'compiled': inductor's segments captured as graphs, the exit draft's position a
    device index inside them): the drafts' steps and the verify pass replay CUDA graphs; tokens and logits are the
    eager think's (fp32). An exit draft's rounds are queued ahead of the last one's read (the device runs a round
    while the host reads the one before)."""
    monkeypatch.setattr(StaticDecode, "STATIC_MIN_KEYS", 8)
    model = build(**kind).cuda().eval()
    ref = Engine(model, decode="eager").generate_batch([[2, 7, 1, 8], [3, 3, 1, 2]], 20)
    eng = Engine(model, decode=decode)
    for k in (1, 4, 4):  # a second generate() with k = 4 replays the graphs the first captured
        res = eng.generate_batch([[2, 7, 1, 8], [3, 3, 1, 2]], 20, speculate=k, draft=draft, fallback=False)
        assert res.tokens == ref.tokens
        for a, b in zip(res.steps, ref.steps):
            torch.testing.assert_close(a.logits, b.logits, rtol=0, atol=1e-4)
        assert (eng.spec_stats.ahead > 0) == draft.startswith("exit")
    assert any(key[0] == "verify" for key in eng.state.ws.graphs)


@pytest.mark.parametrize("kind", KINDS, ids=kind_id)
@pytest.mark.parametrize("draft", ["plan:64,64,64,32", "exit:1"])
def test_rollback_gives_plain_decodings_states(kind, draft):
    """After a round that accepted m of k drafts, the verifier's cache and Mamba states are those of decoding the m+1
    tokens it consumed plainly (and so is a plain draft's own state). Tolerance 1e-5: the verify pass multiplies k+1
    rows where plain decoding multiplies one, so fp32 sums are taken in another order; the first block's Mamba
    states, whose inputs are the embeddings in both, within 1e-6 (only its in_proj sums in another order: the
    projections of MambaMixer.steps take the k+1 positions at once)."""
    torch.manual_seed(0)
    model = build(**kind).eval()
    prompts = torch.tensor([[2, 7, 1, 8, 2, 8], [9, 9, 8, 7, 1, 4]])
    k = 5
    for trial in range(6):
        eng = Engine(model, decode="eager")
        st, logits, _, _ = eng.prefill(prompts, "think", max_len=32)
        spec = Speculator(eng, st, prompts, Draft.parse(draft, model.config.n_layer), k, 0.0, None, None, 32)
        eng.spec_stats = type("S", (), {"rounds": 0, "drafted": 0, "accepted": 0, "accepted_hist": [],
                                        "draft_s": 0.0, "verify_s": 0.0})()
        t0 = torch.randint(0, model.config.vocab_size, (2,), generator=torch.Generator().manual_seed(trial))
        pos = st.pos
        tokens, _, _, m, _ = spec.round(t0, k)
        consumed = torch.cat([t0[:, None], tokens[:, :m]], 1)  # t0, d1 .. dm
        plain = Engine(model, decode="eager")
        ps, _, _, _ = plain.prefill(prompts, "think", max_len=32)
        for i in range(m + 1):
            plain.step(ps, consumed[:, i])
        assert st.pos == ps.pos == pos + m + 1
        for j in st.cache.layers:
            for a, b in ((st.cache.k[j], ps.cache.k[j]), (st.cache.v[j], ps.cache.v[j])):
                torch.testing.assert_close(a[:, :, :st.pos], b[:, :, :ps.pos], rtol=1e-5, atol=1e-5)
            assert st.cache.stored[j] == ps.cache.stored[j]
        for j in st.ssm:
            for a, b in zip(st.ssm[j], ps.ssm[j]):
                tol = 1e-6 if j == 0 else 1e-5
                torch.testing.assert_close(a, b, rtol=tol, atol=tol)
        if spec.dst is not None:  # the plan draft's own state: its plan's plain decoding of the same tokens
            ds, _, _, _ = plain.prefill(prompts, spec.draft.plan, max_len=32, slot="draft")
            for i in range(m + 1):
                plain.step(ds, consumed[:, i])
            assert spec.dst.pos == ds.pos
            for j in ds.ssm:
                for a, b in zip(spec.dst.ssm[j], ds.ssm[j]):
                    torch.testing.assert_close(a, b, rtol=0, atol=0)  # the draft's own steps: the same calls


def test_rollback_restores_the_kept_states():
    model = build(layer_pattern="AM" if HAS_MAMBA else "A").eval()
    eng = Engine(model, decode="eager")
    st, _, _, _ = eng.prefill(torch.tensor([[1, 2, 3]]), "think", max_len=16)
    saved = {j: [(torch.full_like(c, float(i)), torch.full_like(s, -float(i))) for i in range(4)]
             for j, (c, s) in st.ssm.items()}
    st.pos = 7
    with torch.inference_mode():
        rollback(st, 3, saved, 2)
    assert st.pos == 5 and all(s == min(old, 5) for j in st.cache.layers for s, old in zip(st.cache.stored[j], [3]))
    for j, (c, s) in st.ssm.items():
        assert bool((c == 1).all()) and bool((s == -1).all())


def test_the_sampling_rule_gives_thinks_distribution_exactly():
    """P(first token = x) under speculation = q(x) a(x) + (1 - sum_y q(y) a(y)) r(x) with a = accept_prob and
    r = residual: computed, it equals p, for drafts that over- and under-shoot p, overlap it partly or not at all."""
    g = torch.Generator().manual_seed(0)
    V = 11
    cases = [(torch.randn(V, generator=g) * s, torch.randn(V, generator=g) * s) for s in (0.5, 2.0, 6.0)]
    cases.append((torch.randn(V, generator=g), None))  # q == p: nothing is ever rejected
    for lp, lq in cases:
        p = token_probs(lp[None], 0.8, None)[0].double()
        q = p.clone() if lq is None else token_probs(lq[None], 1.3, 5)[0].double()  # top-5 draft: zeros in q
        p, q = p / p.sum(), q / q.sum()  # sums of exactly 1 in float64
        a = torch.where(q > 0, accept_prob(p, q.clamp(min=1e-300)), torch.zeros_like(p))
        out = q * a + (1 - (q * a).sum()) * residual(p, q)
        torch.testing.assert_close(out, p, rtol=0, atol=1e-12)


def test_accept_counts_leading_agreement_per_batch():
    V = 7
    d = torch.tensor([[1, 2, 3], [1, 2, 4]])
    v = torch.full((2, 4, V), -5.0)
    for b, seq in enumerate([[1, 2, 3, 6], [1, 5, 0, 0]]):  # row 0 agrees on all 3, row 1 on the first only
        for i, t in enumerate(seq):
            v[b, i, t] = 5.0
    m, nxt = accept(v, d, None, 0.0, None, None)
    assert int(m) == 1 and nxt.tolist() == [2, 5]  # the batch keeps the shortest agreement; row 0's next is its draft
    m, nxt = accept(v[:1], d[:1], None, 0.0, None, None)
    assert int(m) == 3 and nxt.tolist() == [6]  # all accepted: the bonus token


@pytest.mark.parametrize("decode", ["eager", "static"])
def test_sampled_speculation_runs_and_stays_in_vocab(decode):
    model = build(layer_pattern="AM" if HAS_MAMBA else "A").eval()
    eng = Engine(model, decode=decode)
    runs = [eng.generate_batch([[3, 1, 4], [1, 5, 9]], 12, speculate=3, draft="exit:1", temperature=1.0, top_k=20,
                               fallback=False) for _ in range(2)]
    res = runs[0]
    assert all(len(t) == 12 and all(0 <= x < model.config.vocab_size for x in t) for t in res.tokens)
    assert runs[1].tokens == res.tokens  # the seed fixes the draws (rounds begun early or ahead draw in the same order)
    st = eng.spec_stats
    # no plain step between the rounds: each began after the last one's read or was queued ahead of it (static)
    assert st.rounds > 1 and st.betweens + st.ahead == st.rounds - 1 and (st.ahead > 0) == (decode != "eager")
    assert ("of host time between rounds" in st.summary()) == (st.betweens > 0 and st.between_s > 0)
    assert ("queued ahead" in st.summary()) == (st.ahead > 0)


def test_draft_specs_and_refusals():
    assert Draft.parse("ghost", 4) == Draft("plan", plan="ghost")
    assert Draft.parse("plan:32", 4) == Draft("plan", plan=32)
    assert Draft.parse("plan:16,32,64,64", 4).plan == [16, 32, 64, 64]
    assert Draft.parse("exit:2", 4) == Draft("exit", exit_block=2)
    for bad in ("exit:3", "exit:x", "plan:auto", "think", "plan:wide", "layer:1"):
        with pytest.raises(ValueError):
            Draft.parse(bad, 4)
    model = build().eval()
    with pytest.raises(ValueError, match="mode think"):
        list(Engine(model).generate([[1, 2]], 4, plan="ghost", speculate=2))


def test_fallback_switches_to_plain_steps_when_slower():
    model = build(layer_pattern="A").eval()
    eng = Engine(model, decode="eager")
    ref = eng.generate_batch([[3, 1, 4]], 24)
    res = eng.generate_batch([[3, 1, 4]], 24, speculate=6, draft="plan:64,64,64,32", fallback=True)
    stats = eng.spec_stats
    assert res.tokens == ref.tokens and stats.think_step_s is not None
    # with 6 drafts of a near-full model per round and few accepted, a round costs more than its tokens are worth
    if stats.acceptance < 0.3:
        assert stats.fell_back_at is not None and stats.rounds == JUDGE_ROUNDS  # eager: no round captures graphs


def test_fallback_decides_on_timed_steps_and_stops_stepping_the_draft(monkeypatch):
    """A clock on which a plain step costs 1 s when queued and rounds 10 s (for at most 4 tokens): PROBE_STEPS plain probes (the draft not
    stepped with them; it catches up before its first round), JUDGE_ROUNDS rounds (eager: none captures graphs,
    so every one is judged), then plain steps only, with the draft no longer stepped; the tokens stay think's. The
    yardstick is the time between the generator's resumptions. The engine remembers: its next generations decode
    plain from the start (no draft prefill, no probes), their time counted, until it reaches what the rounds lost
    against plain steps / RETRY_OVERHEAD; the next generation speculates again; a retry too short to be judged leaves
    the memory as it was; a retry that falls back again waits for its own loss's worth at half the share, and the next
    one that falls back at a quarter."""
    import nanochat.speculative as spec_mod
    model = build(layer_pattern="A").eval()
    eng = Engine(model, decode="eager")
    ref = eng.generate_batch([[3, 1, 4]], 24)
    clock = {"t": 0.0}
    monkeypatch.setattr(spec_mod.time, "perf_counter", lambda: clock["t"])
    real_collect, real_step = spec_mod.Speculator.collect, Engine.step
    draft_steps = []

    def slow_round(self, q):
        clock["t"] += 10.0
        return real_collect(self, q)

    def step(self, st, tokens, plan=None):
        clock["t"] += 1.0
        if self.spec_stats is not None and getattr(self, "_draft_state", None) is st:
            draft_steps.append((self.spec_stats.rounds, self.spec_stats.fell_back_at))
        return real_step(self, st, tokens, plan)
    monkeypatch.setattr(spec_mod.Speculator, "collect", slow_round)
    monkeypatch.setattr(Engine, "step", step)
    real_init = spec_mod.Speculator.__init__

    def init(self, *a, **kw):
        real_init(self, *a, **kw)
        self.engine._draft_state = self.dst
    monkeypatch.setattr(spec_mod.Speculator, "__init__", init)
    res = eng.generate_batch([[3, 1, 4]], 24, speculate=3, draft="plan:64,64,64,32", fallback=True)
    stats = eng.spec_stats
    assert res.tokens == ref.tokens
    rounds = JUDGE_ROUNDS
    assert stats.think_step_s == 1.0 and stats.rounds == rounds and stats.fell_back_at is not None
    n_in_rounds = sum(stats.accepted_hist) + rounds
    assert stats.fell_back_at == 1 + PROBE_STEPS + n_in_rounds  # the prompt's token, the probes, the rounds' tokens
    # the draft caught up on the probes' tokens before the first round, stepped in the rounds, never after the fallback
    assert sum(r == 0 for r, _ in draft_steps) == PROBE_STEPS + 3  # and the first round's 3 drafts
    assert len(draft_steps) >= PROBE_STEPS + rounds * 3 and all(f is None for _, f in draft_steps)
    key, = eng.spec_memory  # (draft, k, batch)

    def loss(st):  # what the rounds lost against plain steps of the yardstick: 10 s each for their tokens at 1 s
        return sum(t - n * st.think_step_s for n, t, _ in st.round_log)
    memo = eng.spec_memory[key]  # the first attempt: no plain generation yet, so its rounds' loss
    assert (memo.plain_s, memo.need_s, memo.generations) == (0.0, pytest.approx(loss(stats) / RETRY_OVERHEAD), 0)
    need, plain = memo.need_s, 0
    while eng.spec_memory[key].plain_s < need:  # remembered: plain throughout, no draft steps, think's tokens, timed
        draft_steps.clear()
        t0 = clock["t"]
        again = eng.generate_batch([[3, 1, 4]], 24, speculate=3, draft="plan:64,64,64,32", fallback=True)
        stats = eng.spec_stats
        assert again.tokens == ref.tokens and stats.remembered and stats.rounds == 0 and not draft_steps
        assert "plain decoding throughout" in stats.summary()
        plain += 1
        assert eng.spec_memory[key].plain_s == pytest.approx(plain * (clock["t"] - t0))  # 23 plain steps of 1 s each
        assert eng.spec_memory[key].plain_cost(23) == pytest.approx(23.0)  # 0 s to the first token (prefill), 1 s each
    assert plain == -(-need // 23)  # the retry comes once the plain time reaches the need, not before
    short = eng.generate_batch([[3, 1, 4]], 3, speculate=3, draft="plan:64,64,64,32", fallback=True)  # the retry:
    assert short.tokens == [ref.tokens[0][:3]]  # too short to be judged,
    assert not eng.spec_stats.remembered and not eng.spec_stats.judged  # so the memory stays and the next retries
    t0 = clock["t"]
    retry = eng.generate_batch([[3, 1, 4]], 24, speculate=3, draft="plan:64,64,64,32", fallback=True)
    whole = clock["t"] - t0 - 23.0  # the retry's time against a plain generation of 24 tokens (23 s)
    assert retry.tokens == ref.tokens and not eng.spec_stats.remembered and eng.spec_stats.rounds == rounds
    # it fell back again: the wait is this attempt's whole loss (its draft's catch-up steps and rounds beyond what the
    # rounds alone lost) / half of RETRY_OVERHEAD, counted from zero; the plain generations' prices are kept
    memo = eng.spec_memory[key]
    assert whole > loss(eng.spec_stats) and memo.plain_s == 0.0 and memo.generations == plain
    assert memo.failures == 2 and memo.need_s == pytest.approx(whole / (RETRY_OVERHEAD / 2))
    # retries cost at most RETRY_OVERHEAD of the plain decoding between them
    assert loss(eng.spec_stats) <= RETRY_OVERHEAD * plain * 23 + 1e-9
    remembered = 0
    while eng.spec_memory[key].plain_s < memo.need_s:  # twice the wait before the next retry
        eng.generate_batch([[3, 1, 4]], 24, speculate=3, draft="plan:64,64,64,32", fallback=True)
        assert eng.spec_stats.remembered and f"{2 / RETRY_OVERHEAD:.0f}x" in eng.spec_stats.summary()
        remembered += 1
    assert remembered == -(-memo.need_s // 23) and remembered > 2 * (plain - 1)
    t0 = clock["t"]
    eng.generate_batch([[3, 1, 4]], 24, speculate=3, draft="plan:64,64,64,32", fallback=True)  # falls back again
    memo = eng.spec_memory[key]
    assert memo.failures == 3 and memo.need_s == pytest.approx((clock["t"] - t0 - 23.0) / (RETRY_OVERHEAD / 4))
    # another k is another measurement; fallback=False never consults the memory
    eng.generate_batch([[3, 1, 4]], 24, speculate=2, draft="plan:64,64,64,32", fallback=True)
    assert not eng.spec_stats.remembered
    eng.generate_batch([[3, 1, 4]], 24, speculate=3, draft="plan:64,64,64,32", fallback=False)
    assert not eng.spec_stats.remembered and eng.spec_stats.rounds > rounds


def test_retry_share_halves_with_each_failure_down_to_its_floor():
    assert [retry_share(f) for f in (1, 2, 3)] == [RETRY_OVERHEAD, RETRY_OVERHEAD / 2, RETRY_OVERHEAD / 4]
    floor = RETRY_OVERHEAD / 2 ** RETRY_HALVINGS
    assert retry_share(RETRY_HALVINGS + 1) == floor and retry_share(RETRY_HALVINGS + 9) == floor


def test_plan_draft_catches_up_on_the_probes_when_speculation_pays(monkeypatch):
    """A clock on which rounds are free and plain steps cost 1 s: speculation never falls back. The probes' plain
    steps do not step the plan draft; before each round the draft has consumed what the verifier has (same position),
    and the tokens are think's."""
    import nanochat.speculative as spec_mod
    model = build(layer_pattern="AM").eval()
    eng = Engine(model, decode="eager")
    ref = eng.generate_batch([[3, 1, 4], [2, 7, 1]], 20)
    clock = {"t": 0.0}
    monkeypatch.setattr(spec_mod.time, "perf_counter", lambda: clock["t"])
    real_begin, real_collect, real_step = spec_mod.Speculator.begin, spec_mod.Speculator.collect, Engine.step
    positions, in_round = [], [False]

    def begin(self, t0, k, **kw):
        positions.append((self.st.pos, self.dst.pos))
        in_round[0] = True
        return real_begin(self, t0, k, **kw)

    def collect(self, q):
        try:
            return real_collect(self, q)
        finally:
            in_round[0] = False

    def step(self, st, tokens, plan=None):
        clock["t"] += 0.0 if in_round[0] else 1.0  # the draft's steps in a round cost nothing either
        return real_step(self, st, tokens, plan)
    monkeypatch.setattr(spec_mod.Speculator, "begin", begin)
    monkeypatch.setattr(spec_mod.Speculator, "collect", collect)
    monkeypatch.setattr(Engine, "step", step)
    res = eng.generate_batch([[3, 1, 4], [2, 7, 1]], 20, speculate=2, draft="plan:64,64,64,32", fallback=True)
    stats = eng.spec_stats
    assert res.tokens == ref.tokens and stats.fell_back_at is None and stats.judged
    assert len(positions) > JUDGE_ROUNDS and all(v == d for v, d in positions)
    assert positions[0][0] == 3 + PROBE_STEPS  # the prompt, then the probes' tokens, consumed by both

"""The engine's static decode step (engine_static) against its eager step: the static-shape segments, their CUDA
graphs and compiled forms, with and without gates; the workspace kept across prompts; weight copies for captures."""
import os

import pytest
import torch
from torch._dynamo.utils import counters

from nanochat.engine import Engine
from nanochat.engine_static import StaticDecode
from nanochat.cuda_graphs import cast_weights, weights_version

from engine_testutil import HAS_MAMBA, HAS_MOE, V, build, check_against_forward, decode_steps

STATIC_KINDS = [dict(layer_pattern="A")] + ([dict(layer_pattern="AM"), dict(layer_pattern="AM", mamba_version=2)] if HAS_MAMBA else [])
STATIC_KINDS += [dict(layer_pattern="A", ffn_pattern="ED")] if HAS_MOE else []  # MoE with a capacity: static shapes


@pytest.mark.parametrize("kind", STATIC_KINDS, ids=lambda k: "-".join(f"{v}" for v in k.values()))
def test_static_step_equals_eager_step(kind, monkeypatch):
    """The static-shape step (the function CUDA graphs capture) against the eager step: logits, FLOPs, returned
    widths, caches and Mamba states, over key buckets 4, 8 and 16 (STATIC_MIN_KEYS lowered to 4), for full width
    and for a narrow plan that stores fewer KV heads (and keeps block inputs) than the model has."""
    monkeypatch.setattr(StaticDecode, "STATIC_MIN_KEYS", 4)
    model = build(**kind)
    prompts = torch.tensor([[1, 2, 3], [4, 5, 6]])
    for plan in ("think", [16, 32, 16, 48]):
        runs = {}
        for path in ("eager", "static"):
            eng = Engine(model, decode=path)
            st, logits, _, _ = eng.prefill(prompts, plan=plan, max_len=16)
            tok, steps = logits.argmax(-1), []
            for _ in range(12):  # positions 3..14: buckets 4, 8, 16
                out = eng.step(st, tok)
                assert eng.last_path == path
                steps.append(out)
                tok = out[0].argmax(-1)
            runs[path] = (st, steps)
        (se, eager), (ss, static) = runs["eager"], runs["static"]
        for a, b in zip(eager, static):
            torch.testing.assert_close(b[0], a[0], rtol=0, atol=1e-5)  # logits (masked vs exact-length attention)
            for x, y in zip(a[1:], b[1:]):
                assert torch.equal(x, y)  # exit blocks, widths, widened, FLOPs: exactly
        for j in se.cache.layers:
            for name in ("k", "v"):
                torch.testing.assert_close(getattr(ss.cache, name)[j], getattr(se.cache, name)[j], rtol=0, atol=1e-5)
            # full-width static stores leave their head counts owed (prompt positions 0-2 were stored eagerly)
            full = [p for p in range(3, 15) if ss.cache.stored[j][0] > p and ss.cache.fewest[j][0] == model.config.n_kv_head]
            assert ss.cache.owed[j] == ([(3, 15)] if full else [])
            assert (ss.cache.heads[j][:, 3:15] == 0).all() == bool(full)
            ss.cache.settle(j)
            assert ss.cache.owed[j] == [] and torch.equal(ss.cache.heads[j], se.cache.heads[j])
            assert ss.cache.stored[j] == se.cache.stored[j] and ss.cache.fewest[j] == se.cache.fewest[j]
        assert set(ss.cache.xn) == set(se.cache.xn)
        for j in se.cache.xn:
            torch.testing.assert_close(ss.cache.xn[j], se.cache.xn[j], rtol=0, atol=1e-5)
        for j in se.ssm:
            for a, b in zip(se.ssm[j], ss.ssm[j]):
                torch.testing.assert_close(b, a, rtol=0, atol=1e-5)


def test_a_new_prompt_reuses_the_static_workspace():
    """On the static path the engine keeps its cache, Mamba states (and on CUDA the graphs captured on them) for
    the next prefill of the same shape: reset, they give what a fresh engine gives; the superseded state stops."""
    model = build(layer_pattern="AM" if HAS_MAMBA else "A", exit_stride=1)
    eng = Engine(model, decode="static")
    kw = dict(plan=[16, 32, 16, 48], exit_threshold=0.8, expand_threshold=0.25)
    st1, _ = decode_steps(eng, torch.tensor([[3, 1, 4]]), 6, **kw)
    st2, got = decode_steps(eng, torch.tensor([[2, 7, 1]]), 6, **kw)
    assert st2.ws is st1.ws
    _, ref = decode_steps(Engine(model, decode="static"), torch.tensor([[2, 7, 1]]), 6, **kw)
    for a, b in zip(got, ref):
        assert torch.equal(a, b)
    with pytest.raises(RuntimeError, match="reused by a later prefill"):
        eng.step(st1, torch.tensor([5]))
    st3, _ = decode_steps(eng, torch.tensor([[2, 7, 1, 8]]), 1, **kw)  # another prompt length: same (B, max_len)
    assert st3.ws is st1.ws
    st4, _ = decode_steps(eng, torch.tensor([[2, 7], [1, 8]]), 1)  # another batch size: a new workspace
    assert st4.ws is not st1.ws
    eng.release()
    assert decode_steps(eng, torch.tensor([[2, 7], [1, 8]]), 1)[0].ws is not st4.ws
    eager = Engine(model, decode="eager")  # nothing to reuse for: every prefill allocates
    assert decode_steps(eager, torch.tensor([[3, 1, 4]]), 1)[0].ws is not decode_steps(eager, torch.tensor([[3, 1, 4]]), 1)[0].ws


def test_cast_weights_swaps_linear_weights_for_a_capture_and_restores_them():
    model = build()
    eng = Engine(model)
    copies = {m: m.weight.detach().to(torch.bfloat16) for m in eng.static.linears}
    before = {m: m.weight for m in eng.static.linears}
    with cast_weights(copies):
        assert all(m.weight is copies[m] for m in eng.static.linears)
        assert model.transformer.wte.weight.dtype == torch.float32  # only nn.Linear weights (what autocast casts)
    assert all(m.weight is before[m] and isinstance(m.weight, torch.nn.Parameter) for m in eng.static.linears)
    v = weights_version(eng.static.linears)
    with torch.no_grad():
        model.lm_head.weight.mul_(1.0)
    assert weights_version(eng.static.linears) != v  # an in-place write is seen: graphs on stale copies get recaptured


COMPILE_BACKENDS = ["aot_eager"] + (["inductor"] if os.environ.get("ADAMBA_SLOW_TESTS") else [])


@pytest.mark.parametrize("backend", COMPILE_BACKENDS)
def test_compiled_static_segments_equal_eager_step(backend, monkeypatch):
    """decode='compiled': the static segments through torch.compile (in-place cache and state writes included)
    give the eager step's logits, decisions and FLOPs, with exits and widening, across two key buckets."""
    monkeypatch.setattr(StaticDecode, "STATIC_MIN_KEYS", 4)
    model = build(layer_pattern="AM" if HAS_MAMBA else "A", exit_stride=1)
    feed = torch.randint(0, V, (8, 1), generator=torch.Generator().manual_seed(1))
    kw = dict(plan=[16, 32, 16, 48], max_len=16, exit_threshold=0.8, expand_threshold=0.25)
    runs = {}
    counters.clear()
    for path in ("eager", "compiled"):
        eng = Engine(model, decode=path, compile_backend=backend)
        st, _, _, _ = eng.prefill(torch.tensor([[3, 1, 4]]), **kw)
        runs[path] = [eng.step(st, tok) for tok in feed]
        assert eng.last_path == ("eager" if path == "eager" else "static")
    # every segment kind was compiled: none ran uncompiled past dynamo's recompile limit
    assert counters["frames"]["ok"] == counters["frames"]["total"] > 8
    for a, b in zip(runs["eager"], runs["compiled"]):
        torch.testing.assert_close(b[0], a[0], rtol=0, atol=1e-5)
        for x, y in zip(a[1:], b[1:]):
            assert torch.equal(x, y)
    assert any(int(s[1][0]) < model.config.n_layer - 1 for s in runs["eager"])  # some exits
    assert any(bool(s[3][0]) for s in runs["eager"])  # some widening


def test_tuned_decode_compiles_with_coordinate_descent(monkeypatch):
    """decode='tuned' hands inductor coordinate_descent_tuning (which also decomposes batch-1 matrix-vector
    products into tuned reductions); 'compiled' hands no options, nor does 'tuned' with another backend, which
    cannot take them; tuned with aot_eager still gives the eager step's logits."""
    seen = []
    real = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: seen.append((kw["backend"], kw["options"])) or real(fn, **kw))
    model = build(layer_pattern="AM" if HAS_MAMBA else "A")
    for decode, backend in (("tuned", "inductor"), ("compiled", "inductor"), ("tuned", "aot_eager")):
        Engine(model, decode=decode, compile_backend=backend)
    assert seen == [("inductor", {"coordinate_descent_tuning": True}), ("inductor", None), ("aot_eager", None)]
    feed = torch.randint(0, V, (4, 1), generator=torch.Generator().manual_seed(2))
    runs = {}
    for decode in ("eager", "tuned"):
        eng = Engine(model, decode=decode, compile_backend="aot_eager")
        st, _, _, _ = eng.prefill(torch.tensor([[3, 1, 4]]), plan="think", max_len=12)
        runs[decode] = [eng.step(st, tok)[0] for tok in feed]
        assert eng.last_path == ("eager" if decode == "eager" else "static")
    for a, b in zip(runs["eager"], runs["tuned"]):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-5)


def test_static_step_falls_back_to_eager_where_it_cannot_run():
    model = build(layer_pattern="AM" if HAS_MAMBA else "A")
    prompts = torch.tensor([[1, 2, 3], [4, 5, 6]])
    cases = [(dict(plan="think", exit_threshold=0.8), None),                            # gates
             (dict(plan=torch.tensor([[16, 16, 16, 16], [64, 64, 64, 64]])), None),       # rows differ
             (dict(plan=[16, 16, 16, 16]), torch.full((2, 4), 64))]                       # widened: lacked heads
    for kw, new_plan in cases:
        eng = Engine(model, decode="static")
        st, logits, _, _ = eng.prefill(prompts, max_len=16, **kw)
        eng.step(st, logits.argmax(-1), plan=new_plan)
        assert eng.last_path == "eager", kw
    # after the eager step filled the lacked heads, the wide plan runs static
    eng.step(st, logits.argmax(-1))
    assert eng.last_path == "static"
    with pytest.raises(ValueError, match="decode must be one of"):
        Engine(model, decode="fast")
    with pytest.raises(ValueError, match="needs the model on CUDA"):
        eng = Engine(model, decode="graph")
        st, logits, _, _ = eng.prefill(prompts, max_len=16)
        eng.step(st, logits.argmax(-1))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kind", STATIC_KINDS, ids=lambda k: "-".join(f"{v}" for v in k.values()))
def test_graph_step_equals_eager_step_on_cuda(kind, monkeypatch):
    """CUDA graphs of the static step against the eager step on the same tokens, over buckets 4, 8, 16: fp32 to
    1e-4, and under bf16 autocast to 0.15 (logits reach ~15, where bf16's spacing is 0.0625, and the attention
    kernels differ: masked memory-efficient vs flash); replays do not sync."""
    monkeypatch.setattr(StaticDecode, "STATIC_MIN_KEYS", 4)
    model = build(**kind).cuda()
    prompts = torch.tensor([[1, 2, 3], [4, 5, 6]], device="cuda")
    feed = torch.randint(0, V, (12, 2), generator=torch.Generator().manual_seed(0)).cuda()
    for plan in ("think", [16, 32, 16, 48]):
        for dtype, atol in ((None, 1e-4), (torch.bfloat16, 0.15)):
            ctx = torch.autocast("cuda", dtype=dtype) if dtype else torch.autocast("cuda", enabled=False)
            logits_by = {}
            for path in ("eager", "graph"):
                eng = Engine(model, decode=path)
                with ctx:
                    st, logits, _, _ = eng.prefill(prompts, plan=plan, max_len=16)
                    got = []
                    for tok in feed:
                        out = eng.step(st, tok)
                        assert eng.last_path == path
                        got.append(out[0])
                logits_by[path] = got
            assert len(st.ws.graphs) == 3  # buckets 4, 8 and 16
            for a, b in zip(logits_by["eager"], logits_by["graph"]):
                torch.testing.assert_close(b, a, rtol=0, atol=atol)
    eng = Engine(model, decode="graph")
    st, logits, _, _ = eng.prefill(torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]], device="cuda"), max_len=16)
    tok = eng.step(st, logits.argmax(-1))[0].argmax(-1)  # position 4: captures bucket 8
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        eng.step(st, tok)  # position 5, bucket 8: a replay
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("kind", STATIC_KINDS, ids=lambda k: "-".join(f"{v}" for v in k.values()))
def test_static_segments_with_gates_equal_eager_step(kind, monkeypatch):
    """One row with exit/widening gates: the blocks run in segments ending at the gates, all static (an exited
    token's K/V stores and Mamba steps included): with widening on, every position's lacked KV heads are written
    with its own ones, so a widened query has nothing to fill. Against the all-eager step on the same tokens:
    logits, and exit blocks, widths, widening and FLOPs exactly."""
    monkeypatch.setattr(StaticDecode, "STATIC_MIN_KEYS", 4)
    model = build(**kind, exit_stride=1)
    feed = torch.randint(0, V, (12, 1), generator=torch.Generator().manual_seed(1))
    for plan in ("think", [16, 32, 16, 48]):
        runs, paths = {}, set()
        for path in ("eager", "static"):
            eng = Engine(model, decode=path)
            st, _, _, _ = eng.prefill(torch.tensor([[3, 1, 4]]), plan=plan, max_len=16, exit_threshold=0.8,
                                      expand_threshold=0.25)
            runs[path] = []
            for tok in feed:
                runs[path].append(eng.step(st, tok))
                if path == "static":
                    paths.add(eng.last_path)
        for a, b in zip(runs["eager"], runs["static"]):
            torch.testing.assert_close(b[0], a[0], rtol=0, atol=1e-5)
            for x, y in zip(a[1:], b[1:]):
                assert torch.equal(x, y)
        decode = runs["eager"]
        assert any(int(s[1][0]) < model.config.n_layer - 1 for s in decode)  # some tokens exited
        assert any(bool(s[3][0]) for s in decode)  # some widened
        assert paths == {"static"}, paths


@pytest.mark.skipif(not torch.cuda.is_available() or not HAS_MOE, reason="needs CUDA")
def test_dropless_moe_decodes_eager_on_cuda():
    """A dropless MoE's batched fallback reads the largest expert load back: no graph can hold it, so it runs eager."""
    model = build(layer_pattern="A", ffn_pattern="ED", moe_drop_tokens=False).cuda()
    eng = Engine(model)
    st, logits, _, _ = eng.prefill(torch.tensor([[3, 1, 4]], device="cuda"), max_len=16)
    eng.step(st, logits.argmax(-1))
    assert eng.last_path == "eager"
    assert eng.static.path(st, 1) == ("eager", "dropless MoE blocks")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("compiled", ["compiled", "tuned"])
def test_compiled_graph_step_equals_eager_step_on_cuda(compiled, monkeypatch):
    """decode='compiled' and 'tuned' on CUDA: inductor-compiled segments (tuned: its matrix-vector products as
    Triton reductions) captured as graphs, against the eager step, fp32."""
    monkeypatch.setattr(StaticDecode, "STATIC_MIN_KEYS", 4)
    model = build(layer_pattern="AM" if HAS_MAMBA else "A", exit_stride=1).cuda()
    feed = torch.randint(0, V, (8, 1), generator=torch.Generator().manual_seed(1)).cuda()
    kw = dict(plan=[16, 32, 16, 48], max_len=16, exit_threshold=0.8, expand_threshold=0.25)
    runs = {}
    for path in ("eager", compiled):
        eng = Engine(model, decode=path)
        st, _, _, _ = eng.prefill(torch.tensor([[3, 1, 4]], device="cuda"), **kw)
        runs[path] = [eng.step(st, tok) for tok in feed]
        assert eng.last_path == ("eager" if path == "eager" else "graph")
    for a, b in zip(runs["eager"], runs[compiled]):
        torch.testing.assert_close(b[0], a[0], rtol=0, atol=1e-4)
        for x, y in zip(a[1:], b[1:]):
            assert torch.equal(x, y)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_pipelined_generate_on_cuda_equals_forward():
    """generate() queues each next step before reading the token back: on CUDA graphs, every step's logits still
    equal the per-token-width forward's at its position, and the last token's extra step changes nothing."""
    model = build(layer_pattern="AM" if HAS_MAMBA else "A").cuda()
    for plan, kw in (("think", {}), ([16, 32, 16, 48], dict(exit_threshold=0.8, expand_threshold=0.25))):
        prompts = [[1, 2, 3, 4, 5]] if kw else [[1, 2, 3, 4, 5], [6, 7, 8, 9, 10]]
        eng = Engine(model, decode="graph")
        res = eng.generate_batch(prompts, 8, plan=plan, **kw)
        assert eng.last_path == "graph" and all(len(t) == 8 for t in res.tokens)
        check_against_forward(model, res)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_graphs_under_autocast_follow_a_weight_change_on_cuda():
    """Graphs captured under autocast read bf16 copies of the weights: after an in-place weight change the next
    step captures again, so it still equals the eager step (which casts the weights as they are now)."""
    model = build(layer_pattern="AM" if HAS_MAMBA else "A").cuda()
    prompt = torch.tensor([[3, 1, 4]], device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        eng = Engine(model, decode="graph")
        st, got = decode_steps(eng, prompt, 3)
        assert torch.bfloat16 in st.ws.weight_copies and len(st.ws.graphs) > 0
        with torch.no_grad():
            model.lm_head.weight.mul_(-1.0)
        st, got = decode_steps(eng, prompt, 3)
        _, ref = decode_steps(Engine(model, decode="eager"), prompt, 3)
    for a, b in zip(got[1:], ref[1:]):
        torch.testing.assert_close(a, b, rtol=0, atol=0.15)  # stale copies would give the logits' negatives


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_new_prompt_replays_the_captured_graphs_on_cuda():
    model = build(layer_pattern="AM" if HAS_MAMBA else "A").cuda()
    eng = Engine(model, decode="graph")
    st1, _ = decode_steps(eng, torch.tensor([[3, 1, 4]], device="cuda"), 6)
    n_graphs = len(st1.ws.graphs)
    st2, got = decode_steps(eng, torch.tensor([[2, 7, 1]], device="cuda"), 6)
    assert st2.ws is st1.ws and len(st2.ws.graphs) == n_graphs  # no new capture
    _, ref = decode_steps(Engine(model, decode="eager"), torch.tensor([[2, 7, 1]], device="cuda"), 6)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kind", STATIC_KINDS, ids=lambda k: "-".join(f"{v}" for v in k.values()))
def test_graph_segments_with_gates_equal_eager_on_cuda(kind, monkeypatch):
    monkeypatch.setattr(StaticDecode, "STATIC_MIN_KEYS", 4)
    model = build(**kind, exit_stride=1).cuda()
    feed = torch.randint(0, V, (12, 1), generator=torch.Generator().manual_seed(1)).cuda()
    for plan in ("think", [16, 32, 16, 48]):  # the narrow plan widens onto stored lacked heads: graphs throughout
        runs = {}
        for path in ("eager", "graph"):
            eng = Engine(model, decode=path)
            st, _, _, _ = eng.prefill(torch.tensor([[3, 1, 4]], device="cuda"), plan=plan, max_len=16,
                                      exit_threshold=0.8, expand_threshold=0.25)
            runs[path] = []
            for tok in feed:
                runs[path].append(eng.step(st, tok))
                assert eng.last_path == path
        for a, b in zip(runs["eager"], runs["graph"]):
            torch.testing.assert_close(b[0], a[0], rtol=0, atol=1e-4)
            for x, y in zip(a[1:], b[1:]):
                assert torch.equal(x, y)
        assert any(int(s[1][0]) < model.config.n_layer - 1 for s in runs["eager"])

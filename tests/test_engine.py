"""Engine: incremental decode with exits/widening == the per-token-width forward, dense equivalence, modes, scripts."""
import shutil

import pytest
import torch

from nanochat.gpt import GPT, GPTConfig
from nanochat.hybrid_gpt import HybridGPT
from nanochat.engine import Engine, MODES
from nanochat.checkpoint_manager import save_model, CheckpointError

from testutil import device_reads, dispatched_ops
from engine_testutil import HAS_MAMBA, HAS_MOE, V, ATOL, tiny_config, build, check_against_forward

KINDS = [dict(layer_pattern="A")]
if HAS_MAMBA:
    KINDS += [dict(layer_pattern="AM"), dict(layer_pattern="MA", mamba_version=2, ffn_pattern="DN")]
if HAS_MOE:
    KINDS += [dict(layer_pattern="A", ffn_pattern="ED")]  # capacity_factor = num_experts: nothing is dropped


@pytest.mark.parametrize("kind", KINDS, ids=lambda k: "-".join(f"{v}" for v in k.values()))
def test_decode_with_exits_and_widening_equals_forward(kind):
    model = build(**kind)
    prompts = [[1, 2, 3, 4, 5], [6, 7, 8, 9, 10], [11, 12, 13, 14, 15]]
    plan = torch.tensor([[16, 32, 48, 16], [32, 16, 16, 48], [48, 48, 32, 16]])
    eng = Engine(model)
    res = eng.generate_batch(prompts, 10, plan=plan, exit_threshold=0.8, expand_threshold=0.25, temperature=1.0, seed=1)
    cache = eng.state.cache
    # widening is on: each position's lacked KV heads were written with its own ones, so no block inputs are kept
    # (every row runs one KV head of two somewhere in each block) and nothing was left to fill lazily
    assert cache.xn == {} and all((cache.heads[j][:, :eng.state.pos] == model.config.n_kv_head).all() for j in cache.layers)
    decode = res.steps[1:]
    exits = sum(int((s.exit_block < model.config.n_layer - 1).sum()) for s in decode)
    widens = sum(int(s.widened.sum()) for s in decode)
    total = len(decode) * len(prompts)
    assert 0 < exits < total and 0 < widens < total, (exits, widens, total)  # the test exercises both
    check_against_forward(model, res)


def test_per_token_forward_with_one_width_is_the_static_forward():
    model = build(layer_pattern="AM" if HAS_MAMBA else "A")
    idx = torch.randint(0, V, (2, 9))
    for w in (16, 48, 64):
        widths = torch.full((2, 9, 4), w, dtype=torch.long)
        torch.testing.assert_close(model(idx, width=widths), model(idx, width=w), rtol=0, atol=0)


def test_widening_mid_sequence_equals_wider_plan_from_there():
    model = build()
    eng = Engine(model)
    prompts = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]])
    st, logits, _, _ = eng.prefill(prompts, plan=[16, 16, 32, 16], max_len=16)
    # widths 16 and 32 give one KV head of two: each block kept the normalised inputs to fill from later
    assert set(st.cache.xn) == set(st.cache.layers) and (st.cache.heads[0][:, :4] == 1).all()
    got, toks = [logits], [prompts]
    plans = [None, None, [64] * 4, None, [48, 32, 64, 48]]  # widen at the 3rd token, stay, widen differently
    rows_widths = [st.prompt_widths[:, None].expand(2, 4, 4)]
    for plan in plans:
        tok = got[-1].argmax(-1)
        logits, exit_block, widths, _, _ = eng.step(st, tok, plan=None if plan is None else torch.tensor([plan] * 2))
        got.append(logits)
        toks.append(tok[:, None])
        rows_widths.append(widths[:, None])
        assert (exit_block == 3).all()
    # the lacked heads of the narrow positions were filled when the wide token attended
    assert (st.cache.heads[0][:, :st.pos] == model.config.n_kv_head).all()
    assert all(h.dtype == torch.int16 for h in st.cache.heads.values())
    idx = torch.cat(toks, 1)
    widths = torch.cat(rows_widths, 1)
    with torch.no_grad():
        ref = model(idx, width=widths)
    for k, lg in enumerate(got):
        torch.testing.assert_close(lg, ref[:, 3 + k], rtol=0, atol=ATOL)
    # and the wide tokens do see different keys than an all-wide run: the semantics are not vacuous
    with torch.no_grad():
        all_wide = model(idx, width=torch.where(widths == 16, 64, widths))
    assert (all_wide[:, 7] - ref[:, 7]).abs().max() > 1e-3


def test_full_kv_width_keeps_no_block_inputs():
    """Stored block inputs only serve to fill lacked KV heads: full width (mode think, with exits and widening)
    and a width that runs fewer query heads but every KV head (48 = 3 of 4 heads, 2 of 2 KV heads) keep none."""
    model = build(layer_pattern="AM" if HAS_MAMBA else "A")
    prompts = [[1, 2, 3, 4, 5], [6, 7, 8, 9, 10]]
    for plan in ("think", [48, 64, 48, 48]):
        eng = Engine(model)
        res = eng.generate_batch(prompts, 8, plan=plan, exit_threshold=0.8, expand_threshold=0.25, temperature=1.0, seed=3)
        cache = eng.state.cache
        assert cache.xn == {}, plan
        for j in cache.layers:
            assert (cache.heads[j][:, :eng.state.pos] == model.config.n_kv_head).all()
        check_against_forward(model, res)
    assert any(int((s.exit_block < 3).sum()) for s in res.steps[1:])  # exits stored their K/V at plan width


def test_fill_refuses_positions_never_stored():
    from nanochat.matryoshka_kv import MatryoshkaKVCache
    model = build()
    cache = MatryoshkaKVCache(model, 1, 8)
    attn, rows = model.transformer.h[0].attn, torch.tensor([0])
    assert cache.fill(0, rows, 1, 0, attn, model.cos, model.sin).sum() == 0  # nothing to fill before position 0
    with pytest.raises(RuntimeError, match="never stored"):
        cache.fill(0, rows, 2, 3, attn, model.cos, model.sin)


def test_batch_rows_do_not_affect_each_other():
    model = build(layer_pattern="AM" if HAS_MAMBA else "A")
    prompts = [[1, 2, 3, 4], [4, 3, 2, 1], [7, 7, 7, 7]]
    plan = torch.tensor([[16, 32, 48, 16], [64, 64, 64, 64], [32, 16, 16, 48]])
    eng = Engine(model)
    kw = dict(exit_threshold=0.8, expand_threshold=0.25, temperature=0.0)
    batch = eng.generate_batch(prompts, 8, plan=plan, **kw)
    for b in range(3):
        alone = eng.generate_batch(prompts[b:b + 1], 8, plan=plan[b:b + 1], **kw)
        assert alone.tokens[0] == batch.tokens[b]
        for s_alone, s_batch in zip(alone.steps, batch.steps):
            torch.testing.assert_close(s_alone.logits[0], s_batch.logits[b], rtol=0, atol=ATOL)
            assert int(s_alone.exit_block[0]) == int(s_batch.exit_block[b])
            assert torch.equal(s_alone.widths[0], s_batch.widths[b])


def gpt_and_hybrid():
    torch.manual_seed(0)
    gcfg = GPTConfig(sequence_len=32, vocab_size=V, n_layer=2, n_head=4, n_kv_head=2, n_embd=64)
    gpt = GPT(gcfg)
    gpt.init_weights()
    with torch.no_grad():
        for p in gpt.parameters():
            if p.abs().sum() == 0:
                p.normal_(0, 0.3)
    hybrid = HybridGPT(tiny_config(n_layer=2))
    hybrid.init_weights()
    state = gpt.state_dict()
    state.update({k: v for k, v in hybrid.state_dict().items() if k.startswith("controllers.")})
    hybrid.load_state_dict(state, strict=True)
    return gpt.eval(), hybrid.eval()


def test_full_width_without_exits_is_the_dense_gpt():
    gpt, hybrid = gpt_and_hybrid()
    prompt = [3, 1, 4, 1, 5, 9]
    want = list(gpt.generate(prompt, 12, temperature=0.0))
    res_h = Engine(hybrid).generate_batch([prompt], 12, plan="think", exit_threshold=1.0, expand_threshold=0.0)
    res_g = Engine(gpt).generate_batch([prompt], 12, plan="think")
    assert res_h.tokens[0] == want and res_g.tokens[0] == want
    for a, b in zip(res_h.steps, res_g.steps):
        torch.testing.assert_close(a.logits, b.logits, rtol=0, atol=ATOL)
        torch.testing.assert_close(a.flops, b.flops, rtol=0, atol=0)  # same FLOPs too: nothing extra ran
    with pytest.raises(ValueError, match="dense GPT"):
        list(Engine(gpt).generate([prompt], 2, plan="ghost"))


def test_flops_accounting():
    model = build(layer_pattern="AM" if HAS_MAMBA else "A")
    prompts = [[1, 2, 3], [4, 5, 6]]
    res = Engine(model).generate_batch(prompts, 6, plan="think")
    for s in res.steps:  # full width, no gates: exactly the full model's count
        torch.testing.assert_close(s.flops, s.full_flops, rtol=0, atol=0)
    # the prompt's full-model count (closed form in the engine) is the per-position sum, one readout
    loop = sum(model.forward_flops_per_token(t + 1) for t in range(3)) - 2 * 2 * model.config.n_embd * V
    assert float(res.steps[0].full_flops[0]) == loop
    narrow = Engine(model).generate_batch(prompts, 6, plan=[16] * 4)
    expect = model.forward_flops_per_token(3 + 1, width=16)  # first decoded token attends 4 positions
    assert float(narrow.steps[1].flops[0]) == expect
    gated = Engine(model).generate_batch(prompts, 6, plan=[16] * 4, exit_threshold=0.8, expand_threshold=0.0)
    gate_cost, head = model.controllers.gate.flops_per_check(), 2 * 64 * V
    seen_exit = False
    for k, s in enumerate(gated.steps[1:]):
        L = 3 + k + 1  # context of the k-th decoded token
        rows = model.flops_breakdown(L, width=16)
        for b in range(2):
            eb = int(s.exit_block[b])
            seen_exit |= eb < 3
            want = head + min(eb + 1, 3) * gate_cost  # gates after blocks 0..2 until the token exits
            for j in range(4):
                r = rows[j]
                if j <= eb:
                    want += r["total"]
                elif "attn_proj" in r:
                    want += 2 * 16 * 2 * 1 * 16  # K and V of one KV head at width 16
                else:  # Mamba steps its state (its output projection is computed and dropped); no FFN
                    want += r["mamba_proj"] + r["mamba_conv"] + r["mamba_scan"]
            assert float(s.flops[b]) == want
    assert seen_exit


def test_generate_batch_of_no_tokens_is_empty():
    res = Engine(build()).generate_batch([[1, 2, 3]], 0)
    assert res.tokens == [[]] and res.steps == [] and res.plan is None


def test_every_mode_runs():
    # n_embd 256 so the named modes map to different levels: ghost 128, whisper/normal/think 256
    model = build(n_layer=2, n_head=4, n_kv_head=4, n_embd=256, width_levels=[64, 128, 192, 256], mlp_hidden=256)
    eng = Engine(model)
    for mode in MODES:
        res = eng.generate_batch([[1, 2, 3]], 4, plan=mode)
        assert len(res.tokens[0]) == 4
        want = {"ghost": 128, "whisper": 256, "normal": 256, "think": 256}.get(mode)
        if want is not None:
            assert (res.plan == want).all()
    # auto with an untrained predictor (it predicts 1 nat for any narrowing) keeps full width
    assert (res.plan == 256).all()
    with pytest.raises(ValueError, match="unknown mode"):
        eng.resolve("turbo", None, None)


@pytest.fixture
def hybrid_checkpoint(tmp_path, tiny_data):
    model = build(vocab_size=tiny_data["vocab_size"], n_layer=2, layer_pattern="AM" if HAS_MAMBA else "A")
    ckpt = tmp_path / "ckpt"
    save_model(str(ckpt), 5, model)
    shutil.copy(tiny_data["tokenizer_dir"] / "tokenizer.pkl", ckpt / "tokenizer.pkl")
    return ckpt


def test_generate_script_every_mode(hybrid_checkpoint, capsys):
    from scripts import generate
    for mode in MODES:
        res = generate.main(["--checkpoint", str(hybrid_checkpoint), "--prompt", "the cat", "--mode", mode,
                             "--max-tokens", "5", "--show-compute", "--device", "cpu", "--temperature", "0.7"])
        assert len(res.tokens[0]) <= 5
        out = capsys.readouterr().out
        assert "prompt:" in out and ("decode:" in out or len(res.tokens[0]) <= 1)
        if mode == "auto":
            assert "not calibrated" in out


def test_scripts_on_dense_gpt_checkpoint(tmp_path, tiny_data, capsys):
    from scripts import generate, chat_cli
    torch.manual_seed(0)
    gpt = GPT(GPTConfig(sequence_len=32, vocab_size=tiny_data["vocab_size"], n_layer=2, n_head=2, n_kv_head=2, n_embd=32))
    gpt.init_weights()
    ckpt = tmp_path / "gpt"
    save_model(str(ckpt), 1, gpt)
    tok = str(tiny_data["tokenizer_dir"])
    args = ["--checkpoint", str(ckpt), "--max-tokens", "4", "--device", "cpu", "--tokenizer-dir", tok]
    res = generate.main(args + ["--prompt", "hello", "--mode", "think", "--show-compute"])
    assert len(res.tokens[0]) <= 4
    with pytest.raises(SystemExit, match="dense GPT"):
        generate.main(args + ["--prompt", "hello", "--mode", "auto"])
    replies = chat_cli.main(args + ["--prompt", "hi there"])
    assert len(replies) == 1
    with pytest.raises(CheckpointError, match="tokenizer"):
        generate.main(["--checkpoint", str(ckpt), "--prompt", "x", "--device", "cpu"])  # no tokenizer there


def test_chat_cli_interactive(hybrid_checkpoint, capsys):
    from scripts import chat_cli
    lines = iter(["hello", "clear", "again", "quit"])
    replies = chat_cli.main(["--checkpoint", str(hybrid_checkpoint), "--mode", "auto", "--max-tokens", "3",
                             "--device", "cpu", "--show-compute"], input_fn=lambda _: next(lines))
    assert len(replies) == 2
    assert "Conversation cleared." in capsys.readouterr().out


def test_runs_under_bf16_autocast():
    # what the scripts do on CUDA; on CPU autocast exercises the same mixed-dtype cache writes
    model = build(layer_pattern="AM" if HAS_MAMBA else "A")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        res = Engine(model).generate_batch([[1, 2, 3]] * 2, 5, plan="auto", exit_threshold=0.8, expand_threshold=0.25)
    assert all(len(t) == 5 for t in res.tokens)


def test_auto_runs_one_static_plan():
    """In auto, generated tokens run the same widths as the prompt in every block (the blocks the predictor
    reads stay full), so without gating the logits are the fixed plan's forward."""
    model = build(predictor_after=1).eval()
    prompt = [[3, 1, 4, 1, 5, 9]]
    # a huge epsilon accepts any predicted loss increase: the predictor picks the narrowest level wherever width matters
    eng = Engine(model)
    res = eng.generate_batch(prompt, 4, plan="auto", exit_threshold=1.0, expand_threshold=0.0, plan_epsilon=1e9)
    plan = res.prompt_widths[0]
    assert plan[0] == 64 and (plan[1:] < 64).any()
    # block inputs are kept exactly in the blocks whose width stores fewer KV heads than the model has
    attn = model.transformer.h[0].attn
    assert set(eng.state.cache.xn) == {j for j in range(4) if attn.heads_at(int(plan[j]))[1] < model.config.n_kv_head}
    for s in res.steps[1:]:
        assert torch.equal(s.widths[0], plan)
    idx = torch.tensor([prompt[0] + [s.tokens[0] for s in res.steps[:-1]]])
    ref = model(idx, width=plan.tolist())[0, len(prompt[0]) - 1:]
    got = torch.stack([s.logits[0] for s in res.steps])
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-4)


def test_decode_step_reads_nothing_back_without_gates():
    """A decode step's control state (widths, active rows, FLOPs) lives on the host: with one plan or per-row
    plans and no exit/widening thresholds, no op reads the device. With gates, only their decisions are read
    (through .tolist(), not an aten op: none seen here either)."""
    model = build(layer_pattern="AM" if HAS_MAMBA else "A")
    prompts = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]])
    for plan, thresholds in (("think", {}), ([16, 32, 48, 64], {}), (torch.tensor([[16, 64, 32, 64], [64, 16, 16, 48]]), {}),
                             ("think", dict(exit_threshold=0.8, expand_threshold=0.25))):
        eng = Engine(model)
        st, logits, _, _ = eng.prefill(prompts, plan=plan, max_len=16, **thresholds)
        tok = logits.argmax(-1)
        for _ in range(3):
            (logits, *_), seen = device_reads(lambda: eng.step(st, tok))
            assert seen == [], (plan, thresholds, seen)
            tok = logits.argmax(-1)
    # the counter does see a read: the lazy fill of lacked KV heads reads the head counts when it must
    eng = Engine(model)
    st, logits, _, _ = eng.prefill(prompts, plan=[16, 16, 16, 16], max_len=16)
    _, seen = device_reads(lambda: eng.step(st, logits.argmax(-1), plan=torch.full((2, 4), 64)))
    assert "aten.nonzero_numpy.default" in seen and "aten.index.Tensor" in seen  # the grouping, and have[have < need]


def test_cache_covers_tracks_stores():
    from nanochat.matryoshka_kv import MatryoshkaKVCache
    model = build()
    cache = MatryoshkaKVCache(model, 2, 8)
    hd, hkv = model.config.head_dim, model.config.n_kv_head
    kv = torch.zeros(1, 1, 3, hd)
    cache.store(0, [0], torch.tensor([0]), 0, kv, kv, torch.zeros(1, 3, model.config.n_embd))  # row 0: 3 positions, 1 head
    assert cache.covers(0, [0], 1, 3) and not cache.covers(0, [0], 2, 3)  # too few heads
    assert not cache.covers(0, [0], 1, 4) and not cache.covers(0, [1], 1, 1)  # not stored
    full = torch.zeros(2, hkv, 5, hd)
    cache.store(0, [0, 1], slice(None), 3, full, full, None)  # a gap for row 1 (0..2 never stored)
    assert cache.stored[0] == [8, 0] and cache.fewest[0] == [1, hkv]
    assert not cache.covers(0, [1], 1, 8)


def test_static_stores_owe_full_width_head_counts():
    """store_at writes no head counts for a store of every KV head; note_static_store keeps them owed (ranges of every
    row), truncate forgets those past the end, a narrower store (which writes its own) takes its positions out, and
    settle, fill and an eager store over an owed position write them before anything reads or overwrites them."""
    from nanochat.matryoshka_kv import MatryoshkaKVCache
    model = build()
    cache = MatryoshkaKVCache(model, 2, 16)
    hd, n = model.config.head_dim, model.config.n_kv_head
    assert n > 1

    def static(pos, T, hkv):
        kv = torch.randn(2, hkv, T, hd)
        if hkv < n:
            cache.ensure_xn(0)
        cache.store_at(0, torch.arange(pos, pos + T), kv, kv, torch.randn(2, T, model.config.n_embd))
        cache.note_static_store(0, pos, T, hkv)

    with torch.inference_mode():
        static(0, 5, n)
        static(5, 3, n)
        assert cache.owed[0] == [(0, 8)] and (cache.heads[0] == 0).all()  # unwritten, owed as one range
        cache.truncate(6)
        assert cache.owed[0] == [(0, 6)]
        static(6, 2, 1)  # narrower: its counts written, not owed
        assert cache.owed[0] == [(0, 6)] and (cache.heads[0][:, 6:8] == 1).all()
        cache.settle(0, 6, 16)  # nothing owed there: nothing written
        assert cache.owed[0] == [(0, 6)] and (cache.heads[0][:, :6] == 0).all()
        cache.settle(0)
        assert cache.owed[0] == [] and (cache.heads[0][:, :6] == n).all() and (cache.heads[0][:, 6:8] == 1).all()
        static(8, 2, n)
        one = torch.zeros(1, 1, 1, hd)
        cache.store(0, [0], torch.tensor([0]), 9, one, one, torch.zeros(1, 1, model.config.n_embd))  # over an owed one
        assert cache.owed[0] == [] and cache.heads[0][:, 8:10].tolist() == [[n, 1], [n, n]]
        static(10, 2, n)
        cache.truncate(11)
        cache.fill(0, [0, 1], 1, 11, model.transformer.h[0].attn, model.cos, model.sin)  # reads the counts: settles
        assert cache.owed[0] == [] and (cache.heads[0][:, 10] == n).all() and (cache.heads[0][:, 11] == 0).all()


def test_static_think_then_wider_query_fills_from_settled_counts():
    """Static think steps (head counts owed), a narrow step, then a full-width one whose queries need the narrow
    position's lacked heads: fill() settles the owed counts first (else it would take the think positions for never
    stored and stop), and every step's logits equal the eager engine's."""
    model = build()
    prompts = torch.tensor([[1, 2, 3], [4, 5, 6]])
    plans = [None, None, None, torch.full((2, 4), 16), torch.full((2, 4), 64), None]
    out = {}
    for path in ("eager", "static"):
        eng = Engine(model, decode=path)
        st, logits, _, _ = eng.prefill(prompts, plan="think", max_len=16)
        tok, seen = logits.argmax(-1), []
        for plan in plans:
            logits = eng.step(st, tok, plan=plan)[0] if plan is not None else eng.step(st, tok)[0]
            seen.append(logits)
            tok = logits.argmax(-1)
        out[path] = seen
        if path == "static":
            assert all(st.cache.owed[j] == [(8, 9)] for j in st.cache.layers)  # the last think step's, after the fill
    for a, b in zip(out["eager"], out["static"]):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-5)


def test_static_think_step_writes_no_head_counts():
    """A static think step stores K/V (index_copy) but no head counts (no index_fill), and takes no slot of its
    position (no remainder: only a ring's slot is one): two ops a block fewer."""
    model = build()
    for plan, fills in (("think", 0), ([16, 16, 16, 16], model.config.n_layer)):
        eng = Engine(model, decode="static")
        st, logits, _, _ = eng.prefill(torch.tensor([[1, 2, 3]]), plan=plan, max_len=16)
        _, names = dispatched_ops(lambda: eng.step(st, logits.argmax(-1)))
        assert eng.last_path == "static"
        assert names.count("index_copy_") >= 2 * model.config.n_layer and names.count("index_fill_") == fills
        assert "remainder" not in names


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_decode_step_does_not_sync_on_cuda():
    """torch.cuda.set_sync_debug_mode('error') raises on any host-device sync inside a decode step."""
    model = build(layer_pattern="AM" if HAS_MAMBA else "A").cuda()
    prompts = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]], device="cuda")
    for plan in ("think", torch.tensor([[16, 64, 32, 64], [64, 16, 16, 48]])):
        eng = Engine(model)
        st, logits, _, _ = eng.prefill(prompts, plan=plan, max_len=16)
        tok = logits.argmax(-1)
        eng.step(st, tok)  # warm-up: first calls may allocate pinned memory
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for _ in range(3):
                tok = eng.step(st, tok)[0].argmax(-1)
        finally:
            torch.cuda.set_sync_debug_mode("default")

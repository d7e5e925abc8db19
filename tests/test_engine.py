"""Engine: incremental decode with exits/widening == the per-token-width forward, dense equivalence, modes, scripts."""
import importlib.util
import os
import shutil

import pytest
import torch
from torch._dynamo.utils import counters

from nanochat.gpt import GPT, GPTConfig
from nanochat.hybrid_gpt import HybridGPT, HybridConfig
from nanochat.engine import Engine, MODES
from nanochat.cuda_graphs import cast_weights, weights_version
from nanochat.checkpoint_manager import save_model

from testutil import fill_zero_matrices, device_reads

HAS_MAMBA = importlib.util.find_spec("nanochat.mamba_block") is not None
HAS_MOE = importlib.util.find_spec("nanochat.moe") is not None
V = 96
ATOL = 1e-4


def tiny_config(**kw):
    base = dict(sequence_len=32, vocab_size=V, n_layer=4, n_head=4, n_kv_head=2, n_embd=64, layer_pattern="A",
                ffn_pattern="D", d_state=8, d_conv=4, expand=2, mamba_headdim=16, num_experts=4, expert_dim=64,
                capacity_factor=4.0, width_levels=[16, 32, 48, 64], gate_hidden=16, predictor_hidden=16)
    base.update(kw)
    return HybridConfig(**base)


def build(seed=0, **kw):
    """A tiny model whose residual writers are non-zero and whose gates give varied decisions
    (random gate weights, each gate's bias centring its logits on random text)."""
    torch.manual_seed(seed)
    model = HybridGPT(tiny_config(**kw))
    model.init_weights()
    g = torch.Generator().manual_seed(seed)
    fill_zero_matrices(model, 0.3, g)
    with torch.no_grad():
        gate = model.controllers.gate
        for p, std in ((gate.fc.weight, 0.15), (gate.gate_embed, 0.3), (gate.out.weight, 1.0)):
            p.copy_(torch.randn(p.shape, generator=g) * std)
        model.eval()
        out = model(torch.randint(0, model.config.vocab_size, (4, 16), generator=g), return_exits=True)
        for i in range(gate.n_gates):
            gate.out_bias[i] -= gate.logits(out.exit_hidden[i], i).median()
    return model


def check_against_forward(model, res, atol=ATOL):
    """Every step's logits equal the per-token-width forward given the same decisions."""
    dev = model.get_device()
    idx, widths, exit_after = (t.to(dev) for t in res.reference_inputs())
    with torch.no_grad():
        ref = model(idx, width=widths, exit_after=exit_after)
    Tp = len(res.prompts[0])
    for k, s in enumerate(res.steps):
        torch.testing.assert_close(s.logits, ref[:, Tp - 1 + k], rtol=0, atol=atol)


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
    with pytest.raises(SystemExit, match="tokenizer"):
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


STATIC_KINDS = [dict(layer_pattern="A")] + ([dict(layer_pattern="AM"), dict(layer_pattern="AM", mamba_version=2)] if HAS_MAMBA else [])
STATIC_KINDS += [dict(layer_pattern="A", ffn_pattern="ED")] if HAS_MOE else []  # MoE with a capacity: static shapes


@pytest.mark.parametrize("kind", STATIC_KINDS, ids=lambda k: "-".join(f"{v}" for v in k.values()))
def test_static_step_equals_eager_step(kind, monkeypatch):
    """The static-shape step (the function CUDA graphs capture) against the eager step: logits, FLOPs, returned
    widths, caches and Mamba states, over key buckets 4, 8 and 16 (STATIC_MIN_KEYS lowered to 4), for full width
    and for a narrow plan that stores fewer KV heads (and keeps block inputs) than the model has."""
    monkeypatch.setattr(Engine, "STATIC_MIN_KEYS", 4)
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
            assert torch.equal(ss.cache.heads[j], se.cache.heads[j])
            assert ss.cache.stored[j] == se.cache.stored[j] and ss.cache.fewest[j] == se.cache.fewest[j]
        assert set(ss.cache.xn) == set(se.cache.xn)
        for j in se.cache.xn:
            torch.testing.assert_close(ss.cache.xn[j], se.cache.xn[j], rtol=0, atol=1e-5)
        for j in se.ssm:
            for a, b in zip(se.ssm[j], ss.ssm[j]):
                torch.testing.assert_close(b, a, rtol=0, atol=1e-5)


def decode_steps(eng, prompt, n, **kw):
    st, logits, _, _ = eng.prefill(prompt, max_len=16, **kw)
    out = [logits]
    for _ in range(n):
        out.append(eng.step(st, out[-1].argmax(-1))[0])
    return st, out


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
    copies = {m: m.weight.detach().to(torch.bfloat16) for m in eng._linears}
    before = {m: m.weight for m in eng._linears}
    with cast_weights(copies):
        assert all(m.weight is copies[m] for m in eng._linears)
        assert model.transformer.wte.weight.dtype == torch.float32  # only nn.Linear weights (what autocast casts)
    assert all(m.weight is before[m] and isinstance(m.weight, torch.nn.Parameter) for m in eng._linears)
    v = weights_version(eng._linears)
    with torch.no_grad():
        model.lm_head.weight.mul_(1.0)
    assert weights_version(eng._linears) != v  # an in-place write is seen: graphs on stale copies get recaptured


COMPILE_BACKENDS = ["aot_eager"] + (["inductor"] if os.environ.get("ADAMBA_SLOW_TESTS") else [])


@pytest.mark.slow  # torch.compile
@pytest.mark.parametrize("backend", COMPILE_BACKENDS)
def test_compiled_static_segments_equal_eager_step(backend, monkeypatch):
    """decode='compiled': the static segments through torch.compile (in-place cache and state writes included)
    give the eager step's logits, decisions and FLOPs, with exits and widening, across two key buckets."""
    monkeypatch.setattr(Engine, "STATIC_MIN_KEYS", 4)
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
    monkeypatch.setattr(Engine, "STATIC_MIN_KEYS", 4)
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
    monkeypatch.setattr(Engine, "STATIC_MIN_KEYS", 4)
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
    assert eng._static_path(st, 1) == ("eager", "dropless MoE blocks")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_compiled_graph_step_equals_eager_step_on_cuda(monkeypatch):
    """decode='compiled' on CUDA: inductor-compiled segments captured as graphs, against the eager step, fp32."""
    monkeypatch.setattr(Engine, "STATIC_MIN_KEYS", 4)
    model = build(layer_pattern="AM" if HAS_MAMBA else "A", exit_stride=1).cuda()
    feed = torch.randint(0, V, (8, 1), generator=torch.Generator().manual_seed(1)).cuda()
    kw = dict(plan=[16, 32, 16, 48], max_len=16, exit_threshold=0.8, expand_threshold=0.25)
    runs = {}
    for path in ("eager", "compiled"):
        eng = Engine(model, decode=path)
        st, _, _, _ = eng.prefill(torch.tensor([[3, 1, 4]], device="cuda"), **kw)
        runs[path] = [eng.step(st, tok) for tok in feed]
        assert eng.last_path == ("eager" if path == "eager" else "graph")
    for a, b in zip(runs["eager"], runs["compiled"]):
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
    monkeypatch.setattr(Engine, "STATIC_MIN_KEYS", 4)
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

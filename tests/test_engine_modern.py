"""The engine decodes a hybrid made from today's nanochat (smear, block scalars, value embeddings, backout, sliding
windows): every step's logits equal the forward's (eager and static paths, plans, exits), across a prompt longer
than the window."""
import pytest
import torch

from nanochat.engine import Engine

from engine_testutil import check_against_forward
from test_surgery_modern import make_hybrid, with_active_mamba, SRC

PROMPT = 140  # the short windows (128) cut inside the prompt already


def modern_hybrid(adaptive=False, seed=0):
    _, state, config, _ = make_hybrid("AM", 1, seed=seed, adaptive=adaptive, width_levels=[16, 32, 64],
                                      gate_hidden=16, predictor_hidden=16)
    model = with_active_mamba(config, state)
    if adaptive:  # gates that say different things for different tokens
        g = torch.Generator().manual_seed(seed)
        gate = model.controllers.gate
        with torch.no_grad():
            for p, std in ((gate.fc.weight, 0.15), (gate.gate_embed, 0.3), (gate.out.weight, 1.0)):
                p.copy_(torch.randn(p.shape, generator=g) * std)
            out = model(torch.randint(0, SRC["vocab_size"], (2, 16), generator=g), return_exits=True)
            for i in range(gate.n_gates):
                gate.out_bias[i] -= gate.logits(out.exit_hidden[i], i).median()
    return model.eval()


def prompts(B, seed=0):
    return torch.randint(0, SRC["vocab_size"], (B, PROMPT), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.parametrize("decode", ["eager", "static"])
@pytest.mark.parametrize("plan", ["think", [32] * 8, [64, 64, 16, 32, 64, 64, 32, 64]])
def test_decode_equals_the_forward(decode, plan):
    model = modern_hybrid()
    res = Engine(model, decode=decode).generate_batch(prompts(2), max_tokens=6, plan=plan)
    check_against_forward(model, res)


@pytest.mark.parametrize("decode", ["eager", "static"])
def test_decode_with_exits_and_widening_equals_the_forward(decode):
    model = modern_hybrid(adaptive=True)
    eng = Engine(model, decode=decode)
    res = eng.generate_batch(prompts(1, seed=2), max_tokens=8, plan="ghost", exit_threshold=0.6, expand_threshold=0.4)
    check_against_forward(model, res)
    assert any(s.exit_block.item() < model.config.n_layer - 1 or s.widened.item() for s in res.steps[1:])


def test_static_step_runs_static():
    model = modern_hybrid()
    eng = Engine(model, decode="static")
    res = eng.generate_batch(prompts(1), max_tokens=3)
    check_against_forward(model, res)
    assert eng.last_path == "static"


def test_speculation_and_dense_modern_are_refused():
    from test_gpt_modern import random_modern
    with pytest.raises(ValueError, match="surgery"):
        Engine(random_modern())
    with pytest.raises(ValueError, match="speculate=0"):
        list(Engine(modern_hybrid()).generate(prompts(1), 2, speculate=2))


@pytest.mark.parametrize("decode", ["eager", "static"])
def test_windowed_blocks_keep_a_ring_of_their_window(decode):
    # a short prompt and a long generation: the window blocks (128) keep 129 slots of the 170 positions
    from scripts.bench_decode import engine_cache_bytes
    model = modern_hybrid()
    eng = Engine(model, decode=decode)
    res = eng.generate_batch([p[:20] for p in prompts(2)], max_tokens=150)
    check_against_forward(model, res)
    cache, c = eng.state.cache, model.config
    windowed = [j for j in cache.layers if c.windows[j] == 128]  # the others' windows (512) exceed the 170 positions
    assert len(windowed) == 2 and all(cache.k[j].size(2) == 129 for j in windowed)
    assert all(cache.k[j].size(2) == 170 for j in cache.layers if j not in windowed)
    # the memory report counts the rings: less than the same cache with full-length windowed blocks
    from nanochat.matryoshka_kv import MatryoshkaKVCache
    full = MatryoshkaKVCache(model, 2, 170)
    ring_bytes = engine_cache_bytes("hybrid", eng.state)
    full_bytes = ring_bytes - sum(t.numel() * t.element_size() for j in windowed for t in (cache.k[j], cache.v[j], cache.heads[j])) \
        + sum(t.numel() * t.element_size() for j in windowed for t in (full.k[j], full.v[j], full.heads[j]))
    assert ring_bytes < full_bytes

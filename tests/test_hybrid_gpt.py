"""HybridGPT: width plans on every block kind, equivalences, residual accounting, exits, FLOPs."""
import importlib.util

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from nanochat.gpt import GPT, GPTConfig, CausalSelfAttention, MLP
from nanochat.layers import norm, LOGIT_SOFTCAP
from nanochat.hybrid_gpt import HybridGPT, HybridConfig
from nanochat.checkpoint_manager import save_model, load_model
from testutil import fill_zero_matrices

HAS_MAMBA = importlib.util.find_spec("nanochat.mamba_block") is not None
HAS_MOE = importlib.util.find_spec("nanochat.moe") is not None

LEVELS = [16, 32, 48, 64]
V = 64


def tiny_config(**kw):
    base = dict(sequence_len=32, vocab_size=V, n_layer=2, n_head=4, n_kv_head=2, n_embd=64,
                layer_pattern="A", ffn_pattern="D", d_state=8, d_conv=4, expand=2, mamba_headdim=16,
                num_experts=4, expert_dim=64, capacity_factor=4.0, width_levels=LEVELS, adaptive=False)
    base.update(kw)
    return HybridConfig(**base)


def randomize_outputs(model, std=0.2, seed=0):
    fill_zero_matrices(model, std, torch.Generator().manual_seed(seed))


def build(seed=0, **kw):
    torch.manual_seed(seed)
    model = HybridGPT(tiny_config(**kw))
    model.init_weights()
    randomize_outputs(model, seed=seed)
    return model


BLOCK_KINDS = [("A", "D", 1), ("A", "N", 1)]
if HAS_MAMBA:
    BLOCK_KINDS += [("M", "D", 1), ("M", "D", 2), ("M", "N", 1)]
if HAS_MOE:
    BLOCK_KINDS += [("A", "E", 1)]
if HAS_MAMBA and HAS_MOE:
    BLOCK_KINDS += [("M", "E", 2)]


@pytest.mark.parametrize("mixer,ffn,mamba_version", BLOCK_KINDS)
@pytest.mark.parametrize("width", LEVELS)
def test_every_level_every_block_kind_forward_backward(mixer, ffn, mamba_version, width):
    model = build(layer_pattern=mixer, ffn_pattern=ffn, mamba_version=mamba_version)
    model.train()
    idx = torch.randint(0, V, (2, 12))
    loss = model(idx, idx, width=width)
    assert torch.isfinite(loss)
    loss.backward()
    block = model.transformer.h[0]
    # the sliced weights get gradient; the unused part of attention/MLP weights gets none
    if mixer == "A":
        g = block.attn.c_q.weight.grad
        assert g[:width].abs().sum() > 0
        assert g[width:].abs().sum() == 0 and g[:, width:].abs().sum() == 0
    else:
        assert block.mamba.in_proj.weight.grad.abs().sum() > 0  # Mamba runs at full width
    if ffn == "D":
        hw = model.config.mlp_hidden * width // model.config.n_embd
        g = block.mlp.c_fc.weight.grad
        assert g[:hw, :width].abs().sum() > 0
        assert g[hw:].abs().sum() == 0 and g[:, width:].abs().sum() == 0


@pytest.mark.parametrize("mixer,ffn,mamba_version", BLOCK_KINDS)
def test_full_width_equals_default_forward(mixer, ffn, mamba_version):
    model = build(layer_pattern=mixer, ffn_pattern=ffn, mamba_version=mamba_version).eval()
    idx = torch.randint(0, V, (2, 12))
    ref = model(idx)
    assert torch.equal(model(idx, width=64), ref)
    assert torch.equal(model(idx, width=[64, 64]), ref)


def test_hybrid_attention_only_equals_nanochat_gpt():
    torch.manual_seed(0)
    gpt = GPT(GPTConfig(sequence_len=32, vocab_size=V, n_layer=2, n_head=4, n_kv_head=2, n_embd=64))
    gpt.init_weights()
    randomize_outputs(gpt)
    model = HybridGPT(tiny_config())
    model.load_state_dict(gpt.state_dict(), strict=True)
    idx = torch.randint(0, V, (3, 16))
    assert torch.equal(model(idx), gpt(idx))


@pytest.mark.parametrize("width", [32, 64])
def test_narrow_plan_equals_dense_model_from_prefix_weights(width):
    """At width w every attention/MLP sublayer is a smaller dense sublayer built from the prefix weights."""
    model = build(n_layer=3).eval()
    c = model.config
    h = width // c.head_dim
    kv = h // (c.n_head // c.n_kv_head)
    small_cfg = GPTConfig(sequence_len=32, vocab_size=V, n_layer=1, n_head=h, n_kv_head=kv, n_embd=width)
    hd, hid = c.head_dim, c.mlp_hidden * width // c.n_embd
    idx = torch.randint(0, V, (2, 10))
    T = idx.size(1)
    cos_sin = model.cos[:, :T], model.sin[:, :T]
    with torch.no_grad():
        x = norm(model.transformer.wte(idx))
        for block in model.transformer.h:
            attn = CausalSelfAttention(small_cfg, 0)
            attn.c_q.weight.copy_(block.attn.c_q.weight[:h * hd, :width])
            attn.c_k.weight.copy_(block.attn.c_k.weight[:kv * hd, :width])
            attn.c_v.weight.copy_(block.attn.c_v.weight[:kv * hd, :width])
            attn.c_proj.weight.copy_(block.attn.c_proj.weight[:width, :h * hd])
            mlp = MLP(small_cfg)
            assert mlp.c_fc.weight.shape == (hid, width)
            mlp.c_fc.weight.copy_(block.mlp.c_fc.weight[:hid, :width])
            mlp.c_proj.weight.copy_(block.mlp.c_proj.weight[:width, :hid])
            x = x + F.pad(attn(norm(x)[..., :width], cos_sin), (0, c.n_embd - width))
            x = x + F.pad(mlp(norm(x)[..., :width]), (0, c.n_embd - width))
        ref = LOGIT_SOFTCAP * torch.tanh(model.lm_head(norm(x)) / LOGIT_SOFTCAP)
        out = model(idx, width=width)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize("mixer,ffn,mamba_version", BLOCK_KINDS)
def test_no_double_residual(mixer, ffn, mamba_version):
    """With every output projection zeroed, each block is the identity on the residual stream."""
    model = build(layer_pattern=mixer, ffn_pattern=ffn, mamba_version=mamba_version, n_layer=3).eval()
    with torch.no_grad():
        for block in model.transformer.h:
            for name, p in block.named_parameters():
                if name.endswith(("c_proj.weight", "out_proj.weight", "w_out")):
                    p.zero_()
    idx = torch.randint(0, V, (2, 9))
    x0 = norm(model.transformer.wte(idx))
    out = model(idx, idx, return_exits=True)
    for h in out.exit_hidden:
        assert torch.equal(h, x0)


@pytest.mark.parametrize("mixer,ffn,mamba_version", BLOCK_KINDS)
def test_block_adds_each_sublayer_once(mixer, ffn, mamba_version):
    model = build(layer_pattern=mixer, ffn_pattern=ffn, mamba_version=mamba_version).eval()
    block = model.transformer.h[0]
    x = torch.randn(2, 7, 64)
    cos_sin = model.cos[:, :7], model.sin[:, :7]
    with torch.no_grad():
        if mixer == "A":
            y1 = block.attn(norm(x), 64, cos_sin)
        else:
            y1 = block.mamba(norm(x))
        x1 = x + y1
        if ffn == "D":
            y2 = block.mlp(norm(x1), 64)
        elif ffn == "E":
            y2 = block.moe(norm(x1))
        else:
            y2 = torch.zeros_like(x1)
        torch.testing.assert_close(block(x, 64, cos_sin), x1 + y2, rtol=0, atol=1e-6)


def test_last_readout_equals_model_output_and_exits():
    model = build(n_layer=4, exit_stride=2).eval()
    idx = torch.randint(0, V, (2, 8))
    out = model(idx, idx, return_exits=True)
    assert out.exit_blocks == [1, 3]
    assert torch.equal(model.readout(out.exit_hidden[-1]), out.logits)
    assert torch.equal(out.logits, model(idx))
    assert out.exit_losses.shape == (2, 2, 8)
    torch.testing.assert_close(out.exit_losses[-1].mean(), out.loss)
    assert out.exit_agree[-1].all()


def test_exit_after_freezes_residual():
    model = build(n_layer=3).eval()
    idx = torch.randint(0, V, (1, 6))
    out_full = model(idx, idx, return_exits=True)
    exit_after = torch.zeros(1, 6, dtype=torch.long)  # every token leaves after block 0
    logits = model(idx, exit_after=exit_after)
    torch.testing.assert_close(logits, model.readout(out_full.exit_hidden[0]), rtol=0, atol=0)


def test_impossible_widths_are_rejected():
    model = build()
    idx = torch.randint(0, V, (1, 4))
    for bad in (10, 0, 80, [64]):
        with pytest.raises(ValueError):
            model(idx, width=bad)
    with pytest.raises(ValueError):
        tiny_config(width_levels=[24, 64])  # not a multiple of head_dim 16
    with pytest.raises(ValueError):
        tiny_config(layer_pattern="AX")


def test_default_width_levels():
    cfg = HybridConfig(n_embd=2048, n_head=16, n_kv_head=16, vocab_size=V, n_layer=2)
    assert cfg.width_levels == [128, 256, 512, 1024, 2048]


def test_flops_match_counted_matmuls():
    """forward_flops_per_token summed over positions == FLOPs torch counts for the matmuls."""
    model = build(n_layer=2, n_kv_head=4).eval()
    T = 8
    idx = torch.randint(0, V, (1, T))
    for width in (32, 64):
        with FlopCounterMode(display=False) as counter:
            model(idx, width=width)
        counts = {str(k): v for k, v in counter.get_flop_counts()["Global"].items()}
        linear = counts.get("aten.mm", 0) + counts.get("aten.addmm", 0)
        rows = model.flops_breakdown(context_len=T, width=width)
        ours = T * sum(r.get("attn_proj", 0) + r.get("mlp", 0) + r.get("head", 0) for r in rows)
        assert linear == ours
        # the fused SDPA kernel is invisible to the counter on CPU: count its two matmuls at the same
        # shapes (full T x T scores, i.e. every token at context T) and compare with ours at context T
        h, _ = model.transformer.h[0].attn.heads_at(width)
        q = torch.randn(1, h, T, model.config.head_dim)
        with FlopCounterMode(display=False) as counter:
            (q @ q.transpose(-1, -2)) @ q
        per_layer = sum(counter.get_flop_counts()["Global"].values())
        assert len(rows) - 1 == 2 and 2 * per_layer == T * sum(r.get("attn_scores", 0) for r in rows)


def test_checkpoint_round_trip_registered(tmp_path):
    model = build(n_layer=2)
    save_model(tmp_path / "ckpt", 5, model)
    loaded, meta = load_model(tmp_path / "ckpt")
    assert isinstance(loaded, HybridGPT) and meta["model_kind"] == "hybrid"
    assert loaded.config == model.config
    idx = torch.randint(0, V, (2, 8))
    assert torch.equal(loaded(idx), model.eval()(idx))


def test_chunked_exit_readouts_equal_direct(monkeypatch):
    """Exit losses computed in recomputed chunks equal a direct readout, values and gradients."""
    model = build(n_layer=3)
    idx = torch.randint(0, V, (2, 10))
    monkeypatch.setattr(HybridGPT, "READOUT_CHUNK_TOKENS", 7)  # 20 tokens -> 3 uneven chunks
    out = model(idx, idx, return_exits=True)
    out.exit_losses[:-1].sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    out2 = model(idx, idx, return_exits=True)
    direct = torch.stack([F.cross_entropy(model.readout(h).flatten(0, 1), idx.flatten(), reduction="none").view(2, 10)
                          for h in out2.exit_hidden[:-1]])
    torch.testing.assert_close(out.exit_losses[:-1], direct.detach(), rtol=0, atol=1e-6)
    direct.sum().backward()
    for n, p in model.named_parameters():
        if n in grads:  # a parameter only the last block feeds gets zeros through the stack, None directly
            got = p.grad if p.grad is not None else torch.zeros_like(p)
            torch.testing.assert_close(grads[n], got, rtol=1e-4, atol=1e-5)  # fp32 summation order
    final_top1 = out2.logits.argmax(-1)
    for h, agree in zip(out2.exit_hidden, out2.exit_agree):
        assert torch.equal(agree, model.readout(h).argmax(-1) == final_top1)


def test_readout_chunks_kept_equal_recomputed(monkeypatch):
    """READOUT_CHECKPOINT off (each chunk keeps its logits for the backward) gives the recomputed chunks' exit losses
    and gradients exactly, and recomputes no lm_head forward in the backward."""
    model = build(n_layer=3)
    idx = torch.randint(0, V, (2, 10))
    monkeypatch.setattr(HybridGPT, "READOUT_CHUNK_TOKENS", 7)
    calls = []
    model.lm_head.register_forward_hook(lambda *_: calls.append(1))
    results = []
    for keep in (False, True):
        monkeypatch.setattr(HybridGPT, "READOUT_CHECKPOINT", not keep)
        model.zero_grad()
        calls.clear()
        out = model(idx, idx, return_exits=True)
        n_forward = len(calls)
        (out.loss + out.exit_losses[:-1].sum()).backward()
        results.append((out.exit_losses.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                                                   if p.grad is not None}, len(calls) - n_forward))
    (l0, g0, re0), (l1, g1, re1) = results
    assert torch.equal(l0, l1) and g0.keys() == g1.keys()
    for n in g0:
        assert torch.equal(g0[n], g1[n]), n
    assert re1 == 0 and re0 == 3 * 2  # 2 exits before the last, 3 chunks each, recomputed only when checkpointed

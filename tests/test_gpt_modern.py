"""ModernGPT (today's nanochat): a checkpoint in nanochat's layout round-trips through load_model, its logits equal a
plain-ops reference written from the state_dict, and its sliding-window attention is full attention with the band
mask."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

from nanochat.checkpoint_manager import load_model, save_nanochat_layout, save_model, CheckpointError
from nanochat.gpt_modern import ModernConfig, ModernGPT
from nanochat.modern_layers import layer_windows, has_value_embeds, window_keep
from nanochat.layers import attention

CFG = dict(sequence_len=64, vocab_size=100, n_layer=4, n_head=4, n_kv_head=2, n_embd=64, window_pattern="SL")


def random_modern(cfg=CFG, seed=0):
    """A ModernGPT whose every parameter is random (a fresh init zeroes the output projections and smear)."""
    torch.manual_seed(seed)
    model = ModernGPT(ModernConfig(**cfg))
    model.init_weights()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lambdas"):
                p.add_(torch.randn(p.shape, generator=g) * 0.2)
            elif p.ndim == 1:
                p.copy_(torch.rand(p.shape, generator=g) * 0.5 + 0.1)
            else:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[-1]))
    return model.eval()


def reference_logits(sd, cfg, idx):
    """Today's nanochat forward written out with plain ops on the state_dict (fp32), windows as explicit masks."""
    C, H, Hkv, L, T = cfg["n_embd"], cfg["n_head"], cfg["n_kv_head"], cfg["n_layer"], idx.size(1)
    hd = C // H

    def rms(x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + torch.finfo(x.dtype).eps)

    inv = 1.0 / (100000.0 ** (torch.arange(0, hd, 2).float() / hd))
    ang = torch.arange(T).float()[:, None] * inv[None]
    cos, sin = ang.cos()[None, :, None], ang.sin()[None, :, None]

    def rot(x):
        a, b = x[..., :hd // 2], x[..., hd // 2:]
        return torch.cat([a * cos + b * sin, -a * sin + b * cos], -1)

    e = rms(sd["transformer.wte.weight"].float()[idx])
    gate = sd["smear_lambda"] * torch.sigmoid(e[:, 1:, :24] @ sd["smear_gate.weight"].T)
    x = torch.cat([e[:, :1], e[:, 1:] + gate * e[:, :-1]], 1)
    x0, mid = x, None
    short = math.ceil(cfg["sequence_len"] / 4 / 128) * 128
    for i in range(L):
        p = f"transformer.h.{i}."
        x = sd["resid_lambdas"][i] * x + sd["x0_lambdas"][i] * x0
        xn = rms(x)
        q = (xn @ sd[p + "attn.c_q.weight"].T).view(2, T, H, hd)
        k = (xn @ sd[p + "attn.c_k.weight"].T).view(2, T, Hkv, hd)
        v = (xn @ sd[p + "attn.c_v.weight"].T).view(2, T, Hkv, hd)
        if f"value_embeds.{i}.weight" in sd:
            ve = sd[f"value_embeds.{i}.weight"].float()[idx].view(2, T, Hkv, hd)
            v = v + 3 * torch.sigmoid(xn[..., :12] @ sd[p + "attn.ve_gate.weight"].T)[..., None] * ve
        q, k = rms(rot(q)) * 1.2, rms(rot(k)) * 1.2
        k, v = k.repeat_interleave(H // Hkv, 2), v.repeat_interleave(H // Hkv, 2)
        s = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(hd)
        char = "L" if i == L - 1 else cfg["window_pattern"][i % len(cfg["window_pattern"])]
        w = cfg["sequence_len"] if char == "L" else short
        qi, ki = torch.arange(T)[:, None], torch.arange(T)[None]
        s = s.masked_fill(~((ki <= qi) & (qi - ki <= w)), float("-inf"))
        y = torch.einsum("bhqk,bkhd->bqhd", s.softmax(-1), v).reshape(2, T, C)
        x = x + y @ sd[p + "attn.c_proj.weight"].T
        x = x + F.relu(rms(x) @ sd[p + "mlp.c_fc.weight"].T).square() @ sd[p + "mlp.c_proj.weight"].T
        if i == L // 2:
            mid = x
    x = rms(x - sd["backout_lambda"] * mid)
    logits = (x @ sd["lm_head.weight"].T)[..., :cfg["vocab_size"]]
    return 15 * torch.tanh(logits / 15)


def test_windows_value_embeds_and_padding_follow_nanochat():
    # a quarter of 2048 (nanochat's comment there says 768; its code, and this, give 512); the last layer always L
    assert layer_windows("SSSL", 6, 2048) == [512, 512, 512, 2048, 512, 2048]
    assert layer_windows("SL", 4, 64) == [128, 64, 128, 64]  # a quarter of 64, rounded up to 128
    assert [i for i in range(5) if has_value_embeds(i, 5)] == [0, 2, 4]
    assert [i for i in range(4) if has_value_embeds(i, 4)] == [1, 3]
    assert ModernConfig(vocab_size=100).padded_vocab_size == 128
    sd = ModernGPT(ModernConfig(**CFG)).state_dict()
    assert sd["transformer.wte.weight"].shape == (128, 64) and sd["value_embeds.1.weight"].shape == (128, 32)
    assert "value_embeds.0.weight" not in sd and "transformer.h.0.attn.ve_gate.weight" not in sd
    with pytest.raises(ValueError, match="S and L"):
        ModernConfig(window_pattern="SX")


@pytest.mark.parametrize("cfg,T", [(CFG, 40), (dict(CFG, sequence_len=512, n_layer=3, window_pattern="S"), 160)])
def test_logits_equal_the_plain_reference(cfg, T):
    # the second: windows of 128 over 160 positions, so the band cuts
    model = random_modern(cfg)
    idx = torch.randint(0, cfg["vocab_size"], (2, T), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = model(idx)
        ref = reference_logits(model.state_dict(), cfg, idx)
    assert logits.shape == (2, T, cfg["vocab_size"]) and logits.abs().max() > 1.0
    assert (logits - ref).abs().max().item() < 1e-4


def test_sliding_window_equals_full_attention_with_the_band_mask():
    # window 128 on a 512 context: a 300-token sequence needs the band
    model = random_modern(dict(CFG, sequence_len=512, n_layer=2, window_pattern="S"))
    block, T = model.transformer.h[0], 300
    assert model.windows[0] == 128
    x = torch.randn(1, T, 64)
    q = block.attn.c_q(x).view(1, T, 4, 16).transpose(1, 2)
    k = block.attn.c_k(x).view(1, T, 2, 16).transpose(1, 2)
    v = block.attn.c_v(x).view(1, T, 2, 16).transpose(1, 2)
    i, j = torch.arange(T)[:, None], torch.arange(T)[None]
    band = (j <= i) & (i - j <= 128)
    full_masked = F.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), attn_mask=band)
    windowed = attention(q, k, v, keep=window_keep(torch.arange(T), T, 128))
    assert (windowed - full_masked).abs().max().item() < 1e-5
    unmasked = F.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), is_causal=True)
    assert (windowed - unmasked)[:, :, 200:].abs().max().item() > 1e-3  # the window does cut something


def test_nanochat_layout_round_trips_through_load_model(tmp_path):
    model = random_modern()
    meta = save_nanochat_layout(tmp_path / "d4", 7, model, extra_meta={"val_bpb": 1.0})
    written = json.loads((tmp_path / "d4" / "meta_000007.json").read_text())
    assert "model_kind" not in written and written["model_config"] == CFG == meta["model_config"]
    sd = torch.load(tmp_path / "d4" / "model_000007.pt", weights_only=True)
    assert set(sd) == set(model.state_dict())  # nanochat's key names, nothing of ours
    loaded, meta = load_model(tmp_path / "d4")
    assert isinstance(loaded, ModernGPT) and meta["checkpoint_step"] == 7
    idx = torch.randint(0, 100, (2, 20))
    with torch.no_grad():
        assert torch.equal(loaded(idx), model(idx))
    # bf16 embeddings (as nanochat stores them on CUDA) load as fp32 on the CPU
    sd["transformer.wte.weight"] = sd["transformer.wte.weight"].bfloat16()
    torch.save(sd, tmp_path / "d4" / "model_000007.pt")
    assert load_model(tmp_path / "d4")[0].transformer.wte.weight.dtype == torch.float32
    # our own writer records the kind; loads the same
    save_model(tmp_path / "ours", 3, model)
    with torch.no_grad():
        assert torch.equal(load_model(tmp_path / "ours")[0](idx), model(idx))


def test_loading_is_strict(tmp_path):
    model = random_modern()
    save_nanochat_layout(tmp_path / "d", 1, model)
    sd = torch.load(tmp_path / "d" / "model_000001.pt", weights_only=True)
    del sd["smear_lambda"]
    torch.save(sd, tmp_path / "d" / "model_000001.pt")
    with pytest.raises(CheckpointError, match="smear_lambda"):
        load_model(tmp_path / "d")


def test_trains_a_step():
    model = random_modern()
    model.train()
    idx = torch.randint(0, 100, (2, 16))
    loss = model(idx[:, :-1], idx[:, 1:])
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())

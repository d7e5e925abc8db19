"""
The dense GPT: shapes and loss, KV-cache decoding, GQA, the FLOP count, and loading a
nanochat-layout checkpoint checked against a forward written here from plain torch ops.
"""
import json
import math

import pytest
import torch
from torch.nn.attention import sdpa_kernel, SDPBackend
from torch.utils.flop_counter import FlopCounterMode

from nanochat.gpt import GPT, GPTConfig
from nanochat.checkpoint_manager import load_model, CheckpointError


def tiny_config(**overrides):
    cfg = dict(sequence_len=32, vocab_size=97, n_layer=2, n_head=4, n_kv_head=4, n_embd=64)
    cfg.update(overrides)
    return GPTConfig(**cfg)


def random_model(config, seed=0):
    """A GPT whose every weight is random and nonzero (init_weights zeroes the head and output projections)."""
    torch.manual_seed(seed)
    model = GPT(config)
    model.init_weights()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "wte" not in name:
                p.normal_(0.0, 1.0 / math.sqrt(p.size(1)))
    return model.eval()


# -----------------------------------------------------------------------------
# shapes and loss

def test_fresh_init_logits_shape_and_loss_is_log_vocab():
    config = tiny_config()
    model = GPT(config)
    model.init_weights()
    idx = torch.randint(0, config.vocab_size, (3, 10))
    logits = model(idx)
    assert logits.shape == (3, 10, config.vocab_size)
    assert logits.dtype == torch.float32
    # a zero lm_head gives uniform predictions: the loss is exactly ln(V)
    loss = model(idx, torch.randint(0, config.vocab_size, (3, 10)))
    assert loss.ndim == 0
    assert abs(loss.item() - math.log(config.vocab_size)) < 1e-5
    per_token = model(idx, torch.randint(0, config.vocab_size, (3, 10)), loss_reduction="none")
    assert per_token.shape == (30,)


def test_ignore_index_targets_do_not_count():
    model = random_model(tiny_config())
    idx = torch.randint(0, 97, (2, 8))
    targets = torch.randint(0, 97, (2, 8))
    masked = targets.clone()
    masked[:, 4:] = -1
    full = model(idx, targets, loss_reduction="none").view(2, 8)
    assert torch.allclose(model(idx, masked), full[:, :4].mean(), atol=1e-6)


def test_softcap_bounds_logits():
    model = random_model(tiny_config())
    with torch.no_grad():
        model.lm_head.weight.mul_(1000.0)
    logits = model(torch.randint(0, 97, (1, 8)))
    assert logits.abs().max().item() <= 15.0
    assert logits.abs().max().item() > 14.0  # the cap is actually reached, so the check above means something


# -----------------------------------------------------------------------------
# KV cache

@pytest.mark.parametrize("n_kv_head", [4, 2, 1])
def test_kv_cache_decode_equals_full_forward(n_kv_head):
    config = tiny_config(n_kv_head=n_kv_head)
    model = random_model(config)
    T = 12
    idx = torch.randint(0, config.vocab_size, (2, T))
    with torch.no_grad():
        full = model(idx)  # (B, T, V)
        # prefill a prefix, then one token at a time
        cache = model.new_kv_cache(2, T)
        prefix = 5
        steps = [model(idx[:, :prefix], kv_cache=cache)]
        for t in range(prefix, T):
            steps.append(model(idx[:, t:t + 1], kv_cache=cache))
        decoded = torch.cat(steps, dim=1)
        assert cache.pos == T
        assert (decoded - full).abs().max().item() < 1e-5
        # a multi-token chunk after a prefix: the chunk is causal within itself and sees the whole prefix
        cache = model.new_kv_cache(2, T)
        a = model(idx[:, :4], kv_cache=cache)
        b = model(idx[:, 4:9], kv_cache=cache)
        c = model(idx[:, 9:], kv_cache=cache)
        chunked = torch.cat([a, b, c], dim=1)
        assert (chunked - full).abs().max().item() < 1e-5


def test_kv_cache_overflow_is_an_error():
    model = random_model(tiny_config())
    cache = model.new_kv_cache(1, 4)
    with pytest.raises(RuntimeError, match="KV cache full"):
        model(torch.zeros(1, 5, dtype=torch.long), kv_cache=cache)


# -----------------------------------------------------------------------------
# GQA

def test_gqa_equals_mha_with_repeated_kv_heads():
    """GQA with n_kv_head < n_head is the same function as MHA whose k/v heads are copied per group."""
    gqa = random_model(tiny_config(n_head=4, n_kv_head=2))
    mha = GPT(tiny_config(n_head=4, n_kv_head=4))
    sd = dict(gqa.state_dict())
    head_dim = 64 // 4
    for i in range(2):
        for name in ("c_k", "c_v"):
            key = f"transformer.h.{i}.attn.{name}.weight"
            w = sd[key].view(2, head_dim, 64)  # (H_kv, D, C): query heads 2g and 2g+1 share kv head g
            sd[key] = w.repeat_interleave(2, dim=0).reshape(4 * head_dim, 64)
    mha.load_state_dict(sd, strict=True)
    mha.eval()
    idx = torch.randint(0, 97, (2, 10))
    with torch.no_grad():
        assert (gqa(idx) - mha(idx)).abs().max().item() < 1e-5


@pytest.mark.parametrize("hq,hkv", [(4, 4), (4, 2), (6, 1)])
@pytest.mark.parametrize("per_head_mask", [False, True])
def test_one_query_masked_attention_equals_masked_sdpa(hq, hkv, per_head_mask):
    # the static decode step's path (one query over a key buffer with a mask) against SDPA's masked math in
    # float64; fp32 1e-5; bf16 queries over an fp32 cache (autocast's case) 2e-2, bf16's rounding of the output
    from nanochat.layers import attention
    from nanochat.decode_attention import masked_attention
    torch.manual_seed(0)
    B, L, D = 3, 37, 16
    q = torch.randn(B, hq, 1, D)
    k, v = torch.randn(B, hkv, L, D), torch.randn(B, hkv, L, D)
    lengths = torch.tensor([1, 20, 37])
    keep = (torch.arange(L) < lengths[:, None]).view(B, 1, 1, L)
    if per_head_mask:  # each head sees a different prefix: checks the GQA grouping of the mask
        keep = keep & (torch.arange(L) < (L - torch.arange(hq))[:, None]).view(1, hq, 1, L)
        keep[..., 0] = True
    ref = torch.nn.functional.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=keep,
                                                           enable_gqa=hq != hkv)
    got = attention(q, k, v, keep=keep)
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5)
    got16 = masked_attention(q.bfloat16(), k, v, None, keep)
    assert got16.dtype == torch.bfloat16
    torch.testing.assert_close(got16.double(), ref, rtol=2e-2, atol=2e-2)
    if per_head_mask:  # a per-head mask shared by every row (batch dim 1)
        keep1 = keep[2:3]
        ref1 = torch.nn.functional.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=keep1,
                                                                enable_gqa=hq != hkv)
        torch.testing.assert_close(attention(q, k, v, keep=keep1).double(), ref1, rtol=1e-5, atol=1e-5)


def test_gqa_bad_head_counts_are_errors():
    with pytest.raises(ValueError, match="multiple of n_kv_head"):
        GPT(tiny_config(n_head=4, n_kv_head=3))
    with pytest.raises(ValueError, match="multiple of n_head"):
        GPT(tiny_config(n_embd=60, n_head=8, n_kv_head=8))


# -----------------------------------------------------------------------------
# FLOPs

def test_forward_flops_per_token_matches_counted_matmuls():
    """
    Convention (gpt.forward_flops_per_token): 2 FLOPs per multiply-accumulate of every matmul,
    attention counted per query over the keys it attends to; embedding lookup, norms, softmax
    and rotary are not counted. FlopCounterMode counts mm/bmm the same way (2 per MAC). Decoding
    one token at a time with the KV cache makes token t attend over exactly t+1 keys, and the
    math SDPA backend makes attention visible to the counter as bmm ops, so the counted total
    must equal sum_t forward_flops_per_token(t + 1).
    """
    config = tiny_config(n_head=4, n_kv_head=2, vocab_size=50)
    model = random_model(config)
    T = 7
    idx = torch.randint(0, config.vocab_size, (1, T))
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        cache = model.new_kv_cache(1, T)
        with counter:
            for t in range(T):
                model(idx[:, t:t + 1], kv_cache=cache)
    expected = sum(model.forward_flops_per_token(t + 1) for t in range(T))
    assert counter.get_total_flops() == expected
    # and the independent closed form for the weight matmuls alone, per token
    C, V, L = config.n_embd, config.vocab_size, config.n_layer
    kv_dim = config.n_kv_head * (C // config.n_head)
    weight_macs = L * (C * C + 2 * C * kv_dim + C * C + 8 * C * C) + C * V
    assert model.forward_flops_per_token(0) == 2 * weight_macs
    assert model.estimate_flops() == 3 * model.forward_flops_per_token(config.sequence_len / 2)


# -----------------------------------------------------------------------------
# nanochat-layout checkpoints, checked against a forward written from plain torch ops

NANO_CFG = dict(sequence_len=64, vocab_size=101, n_layer=2, n_head=4, n_kv_head=2, n_embd=64)


def nanochat_state_dict(cfg, seed=0):
    """A state_dict with nanochat's key names and dtypes (wte in bf16, the rest fp32)."""
    g = torch.Generator().manual_seed(seed)
    C, V, hd = cfg["n_embd"], cfg["vocab_size"], cfg["n_embd"] // cfg["n_head"]
    sd = {"transformer.wte.weight": torch.randn(V, C, generator=g).bfloat16()}
    shapes = {"attn.c_q": (cfg["n_head"] * hd, C), "attn.c_k": (cfg["n_kv_head"] * hd, C),
              "attn.c_v": (cfg["n_kv_head"] * hd, C), "attn.c_proj": (C, C),
              "mlp.c_fc": (4 * C, C), "mlp.c_proj": (C, 4 * C)}
    for i in range(cfg["n_layer"]):
        for name, shape in shapes.items():
            sd[f"transformer.h.{i}.{name}.weight"] = torch.randn(*shape, generator=g) / math.sqrt(shape[1])
    sd["lm_head.weight"] = torch.randn(V, C, generator=g) / math.sqrt(C)
    return sd


def write_nanochat_checkpoint(directory, sd, cfg, step=10):
    directory.mkdir(parents=True, exist_ok=True)
    torch.save(sd, directory / f"model_{step:06d}.pt")
    meta = {"step": step, "val_bpb": 1.23, "model_config": cfg, "user_config": {"depth": cfg["n_layer"]},
            "device_batch_size": 4, "max_seq_len": cfg["sequence_len"]}
    (directory / f"meta_{step:06d}.json").write_text(json.dumps(meta, indent=2))


def reference_forward(sd, cfg, idx):
    """nanochat's Oct-2025 GPT, written out with plain ops from the state_dict; fp32 logits (B, T, V)."""
    C, H, Hkv = cfg["n_embd"], cfg["n_head"], cfg["n_kv_head"]
    hd = C // H
    B, T = idx.shape

    def rms(x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + torch.finfo(x.dtype).eps)

    def rotate(x, cos, sin):  # x (B, T, H, D): dim j pairs with dim j + D/2
        x1, x2 = x[..., :hd // 2], x[..., hd // 2:]
        return torch.cat([x1 * cos + x2 * sin, -x1 * sin + x2 * cos], dim=-1)

    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, hd, 2).float() / hd))
    angles = torch.arange(T).float()[:, None] * inv_freq[None, :]  # (T, D/2)
    cos = angles.cos().bfloat16().float()[None, :, None, :]  # nanochat keeps cos/sin in bf16
    sin = angles.sin().bfloat16().float()[None, :, None, :]
    causal = torch.ones(T, T).tril().bool()
    x = rms(sd["transformer.wte.weight"].float()[idx])  # (B, T, C)
    for i in range(cfg["n_layer"]):
        p = lambda name: sd[f"transformer.h.{i}.{name}.weight"].float()
        h = rms(x)
        q = (h @ p("attn.c_q").T).view(B, T, H, hd)
        k = (h @ p("attn.c_k").T).view(B, T, Hkv, hd)
        v = (h @ p("attn.c_v").T).view(B, T, Hkv, hd)
        q, k = rms(rotate(q, cos, sin)), rms(rotate(k, cos, sin))
        k, v = k.repeat_interleave(H // Hkv, dim=2), v.repeat_interleave(H // Hkv, dim=2)
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(hd)
        att = scores.masked_fill(~causal, float("-inf")).softmax(-1)
        y = torch.einsum("bhqk,bkhd->bqhd", att, v).reshape(B, T, C)
        x = x + y @ p("attn.c_proj").T
        x = x + torch.relu(rms(x) @ p("mlp.c_fc").T).square() @ p("mlp.c_proj").T
    logits = rms(x) @ sd["lm_head.weight"].float().T
    return 15.0 * torch.tanh(logits / 15.0)


@pytest.mark.parametrize("compiled_prefix", [False, True])
def test_nanochat_checkpoint_loads_and_matches_reference(tmp_path, compiled_prefix):
    sd = nanochat_state_dict(NANO_CFG)
    saved = {("_orig_mod." + k if compiled_prefix else k): v for k, v in sd.items()}
    write_nanochat_checkpoint(tmp_path / "d2", saved, NANO_CFG)
    model, meta = load_model(tmp_path / "d2", device="cpu")
    assert isinstance(model, GPT) and meta["checkpoint_step"] == 10
    assert not model.training
    idx = torch.randint(0, NANO_CFG["vocab_size"], (2, 16))
    with torch.no_grad():
        logits = model(idx)
    ref = reference_forward(sd, NANO_CFG, idx)
    assert logits.shape == ref.shape == (2, 16, NANO_CFG["vocab_size"])
    assert logits.abs().max().item() > 1.0  # random weights: a nontrivial function
    assert (logits - ref).abs().max().item() < 1e-5
    # a model_<step>.pt path works as well as the directory
    model2, _ = load_model(tmp_path / "d2" / "model_000010.pt")
    with torch.no_grad():
        assert torch.equal(model2(idx), logits)


def test_newer_nanochat_checkpoint_is_refused_naming_the_features(tmp_path):
    sd = nanochat_state_dict(NANO_CFG)
    sd["resid_lambdas"] = torch.ones(NANO_CFG["n_layer"])
    sd["value_embeds.0.weight"] = torch.zeros(NANO_CFG["vocab_size"], NANO_CFG["n_embd"])
    write_nanochat_checkpoint(tmp_path / "new", sd, NANO_CFG)
    with pytest.raises((ValueError, CheckpointError)) as info:
        load_model(tmp_path / "new")
    msg = str(info.value)
    assert "residual lambdas" in msg and "value embeddings" in msg

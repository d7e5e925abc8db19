"""
Tests for the Mamba mixers, nanochat/mamba_block.py (Mamba, the shared MambaMixer) and nanochat/mamba2_block.py
(Mamba2) (CPU, PyTorch path).

References: the sequential float64 recurrences of nanochat/mamba_scan.py (selective_scan_reference, ssd_reference),
and a module-level reference forward written here from mamba-ssm's non-fused forward (nn.Conv1d, the
sequential scan, mamba-ssm's rms_norm_ref math). Expected state_dict shapes are derived by hand from
mamba-ssm 2.3.2's source, not from the module under test.
"""
import os
import sys

import pytest
import torch
import torch.nn.functional as F

from nanochat.mamba_block import InferenceParams, Mamba
from nanochat.mamba2_block import Mamba2
from nanochat.mamba_scan import selective_scan, selective_scan_reference, ssd_chunk_scan, ssd_reference

F64 = torch.float64


def rnd(*shape, dtype=F64):
    return torch.randn(*shape, dtype=dtype)


# -----------------------------------------------------------------------------
# scans against the sequential references

@pytest.mark.parametrize("L", [1, 7, 37])
@pytest.mark.parametrize("chunk_size", [4, 16])
def test_selective_scan_matches_reference(L, chunk_size):
    torch.manual_seed(L + chunk_size)
    Bsz, D, N = 2, 3, 4
    args = (rnd(Bsz, D, L), rnd(Bsz, D, L), -torch.rand(D, N, dtype=F64) * 3 - 0.1, rnd(Bsz, N, L), rnd(Bsz, N, L))
    kw = dict(D=rnd(D), z=rnd(Bsz, D, L), delta_bias=rnd(D), delta_softplus=True, initial_state=rnd(Bsz, D, N),
              return_last_state=True)
    # row 0: three documents (a boundary inside and at the edge of chunks), row 1: one document
    seq_idx = torch.stack([torch.arange(L) // 5 * 3, torch.full((L,), 7)])
    for s in (None, seq_idx):
        y, last = selective_scan(*args, seq_idx=s, chunk_size=chunk_size, **kw)
        y_ref, last_ref = selective_scan_reference(*args, seq_idx=s, **kw)
        torch.testing.assert_close(y, y_ref, atol=1e-10, rtol=0)
        torch.testing.assert_close(last, last_ref, atol=1e-10, rtol=0)
    if L > 5:  # the reset really happened: the final state of row 0 ignores the initial state
        y2, last2 = selective_scan(*args, seq_idx=seq_idx, chunk_size=chunk_size, **{**kw, "initial_state": None})
        torch.testing.assert_close(last2[0], last[0], atol=1e-12, rtol=0)
        assert (last2[1] - last[1]).abs().max() > 1e-6


@pytest.mark.parametrize("L", [1, 13, 40])
@pytest.mark.parametrize("ngroups", [1, 2])
@pytest.mark.parametrize("D_has_hdim", [False, True])
def test_ssd_chunk_scan_matches_reference(L, ngroups, D_has_hdim):
    torch.manual_seed(L * 10 + ngroups)
    b, h, p, n, chunk = 2, 4, 3, 5, 8
    x, dt = rnd(b, L, h, p), F.softplus(rnd(b, L, h)) + 0.01
    A, B, C = -torch.rand(h, dtype=F64) * 2 - 0.1, rnd(b, L, ngroups, n), rnd(b, L, ngroups, n)
    kw = dict(D=rnd(h, p) if D_has_hdim else rnd(h), z=rnd(b, L, h, p), initial_states=rnd(b, h, p, n))
    # boundaries at 8 (a chunk edge) and 11 (inside a chunk) in row 0
    seq_idx = torch.stack([(torch.arange(L) >= 8).long() + (torch.arange(L) >= 11).long(), torch.zeros(L, dtype=torch.long)])
    for s in (None, seq_idx):
        y, final = ssd_chunk_scan(x, dt, A, B, C, chunk, seq_idx=s, return_final_states=True, **kw)
        y_ref, final_ref = ssd_reference(x, dt, A, B, C, seq_idx=s, **kw)
        torch.testing.assert_close(y, y_ref, atol=1e-10, rtol=0)
        torch.testing.assert_close(final, final_ref, atol=1e-10, rtol=0)


def test_ssd_chunk_scan_dt_options_match_preprocessed_dt():
    torch.manual_seed(0)
    b, L, h, p, n = 1, 10, 2, 2, 3
    x, dt_raw, dt_bias = rnd(b, L, h, p), rnd(b, L, h), rnd(h)
    A, B, C = -torch.rand(h, dtype=F64) - 0.5, rnd(b, L, 1, n), rnd(b, L, 1, n)
    y = ssd_chunk_scan(x, dt_raw, A, B, C, 4, dt_bias=dt_bias, dt_softplus=True, dt_limit=(0.2, 0.9))
    y_ref, _ = ssd_reference(x, F.softplus(dt_raw + dt_bias).clamp(0.2, 0.9), A, B, C)
    torch.testing.assert_close(y, y_ref, atol=1e-10, rtol=0)


def test_selective_scan_gradcheck():
    torch.manual_seed(0)
    Bsz, D, L, N = 1, 2, 5, 2
    inputs = (rnd(Bsz, D, L), F.softplus(rnd(Bsz, D, L)), -torch.rand(D, N, dtype=F64) - 0.2, rnd(Bsz, N, L),
              rnd(Bsz, N, L), rnd(D), rnd(Bsz, D, L), rnd(Bsz, D, N))
    inputs = tuple(t.requires_grad_() for t in inputs)
    seq_idx = torch.tensor([[0, 0, 0, 1, 1]])

    def fn(u, delta, A, B, C, D, z, h0):
        return selective_scan(u, delta, A, B, C, D, z, initial_state=h0, seq_idx=seq_idx, return_last_state=True, chunk_size=2)
    assert torch.autograd.gradcheck(fn, inputs)


def test_ssd_chunk_scan_gradcheck():
    torch.manual_seed(0)
    b, L, h, p, n = 1, 6, 2, 2, 2
    inputs = (rnd(b, L, h, p), F.softplus(rnd(b, L, h)), -torch.rand(h, dtype=F64) - 0.2, rnd(b, L, 1, n),
              rnd(b, L, 1, n), rnd(h), rnd(b, h, p, n))
    inputs = tuple(t.requires_grad_() for t in inputs)
    seq_idx = torch.tensor([[0, 0, 1, 1, 1, 1]])

    def fn(x, dt, A, B, C, D, h0):
        return ssd_chunk_scan(x, dt, A, B, C, 4, D=D, initial_states=h0, seq_idx=seq_idx, return_final_states=True)
    assert torch.autograd.gradcheck(fn, inputs)


# -----------------------------------------------------------------------------
# full modules against a reference forward built from mamba-ssm's non-fused path

def reference_mamba(m, u):
    L = u.shape[1]
    x, z = m.in_proj(u).transpose(1, 2).chunk(2, dim=1)  # (B, d_inner, L)
    x = F.silu(m.conv1d(x)[..., :L])
    dt, B, C = m.x_proj(x.transpose(1, 2)).split([m.dt_rank, m.d_state, m.d_state], dim=-1)
    y = selective_scan_reference(x, m.dt_proj(dt).transpose(1, 2), -torch.exp(m.A_log), B.transpose(1, 2),
                                 C.transpose(1, 2), m.D, z, delta_softplus=True)
    return m.out_proj(y.transpose(1, 2))


def reference_rmsnorm_gated(x, z, weight, eps, group_size, norm_before_gate):
    if not norm_before_gate:
        x = x * F.silu(z)
    g = x.unflatten(-1, (-1, group_size))
    out = (g / torch.sqrt(g.square().mean(-1, keepdim=True) + eps)).flatten(-2) * weight
    return out * F.silu(z) if norm_before_gate else out


def reference_mamba2(m, u):
    L = u.shape[1]
    d_mlp = m.d_inner - m.d_ssm
    z0, x0, z, xBC, dt = m.in_proj(u).split([d_mlp, d_mlp, m.d_ssm, m.d_ssm + 2 * m.ngroups * m.d_state, m.nheads], dim=-1)
    xBC = F.silu(m.conv1d(xBC.transpose(1, 2))[..., :L].transpose(1, 2))
    x, B, C = xBC.split([m.d_ssm, m.ngroups * m.d_state, m.ngroups * m.d_state], dim=-1)
    dt = F.softplus(dt + m.dt_bias)
    if m.dt_limit != (0.0, float("inf")):
        dt = dt.clamp(*m.dt_limit)
    H, P = m.nheads, m.headdim
    y, _ = ssd_reference(x.unflatten(-1, (H, P)), dt, -torch.exp(m.A_log), B.unflatten(-1, (m.ngroups, m.d_state)),
                         C.unflatten(-1, (m.ngroups, m.d_state)), D=m.D.view(H, P) if m.D_has_hdim else m.D,
                         z=None if m.rmsnorm else z.unflatten(-1, (H, P)))
    y = y.flatten(2)
    if m.rmsnorm:
        y = reference_rmsnorm_gated(y, z, m.norm.weight, m.norm.eps, m.d_ssm // m.ngroups, m.norm_before_gate)
    if d_mlp:
        y = torch.cat([F.silu(z0) * x0, y], dim=-1)
    return m.out_proj(y)


MAMBA1_CONFIGS = [dict(d_model=16), dict(d_model=16, d_state=4, expand=1, dt_rank=3, bias=True, conv_bias=False)]
MAMBA2_CONFIGS = [
    dict(d_model=32, d_state=8, headdim=8, ngroups=2, chunk_size=4),
    dict(d_model=32, d_state=4, headdim=8, d_ssm=32, D_has_hdim=True, chunk_size=4, bias=True),  # d_mlp = 32
    dict(d_model=16, d_state=4, headdim=8, rmsnorm=False, chunk_size=8, dt_limit=(0.01, 0.05)),
    dict(d_model=16, d_state=4, headdim=4, ngroups=2, norm_before_gate=True, chunk_size=256, conv_init=0.3),
]
MODULES = [(Mamba, c) for c in MAMBA1_CONFIGS] + [(Mamba2, c) for c in MAMBA2_CONFIGS]
IDS = [f"{cls.__name__}-{i}" for i, (cls, _) in enumerate(MODULES)]


def build(cls, cfg, dtype=F64, seed=0):
    torch.manual_seed(seed)
    m = cls(**cfg, layer_idx=0).to(dtype)
    m.path = "torch"
    with torch.no_grad():  # move off the init point so D, A_log and the norm are exercised
        for p in m.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return m


@pytest.mark.parametrize("cls,cfg", MODULES, ids=IDS)
@pytest.mark.parametrize("L", [1, 11])
def test_module_forward_matches_reference(cls, cfg, L):
    m = build(cls, cfg)
    u = rnd(2, L, m.d_model)
    ref = reference_mamba(m, u) if cls is Mamba else reference_mamba2(m, u)
    torch.testing.assert_close(m(u), ref, atol=1e-10, rtol=0)


# -----------------------------------------------------------------------------
# decoding: step, prefill + step, chunked prefill

def run_cached(m, u, splits):
    """Feed u (B, L, D) through forward with an InferenceParams cache in pieces of the given lengths."""
    params = InferenceParams(max_seqlen=u.shape[1], max_batch_size=u.shape[0])
    outs, t = [], 0
    for n in splits:
        outs.append(m(u[:, t:t + n], inference_params=params))
        params.seqlen_offset += n
        t += n
    return torch.cat(outs, dim=1), params.key_value_memory_dict[0]


@pytest.mark.parametrize("cls,cfg", MODULES, ids=IDS)
def test_decode_matches_forward(cls, cfg):
    m = build(cls, cfg, dtype=torch.float32)
    torch.manual_seed(1)
    u = torch.randn(2, 13, m.d_model)
    with torch.no_grad():
        full = m(u)
        _, (conv_full, ssm_full) = run_cached(m, u, [13])
        for splits in ([1] * 13, [5] + [1] * 8, [7, 6], [2, 9, 2]):
            out, (conv_state, ssm_state) = run_cached(m, u, splits)
            torch.testing.assert_close(out, full, atol=1e-5, rtol=1e-5, msg=f"splits {splits}")
            torch.testing.assert_close(conv_state, conv_full, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(ssm_state, ssm_full, atol=1e-5, rtol=1e-5)
        # step() directly on freshly allocated states
        conv_state, ssm_state = m.allocate_inference_cache(2, 13)
        steps = [m.step(u[:, t:t + 1], conv_state, ssm_state)[0] for t in range(13)]
        torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)


def test_cache_shapes_and_layout():
    m1, m2 = Mamba(16, d_state=4, layer_idx=3), Mamba2(32, d_state=8, headdim=8, ngroups=2, layer_idx=3)
    c, s = m1.allocate_inference_cache(5, 100)
    assert c.shape == (5, 32, 4) and s.shape == (5, 32, 4)
    c, s = m2.allocate_inference_cache(5, 100, dtype=torch.bfloat16)
    assert c.shape == (5, 64 + 2 * 2 * 8, 4) and s.shape == (5, 8, 8, 8)
    assert c.stride(1) == 1 and c.dtype == s.dtype == torch.bfloat16  # channel-last, as mamba-ssm's
    params = InferenceParams(max_seqlen=8, max_batch_size=2)
    m2(torch.randn(2, 3, 32), inference_params=params)
    assert set(params.key_value_memory_dict) == {3}
    with pytest.raises(ValueError, match="batch"):
        m2(torch.randn(3, 3, 32), inference_params=params)


# -----------------------------------------------------------------------------
# masks and packed documents

def padded_batch(seqs, L, side):
    """Two sequences (n_i, D) into (2, L, D) with a mask; side: left, right or interior (a hole of 2)."""
    u = torch.zeros(len(seqs), L, seqs[0].shape[-1], dtype=seqs[0].dtype)
    mask = torch.zeros(len(seqs), L, dtype=torch.bool)
    for i, s in enumerate(seqs):
        n = s.shape[0]
        if side == "left":
            pos = torch.arange(L - n, L)
        elif side == "right":
            pos = torch.arange(n)
        else:
            pos = torch.cat([torch.arange(3), torch.arange(5, n + 2)])
        u[i, pos], mask[i, pos] = s, True
        u[i, ~mask[i]] = 100.0  # garbage in the pads must not leak
    return u, mask


@pytest.mark.parametrize("cls,cfg", MODULES, ids=IDS)
@pytest.mark.parametrize("side", ["left", "right", "interior"])
def test_mask_equals_unpadded(cls, cfg, side):
    m = build(cls, cfg)
    torch.manual_seed(2)
    seqs = [rnd(9, m.d_model), rnd(6, m.d_model)]
    u, mask = padded_batch(seqs, 12, side)
    out = m(u, mask=mask)
    for i, s in enumerate(seqs):
        torch.testing.assert_close(out[i][mask[i]], m(s[None])[0], atol=1e-10, rtol=0)
    assert (out[~mask] == 0).all()
    # prefill the padded batch into a cache, then decode: same as each sequence on its own
    params = InferenceParams(max_seqlen=20, max_batch_size=2)
    m(u, inference_params=params, mask=mask)
    params.seqlen_offset = 12
    nxt = rnd(2, 3, m.d_model)
    cont = m(nxt, inference_params=params)  # chunked-prefill continuation from the cached states
    for i, s in enumerate(seqs):
        alone = m(torch.cat([s, nxt[i]])[None])[0, -3:]
        torch.testing.assert_close(cont[i], alone, atol=1e-10, rtol=0)


@pytest.mark.parametrize("cls,cfg", MODULES, ids=IDS)
def test_seq_idx_packing_equals_separate(cls, cfg):
    m = build(cls, cfg)
    torch.manual_seed(3)
    # boundaries at 8 (a chunk edge) and 13 (inside a chunk); the last document is shorter than d_conv
    docs = [rnd(8, m.d_model), rnd(5, m.d_model), rnd(2, m.d_model)]
    packed = torch.cat(docs)[None]
    seq_idx = torch.cat([torch.full((d.shape[0],), i) for i, d in enumerate(docs)])[None]
    out = m(packed, seq_idx=seq_idx)
    torch.testing.assert_close(out[0], torch.cat([m(d[None])[0] for d in docs]), atol=1e-10, rtol=0)

    def cached_states(u, **kw):
        params = InferenceParams(20, u.shape[0])
        m(u, inference_params=params, **kw)
        return params.key_value_memory_dict[0]
    # the cached states after a packed prefill are those of the last document alone
    for a, b in zip(cached_states(packed, seq_idx=seq_idx), cached_states(docs[-1][None])):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=0)
    # a second row right-padded, its pads labelled as another document: they must not reset its state
    u = torch.cat([packed, torch.cat([docs[0], torch.zeros(7, m.d_model, dtype=F64)])[None]])
    mask = torch.ones(2, 15, dtype=torch.bool)
    mask[1, 8:] = False
    seq2 = torch.cat([seq_idx, (~mask[1:]).long() * 9])
    out2 = m(u, mask=mask, seq_idx=seq2)
    torch.testing.assert_close(out2[0], out[0], atol=1e-10, rtol=0)
    torch.testing.assert_close(out2[1, :8], m(docs[0][None])[0], atol=1e-10, rtol=0)
    for a, b in zip(cached_states(u, mask=mask, seq_idx=seq2), cached_states(docs[0][None])):
        torch.testing.assert_close(a[1], b[0], atol=1e-10, rtol=0)


# -----------------------------------------------------------------------------
# parameters: names, shapes, dtypes, flags, init (expected values read off mamba-ssm 2.3.2's source)

STATE_DICTS = [
    # Mamba(64): d_inner 128, dt_rank ceil(64/16) = 4, d_state 16
    (Mamba, dict(d_model=64), {
        "A_log": (128, 16), "D": (128,), "in_proj.weight": (256, 64), "conv1d.weight": (128, 1, 4),
        "conv1d.bias": (128,), "x_proj.weight": (4 + 32, 128), "dt_proj.weight": (128, 4), "dt_proj.bias": (128,),
        "out_proj.weight": (64, 128)}),
    (Mamba, dict(d_model=64, d_state=8, expand=1, dt_rank=4), {
        "A_log": (64, 8), "D": (64,), "in_proj.weight": (128, 64), "conv1d.weight": (64, 1, 4), "conv1d.bias": (64,),
        "x_proj.weight": (4 + 16, 64), "dt_proj.weight": (64, 4), "dt_proj.bias": (64,), "out_proj.weight": (64, 64)}),
    # Mamba2(256, headdim 32, d_state 16, ngroups 2): d_inner 512, nheads 16, in_proj 2*512 + 2*2*16 + 16
    (Mamba2, dict(d_model=256, headdim=32, d_state=16, ngroups=2), {
        "dt_bias": (16,), "A_log": (16,), "D": (16,), "in_proj.weight": (1104, 256), "conv1d.weight": (576, 1, 4),
        "conv1d.bias": (576,), "norm.weight": (512,), "out_proj.weight": (256, 512)}),
    # Mamba2(128) defaults: d_state 128, headdim 64 -> d_inner 256, nheads 4, in_proj 512 + 2*128 + 4
    (Mamba2, dict(d_model=128), {
        "dt_bias": (4,), "A_log": (4,), "D": (4,), "in_proj.weight": (772, 128), "conv1d.weight": (512, 1, 4),
        "conv1d.bias": (512,), "norm.weight": (256,), "out_proj.weight": (128, 256)}),
    # d_ssm 128 of d_inner 256, D per channel, no norm, biases: in_proj 2*256 + 2*16 + 4
    (Mamba2, dict(d_model=128, d_ssm=128, headdim=32, d_state=16, D_has_hdim=True, rmsnorm=False, bias=True,
                  conv_bias=False), {
        "dt_bias": (4,), "A_log": (4,), "D": (128,), "in_proj.weight": (548, 128), "in_proj.bias": (548,),
        "conv1d.weight": (160, 1, 4), "out_proj.weight": (128, 256), "out_proj.bias": (128,)}),
]


@pytest.mark.parametrize("cls,cfg,expected", STATE_DICTS, ids=[f"{c.__name__}-{i}" for i, (c, _, _) in enumerate(STATE_DICTS)])
def test_state_dict_matches_mamba_ssm(cls, cfg, expected):
    m = cls(**cfg, dtype=torch.bfloat16)
    sd = m.state_dict()
    assert {k: tuple(v.shape) for k, v in sd.items()} == expected
    # dtypes: Mamba keeps A_log in fp32; Mamba2 builds A_log in dtype; D is always the default (fp32)
    fp32 = {"D", "A_log"} if cls is Mamba else {"D"}
    for k, v in sd.items():
        assert v.dtype == (torch.float32 if k in fp32 else torch.bfloat16), k
    no_wd = {n for n, p in m.named_parameters() if getattr(p, "_no_weight_decay", False)}
    assert no_wd == ({"A_log", "D"} if cls is Mamba else {"A_log", "D", "dt_bias"})
    if cls is Mamba:
        assert m.dt_proj.bias._no_reinit is True
    fresh = cls(**cfg, dtype=torch.bfloat16)
    fresh.load_state_dict(sd, strict=True)
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), sd.values()))


def test_init_statistics():
    torch.manual_seed(0)
    m = Mamba(64, dt_min=0.002, dt_max=0.05)
    dt = F.softplus(m.dt_proj.bias)
    assert dt.min() >= 0.002 * (1 - 1e-5) and dt.max() <= 0.05 * (1 + 1e-5)
    assert dt.log().std() > 0.5  # log-uniform over a 25x range, not constant
    std = m.dt_rank ** -0.5
    assert m.dt_proj.weight.abs().max() <= std and m.dt_proj.weight.abs().max() > 0.8 * std
    torch.testing.assert_close(m.A_log, torch.log(torch.arange(1, 17.0)).expand(128, 16))
    assert torch.equal(m.D, torch.ones(128))
    assert torch.allclose(F.softplus(Mamba(64, dt_min=1e-5, dt_max=2e-5).dt_proj.bias), torch.tensor(1e-4), rtol=1e-4)  # floor
    m2 = Mamba2(256, headdim=16, d_state=16, A_init_range=(2, 8), dt_min=0.01, dt_max=0.02, conv_init=0.05)
    dt = F.softplus(m2.dt_bias)
    assert dt.min() >= 0.01 * (1 - 1e-5) and dt.max() <= 0.02 * (1 + 1e-5)
    A = m2.A_log.exp()
    assert A.min() >= 2 and A.max() <= 8 and A.std() > 0.5
    assert torch.equal(m2.D, torch.ones(32)) and torch.equal(m2.norm.weight, torch.ones(512))
    assert m2.conv1d.weight.abs().max() <= 0.05
    # reset_parameters re-creates the same init after a meta-device build
    with torch.device("meta"):
        meta = Mamba2(256, headdim=16, d_state=16)
    meta = meta.to_empty(device="cpu")
    meta.reset_parameters()
    assert torch.equal(meta.D, torch.ones(32)) and meta.A_log.exp().min() >= 1 and meta.A_log.exp().max() <= 16


# -----------------------------------------------------------------------------
# paths, compile, errors

# inductor needs ~80 s of C++ compilation on a 2-core CPU: opt in with ADAMBA_SLOW_TESTS=1
COMPILE_BACKENDS = ["aot_eager"] + (["inductor"] if os.environ.get("ADAMBA_SLOW_TESTS") else [])


@pytest.mark.parametrize("backend", COMPILE_BACKENDS)
@pytest.mark.parametrize("cls,cfg", [(Mamba, MAMBA1_CONFIGS[0]), (Mamba2, MAMBA2_CONFIGS[0])], ids=["Mamba", "Mamba2"])
def test_compile_torch_path(cls, cfg, backend):
    """torch.compile (fullgraph) of the PyTorch path with a mask and packed documents, forward + backward.
    Compiled, Mamba-1 scans with torch's associative_scan; eager, with the log-depth scan: this compares them."""
    mod = build(cls, cfg, dtype=torch.float32)
    u = torch.randn(2, 9, mod.d_model)
    kw = dict(seq_idx=torch.tensor([[0] * 5 + [1] * 4] * 2), mask=torch.arange(9)[None].expand(2, -1) >= torch.tensor([[0], [2]]))
    compiled = torch.compile(mod, backend=backend, fullgraph=True)
    try:
        out = compiled(u, **kw)
    except Exception as e:
        if backend == "aot_eager":  # needs no compiler toolchain: any failure is ours
            raise
        pytest.skip(f"torch.compile with {backend} unavailable here: {type(e).__name__}: {e}")
    out.square().sum().backward()
    grads = [p.grad.clone() for p in mod.parameters()]
    mod.zero_grad()
    eager = mod(u, **kw)
    eager.square().sum().backward()
    torch.testing.assert_close(out, eager, atol=1e-5, rtol=1e-5)
    for g, p in zip(grads, mod.parameters()):
        torch.testing.assert_close(g, p.grad, atol=1e-4, rtol=1e-4)


def test_paths_and_errors():
    m = Mamba(16)
    m.path = "kernel"  # no CUDA kernels on this machine
    with pytest.raises(RuntimeError, match="path='kernel'"):
        m(torch.randn(1, 3, 16))
    m.path = "fast"
    with pytest.raises(ValueError, match="path must be one of"):
        m(torch.randn(1, 3, 16))
    with pytest.raises(NotImplementedError, match="process_group"):
        Mamba2(64, headdim=16, process_group=object())
    m2 = Mamba2(64, headdim=16, d_state=8)
    with pytest.raises(NotImplementedError, match="cu_seqlens"):
        m2(torch.randn(1, 4, 64), cu_seqlens=torch.tensor([0, 4]))
    with pytest.raises(ValueError, match="bool"):
        m2(torch.randn(1, 4, 64), mask=torch.ones(1, 4))
    with pytest.raises(ValueError, match="layer_idx"):
        m2(torch.randn(1, 4, 64), inference_params=InferenceParams(4, 1))
    with pytest.raises(ValueError, match="multiple of ngroups"):
        Mamba2(64, headdim=16, ngroups=3)
    # mamba-ssm's flattened (B*L, D) input with seqlen
    u = torch.randn(2, 5, 64)
    torch.testing.assert_close(m2(u.flatten(0, 1), seqlen=5), m2(u).flatten(0, 1))


def test_compiled_step_takes_pytorch_ops(monkeypatch):
    """Under path='auto' a decode step that torch.compile traces runs the PyTorch ops (inductor fuses them) before
    any other reason is looked at; path='kernel' keeps the kernels there, and forward and eager steps are unchanged.
    The kernels are made to look present; this CPU's input then gives the reason a GPU would not have."""
    import nanochat.mamba_block as mb
    monkeypatch.setattr(mb, "KERNEL_IMPORT_ERROR", None)
    x, cpu = torch.randn(1, 1, 16), "input is not on CUDA"
    m, seen = Mamba(16), []

    @torch.compile(backend="eager", fullgraph=True)
    def traced(x, what):
        seen.append(m._kernel_reason(x, what))
        return x + 1

    for path, want in (("auto", ["a compiled decode step", cpu]), ("kernel", [cpu, cpu]),
                       ("torch", ["path='torch'"] * 2)):
        m.path, seen[:] = path, []
        torch._dynamo.reset()
        traced(x, "step")
        traced(x, "forward")
        assert seen == want, path
        assert m._kernel_reason(x, "step") == want[1], path  # an eager step: as forward


@pytest.mark.parametrize("cls,cfg", [(Mamba, c) for c in MAMBA1_CONFIGS] + [(Mamba2, c) for c in MAMBA2_CONFIGS])
@pytest.mark.parametrize("B,T", [(1, 1), (3, 4)])
def test_steps_equal_one_step_per_position(cls, cfg, B, T):
    """steps() (in_proj and out_proj over the T positions at once: the speculative verify pass) gives what T calls
    of step() give, fp32: outputs, the states after each position (what keep sees), the final states."""
    m = build(cls, cfg, dtype=torch.float32)
    u = torch.randn(B, 2 + T, m.d_model)
    conv, ssm = m.allocate_inference_cache(B, 2 + T)
    for t in range(2):  # a history first
        m.step(u[:, t:t + 1], conv, ssm)
    ref_conv, ref_ssm = conv.clone(), ssm.clone()
    ref, ref_kept = [], []
    for t in range(2, 2 + T):
        ref.append(m.step(u[:, t:t + 1], ref_conv, ref_ssm)[0])
        ref_kept.append((ref_conv.clone(), ref_ssm.clone()))
    kept = []
    out = m.steps(u[:, 2:], conv, ssm, lambda t, c, s: kept.append((t, c.clone(), s.clone())))
    torch.testing.assert_close(out, torch.cat(ref, 1), rtol=1e-6, atol=1e-6)
    assert [t for t, _, _ in kept] == list(range(T))
    for (_, c, s), (rc, rs) in zip(kept, ref_kept):
        torch.testing.assert_close(c, rc, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(s, rs, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ssm, ref_ssm, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(conv, ref_conv, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="step takes one token"):
        m.step(u[:, :2], conv, ssm)


@pytest.mark.parametrize("cls,cfg", MODULES, ids=IDS)
def test_steps_in_bf16_round_states_as_one_step_per_position(cls, cfg):
    """bf16 weights and states: steps() (_recur_many: the conv and what else reads no SSM state over the positions
    at once) rounds the conv inputs and each position's SSM state to bf16 where step() does, so it gives step()'s
    outputs and states to bf16's default tolerance (exactly, on this CPU)."""
    m = build(cls, cfg, dtype=torch.bfloat16)
    u = torch.randn(3, 7, m.d_model, dtype=torch.bfloat16)
    conv, ssm = m.allocate_inference_cache(3, 7)
    assert conv.dtype == ssm.dtype == torch.bfloat16
    for t in range(2):
        m.step(u[:, t:t + 1], conv, ssm)
    ref_conv, ref_ssm = conv.clone(), ssm.clone()
    ref = torch.cat([m.step(u[:, t:t + 1], ref_conv, ref_ssm)[0] for t in range(2, 7)], 1)
    out = m.steps(u[:, 2:], conv, ssm)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(ssm, ref_ssm)
    assert torch.equal(conv, ref_conv)


@pytest.mark.parametrize("cls,cfg", [(Mamba, MAMBA1_CONFIGS[0]), (Mamba2, MAMBA2_CONFIGS[0])], ids=["Mamba", "Mamba2"])
def test_masked_decode_step_leaves_state(cls, cfg):
    """A one-token call with a mask (a finished row in a batch): that row's output is 0, its states stay."""
    m = build(cls, cfg)
    u = rnd(2, 6, m.d_model)
    params = InferenceParams(8, 2)
    m(u[:, :5], inference_params=params)
    params.seqlen_offset = 5
    before = [s.clone() for s in params.key_value_memory_dict[0]]
    out = m(u[:, 5:], inference_params=params, mask=torch.tensor([[True], [False]]))
    assert (out[1] == 0).all()
    for b, s in zip(before, params.key_value_memory_dict[0]):
        assert torch.equal(b[1], s[1]) and not torch.equal(b[0], s[0])
    torch.testing.assert_close(out[0], m(u[:1])[0, 5:], atol=1e-10, rtol=0)


def test_bfloat16_forward_and_step_run():
    for m in (Mamba(32, d_state=4, dtype=torch.bfloat16), Mamba2(32, d_state=8, headdim=8, chunk_size=4, dtype=torch.bfloat16)):
        u = torch.randn(2, 7, 32, dtype=torch.bfloat16)
        y = m(u)
        conv_state, ssm_state = m.allocate_inference_cache(2, 7)
        steps = torch.cat([m.step(u[:, t:t + 1], conv_state, ssm_state)[0] for t in range(7)], 1)
        assert y.dtype == steps.dtype == torch.bfloat16
        torch.testing.assert_close(steps, y, atol=3e-2, rtol=3e-2)  # bf16 rounding of the cached states


# -----------------------------------------------------------------------------
# decode on the kernel path, with doubles that hold mamba-ssm 2.3.2's argument contract (CPU-testable)

def _ssu_double(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False):
    """selective_state_update's checks and math (ops/triton/selective_state_update.py, 2.3.2)."""
    heads = state.dim() == 4
    if not heads:
        state, x, dt, A, B, C = state[:, None], x[:, None], dt[:, None], A[None], B[:, None], C[:, None]
        D = None if D is None else D[None]
        z = None if z is None else z[:, None]
        dt_bias = None if dt_bias is None else dt_bias[None]
    b, h, p, n = state.shape
    g = B.shape[1]
    assert x.shape == (b, h, p) and dt.shape == x.shape and A.shape == (h, p, n)
    assert B.shape == (b, g, n) and C.shape == B.shape and h % g == 0
    assert D is None or D.shape == (h, p)
    assert z is None or z.shape == x.shape
    # the 2.3.2 kernel reads dt_bias.stride(-1) whether or not a bias is given: None crashes there
    assert dt_bias is not None and dt_bias.shape == (h, p), "dt_bias must be given as (nheads, dim)"
    f = torch.float32
    d = dt.to(f) + dt_bias.to(f)
    d = F.softplus(d) if dt_softplus else d
    Bh, Ch = B.to(f).repeat_interleave(h // g, 1), C.to(f).repeat_interleave(h // g, 1)
    new = state.to(f) * torch.exp(d[..., None] * A.to(f)) + (d * x.to(f))[..., None] * Bh[:, :, None, :]
    state.copy_(new)
    out = torch.einsum("bhpn,bhn->bhp", new, Ch)
    out = out if D is None else out + x.to(f) * D.to(f)
    out = (out if z is None else out * F.silu(z.to(f))).to(x.dtype)
    return out if heads else out[:, 0]


def _conv_update_double(x, conv_state, weight, bias=None, activation=None):
    """causal_conv1d_update's dtype check and math (causal-conv1d 1.7.0)."""
    assert x.dtype == conv_state.dtype, "Expected conv_state.scalar_type() == input_type"
    conv_state.copy_(torch.roll(conv_state, -1, -1))
    conv_state[:, :, -1] = x
    out = (conv_state * weight).sum(-1) + (0 if bias is None else bias)
    return F.silu(out) if activation in ("silu", "swish") else out


@pytest.mark.parametrize("cls,cfg", [(Mamba, dict(d_model=32, d_state=8)),
                                     (Mamba2, dict(d_model=64, d_state=8, headdim=16, ngroups=2)),
                                     (Mamba2, dict(d_model=64, d_state=8, headdim=16, rmsnorm=False))])
def test_kernel_step_contract(monkeypatch, cls, cfg):
    """step() on the kernel path calls the kernels as their contract demands (fp32 and bf16 autocast)
    and computes the torch path's function."""
    import nanochat.mamba_block as mb
    mixer_module = sys.modules[cls.__module__]  # where the class looks up selective_state_update
    torch.manual_seed(0)
    m = cls(**cfg)
    xs = torch.randn(2, 5, cfg["d_model"])

    def run(kernels, autocast):
        monkeypatch.setattr(mb.MambaMixer, "_use_kernels", lambda self, x, what, unsupported=None: kernels)
        monkeypatch.setattr(mixer_module, "selective_state_update", _ssu_double)
        monkeypatch.setattr(mb, "causal_conv1d_update", _conv_update_double)
        conv, ssm = m.allocate_inference_cache(2, 5)
        outs = []
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            for t in range(5):
                outs.append(m.step(xs[:, t:t + 1], conv, ssm)[0].float())
        return torch.cat(outs, 1), ssm.float()

    for autocast, tol in ((False, 1e-5), (True, 3e-2)):
        y_k, s_k = run(True, autocast)
        y_t, s_t = run(False, autocast)
        torch.testing.assert_close(y_k, y_t, rtol=tol, atol=tol)
        torch.testing.assert_close(s_k, s_t, rtol=tol, atol=tol)

"""
Surgery on nanochat-format checkpoints: create (Mamba blocks inserted) and grow (width), logits
unchanged; the written checkpoints load strictly; new weights are reachable by gradient; bad input
stops with a clear message.
"""
import itertools
import json
import os

import pytest
import torch

from nanochat.gpt import GPT, GPTConfig
from nanochat.checkpoint_manager import load_model, save_checkpoint, CheckpointError
from nanochat import surgery
from scripts import surgery as surgery_cli

V = 96
TOL = 1e-4


def write_nanochat_checkpoint(d, n_embd=64, n_head=4, n_kv_head=2, n_layer=2, seed=0, step=10, tokenizer=True):
    """A tiny GPT saved as nanochat does: model_000010.pt (wte bf16), meta_000010.json with model_config.
    Every weight random (a fresh init would zero c_proj and lm_head and hide mistakes)."""
    cfg = GPTConfig(sequence_len=32, vocab_size=V, n_layer=n_layer, n_head=n_head, n_kv_head=n_kv_head, n_embd=n_embd)
    torch.manual_seed(seed)
    model = GPT(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0.0, 1.0 if "wte" in name else 0.15)
    state = model.state_dict()
    state["transformer.wte.weight"] = state["transformer.wte.weight"].bfloat16()
    os.makedirs(d, exist_ok=True)
    torch.save(state, os.path.join(d, f"model_{step:06d}.pt"))
    with open(os.path.join(d, f"meta_{step:06d}.json"), "w") as f:
        json.dump({"step": step, "val_bpb": 1.0, "model_config": cfg.__dict__, "user_config": {}}, f)
    if tokenizer:
        with open(os.path.join(d, "tokenizer.pkl"), "wb") as f:
            f.write(b"tokenizer-bytes-" + bytes(range(16)))
        torch.save(torch.arange(V), os.path.join(d, "token_bytes.pt"))
    return str(d)


def logits_of(path, idx):
    model, _ = load_model(path)
    with torch.no_grad():
        return model(idx)


def perturb_checkpoint(src, dst, std=0.05, seed=1):
    """Stand-in for training: every tensor of a hybrid checkpoint moved off its init (zeros included),
    so growth is checked on a model whose Mamba blocks and new FFNs really compute something."""
    model, meta = load_model(src)
    g = torch.Generator().manual_seed(seed)
    state = {k: v + std * torch.randn(v.shape, generator=g) for k, v in model.state_dict().items()}
    meta = {k: v for k, v in meta.items() if k not in ("checkpoint_dir", "checkpoint_step")}
    save_checkpoint(dst, meta["step"], state, meta)
    for f in surgery_cli.TOKENIZER_FILES:
        os.link(os.path.join(src, f), os.path.join(dst, f))
    return dst


@pytest.fixture
def src(tmp_path, base_dir):
    return write_nanochat_checkpoint(tmp_path / "chatsft_checkpoints" / "d2")


IDX = torch.randint(0, V, (1, 16), generator=torch.Generator().manual_seed(7))


def run(argv):
    """The CLI with a short probe (the CPU here is small and shared)."""
    return surgery_cli.main([*argv, "--probe-tokens=16"])


# -----------------------------------------------------------------------------
# create

def test_create_default(src, tmp_path):
    dst = str(tmp_path / "out")
    out = run(["--new-dim=64", "--src", src, "--dst", dst])
    assert out["op"] == "create" and out["max_abs_dlogit"] <= TOL
    # independent check through the public loader (strict), not the script's own probe
    model, meta = load_model(dst)
    assert meta["model_kind"] == "hybrid" and model.config.n_layer == 4
    assert [model.config.mixer_kind(j) for j in range(4)] == ["A", "M", "A", "M"]
    assert (logits_of(src, IDX) - logits_of(dst, IDX)).abs().max() <= TOL
    # every source weight kept, at its new index; wte stays bf16 in the file
    src_sd = torch.load(os.path.join(src, "model_000010.pt"))
    dst_sd = torch.load(os.path.join(dst, "model_000010.pt"))
    assert set(dst_sd) == set(model.state_dict())
    assert dst_sd["transformer.wte.weight"].dtype == torch.bfloat16
    for i, j in ((0, 0), (1, 2)):
        for w in ("attn.c_q", "attn.c_k", "attn.c_v", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"):
            assert torch.equal(dst_sd[f"transformer.h.{j}.{w}.weight"], src_sd[f"transformer.h.{i}.{w}.weight"])
    # new blocks: residual writers zero, the rest initialised (mamba-ssm init: A_log = log(1..N), D = 1)
    for j in (1, 3):
        assert dst_sd[f"transformer.h.{j}.mamba.out_proj.weight"].abs().sum() == 0
        assert dst_sd[f"transformer.h.{j}.mlp.c_proj.weight"].abs().sum() == 0
        assert dst_sd[f"transformer.h.{j}.mlp.c_fc.weight"].std() > 0
        assert torch.allclose(dst_sd[f"transformer.h.{j}.mamba.A_log"][0], torch.log(torch.arange(1.0, 17.0)))
        assert torch.equal(dst_sd[f"transformer.h.{j}.mamba.D"], torch.ones(128))
    s = meta["surgery"]
    assert s["new_param_prefixes"] == ["transformer.h.1.mamba.", "transformer.h.1.mlp.",
                                       "transformer.h.3.mamba.", "transformer.h.3.mlp."]
    assert s["source"]["path"] == src and s["source"]["step"] == 10 and s["blocks_added"] == [1, 3]
    assert s["params_before"]["attention"] == s["params_after"]["attention"]
    assert s["params_before"]["mamba"] == 0 and s["params_after"]["mamba"] > 0
    # tokenizer files copied byte for byte
    for f in surgery_cli.TOKENIZER_FILES:
        assert open(os.path.join(src, f), "rb").read() == open(os.path.join(dst, f), "rb").read()


@pytest.mark.parametrize("flags", [["--mamba=2", "--mamba-headdim=16", "--mamba-ffn=none"],
                                   ["--mamba-ffn=moe", "--num-experts=4"],
                                   ["--pattern=AAM", "--mamba=2", "--mamba-headdim=32"]])
def test_create_variants(src, tmp_path, flags):
    dst = str(tmp_path / "out")
    out = run(["--new-dim=64", "--src", src, "--dst", dst, *flags])
    model, meta = load_model(dst)
    assert out["max_abs_dlogit"] <= TOL
    assert (logits_of(src, IDX) - logits_of(dst, IDX)).abs().max() <= TOL
    prefixes = meta["surgery"]["new_param_prefixes"]
    assert prefixes and all(".mamba." in p or ".moe." in p or ".mlp." in p for p in prefixes)
    assert all(model.config.mixer_kind(int(p.split(".")[2])) == "M" for p in prefixes)


def test_default_paths_and_tag(tmp_path, base_dir):
    # default source <base>/chatsft_checkpoints/d32 and destination <base>/hybrid_checkpoints/d32_<D>
    write_nanochat_checkpoint(base_dir / "chatsft_checkpoints" / "d32")
    out = run(["--new-dim=64"])
    assert out["dst"] == str(base_dir / "hybrid_checkpoints" / "d32_64")
    out = run(["--expand-from=64", "--new-dim=96"])  # default grow source: hybrid_checkpoints/d32_64
    assert out["dst"] == str(base_dir / "hybrid_checkpoints" / "d32_96") and out["op"] == "grow"


def test_create_and_grow_in_one_run(src, tmp_path):
    dst = str(tmp_path / "out")
    out = run(["--new-dim=96", "--src", src, "--dst", dst, "--mamba=2", "--mamba-headdim=16",
                            "--mamba-ngroups=2"])
    assert out["op"] == "create+grow" and out["n_embd"] == [64, 96]
    assert (logits_of(src, IDX) - logits_of(dst, IDX)).abs().max() <= TOL
    _, meta = load_model(dst)
    assert meta["model_config"]["grown_from"] == [64] and meta["model_config"]["mamba_ngroups"] == 3
    assert meta["surgery"]["new_param_prefixes"][0] == "transformer.h.1.mamba."


# -----------------------------------------------------------------------------
# grow

@pytest.mark.parametrize("mamba,head_growth", [(1, "add"), (2, "widen")])
def test_grow_chain_keeps_logits(src, tmp_path, mamba, head_growth):
    """64 -> 96 -> 128 (the tiny mirror of 256 -> 384 -> 512), on a hybrid whose every weight is nonzero."""
    created = str(tmp_path / "d2_64")
    run(["--new-dim=64", "--src", src, "--dst", created, f"--mamba={mamba}", "--mamba-headdim=16",
                      "--mamba-ngroups=2", "--mamba-ffn=moe", "--num-experts=4", "--capacity-factor=4"])
    trained = perturb_checkpoint(created, str(tmp_path / "trained_64"))
    ref = logits_of(trained, IDX)
    prev = trained
    for D, D2 in ((64, 96), (96, 128)):
        dst = str(tmp_path / f"g{D2}")
        out = run([f"--expand-from={D}", f"--new-dim={D2}", "--src", prev, "--dst", dst,
                                f"--head-growth={head_growth}"])
        assert out["max_abs_dlogit"] <= TOL
        model, meta = load_model(dst)
        assert (ref - logits_of(dst, IDX)).abs().max() <= TOL
        c = model.config
        assert c.n_embd == D2 and c.grown_from == ([64] if D == 64 else [64, 96])
        if head_growth == "add":
            assert c.head_dim == 16 and c.n_head == D2 // 16 and c.n_kv_head == c.n_head // 2  # GQA group kept
        else:
            assert c.n_head == 4 and c.rotary_dims == [16, 24] + ([32] if D2 == 128 else [])
            assert abs(c.softmax_scale - 0.25 * 16 / c.head_dim) < 1e-12
        assert c.mlp_hidden == 4 * D2 and c.expert_dim == 4 * D2
        assert c.width_levels[-1] == D2
        g = meta["surgery"]["grow"]
        assert g["from"] == D and g["to"] == D2 and meta["surgery"]["op"] == "grow"
        assert meta["surgery"]["previous"]["op"] in ("create", "grow")
        prev = dst


def test_grow_is_exact_in_float64(src):
    """In fp64 the grown model matches to the final fp32 cast: the construction is exact, not approximate."""
    state, meta, _, _ = surgery_cli.load_source(src)
    cfg = surgery.gpt_config_from_meta(meta, state)
    hstate, hcfg, _ = surgery.create_hybrid(state, cfg, mamba_version=1, d_state=8)
    g = torch.Generator().manual_seed(3)
    hstate = {k: v.double() + 0.05 * torch.randn(v.shape, generator=g, dtype=torch.float64) for k, v in hstate.items()}
    for mode in ("add", "widen"):
        gstate, gcfg, _ = surgery.grow(hstate, hcfg, 128, head_growth=mode)
        a = surgery.model_from_state("hybrid", hcfg, hstate).double()
        b = surgery.model_from_state("hybrid", gcfg, {k: v.double() for k, v in gstate.items()}).double()
        assert surgery.max_abs_logit_diff(a, b, IDX) <= 2e-6


def test_add_growth_old_width_plan_is_the_old_model(src, tmp_path):
    """Under head_growth=add the old channels/heads/units are the width-D prefix: plan D == source model."""
    state, meta, _, _ = surgery_cli.load_source(src)
    hstate, hcfg, _ = surgery.create_hybrid(state, surgery.gpt_config_from_meta(meta, state), d_state=8)
    hstate = {k: v.float() + 0.05 * torch.randn(v.shape) for k, v in hstate.items()}
    gstate, gcfg, _ = surgery.grow(hstate, hcfg, 128, width_levels=[64, 128])
    old = surgery.model_from_state("hybrid", hcfg, hstate)
    new = surgery.model_from_state("hybrid", gcfg, gstate)
    with torch.no_grad():
        assert (old(IDX) - new(IDX, width=64)).abs().max() <= TOL


@pytest.mark.parametrize("mamba,head_growth,ffn", [(1, "widen", "moe"), (2, "add", "dense")])
def test_no_new_weight_stays_dead(src, mamba, head_growth, ffn):
    """Two AdamW steps on the grown model: along every grown and every old dimension of every new-entry
    block of every grown tensor, each index gets a nonzero gradient (the vocab rows of wte and the expert
    index of MoE weights are skipped: which tokens / experts appear is up to the data)."""
    state, meta, _, _ = surgery_cli.load_source(src)
    hstate, hcfg, _ = surgery.create_hybrid(state, surgery.gpt_config_from_meta(meta, state), mamba_version=mamba,
                                            d_state=8, mamba_headdim=16, mamba_ngroups=2, mamba_ffn=ffn,
                                            num_experts=4, capacity_factor=4.0)
    hstate = {k: v.float() + 0.05 * torch.randn(v.shape) for k, v in hstate.items()}
    gstate, gcfg, info = surgery.grow(hstate, hcfg, 96, head_growth=head_growth)
    model = surgery.model_from_state("hybrid", gcfg, {k: v.clone() for k, v in gstate.items()}).train()
    for p in model.parameters():
        p.requires_grad_(True)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    acc = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    g = torch.Generator().manual_seed(1)
    for _ in range(2):
        idx = torch.randint(0, V, (4, 16), generator=g)
        loss = model(idx, torch.roll(idx, -1, 1))
        opt.zero_grad()
        loss.backward()
        for n, p in model.named_parameters():
            if p.grad is not None:
                acc[n] += p.grad.abs()
        opt.step()
    assert len(info["old_index"]) > 10
    dead = []
    for name, old_index in info["old_index"].items():
        a = acc[name]
        old_masks = [~surgery.new_entry_mask((n,), [runs]) for n, runs in zip(a.shape, old_index)]
        skip0 = name.endswith("wte.weight") or ".moe.w_" in name
        for sel in itertools.product((True, False), repeat=a.ndim):
            if all(sel):
                continue  # the old block
            ids = [torch.nonzero(m if s else ~m).squeeze(1) for m, s in zip(old_masks, sel)]
            if any(len(i) == 0 for i in ids):
                continue
            blk = a
            for k, i in enumerate(ids):
                blk = blk.index_select(k, i)
            for k in range(blk.ndim):
                if k == 0 and skip0:
                    continue
                if not bool((blk.movedim(k, 0).reshape(blk.shape[k], -1) > 0).any(1).all()):
                    dead.append((name, sel, k))
    assert not dead, dead


def test_new_entry_mask_matches_the_grown_tensors(src):
    state, meta, _, _ = surgery_cli.load_source(src)
    hstate, hcfg, _ = surgery.create_hybrid(state, surgery.gpt_config_from_meta(meta, state), mamba_version=2,
                                            mamba_headdim=16, mamba_ngroups=2, d_state=8)
    gstate, _, info = surgery.grow(hstate, hcfg, 128, head_growth="widen")
    s = info["residual_scale"]
    for name, scale in (("transformer.h.0.mlp.c_fc.weight", 1 / s), ("transformer.h.0.attn.c_v.weight", 1 / s),
                        ("transformer.h.1.mamba.in_proj.weight", 1 / s), ("transformer.h.1.mamba.conv1d.bias", 1.0),
                        ("transformer.h.0.attn.c_q.weight", (32 / 16) ** 0.5 / s)):
        mask = surgery.new_entry_mask(gstate[name].shape, info["old_index"][name])
        assert mask.sum() == gstate[name].numel() - hstate[name].numel()
        assert torch.allclose(gstate[name][~mask], (hstate[name].float() * scale).flatten(), atol=1e-7)
    # widen: new head dims of q/k read nothing of the old residual
    q = gstate["transformer.h.0.attn.c_q.weight"].view(4, 32, 128)
    assert q[:, 8:16, :64].abs().sum() == 0 and q[:, 24:, :64].abs().sum() == 0


def test_upcycle_moe(src, tmp_path):
    # what upcycling rests on, measured: MoE.from_dense with the straight-through gate and no dropping
    # computes the dense MLP; the plain Switch gate computes p * MLP(x), a different function
    from nanochat.moe import MoE
    g = torch.Generator().manual_seed(0)
    c_fc, c_proj = torch.randn(256, 64, generator=g) * 0.1, torch.randn(64, 256, generator=g) * 0.1
    x = torch.randn(2, 16, 64, generator=g)
    dense = torch.relu(x @ c_fc.T).square() @ c_proj.T
    with torch.no_grad():
        assert (MoE.from_dense(c_fc, c_proj, 4)(x) - dense).abs().max() <= 1e-5
        assert (MoE.from_dense(c_fc, c_proj, 4, straight_gate=False)(x) - dense).abs().max() > 1e-2
    out = run(["--new-dim=64", "--src", src, "--dst", str(tmp_path / "out"), "--upcycle-moe", "--num-experts=4"])
    assert out["max_abs_dlogit"] <= TOL
    model, meta = load_model(tmp_path / "out")
    assert model.config.moe_straight_gate and not model.config.moe_drop_tokens


# -----------------------------------------------------------------------------
# checks that must fire

def test_probe_catches_a_changed_function(src, tmp_path, monkeypatch):
    real = surgery.create_hybrid

    def broken(*a, **k):
        state, config, info = real(*a, **k)
        state["transformer.h.1.mamba.out_proj.weight"] = torch.full_like(state["transformer.h.1.mamba.out_proj.weight"], 0.1)
        return state, config, info

    monkeypatch.setattr(surgery, "create_hybrid", broken)
    dst = tmp_path / "out"
    with pytest.raises(SystemExit, match="changed the logits"):
        run(["--new-dim=64", "--src", src, "--dst", str(dst)])
    assert not dst.exists() or not list(dst.iterdir())


def test_bad_inputs(src, tmp_path):
    created = str(tmp_path / "h64")
    run(["--new-dim=64", "--src", src, "--dst", created, "--mamba=2", "--mamba-headdim=16"])
    cases = [
        (["--expand-from=64", "--new-dim=72", "--src", created], ValueError, "multiple of head_dim"),
        (["--expand-from=64", "--new-dim=68", "--src", created, "--head-growth=widen"], ValueError, "multiple of 2\\*n_head"),
        (["--expand-from=64", "--new-dim=48", "--src", created], SystemExit, "never shrinks"),
        (["--expand-from=64", "--new-dim=64", "--src", created], SystemExit, "nothing to grow"),
        (["--expand-from=128", "--new-dim=256", "--src", created], SystemExit, "n_embd=64"),
        (["--expand-from=64", "--new-dim=96", "--src", created], ValueError, "mamba_ngroups"),  # 1*96/64
        (["--expand-from=64", "--new-dim=128", "--src", src], SystemExit, "run create first"),
        (["--new-dim=128", "--src", created], SystemExit, "--expand-from"),
        (["--new-dim=48", "--src", src], SystemExit, "never shrinks"),
        (["--new-dim=64", "--src", str(tmp_path / "no_such_dir")], CheckpointError, "does not exist"),
    ]
    for argv, exc, msg in cases:
        with pytest.raises(exc, match=msg):
            run(argv + ["--dst", str(tmp_path / "never")] if "--dst" not in argv else argv)
    # missing meta: a model file without its meta_<step>.json
    lone = tmp_path / "lone"
    write_nanochat_checkpoint(lone)
    os.remove(lone / "meta_000010.json")
    with pytest.raises(CheckpointError, match="meta"):
        run(["--new-dim=64", "--src", str(lone / "model_000010.pt")])
    with pytest.raises(CheckpointError, match="meta"):
        run(["--new-dim=64", "--src", str(lone)])
    # unknown model kind
    odd = tmp_path / "odd"
    write_nanochat_checkpoint(odd)
    meta = json.load(open(odd / "meta_000010.json"))
    json.dump(dict(meta, model_kind="transformer_xl"), open(odd / "meta_000010.json", "w"))
    with pytest.raises(CheckpointError, match="unknown model kind"):
        run(["--new-dim=64", "--src", str(odd)])
    # no tokenizer anywhere
    bare = tmp_path / "bare"
    write_nanochat_checkpoint(bare, tokenizer=False)
    with pytest.raises(CheckpointError, match="tokenizer"):
        run(["--new-dim=64", "--src", str(bare), "--dst", str(tmp_path / "never")])
    assert not (tmp_path / "never").exists()


def test_hub_offline_gives_a_clear_error(base_dir, monkeypatch):
    import huggingface_hub.constants
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read at import; set for this process too
    with pytest.raises(CheckpointError, match="cannot download karpathy/nanochat-d32"):
        run(["--new-dim=2048", "--hub", "karpathy/nanochat-d32"])


def test_benchmark_runs_on_a_small_synthetic_checkpoint(tmp_path):
    out = surgery_cli.main(["--benchmark-synthetic", "d1", "--bench-dir", str(tmp_path / "bench"), "--d-state=4",
                            "--probe-tokens=8"])
    assert out["peak_rss_bytes"] > 0 and out["output_bytes"] > out["checkpoint_bytes"]
    model, meta = load_model(str(tmp_path / "bench" / "dst"))
    assert meta["surgery"]["max_abs_dlogit"] <= TOL and model.config.n_layer == 2

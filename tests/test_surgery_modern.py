"""Surgery and growth from today's nanochat (ModernGPT): Mamba blocks inserted and widths grown with the logits
kept (fp32, <= 1e-4), its features on the hybrid's blocks, narrow widths and old configs unaffected."""
import pytest
import torch

from nanochat.hybrid_gpt import HybridConfig, HybridGPT
from nanochat.surgery import create_hybrid_from_modern, grow, model_from_state, params_by_kind
from nanochat.checkpoint_manager import save_nanochat_layout, load_model, save_model

from test_gpt_modern import CFG, random_modern
from testutil import fill_zero_matrices

# windows of 128 on a 512 context over 160 positions: the band cuts
SRC = dict(CFG, sequence_len=512, n_layer=4, window_pattern="SL")
T = 160


def tokens(seed=1, B=2, n=T):
    return torch.randint(0, SRC["vocab_size"], (B, n), generator=torch.Generator().manual_seed(seed))


def make_hybrid(pattern="AM", mamba_version=1, seed=0, **kw):
    src = random_modern(SRC, seed)
    kw = dict(dict(adaptive=False), **kw)
    state, config, info = create_hybrid_from_modern(src.state_dict(), src.config, layer_pattern=pattern,
                                                    mamba_version=mamba_version, d_state=8, mamba_headdim=16,
                                                    seed=seed, **kw)
    return src, state, config, info


@pytest.mark.parametrize("pattern,mamba_version", [("AM", 1), ("AMM", 2), ("MA", 1)])
def test_create_keeps_the_logits(pattern, mamba_version):
    src, state, config, info = make_hybrid(pattern, mamba_version)
    hybrid = model_from_state("hybrid", config, state)
    idx = tokens()
    with torch.no_grad():
        ref, out = src(idx), hybrid(idx)
    assert ref.abs().max() > 1.0 and (out - ref).abs().max().item() < 1e-4
    # the features sit on the attention blocks that hold the source layers
    attn = info["attention_blocks"]
    assert config.ve_blocks == [attn[1], attn[3]] and config.backout_block == attn[2]
    assert [config.windows[attn[i]] for i in range(4)] == [128, 512, 128, 512]
    assert all(config.windows[j] == 0 for j in info["blocks_added"])
    assert all(state[f"transformer.h.{j}.resid_lambda"] == 1 and state[f"transformer.h.{j}.x0_lambda"] == 0
               for j in info["blocks_added"])
    assert state["transformer.wte.weight"].shape[0] == SRC["vocab_size"]  # the padding rows are gone
    kinds = params_by_kind(state)
    assert kinds["scalars"] > 0 and kinds["total"] == sum(t.numel() for t in state.values())


def test_create_refuses_overriding_the_architecture():
    src = random_modern(SRC)
    with pytest.raises(ValueError, match="attn_scale"):
        create_hybrid_from_modern(src.state_dict(), src.config, attn_scale=0.5)


def with_active_mamba(config, state, seed=3):
    """The hybrid with every zero matrix (new Mamba out_proj and MLP c_proj) random: the new blocks do something."""
    model = model_from_state("hybrid", config, {k: v.clone() for k, v in state.items()})
    fill_zero_matrices(model, 0.05, torch.Generator().manual_seed(seed))
    return model


@pytest.mark.parametrize("head_growth", ["add", "widen"])
def test_growth_keeps_the_logits(head_growth):
    _, state, config, _ = make_hybrid("AM", 1)
    model = with_active_mamba(config, state)
    grown_state, grown_config, info = grow(model.state_dict(), config, 128, head_growth=head_growth)
    grown = model_from_state("hybrid", grown_config, grown_state)
    assert grown_config.ve_blocks == config.ve_blocks and grown_config.windows == config.windows
    idx = tokens()
    with torch.no_grad():
        ref, out = model(idx), grown(idx)
    assert (out - ref).abs().max().item() < 1e-4
    # the old width is a plan of the grown model (add: same heads), and every level runs
    for w in grown_config.width_levels:
        with torch.no_grad():
            assert torch.isfinite(grown(idx, width=w)).all()
    if head_growth == "add":
        j = config.ve_blocks[0]
        assert grown_state[f"transformer.h.{j}.attn.value_embed.weight"].shape[1] == 2 * state[
            f"transformer.h.{j}.attn.value_embed.weight"].shape[1]


def test_narrow_widths_per_token_widths_and_exits_run():
    _, state, config, _ = make_hybrid("AM", 1, width_levels=[16, 32, 64])
    model = with_active_mamba(config, state)
    idx = tokens(n=40)
    with torch.no_grad():
        full = model(idx)
        for w in (16, 32):
            narrow = model(idx, width=w)
            assert torch.isfinite(narrow).all() and (narrow - full).abs().max() > 1e-3
        # per-token widths all at full width are the static forward
        same = model(idx, width=torch.full((2, 40, config.n_layer), 64, dtype=torch.long))
        assert (same - full).abs().max().item() < 1e-5
        out = model(idx, return_exits=True, targets=idx)
        assert torch.isfinite(out.exit_losses).all()
    # gradients reach the new parameters
    model.train()
    model(idx, targets=idx).backward()
    j = config.ve_blocks[0]
    for name in (f"transformer.h.{j}.attn.value_embed.weight", f"transformer.h.{j}.attn.ve_gate.weight",
                 "smear_gate.weight", "smear_lambda", f"transformer.h.{config.n_layer - 1}.backout_lambda",
                 "transformer.h.0.resid_lambda", "transformer.h.1.x0_lambda"):
        assert model.get_parameter(name).grad.abs().sum() > 0, name


def test_hybrid_round_trips_and_old_configs_are_unchanged(tmp_path):
    _, state, config, _ = make_hybrid("AM", 1)
    model = model_from_state("hybrid", config, state)
    save_model(tmp_path / "h", 1, model)
    loaded, _ = load_model(tmp_path / "h")
    idx = tokens(n=20)
    with torch.no_grad():
        assert torch.equal(loaded(idx), model(idx))
    plain = HybridGPT(HybridConfig(n_layer=2, n_embd=64, n_head=4, n_kv_head=4, adaptive=False))
    assert not any(k.endswith(("lambda", "value_embed.weight", "ve_gate.weight")) or k.startswith("smear")
                   for k in plain.state_dict())


def test_surgery_script_takes_a_nanochat_layout_checkpoint(tmp_path):
    from scripts import surgery as surgery_cli
    src = random_modern(SRC)
    save_nanochat_layout(tmp_path / "src", 5, src)
    out = surgery_cli.main(["--src", str(tmp_path / "src"), "--dst", str(tmp_path / "dst"), "--new-dim", "128",
                            "--skip-tokenizer", "--mamba-headdim", "16", "--d-state", "8", "--probe-tokens", "160"])
    assert out["op"] == "create+grow" and out["max_abs_dlogit"] < 1e-4
    model, meta = load_model(tmp_path / "dst")
    assert meta["model_kind"] == "hybrid" and model.config.n_embd == 128 and model.config.smear


def test_flop_table_counts_the_windows():
    from nanochat.flops import flop_table
    _, state, config, _ = make_hybrid("AM", 1)
    table = flop_table(model_from_state("hybrid", config, state))
    j = config.windows.index(128)
    score = table.parts(j, config.n_embd)["score"]
    row = lambda c: table.breakdown(c)[j]["attn_scores"]  # noqa: E731
    assert row(100) == 100 * score and row(400) == 129 * score  # capped at the window's 129 positions
    # the prompt's count is the sum of its tokens' forwards (the last one's logits only)
    for T in (50, 129, 300):
        assert table.prefill(T) == sum(table.forward(c) for c in range(1, T + 1)) - (T - 1) * table.head
    # a step at position pos counts what its query attends
    assert table.attended(j, 400, 1) == 129 and table.attended(j, 10, 1) == 11

"""The one FLOP table (nanochat/flops.py): its closed forms against plain sums, and the dense GPT as its
all-attention case. (Counted matmuls against the table: tests/test_gpt.py, tests/test_hybrid_gpt.py; the
engine's per-token counts against it: tests/test_engine.py::test_flops_accounting.)"""
import pytest

from nanochat.flops import flop_table
from nanochat.gpt import GPT, GPTConfig
from nanochat.hybrid_gpt import HybridGPT, HybridConfig


def hybrid(**kw):
    cfg = dict(sequence_len=32, vocab_size=96, n_layer=4, n_head=4, n_kv_head=2, n_embd=64, layer_pattern="AM",
               ffn_pattern="DE", d_state=8, expand=2, num_experts=4, expert_dim=64, width_levels=[16, 32, 64])
    cfg.update(kw)
    return HybridGPT(HybridConfig(**cfg))


@pytest.mark.parametrize("T", [1, 2, 7, 33])
def test_prefill_closed_form_is_the_sum_over_positions(T):
    table = flop_table(hybrid())
    loop = sum(table.forward(t + 1) for t in range(T)) - (T - 1) * table.head  # one readout, at the last position
    assert table.prefill(T) == loop


def test_dense_gpt_is_the_all_attention_case():
    c = dict(sequence_len=32, vocab_size=96, n_layer=3, n_head=4, n_kv_head=2, n_embd=64)
    dense = flop_table(GPT(GPTConfig(**c)))
    hyb = flop_table(hybrid(**c, layer_pattern="A", ffn_pattern="D", mlp_hidden=256))
    for ctx in (0, 5, 16.5):
        assert dense.forward(ctx) == hyb.forward(ctx)
    assert dense.training() == hyb.training() == 3 * dense.forward(16)


def test_block_tokens_counts_what_runs():
    model = hybrid()
    table = flop_table(model)
    for j in range(4):
        for w in (16, 64):
            p = table.parts(j, w)
            full = table.block_tokens(j, w, T=1, pos=9, active=True, all_heads=False)
            exited = table.block_tokens(j, w, T=1, pos=9, active=False, all_heads=False)
            assert exited == p["kv"] + p["mamba"]  # an exited token only feeds the mixer's cache or state
            assert full == exited + p["qo"] + p["ffn"] + 10 * p["score"]  # the token at position 9 sees 10 keys
            widened = table.block_tokens(j, w, T=1, pos=9, active=False, all_heads=True)
            assert widened == exited + p["kv_lacked"]
            assert (p["kv_lacked"] == 0) == (w == 64 or model.config.mixer_kind(j) == "M")
    # a prompt chunk of T tokens: each token's own context
    p = table.parts(0, 32)
    assert table.block_tokens(0, 32, T=3, pos=4, active=True, all_heads=False) == \
        3 * (p["kv"] + p["qo"] + p["ffn"]) + (5 + 6 + 7) * p["score"]


def test_table_is_kept_on_the_model_and_plans_are_checked():
    model = hybrid()
    assert flop_table(model) is flop_table(model)
    with pytest.raises(ValueError, match="impossible"):
        flop_table(model).forward(0, width=24)


@pytest.mark.parametrize("windows", [[], [5, 0, 0, 0], [0, 0, 11, 0]])
def test_forward_is_the_total_of_its_breakdown(windows):
    """forward() (kept per-width terms for a uniform width) = the sum of breakdown's rows: every context (across
    a sliding window's edge; a fractional one as training's mean context), widths None / an int / a plan, each
    asked twice (the second from the kept terms)."""
    table = flop_table(hybrid(n_layer=4, layer_pattern="A" if windows else "AM", windows=windows))
    for width in (None, 32, 16, [64, 32, 16, 64]):
        for _ in range(2):
            for ctx in (0, 1, 4, 5, 6, 11, 12, 13, 31, 16.5):
                want = sum(r["total"] for r in table.breakdown(ctx, width))
                assert table.forward(ctx, width) == pytest.approx(want, rel=1e-15, abs=0)
                if isinstance(ctx, int):
                    assert table.forward(ctx, width) == want
    assert set(table._forward_terms) == {None, 32, 16}

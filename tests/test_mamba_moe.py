"""
Tests for nanochat/mamba_moe.py, the Mamba + MoE model (create_mamba_moe): the seed example, padding that never
leaks into real positions (Mamba-1 and Mamba-2 mixers), the input rotary, and the vocab-mode loss. CPU, small.
"""
import pytest
import torch
import torch.nn.functional as F

from nanochat.mamba_moe import create_mamba_moe, apply_rotary


def perturb_zero_inits(model):
    # fresh MoE w_out and lm_head are zero; give them values so every path carries signal and gradient
    with torch.no_grad():
        for layer in model.layers:
            layer.moe.w_out.normal_(0.0, 0.05)
            layer.moe.router.weight.normal_(0.0, 0.3)
        if model.vocab_size is not None:
            model.lm_head.weight.normal_(0.0, 0.05)


def test_seed_example():
    torch.manual_seed(0)
    model = create_mamba_moe(dim=256, depth=6, d_state=16, d_conv=2, expand=1, num_experts=4, expert_dim=512,
                             device="cpu")
    x = torch.randn(4, 512, 256)
    mask = torch.ones(4, 512, dtype=torch.bool)
    model.eval()
    with torch.no_grad():
        y = model(x, mask=mask)
    assert y.shape == (4, 512, 256) and torch.isfinite(y).all()
    assert torch.isfinite(model.aux_loss) and torch.isfinite(model.z_loss)
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.randn(1, 2049, 256))


@pytest.mark.parametrize("mamba_version", [1, 2])
def test_model_padding_does_not_leak(mamba_version):
    torch.manual_seed(0)
    kw = dict(mamba_kwargs=dict(headdim=16)) if mamba_version == 2 else {}
    model = create_mamba_moe(dim=32, depth=2, d_state=8, d_conv=4, expand=1, num_experts=4, expert_dim=64,
                             max_seq_len=32, mamba_version=mamba_version, device="cpu", **kw)
    perturb_zero_inits(model)
    x = torch.randn(2, 10, 32)
    y = model(x)
    aux = model.aux_loss.item()
    assert sum(layer.moe.last_stats["dropped"] for layer in model.layers) > 0  # capacity binds
    # row 0: 3 left + 2 right padding; row 1: 5 right padding; garbage in the padding
    xp = 50 * torch.randn(2, 15, 32)
    mask = torch.zeros(2, 15, dtype=torch.bool)
    xp[0, 3:13], mask[0, 3:13] = x[0], True
    xp[1, :10], mask[1, :10] = x[1], True
    yp = model(xp, mask=mask)
    torch.testing.assert_close(yp[0, 3:13], y[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(yp[1, :10], y[1], rtol=0, atol=1e-5)
    assert torch.equal(yp[~mask], torch.zeros(int((~mask).sum()), 32))
    assert abs(model.aux_loss.item() - aux) < 1e-6
    assert y.abs().mean() > 0.1  # the comparison is not between zeros


def test_rotary_is_a_rotation():
    x = torch.randn(2, 5, 9)
    pos = torch.arange(5).expand(2, 5)
    y = apply_rotary(x, pos)
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1))
    assert torch.equal(y[:, 0], x[:, 0]) and torch.equal(y[..., 8], x[..., 8])  # position 0, odd channel
    assert not torch.allclose(y[:, 1:], x[:, 1:])


def test_vocab_mode_loss_backprops_everywhere():
    torch.manual_seed(0)
    model = create_mamba_moe(dim=32, depth=2, d_state=8, d_conv=4, expand=1, num_experts=4, expert_dim=64,
                             max_seq_len=16, vocab_size=50, device="cpu", moe_kwargs=dict(top_k=2))
    perturb_zero_inits(model)
    idx = torch.randint(0, 50, (2, 12))
    logits = model(idx)
    assert logits.shape == (2, 12, 50) and logits.dtype == torch.float32
    targets = torch.randint(0, 50, (2, 12))
    targets[0, -3:] = -1
    loss = model(idx, targets)
    assert loss.ndim == 0
    expected = F.cross_entropy(logits.view(-1, 50), targets.view(-1), ignore_index=-1) + model.router_loss
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(model.router_loss, 1e-2 * model.aux_loss + 1e-3 * model.z_loss)
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    with pytest.raises(ValueError, match="token ids"):
        model(torch.randn(2, 12, 32))

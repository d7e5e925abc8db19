"""Helpers shared by the model tests."""
import torch


def fill_zero_matrices(model, std, generator, skip_prefix="controllers."):
    """A fresh init zeroes every residual-writing projection and the head, which would hide their role in
    a test: give every all-zero matrix (outside `skip_prefix`) N(0, std) values drawn from `generator`."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.startswith(skip_prefix) and p.ndim >= 2 and p.abs().sum() == 0:
                p.copy_(torch.randn(p.shape, generator=generator) * std)

"""
Evaluating a language model's loss in a tokenizer-independent unit: bits per byte.

A mean loss per token depends on the tokenizer (a bigger vocabulary packs more text per
token), so we sum the loss in nats over the target tokens and divide by the number of UTF-8
bytes those tokens stand for, then convert nats to bits:

    bpb = sum_t loss_t / (ln 2 * sum_t bytes(target_t))

Tokens that stand for no text (special tokens such as <|bos|>, token_bytes == 0) and
ignored targets (< 0, e.g. -1 masks) add neither loss nor bytes.

The model is called as `model(x, y, loss_reduction='none', **forward_kwargs)` and must return
per-token losses (B, T). `forward_kwargs` lets a model that can run in several ways (e.g. a
hybrid model at a given width plan) be evaluated in each of them with the same code; a
compute-vs-quality sweep is `loss_bytes_sums` called once per setting on the same batches.
"""
import math

import torch
import torch.distributed as dist


@torch.no_grad()
def loss_bytes_sums(model, batches, steps, token_bytes, forward_kwargs=None):
    """
    (total_nats, total_bytes) as 0-d tensors on token_bytes' device, summed over `steps` batches
    of this rank only. `batches` yields (x, y) or (x, y, state, ...) tuples; extra items are ignored.
    """
    forward_kwargs = forward_kwargs or {}
    # float64 sums keep long evals exact to the last digit printed; MPS has no float64
    acc_dtype = torch.float32 if token_bytes.device.type == "mps" else torch.float64
    total_nats = torch.zeros((), dtype=acc_dtype, device=token_bytes.device)
    total_bytes = torch.zeros((), dtype=torch.int64, device=token_bytes.device)
    batch_iter = iter(batches)
    for i in range(steps):
        try:
            batch = next(batch_iter)
        except StopIteration:
            raise ValueError(f"the evaluation batches ran out after {i} of {steps} steps: "
                             f"lower the number of eval tokens or use a bigger val split") from None
        x, y = batch[0], batch[1]
        loss = model(x, y, loss_reduction="none", **forward_kwargs)  # (B, T) nats per target token
        loss, y = loss.reshape(-1).float(), y.reshape(-1).to(token_bytes.device)
        if loss.numel() != y.numel():
            raise ValueError(f"model returned {loss.numel()} per-token losses for {y.numel()} targets; "
                             f"it must honour loss_reduction='none'")
        valid = y >= 0  # ignore_index targets (-1) must not index token_bytes
        num_bytes = torch.where(valid, token_bytes[torch.where(valid, y, 0)], 0).to(torch.int64)  # (B*T,)
        # ignored targets have loss 0 from cross_entropy(ignore_index=-1); zero-byte tokens are masked here
        total_nats += (loss.to(total_nats.device) * (num_bytes > 0)).sum(dtype=acc_dtype)
        total_bytes += num_bytes.sum()
    return total_nats, total_bytes


def all_reduce_sums(*tensors):
    """Sum tensors in place over all ranks when running distributed; a no-op otherwise."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        for t in tensors:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return tensors


def evaluate_bpb(model, batches, steps, token_bytes, forward_kwargs=None):
    """
    Bits per byte of `model` over `steps` batches from `batches`, summed over all ranks.
    token_bytes: (V,) integer tensor of bytes per token id (0 for special tokens), on the model's device.
    Raises if the batches hold no counted bytes (a bpb of nothing is not a number to report).
    """
    total_nats, total_bytes = loss_bytes_sums(model, batches, steps, token_bytes, forward_kwargs)
    all_reduce_sums(total_nats, total_bytes)
    nats, num_bytes = total_nats.item(), total_bytes.item()
    if num_bytes == 0:
        raise ValueError("the evaluation batches contain no target tokens with text (all special or ignored)")
    return nats / (math.log(2) * num_bytes)

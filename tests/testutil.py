"""Helpers shared by the model tests."""
import torch
from torch.utils._python_dispatch import TorchDispatchMode

# aten ops that make a CUDA host wait for the device: a value read back, or an output whose shape depends on data
SYNC_OPS = {"_local_scalar_dense", "item", "is_nonzero", "equal", "nonzero", "nonzero_numpy", "masked_select",
            "bincount", "_unique2", "unique_dim", "unique_consecutive"}


class SyncOps(TorchDispatchMode):
    """
    Records (in `seen`) every op dispatched inside it that syncs a CUDA host with the device: SYNC_OPS, an index
    or index_put_ with a bool mask (a nonzero), repeat_interleave with tensor repeats and no output_size.
    `.tolist()` bypasses dispatch, so reads made that way are not seen (torch.cuda.set_sync_debug_mode sees
    every kind, on a GPU).
    """

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        bool_index = name in ("index", "index_put_") and any(i is not None and i.dtype == torch.bool for i in args[1])
        tensor_repeats = (name == "repeat_interleave" and func._overloadname in ("Tensor", "self_Tensor")
                          and kwargs.get("output_size") is None)
        if name in SYNC_OPS or bool_index or tensor_repeats:
            self.seen.append(str(func))
        return func(*args, **kwargs)


def device_reads(fn):
    """(fn(), the names of the sync ops it dispatched): SyncOps around one call."""
    with SyncOps() as ops:
        out = fn()
    return out, ops.seen


def fill_zero_matrices(model, std, generator, skip_prefix="controllers."):
    """A fresh init zeroes every residual-writing projection and the head, which would hide their role in
    a test: give every all-zero matrix (outside `skip_prefix`) N(0, std) values drawn from `generator`."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.startswith(skip_prefix) and p.ndim >= 2 and p.abs().sum() == 0:
                p.copy_(torch.randn(p.shape, generator=generator) * std)

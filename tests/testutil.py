"""Helpers shared by the model tests."""
import json
import os
import subprocess
import sys
from pathlib import Path

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


def write_hybrid_checkpoint(d, tiny_data, gate_std=None):
    """A small adaptive hybrid (non-zero residual writers) saved with the tiny corpus's tokenizer. gate_std:
    random gate weights of that scale, so that the gates' scores vary from token to token (fresh: all 0.5)."""
    from nanochat.hybrid_gpt import HybridGPT, HybridConfig
    from nanochat.checkpoint_manager import save_model, copy_tokenizer_files
    config = HybridConfig(sequence_len=32, vocab_size=tiny_data["vocab_size"], n_layer=4, n_head=4, n_kv_head=2,
                          n_embd=256, layer_pattern="AM", ffn_pattern="DD", d_state=8, mamba_headdim=16,
                          width_levels=[64, 128, 256], gate_hidden=16, predictor_hidden=16)  # ghost: 128
    model = HybridGPT(config)
    model.init_weights()
    g = torch.Generator().manual_seed(0)
    fill_zero_matrices(model, 0.3, g)
    if gate_std is not None:
        gate = model.controllers.gate
        with torch.no_grad():
            for p in (gate.fc.weight, gate.gate_embed, gate.out.weight):
                p.copy_(torch.randn(p.shape, generator=g) * gate_std)
    save_model(str(d), 5, model)
    copy_tokenizer_files(tiny_data["tokenizer_dir"], str(d))
    return model


def dispatched_ops(fn):
    """(fn(), the names of every aten op it dispatched, in order)."""
    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    with Ops() as ops:
        out = fn()
    return out, ops.names


def interpreted(script, timeout, one_thread=False):
    """`python -c script <repository root>` from the root with TRITON_INTERPRET=1 (Triton's interpreter runs the
    kernels on the CPU; one_thread: OMP_NUM_THREADS=1 too); asserts that it succeeded (else shows its stderr's tail)
    and returns the JSON of its last stdout line."""
    root = str(Path(__file__).resolve().parents[1])
    env = dict(os.environ, TRITON_INTERPRET="1", **({"OMP_NUM_THREADS": "1"} if one_thread else {}))
    r = subprocess.run([sys.executable, "-c", script, root], env=env, capture_output=True, text=True, timeout=timeout,
                       cwd=root)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def exit_now():
    """End a spawned worker that passed: os._exit skips the interpreter's teardown, where a gloo thread still joinable
    at exit aborted the process now and then ("terminate called without an active exception", SIGABRT, about 1
    run in 30 on this project's CPU machine). A failing worker raises before this and spawn reports it."""
    os._exit(0)


def torchrun2(module, *args, timeout=300):
    """`python -m module args` as 2 torchrun processes (single-threaded) from the repository root; asserts that it
    succeeded (else shows the output's tails) and returns its stdout."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", module, *args]
    proc = subprocess.run(cmd, cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout

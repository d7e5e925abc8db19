"""
train_utils.apply_fsdp(bf16_matrices=True) (fractal_train --fsdp-bf16), 2 gloo processes on CPU under bf16 autocast:
the weight matrices are gathered as bf16, everything autocast leaves in fp32 (Mamba's A_log, D, dt bias, conv and
norm weights) stays fp32, the loss and gradients are those of the unsharded fp32 model under the same autocast, and a
checkpoint's full state dict is the model's.
"""
import copy

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from testutil import exit_now

WORLD = 2
# what the forward reads in fp32 (replicated, not sharded, under --fsdp-bf16): Mamba's SSM parameters, conv, norms
KEPT = ("A_log", ".D", "dt_bias", ".bias", "norm.weight", "conv1d.weight")


def small_hybrid(mamba, device="cpu"):
    from nanochat.hybrid_gpt import HybridConfig, HybridGPT
    config = HybridConfig(n_layer=2, n_embd=64, n_head=2, n_kv_head=2, vocab_size=96, sequence_len=16,
                          layer_pattern="AM", ffn_pattern="DD", mamba_version=mamba, exit_stride=1)
    torch.manual_seed(0)
    with torch.device(device):
        model = HybridGPT(config)
        model.init_weights()
    return model


def _worker(rank, store_path, mamba, keep, device, world):
    from nanochat.train_utils import apply_fsdp, allreduce_gradients, full_state_dict
    torch.set_num_threads(1)
    dist.init_process_group("gloo" if device == "cpu" else "nccl", store=dist.FileStore(store_path, world), rank=rank,
                            world_size=world)
    try:
        ref = small_hybrid(mamba, device)
        model = copy.deepcopy(ref)
        ctrl = list(model.controllers.parameters())  # replicated, as fractal_train does
        replicated = apply_fsdp(model, model.transformer.h, ctrl, device_type=device, separate=[model.transformer.wte],
                                reshard_after_forward=not keep, bf16_matrices=True)
        seen = {}  # the dtype of each parameter of a module while the module runs (gathered)
        for name, module in model.named_modules():
            module.register_forward_pre_hook(lambda m, i, name=name: seen.update(
                {f"{name}.{n}".lstrip("."): p.dtype for n, p in m.named_parameters()}))
        g = torch.Generator().manual_seed(1)
        x = torch.randint(0, 96, (2, 16), generator=g).to(device)
        y = torch.randint(0, 96, (2, 16), generator=g).to(device)
        losses = []
        for m in (ref, model):  # every rank the same rows: FSDP2's mean over ranks is then the one-process gradient
            with torch.autocast(device, dtype=torch.bfloat16):
                loss = m(x, y)
            loss.backward()
            losses.append(loss.detach())
        assert torch.equal(losses[0], losses[1]), (rank, losses)
        allreduce_gradients(replicated, divide_by=world)  # what FSDP leaves to the caller (fractal_train does it)
        kept = {n for n, p in ref.named_parameters() if n.endswith(KEPT) or n.startswith("controllers.")}
        assert {id(p) for p in replicated} == {id(p) for n, p in model.named_parameters() if n in kept}
        for name, p in ref.named_parameters():
            if name.startswith("controllers."):
                continue  # called outside the forward (model.controllers' own methods)
            if name.startswith("transformer.wte"):
                continue  # its own group, never cast (bf16 already on CUDA, as nanochat)
            want = torch.float32 if name in kept else torch.bfloat16
            assert seen[name] == want, (name, seen[name])
        got = dict(model.named_parameters())
        for name, p in ref.named_parameters():
            if name.startswith("controllers."):
                continue  # no gradient from this forward
            q = got[name]
            assert q.dtype == p.dtype and q.grad.dtype == p.grad.dtype, name  # the master weights and grads as before
            # fp32 sums in another order (the reduce-scatter's mean): equal to rounding
            g = q.grad.full_tensor() if hasattr(q.grad, "full_tensor") else q.grad
            torch.testing.assert_close(g, p.grad, rtol=1e-5, atol=1e-7, msg=name)
        # a checkpoint holds the whole model, the replicated fp32 parameters included, in their own dtypes
        state = full_state_dict(model)  # a collective; rank 0 gets it
        if rank == 0:
            want = ref.state_dict()
            assert state.keys() == want.keys()
            for k, v in state.items():
                assert v.dtype == want[k].dtype and torch.equal(v, want[k].cpu()), k
    finally:
        dist.destroy_process_group()
    exit_now()


@pytest.mark.parametrize("mamba,keep", [(1, False), (2, True)])
def test_bf16_gathered_matrices_equal_fp32_weights_under_autocast(tmp_path, mamba, keep):
    mp.spawn(_worker, args=(str(tmp_path / "store"), mamba, keep, "cpu", WORLD), nprocs=WORLD, join=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA: the mamba-ssm kernels' path, one NCCL rank")
@pytest.mark.parametrize("mamba", [1, 2])
def test_bf16_gathered_matrices_on_cuda(tmp_path, mamba):
    """The same on one GPU: the kernels (mamba-ssm, causal-conv1d, flash attention) take bf16 matrices and fp32
    SSM parameters and give the loss and gradients of fp32 weights under the same autocast."""
    mp.spawn(_worker, args=(str(tmp_path / "store"), mamba, True, "cuda", 1), nprocs=1, join=True)


def test_bf16_gathered_is_what_autocast_rounds():
    """Matrices and the head are gathered as bf16; the embedding, Mamba's SSM parameters, conv and norm weights,
    biases, routers and the controllers stay fp32."""
    from nanochat.train_utils import bf16_gathered
    for mamba in (1, 2):
        model = small_hybrid(mamba)
        got = {n for n, p in model.named_parameters() if not bf16_gathered(n, p, model.param_kind)}
        want = {n for n, p in model.named_parameters() if n.endswith(KEPT) or n.startswith(("transformer.wte", "controllers."))}
        assert got == want and got, (mamba, got ^ want)

"""
Expert parallelism (nanochat.moe_ep), 2 gloo processes on CPU (and NCCL on 2 GPUs where there are): each rank's
outputs and input gradients equal the unsharded MoE's on the same tokens, and each rank's expert gradients equal
the sum over ranks of the unsharded gradients of its experts, for drops, dropless top-2, padding, a rank with no
token, and a different Matryoshka width on each rank in the same call.
"""
import copy
import datetime

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from testutil import exit_now

WORLD = 2
D, H, E = 16, 32, 4


def make_moe(device, dtype=torch.float32, **kw):
    from nanochat.moe import MoE
    torch.manual_seed(0)  # the same weights on every rank
    moe = MoE(D, E, H, device=device, dtype=dtype, **kw)
    with torch.no_grad():
        moe.w_out.normal_(0.0, 0.2)  # init is 0: the outputs would say nothing
        moe.router.weight.normal_(0.0, 1.0)  # strong preferences, so capacity binds
    return moe


# (MoE kwargs, dispatch, width on rank 0, on rank 1, mask kind)
CASES = [
    (dict(capacity_factor=1.0, min_capacity=1), "grouped_mm", D, D, None),
    (dict(capacity_factor=1.0, min_capacity=1), "bmm", D, D, None),
    (dict(top_k=2, drop_tokens=False), "grouped_mm", D, D, None),
    (dict(top_k=2, capacity_factor=1.25), "grouped_mm", D, D, "pad"),
    (dict(capacity_factor=1.0), "grouped_mm", D, D, "rank1-empty"),
    (dict(capacity_factor=1.0), "grouped_mm", 8, D, None),  # Matryoshka: another width per rank, one call
    (dict(top_k=2, capacity_factor=1.0), "bmm", D, 8, "pad"),
    # rank 1's experts (2, 3) chosen by no token of either rank: their gradients are 0, not None (as unsharded)
    (dict(bias_balancing=True), "grouped_mm", D, D, "idle-experts"),
]


def _check(rank, device, kw, dispatch, widths, mask_kind, mesh, dtype=torch.float32):
    from nanochat.moe_ep import shard_experts
    ref = make_moe(device, dtype, dispatch=dispatch, **kw)
    if mask_kind == "idle-experts":
        ref.expert_bias[E // WORLD:] = -10.0  # selection scores are probs + bias: never picked
    ep = copy.deepcopy(ref)
    assert shard_experts(ep, mesh) == 1
    assert ep.w_in.to_local().shape == (E // WORLD, H, D)
    w = widths[rank]
    g = torch.Generator().manual_seed(10 + rank)  # each rank its own tokens
    x = torch.randn(3, 8, w, generator=g).to(device, dtype)
    gy = torch.randn(3, 8, w, generator=g).to(device, dtype)
    mask = None
    if mask_kind == "pad":
        mask = torch.ones(3, 8, dtype=torch.bool)
        mask[1, 5:] = False
        mask[2, 2:] = False
        mask = mask.to(device)
    elif mask_kind == "rank1-empty":
        mask = torch.full((3, 8), rank == 0, dtype=torch.bool, device=device)
    outs = {}
    for name, m in (("ref", ref), ("ep", ep)):
        xi = x.clone().requires_grad_()
        y = m(xi, mask=mask, width=w)
        (y * gy).sum().backward()
        outs[name] = (y.detach(), xi.grad, m.router.weight.grad, m.last_stats)
    (y_ref, gx_ref, gr_ref, st_ref), (y_ep, gx_ep, gr_ep, st_ep) = outs["ref"], outs["ep"]
    if mask_kind == "rank1-empty" and rank == 1:
        assert st_ep["tokens_per_expert"].sum() == 0
    else:
        assert y_ref.abs().max() > 0
    assert torch.equal(st_ref["tokens_per_expert"], st_ep["tokens_per_expert"]) and st_ref["dropped"] == st_ep["dropped"]
    if mask_kind == "idle-experts":
        assert st_ep["tokens_per_expert"][E // WORLD:].sum() == 0
    if kw.get("capacity_factor") == 1.0 and mask_kind is None:
        assert st_ep["dropped"] > 0  # the case tests drops
    # fp32: the same sums up to order; bf16 (CUDA grouped_mm): the weight gradients are summed in another order
    # and rounded to bf16
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(y_ep, y_ref, **tol)
    torch.testing.assert_close(gx_ep, gx_ref, **tol)
    torch.testing.assert_close(gr_ep, gr_ref, **tol)  # the router's fp32 weight gradient
    lo, hi = rank * (E // WORLD), (rank + 1) * (E // WORLD)
    for name in ("w_in", "w_out"):
        want = getattr(ref, name).grad.clone()
        dist.all_reduce(want)  # every rank's tokens reach the expert's one copy
        torch.testing.assert_close(getattr(ep, name).grad.to_local(), want[lo:hi], **tol)


def _check_hybrid(rank, device, mesh):
    """HybridGPT with MoE FFNs at per-row width plans: rank 0's rows use level 16 only, rank 1's 32 and 16 in other
    blocks, so a block's per-token calls differ by rank unless MoE.levels_for_call makes them the same."""
    from nanochat.hybrid_gpt import HybridConfig, HybridGPT
    from nanochat.moe_ep import shard_experts
    torch.manual_seed(0)
    cfg = HybridConfig(sequence_len=8, vocab_size=64, n_layer=2, n_head=2, n_kv_head=2, n_embd=32, layer_pattern="A",
                       ffn_pattern="E", num_experts=4, expert_dim=32, width_levels=[16, 32], adaptive=False)
    ref = HybridGPT(cfg).to(device)
    ref.init_weights()
    with torch.no_grad():
        for b in ref.transformer.h:
            b.moe.w_out.normal_(0.0, 0.2)
    ep = copy.deepcopy(ref)
    assert shard_experts(ep, mesh) == 2
    g = torch.Generator().manual_seed(20 + rank)
    idx = torch.randint(0, 64, (3, 8), generator=g).to(device)
    plan = torch.tensor([[16, 16]] * 3 if rank == 0 else [[32, 16], [16, 32], [32, 32]], device=device)
    losses = []
    for m in (ref, ep):
        loss = m(idx, idx, width=plan)
        loss.backward()
        losses.append(loss.detach())
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ep.transformer.wte.weight.grad, ref.transformer.wte.weight.grad, rtol=1e-5, atol=1e-6)


def _worker(rank, store_path, backend):
    from torch.distributed.device_mesh import init_device_mesh
    from nanochat.moe_ep import is_expert_shard, shard_experts
    torch.set_num_threads(1)
    if backend == "nccl":
        torch.cuda.set_device(rank)
    device = torch.device("cuda", rank) if backend == "nccl" else torch.device("cpu")
    # a timeout: calls that differ by rank fail the test instead of hanging it
    dist.init_process_group(backend, store=dist.FileStore(store_path, WORLD), rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=60))
    try:
        mesh = init_device_mesh(device.type, (WORLD,))
        for kw, dispatch, *widths, mask_kind in CASES:
            if backend == "nccl":  # CUDA grouped_mm is bf16 only; fp32 here, so the batched path
                dispatch = "bmm"
            _check(rank, device, kw, dispatch, widths, mask_kind, mesh)
        if backend == "nccl":  # the path CUDA training takes: bf16 torch._grouped_mm (sm90+)
            for kw, _, *widths, mask_kind in CASES[:1] + CASES[5:6]:
                _check(rank, device, kw, "grouped_mm", widths, mask_kind, mesh, torch.bfloat16)
        _check_hybrid(rank, device, mesh)
        ep = make_moe(device)
        shard_experts(ep, mesh)
        assert ep.levels_for_call([8] if rank == 0 else [16, 4]) == [4, 8, 16]
        assert is_expert_shard(ep.w_in) and not is_expert_shard(ep.router.weight)
        with pytest.raises(ValueError, match="already a DTensor"):
            shard_experts(ep, mesh)
        from nanochat.moe import MoE
        with pytest.raises(ValueError, match="num_experts divisible by 2"):
            shard_experts(MoE(D, 3, H, device=device), mesh)
    finally:
        dist.destroy_process_group()
    exit_now()


def test_expert_parallel_equals_unsharded_gloo(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path / "store"), "gloo"), nprocs=WORLD, join=True)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_expert_parallel_equals_unsharded_nccl(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path / "store"), "nccl"), nprocs=WORLD, join=True)

"""
Muon under FSDP2 (2 gloo processes on CPU): each matrix is orthogonalised by one owner rank, with two
all_to_all per world-size matrices and no full_tensor (a 3-D expert stack by each rank, its own experts, with
none), and the result is bitwise the single-process step.
Also train_utils.full_state_dict under FSDP2 when an eval forward left the parameters gathered.
"""
import copy

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

from testutil import exit_now

WORLD = 2
STEPS = 3
# rows over 2 ranks (torch.chunk): 7 -> 4+3, 5 -> 3+2, 1 -> 1+0, 3 -> 2+1, 2 -> 1+1 (and 3 experts -> 2+1)
SHARDED = {"a": (7, 5), "b": (5, 9), "c": (1, 6), "d": (3, 4), "experts": (3, 4, 6), "e": (2, 3)}


class Matrices(nn.Module):
    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        for name, shape in SHARDED.items():
            setattr(self, name, nn.Parameter(torch.randn(*shape, generator=g)))
        self.plain = nn.Parameter(torch.randn(4, 6, generator=g))  # left out of fully_shard: a plain tensor


def make_muon(m):
    from nanochat.optim import Muon
    # two groups of other settings; batches of 2 DTensor matrices span them (c, d) and the last is partial (e);
    # the experts (a 3-D stack: whole matrices on each rank) are orthogonalised where they are
    return Muon([dict(params=[m.a, m.b, m.c], lr=0.03, weight_decay=0.1),
                 dict(params=[m.d, m.experts, m.e, m.plain], lr=0.05, nesterov=False, momentum=0.9)])


def _worker(rank, store_path):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor, distribute_tensor
    from nanochat.train_utils import optimizer_state_full
    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.FileStore(store_path, WORLD), rank=rank, world_size=WORLD)
    try:
        ref = Matrices()
        model = copy.deepcopy(ref)
        mesh = init_device_mesh("cpu", (WORLD,))
        fully_shard(model, mesh=mesh, ignored_params={model.plain})
        params = dict(model.named_parameters())
        assert all(isinstance(params[n], DTensor) for n in SHARDED) and not isinstance(model.plain, DTensor)
        assert params["c"].to_local().shape == ((1, 6) if rank == 0 else (0, 6))
        opt_ref, opt = make_muon(ref), make_muon(model)

        calls = []
        all_to_all, full_tensor = dist.all_to_all_single, DTensor.__dict__["full_tensor"]

        def counted(*args, **kwargs):
            calls.append(1)
            return all_to_all(*args, **kwargs)

        def no_full_tensor(self, *args, **kwargs):
            raise AssertionError("Muon.step gathered a full tensor")

        g = torch.Generator().manual_seed(1)
        for _ in range(STEPS):
            for name, p in ref.named_parameters():  # the same gradients on every rank, sharded as FSDP2 shards
                p.grad = torch.randn(p.shape, generator=g)
                q = params[name]
                q.grad = distribute_tensor(p.grad, mesh, q.placements) if isinstance(q, DTensor) else p.grad.clone()
            opt_ref.step()
            calls.clear()
            dist.all_to_all_single, DTensor.full_tensor = counted, no_full_tensor
            try:
                opt.step()
            finally:
                dist.all_to_all_single, DTensor.full_tensor = all_to_all, full_tensor
            # 5 DTensor matrices in batches of 2: 3 batches, 2 all_to_all each; none for the experts
            assert len(calls) == 2 * 3, len(calls)

        for name, p in ref.named_parameters():
            q = params[name]
            q = q.full_tensor() if isinstance(q, DTensor) else q
            assert torch.equal(p.detach(), q.detach()), (rank, name, (p - q).abs().max().item())
        # the momentum buffers are sharded like the parameters and gather (checkpoints) into the reference's
        [full] = optimizer_state_full([opt.state_dict()])
        want = opt_ref.state_dict()
        assert full["param_groups"] == want["param_groups"]
        for i, st in want["state"].items():
            assert torch.equal(st["momentum_buffer"], full["state"][i]["momentum_buffer"]), (rank, i)
    finally:
        dist.destroy_process_group()
    exit_now()


def test_fsdp_muon_owner_ranks_equal_one_process(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path / "store"),), nprocs=WORLD, join=True)


def test_shard_rows_follow_torch_chunk():
    """FSDP2 shards dim 0 as torch.chunk does; ranks past the last chunk hold no rows."""
    from nanochat.optim import _shard_rows
    for world in range(1, 6):
        for n in range(1, 20):
            chunks = [len(c) for c in torch.arange(n).chunk(world)]
            assert _shard_rows(n, world) == chunks + [0] * (world - len(chunks)), (n, world)


class Blocks(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([nn.Linear(8, 8, bias=False) for _ in range(2)])
        self.head = nn.Linear(8, 4, bias=False)

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return self.head(x)


def _save_worker(rank, store_path):
    from nanochat.train_utils import apply_fsdp, full_state_dict
    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.FileStore(store_path, WORLD), rank=rank, world_size=WORLD)
    try:
        torch.manual_seed(0)
        model = Blocks()
        want = {k: v.clone() for k, v in model.state_dict().items()}
        # fractal_train --fsdp-keep-params: an eval forward (no backward) leaves every parameter gathered
        apply_fsdp(model, model.blocks, device_type="cpu", reshard_after_forward=False)
        model.eval()
        with torch.no_grad():
            model(torch.randn(3, 8))
        got = full_state_dict(model)  # a collective; the state arrives on rank 0 only
        if rank == 0:
            assert got.keys() == want.keys()
            for k, v in got.items():  # full plain tensors, not this rank's shards
                assert type(v) is torch.Tensor and torch.equal(v, want[k]), (k, type(v).__name__, tuple(v.shape))
    finally:
        dist.destroy_process_group()
    exit_now()


def test_full_state_dict_after_an_eval_with_gathered_parameters(tmp_path):
    mp.spawn(_save_worker, args=(str(tmp_path / "store"),), nprocs=WORLD, join=True)

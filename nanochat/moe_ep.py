"""
Expert parallelism for nanochat.moe.MoE: each rank of a process group holds E / W of the experts, and the
rows of the expert computation travel to the rank that holds their expert and back (two all_to_all per
forward, two per backward).

Applied from outside the model, like FSDP2: `shard_experts(model, mesh)` turns every MoE's w_in and w_out
into DTensors sharded on dim 0 (the expert dim) over a 1-D mesh, so rank r holds experts
[r * E/W, (r + 1) * E/W), and installs an ExpertParallel as the MoE's expert_dispatch (MoE's public hook;
nanochat.moe never imports this module). The router stays a plain, replicated parameter. What each rank
computes is the MoE's function on its own tokens: routing, capacity and drops are decided per rank and call,
exactly as without expert parallelism, so a run on W ranks equals a run on one rank that sees the same
micro-batches.

Gradients: an expert's local gradient already sums the contributions of every rank's tokens. With the
trainer's DDP convention (loss scaled by 1 / world size, gradients summed) it is the global mean, so the
trainer must not all-reduce the expert parameters (they are DTensors; allreduce_gradients skips nothing
by itself, the caller leaves them out). Checkpoints hold full tensors (train_utils.full_state_dict gathers
DTensors), so an expert-parallel checkpoint loads anywhere.

Every rank must make the same MoE calls in the same order (each call is a collective), with any Matryoshka
width per rank and call: rows are exchanged as flat buffers with their width, and a rank runs its experts
once per distinct width it received. MoE.levels_for_call (answered here by ExpertParallel.levels_for_call)
makes per-token-width forwards (one MoE call per width level present) call the same levels on every rank.
The exchange reads the row counts on the host (one sync per call), so this path is eager only
(torch.compiler.disable).
"""
import torch
import torch.distributed as dist
import torch.nn as nn

from nanochat.moe import MoE, permute_rows


def shard_experts(model, mesh):
    """Shard the experts of every MoE in model (or model itself) over the 1-D device mesh; returns how many MoEs.
    Every rank must hold the same full weights before (they are sliced, not sent)."""
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor
    if mesh.ndim != 1:
        raise ValueError(f"expert parallelism wants a 1-D mesh, got {mesh.ndim}-D")
    W = mesh.size()
    moes = [m for m in model.modules() if isinstance(m, MoE)]
    if not moes:
        raise ValueError("shard_experts: the model has no MoE block (ffn_pattern needs an 'E')")
    for m in moes:
        if m.num_experts % W:
            raise ValueError(f"expert parallelism over {W} ranks needs num_experts divisible by {W}, got {m.num_experts}")
        for name in ("w_in", "w_out"):
            p = getattr(m, name)
            if isinstance(p, DTensor):
                raise ValueError(f"shard_experts: {name} is already a DTensor (sharded twice, or under FSDP2)")
            local = distribute_tensor(p.detach(), mesh, [Shard(0)], src_data_rank=None)
            setattr(m, name, nn.Parameter(local, requires_grad=p.requires_grad))
        m.expert_dispatch = ExpertParallel(mesh.get_group())
    return len(moes)


def is_expert_shard(p):
    """Is p a parameter that shard_experts made (a DTensor), whose gradient must not be all-reduced?"""
    return hasattr(p, "to_local") and hasattr(p, "device_mesh")


class _AllToAll(torch.autograd.Function):
    """Flat buffer x (sum(in_splits),) -> (sum(out_splits),) over the group; backward: the reverse exchange."""

    @staticmethod
    def forward(ctx, x, out_splits, in_splits, group):
        ctx.splits, ctx.group = (out_splits, in_splits), group
        out = x.new_empty(sum(out_splits))
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, g):
        out_splits, in_splits = ctx.splits
        gx = g.new_empty(sum(in_splits))
        dist.all_to_all_single(gx, g.contiguous(), in_splits, out_splits, group=ctx.group)
        return gx, None, None, None


def _regroup(sizes, n):
    """sizes (S, El) long, on the device: rows of block (source s, local expert j), the blocks laid out source-major;
    n = their sum (a host int). Returns (perm, pos): rows[perm] is expert-major (j, then s), pos is perm's inverse.
    Device ops only: no host-to-device copy, which would wait like a sync."""
    S, El = sizes.shape
    flat = sizes.reshape(-1)  # source-major block sizes
    src_start = flat.cumsum(0) - flat
    by_expert = sizes.t().reshape(-1)  # the same blocks, expert-major
    dst_start = (by_expert.cumsum(0) - by_expert).view(El, S).t().reshape(-1)  # indexed source-major again
    ar = torch.arange(n, device=sizes.device)
    bid = torch.repeat_interleave(torch.arange(S * El, device=sizes.device), flat, output_size=n)  # (n,) block of each row
    pos = dst_start.index_select(0, bid) + ar - src_start.index_select(0, bid)  # (n,) expert-major row of each row
    perm = torch.empty_like(pos).scatter_(0, pos, ar)
    return perm, pos


class ExpertParallel:
    """MoE.expert_dispatch for experts sharded over the ranks of group (what shard_experts installs)."""

    def __init__(self, group):
        self.group = group

    def levels_for_call(self, moe, levels):
        """The union over the group's ranks of the (sorted) width levels each rank's per-token-width forward
        needs: every rank calls them all, a rank with no token at a level calls it with none."""
        present = torch.zeros(moe.dim + 1, dtype=torch.int32, device=moe.router.weight.device)
        present[levels] = 1
        dist.all_reduce(present, op=dist.ReduceOp.MAX, group=self.group)
        return present.nonzero().squeeze(1).tolist()

    @torch.compiler.disable
    def run(self, moe, xs, kept_counts, cdtype):
        """
        The expert computation of MoE.forward under expert parallelism. xs (nk, w): rows grouped by global expert,
        the kept ones first (kept_counts (E,) of them per expert, in expert order, so destination rank by rank).
        Returns ys (nk, w): the experts' outputs for the kept rows, 0 for the others.
        """
        group = self.group
        W = dist.get_world_size(group)
        E, El = moe.num_experts, moe.num_experts // W
        nk, w = xs.shape
        dev = xs.device
        # counts per (destination, local expert) plus this rank's width; what every source sends this rank
        msg = torch.cat([kept_counts.view(W, El), kept_counts.new_full((W, 1), w)], 1)  # (W, El + 1)
        got = torch.empty_like(msg)
        dist.all_to_all_single(got, msg.contiguous(), group=group)
        host = torch.cat([kept_counts, got.reshape(-1)]).tolist()  # the one host sync of the call
        send_rows = [sum(host[d * El:(d + 1) * El]) for d in range(W)]
        recv = [host[E + s * (El + 1): E + (s + 1) * (El + 1)] for s in range(W)]  # [counts per local expert..., width]
        recv_rows = [sum(r[:El]) for r in recv]
        n_kept = sum(send_rows)
        send_numel = [c * w for c in send_rows]
        recv_numel = [recv_rows[s] * recv[s][El] for s in range(W)]  # each source's rows at its own width

        flat = _AllToAll.apply(xs[:n_kept].reshape(-1), recv_numel, send_numel, group)
        chunks = [c.view(recv_rows[s], recv[s][El]) for s, c in enumerate(flat.split(recv_numel))]
        outs = list(chunks)  # replaced per source below; a source that sent nothing gets its empty chunk back
        w_in_l, w_out_l = moe.w_in.to_local(), moe.w_out.to_local()  # (El, H, D), (El, D, H)
        widths = sorted({recv[s][El] for s in range(W) if recv_rows[s] > 0})
        for v in widths:
            srcs = [s for s in range(W) if recv[s][El] == v and recv_rows[s] > 0]
            rows = torch.cat([chunks[s] for s in srcs]) if len(srcs) > 1 else chunks[srcs[0]]
            sizes = torch.stack([got[s, :El] for s in srcs])  # (len(srcs), El) on the device
            perm, pos = _regroup(sizes, rows.shape[0])
            grouped = permute_rows(rows, perm, pos)  # rows[perm]: expert-major
            cap = max(sum(recv[s][j] for s in srcs) for j in range(El))  # bmm's rows per expert, from the host copy
            h_v = moe.expert_dim * v // moe.dim
            path, _ = moe.pick_path(cdtype, dev, v, h_v)
            ys = moe.run_experts(grouped, sizes.sum(0), w_in_l[:, :h_v, :v].to(cdtype),
                                 w_out_l[:, :v, :h_v].to(cdtype), path, cap)
            ys = permute_rows(ys, pos, perm)  # back to source-major
            for s, y in zip(srcs, ys.split([recv_rows[s] for s in srcs])):
                outs[s] = y
        # no row for this rank's experts: their weights still join the graph (an empty slice of a sum), so they get the
        # zero gradient that the unsharded MoE gives experts without tokens, and the optimizer steps them alike
        # (Muon's momentum moves a weight whose gradient is 0, and skips one whose gradient is None)
        idle = [] if widths else [(w_in_l.sum() + w_out_l.sum()).reshape(1)[:0].to(xs.dtype)]
        back = _AllToAll.apply(torch.cat([o.reshape(-1) for o in outs] + idle), send_numel, recv_numel, group)
        ys = back.view(n_kept, w)
        if n_kept < nk:
            ys = torch.cat([ys, ys.new_zeros(nk - n_kept, w)])
        return ys

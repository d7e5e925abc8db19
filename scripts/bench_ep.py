"""
`python -m scripts.bench moe-ep` under torchrun: the MoE's fwd+bwd with every expert on every rank (replicated,
as --parallel=ddp keeps it) against the experts sharded over the ranks (nanochat.moe_ep, as fractal_train
--expert-parallel), each rank routing its own tokens. Both eager (the expert-parallel exchange reads the row
counts on the host, so it is not compiled or graphed), bf16 weights and tokens on CUDA (fp32 on a CPU), weight
gradients accumulating as in bench moe. Per rank: time (the slowest rank's median), expert weights held, peak
memory. Rank 0 prints the table and the JSON line.

    torchrun --standalone --nproc_per_node=2 -m scripts.bench moe-ep
"""
import copy

import torch
import torch.distributed as dist

from nanochat.common import compute_init, compute_cleanup
from scripts.bench_common import measure, print_table, finish, free_memory, top_kernels, print_profile


def add_args(sub):
    e = sub.add_parser("moe-ep", help="under torchrun: MoE fwd+bwd with replicated vs expert-parallel experts")
    e.add_argument("--tokens", type=int, default=16384, help="tokens per rank")
    e.add_argument("--d-model", type=int, default=1024)
    e.add_argument("--expert-dim", type=int, default=4096)
    e.add_argument("--experts", type=int, default=8)
    e.add_argument("--top-k", type=int, default=1)
    e.add_argument("--capacity-factor", type=float, default=1.25, help="HybridConfig's default")


def cmd_moe_ep(args, device):
    from torch.distributed.device_mesh import init_device_mesh
    from nanochat.moe import MoE
    from nanochat.moe_ep import shard_experts, is_expert_shard
    ddp, rank, _, world, device = compute_init(device.type)
    if not ddp or world < 2:
        raise SystemExit("bench moe-ep compares expert placements over ranks: start it with torchrun --nproc_per_node=N (N >= 2)")
    if args.experts % world:
        raise SystemExit(f"--experts={args.experts} does not divide over {world} ranks")
    dt = torch.bfloat16 if device.type == "cuda" else torch.float32
    D, H, E, k = args.d_model, args.expert_dim, args.experts, args.top_k
    torch.manual_seed(0)  # the same weights on every rank
    replicated = MoE(D, E, H, top_k=k, capacity_factor=args.capacity_factor, device=device, dtype=dt)
    with torch.no_grad():
        replicated.w_out.normal_(0.0, H ** -0.5)  # init is 0 (a fresh block adds nothing); any values cost the same
        replicated.router.weight.normal_(0.0, D ** -0.5)
    sharded = copy.deepcopy(replicated)
    shard_experts(sharded, init_device_mesh(device.type, (world,)))
    T = min(args.tokens, 1024)
    g = torch.Generator(device=device).manual_seed(1 + rank)  # each rank its own tokens
    x = torch.randn(args.tokens // T, T, D, device=device, dtype=dt, generator=g, requires_grad=True)
    gy = torch.randn(x.shape, device=device, dtype=dt, generator=g)
    n_tok = x.shape[0] * T
    rows, profiles = [], {}
    for name, moe in (("replicated", replicated), ("expert parallel", sharded)):
        def fwd_bwd(moe=moe):
            moe(x).backward(gy)
        r = measure(fwd_bwd, device, args.warmup, args.iters)
        # every rank took part in every call; the step is as slow as the slowest rank
        ms = torch.tensor([r.get("ms", float("nan")), r.get("peak_gib") or 0.0], device=device, dtype=torch.float64)
        dist.all_reduce(ms, op=dist.ReduceOp.MAX)
        local = [moe.w_in, moe.w_out]
        held = sum((p.to_local() if is_expert_shard(p) else p).numel() * p.element_size() for p in local) / 2**30
        row = {"impl": name, "experts_per_rank": E // world if moe is sharded else E, "expert_gib": held}
        if "ms" in r:
            row.update(ms=ms[0].item(), tok_per_s=n_tok / ms[0].item() * 1e3, peak_gib=ms[1].item() if r.get("peak_gib") is not None else None)
        else:
            row["error"] = r["error"]
        rows.append(row)
        if args.profile and "ms" in r:  # every rank runs it (collectives); rank 0's kernels are printed
            profiles[name] = top_kernels(fwd_bwd, device)
        moe.zero_grad(set_to_none=True)
        x.grad = None
        free_memory(device)
    result = {"rows": rows, "world_size": world, "profiles": profiles}
    if rank == 0:
        precision = "bf16" if dt == torch.bfloat16 else "fp32"
        print_table(f"MoE fwd+bwd per rank ({world} ranks): {n_tok} tokens each, d_model {D}, {E} experts x {H}, top-{k}, "
                    f"capacity factor {args.capacity_factor}, {precision}, eager; ms = the slowest rank's median", rows,
                    [("impl", "impl", ""), ("experts_per_rank", "experts/rank", "d"), ("expert_gib", "expert GiB/rank", ".3f"),
                     ("ms", "ms", ".3f"), ("tok_per_s", "tokens/s/rank", ",.0f"), ("peak_gib", "peak GiB", ".2f")])
        if all("ms" in r for r in rows):
            result["ep_over_replicated"] = rows[1]["ms"] / rows[0]["ms"]
            print(f"  expert parallel / replicated time: {result['ep_over_replicated']:.2f}x, "
                  f"expert weights per rank {rows[1]['expert_gib'] / rows[0]['expert_gib']:.2f}x")
        for name, p in profiles.items():
            print_profile(f"{name} fwd+bwd, rank 0", p)
        finish("moe-ep", args, device, result)
    compute_cleanup()
    return result

"""
`python -m scripts.bench matvec`: decode's matrix products at a model's shapes (every distinct weight of the d20
hybrid by default; M rows of x: 1 = a think step, k + 1 = a verify pass), three ways, each timed as a CUDA graph
of calls that cycles over enough copies of the weight to overflow the L2 cache (a decode step reads each weight
once): cuBLAS (F.linear), inductor's tuned reduction (torch.compile with coordinate-descent tuning, which turns a
one-row product into a Triton reduction: decode="tuned"; one row only) and nanochat.decode_matvec's kernel (its
default config, and the best of a sweep). Per shape: microseconds a call and TB/s of weight read; then the
step's total (each shape times the weights of that shape): what the decode step's matrices would cost each way.
"""
import itertools
import math

import torch
import torch.nn.functional as F

from scripts.bench_common import bench_configs, build_model, cuda_graphed, print_table, finish, progress, timed_ms

L2_FLUSH_BYTES = 256 * 2**20  # copies of a weight enough to read this much per cycle (an H100's L2 is 50 MB)
SWEEP = [c for c in itertools.product((2, 4, 8, 16, 32), (128, 256, 512, 1024, 2048), (1, 2, 4), (4, 8))
         if 1024 <= c[0] * c[1] <= 16384]  # (BLOCK_N, BLOCK_K, SPLIT_K, warps): tiles of 2-32 KB of bf16


def add_args(sub):
    v = sub.add_parser("matvec", help="decode's matrix products: cuBLAS vs inductor's tuned reduction vs the Triton kernel")
    v.add_argument("--depth", type=int, default=20, help="the hybrid's depth dial (bench decode's 'hybrid')")
    v.add_argument("--vocab-size", type=int, default=65536)
    v.add_argument("--mamba", type=int, default=1, choices=(1, 2))
    v.add_argument("--rows", type=str, default="1,5", help="comma-separated M: rows of x (1 = think, k+1 = verify)")
    v.add_argument("--sweep", action="store_true", help="also the kernel's best config of a sweep (BLOCK_N x BLOCK_K "
                   f"x SPLIT_K x warps: {len(SWEEP)} configs a shape)")
    v.add_argument("--calls", type=int, default=64, help="calls a captured graph replays (timed: its median / calls)")


def _linear(x, w):
    return F.linear(x, w)


def weight_shapes(args):
    """{(N, K): count} of the hybrid's linear weights a think step multiplies (the gates' and the width predictor's
    few-thousand-element matrices left out: think does not run them)."""
    kind, config = bench_configs(args, 2048)["hybrid"]
    model = build_model(kind, config, "meta")
    shapes = {}
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and mod.weight.numel() >= 2**16:
            shapes[tuple(mod.weight.shape)] = shapes.get(tuple(mod.weight.shape), 0) + 1
    return shapes


def time_per_call(fn_of_weight, weights, x, calls, device, iters):
    """Median microseconds a call of fn_of_weight(x, w) over a graph of `calls` calls cycling over weights."""
    outs = []

    def many():
        outs.clear()
        for i in range(calls):
            outs.append(fn_of_weight(x, weights[i % len(weights)]))

    replay = cuda_graphed(many)
    return timed_ms(replay, iters, device) * 1e3 / calls


def cmd_matvec(args, device):
    from nanochat import decode_matvec as dm
    try:
        rows_m = [int(m) for m in args.rows.split(",") if m]
    except ValueError:
        raise SystemExit(f"--rows {args.rows}: comma-separated integers") from None
    if not rows_m or any(not 1 <= m <= dm.MAX_ROWS for m in rows_m):
        raise SystemExit(f"--rows {args.rows}: each 1 to {dm.MAX_ROWS}")
    if device.type != "cuda":
        raise SystemExit("bench matvec times CUDA kernels: run it on a GPU")
    if dm.build() is None:
        raise SystemExit("bench matvec: Triton does not import here")
    shapes = weight_shapes(args)
    bf = torch.bfloat16
    rows, totals = [], {}
    for (N, K), count in sorted(shapes.items()):
        size = N * K * 2
        copies = max(1, math.ceil(L2_FLUSH_BYTES / size))
        weights = [torch.randn(N, K, device=device, dtype=bf) * K ** -0.5 for _ in range(copies)]
        for M in rows_m:
            x = torch.randn(M, K, device=device, dtype=bf)
            ref = dm.matvec_reference(x, weights[0])
            row = {"N": N, "K": K, "count": count, "M": M, "MB": size / 1e6}
            paths = {"cublas": F.linear, "kernel": lambda a, w: dm.matvec(a, w)}
            if M == 1:  # a fresh compile a shape (dynamo's recompile limit counts per function)
                torch._dynamo.reset()
                paths["inductor"] = torch.compile(_linear, dynamic=False, options={"coordinate_descent_tuning": True})
            for name, fn in paths.items():
                err = (fn(x, weights[0]).float() - ref.float()).abs().max().item()
                if err > 2 ** -6 * ref.float().abs().max().item():
                    raise SystemExit(f"{name} at M={M} N={N} K={K}: off the reference by {err}")
                row[name] = time_per_call(fn, weights, x, args.calls, device, args.iters)
            if args.sweep:
                best = None
                for cfg in SWEEP:
                    if M > 1 and cfg[0] < 16:
                        continue
                    us = time_per_call(lambda a, w: dm.matvec(a, w, config=cfg), weights, x, args.calls, device, args.iters)
                    if best is None or us < best[0]:
                        best = (us, cfg)
                row["best"], row["best_cfg"] = best[0], "x".join(map(str, best[1]))
            row["cfg"] = "x".join(map(str, dm.default_config(M, N, K)))
            for name in ("cublas", "inductor", "kernel", "best"):
                if name in row:
                    row[name + "_tbs"] = size / row[name] / 1e6
                    totals.setdefault((M, name), 0.0)
                    totals[(M, name)] += row[name] * count
            rows.append(row)
            progress(row)
        del weights
        torch.cuda.empty_cache()
    cols = [("N", "N", "d"), ("K", "K", "d"), ("count", "weights", "d"), ("M", "M", "d"), ("MB", "MB", ".1f"),
            ("cublas", "cuBLAS us", ".1f"), ("cublas_tbs", "TB/s", ".2f"), ("inductor", "inductor us", ".1f"),
            ("inductor_tbs", "TB/s", ".2f"), ("kernel", "kernel us", ".1f"), ("kernel_tbs", "TB/s", ".2f"),
            ("cfg", "config", "")]
    if args.sweep:
        cols += [("best", "best us", ".1f"), ("best_tbs", "TB/s", ".2f"), ("best_cfg", "best config", "")]
    print_table(f"decode matrix products of the d{args.depth} hybrid (bf16; a graph of {args.calls} calls over copies "
                f"past L2; config = BLOCK_N x BLOCK_K x SPLIT_K x warps)", rows, cols)
    total_rows = [{"M": M, "path": name, "ms": us / 1e3} for (M, name), us in sorted(totals.items())]
    print_table("a step's matrices (each shape x its weights), ms", total_rows,
                [("M", "M", "d"), ("path", "path", ""), ("ms", "ms", ".3f")])
    return finish("matvec", args, device, {"rows": rows, "totals": total_rows})

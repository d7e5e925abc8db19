"""
`python -m scripts.bench prefetch`: would prefetching a decode step's weights into the L2 cache, ahead of the
products that read them, shorten the step? An experiment for issue #29's bandwidth goal, on a skeleton of the step,
not the engine.

Why: session 33's profile of tuned think at d20 (docs/benchmarks.md) has about 0.7 ms of a 1.95 ms step in kernels
that read little (norm statistics, cache writes, the conv, attention's pieces) while HBM idles, and 1.1 ms in
matrix-vector products that each start cold and reach 0.8-2.2 TB/s. If the weights of the next products were
streaming into L2 while the small kernels run, the products would read L2. The skeleton: the d20 hybrid's matrices
(bf16, random, in the order a step calls them: each block's mixer, then its MLP, then the readout), one row through
each (F.linear, what inductor's reductions and cuBLAS compute), with --small pointwise kernels on a vector before
each group (a mixer or an MLP: standing in for the step's small kernels), captured as one CUDA graph. Variants:
none; a prefetch of group g + ahead issued as group g begins (a Triton kernel whose programs issue
`cp.async.bulk.prefetch.L2.global` (bulk, sm_90) or `prefetch.global.L2::evict_last` per 128-byte line (line) over
that group's weights), launched on the step's stream (main) or on a second stream of the graph (side: it runs beside
the step's kernels instead of between them). A prefetch changes no value: each variant's output is compared with
the baseline's, bit for bit. Columns: us a step, us a group, the weights' TB/s over the whole step, x baseline.
"""
import torch
import torch.nn.functional as F

from scripts.bench_common import bench_configs, build_model, cuda_graphed, print_table, finish, progress, timed_ms

MIN_NUMEL = 2 ** 16  # the gates' and the width predictor's small matrices left out, as bench matvec does


def add_args(sub):
    p = sub.add_parser("prefetch", help="an experiment: L2 prefetch of a decode step's weights ahead of its products "
                       "(CUDA, sm_90)")
    p.add_argument("--depth", type=int, default=20, help="the hybrid's depth dial (bench decode's 'hybrid')")
    p.add_argument("--vocab-size", type=int, default=65536)
    p.add_argument("--mamba", type=int, default=1, choices=(1, 2))
    p.add_argument("--small", type=str, default="0,4", help="comma-separated: small pointwise kernels before each "
                   "group (a mixer or an MLP), one table row set each")
    p.add_argument("--ahead", type=str, default="0,1,2", help="comma-separated: groups ahead the prefetch reaches "
                   "(0: a group's own weights as it begins)")
    p.add_argument("--how", type=str, default="bulk,line", help="comma-separated: bulk (cp.async.bulk.prefetch.L2, "
                   "16 KB a lane) and/or line (prefetch.global.L2::evict_last, one 128-byte line a lane)")
    p.add_argument("--stream", type=str, default="main,side", help="comma-separated: main (prefetches launched "
                   "between the step's kernels) and/or side (on a second stream of the graph)")


def int_list(text, flag, lo):
    try:
        out = [int(v) for v in text.split(",") if v]
    except ValueError:
        raise SystemExit(f"--{flag} {text}: comma-separated integers") from None
    if not out or any(v < lo for v in out):
        raise SystemExit(f"--{flag} {text}: each >= {lo}")
    return out


def choice_list(text, flag, allowed):
    out = [v for v in text.split(",") if v]
    if not out or any(v not in allowed for v in out):
        raise SystemExit(f"--{flag} {text}: comma-separated, from {', '.join(allowed)}")
    return out


def weight_groups(args):
    """[(name, [(N, K), ...])]: the hybrid's matrices a think step multiplies, grouped by the module that holds
    them (a block's mixer, its MLP, the readout), in the model's order; the gates and the width predictor (the
    controllers) left out: think does not run them."""
    kind, config = bench_configs(args, 2048)["hybrid"]
    model = build_model(kind, config, "meta")
    groups = []
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and mod.weight.numel() >= MIN_NUMEL and not name.startswith("controllers"):
            owner = name.rsplit(".", 1)[0] if "." in name else name
            if not groups or groups[-1][0] != owner:
                groups.append((owner, []))
            groups[-1][1].append(tuple(mod.weight.shape))
    return groups


def build_prefetch():
    """The two prefetch kernels: programs of LANES lanes over a table of (address, bytes) of the weights of one
    group; each lane issues its share. Returns {how: (kernel, SUB, LANES, warps)}."""
    import triton
    import triton.language as tl

    @triton.jit
    def bulk(Table, Sink, SUB: tl.constexpr, LANES: tl.constexpr):
        # program (item, chunk group): item = one weight, its bytes in SUB-byte pieces, LANES pieces a program
        item = tl.program_id(0)
        base = tl.load(Table + 2 * item)
        nbytes = tl.load(Table + 2 * item + 1)
        i = tl.program_id(1) * LANES + tl.arange(0, LANES)
        off = i.to(tl.int64) * SUB
        ok = off < nbytes
        size = tl.where(ok, tl.minimum(nbytes - off, SUB), 16).to(tl.int32)
        addr = tl.where(ok, base + off, base)
        r = tl.inline_asm_elementwise("cp.async.bulk.prefetch.L2.global [$1], $2;\n mov.u32 $0, 0;", "=r,l,r",
                                      [addr, size], dtype=tl.int32, is_pure=False, pack=1)
        tl.store(Sink + tl.arange(0, LANES), r, mask=(nbytes < 0) & ok)  # never true: keeps the asm

    @triton.jit
    def line(Table, Sink, SUB: tl.constexpr, LANES: tl.constexpr):
        item = tl.program_id(0)
        base = tl.load(Table + 2 * item)
        nbytes = tl.load(Table + 2 * item + 1)
        for j in range(SUB // 128):  # each lane SUB bytes, a line at a time
            off = ((tl.program_id(1) * LANES + tl.arange(0, LANES)).to(tl.int64) * SUB) + j * 128
            ok = off < nbytes
            addr = tl.where(ok, base + off, base)
            r = tl.inline_asm_elementwise("prefetch.global.L2::evict_last [$1];\n mov.u32 $0, 0;", "=r,l",
                                          [addr], dtype=tl.int32, is_pure=False, pack=1)
            tl.store(Sink + tl.arange(0, LANES), r, mask=(nbytes < 0) & ok)

    return {"bulk": (bulk, 16384, 32, 1), "line": (line, 1024, 128, 4)}  # kernel, SUB, LANES, warps


def launcher(kernel, sub, lanes, warps, device):
    """launch(table, max_bytes): one program a weight of the table (rows of address, bytes) and LANES x SUB bytes."""
    import triton
    sink = torch.zeros(1024, dtype=torch.int32, device=device)

    def launch(table, max_bytes):
        kernel[(table.size(0), triton.cdiv(triton.cdiv(max_bytes, sub), lanes))](table, sink, SUB=sub, LANES=lanes,
                                                                              num_warps=warps)
    return launch


def cmd_prefetch(args, device):
    smalls = int_list(args.small, "small", 0)
    aheads = int_list(args.ahead, "ahead", 0)
    hows = choice_list(args.how, "how", ("bulk", "line"))
    streams = choice_list(args.stream, "stream", ("main", "side"))
    if device.type != "cuda":
        raise SystemExit("bench prefetch times CUDA kernels: run it on a GPU")
    if torch.cuda.get_device_capability(device) < (9, 0):
        raise SystemExit("bench prefetch issues sm_90 prefetch instructions: it needs a Hopper GPU or newer")
    try:
        launch = {how: launcher(*k, device) for how, k in build_prefetch().items()}
    except ImportError:
        raise SystemExit("bench prefetch: Triton does not import here") from None
    groups = weight_groups(args)
    bf = torch.bfloat16
    gen = torch.Generator(device=device).manual_seed(0)
    weights = [[torch.randn(s, device=device, dtype=bf, generator=gen) * s[1] ** -0.5 for s in shapes]
               for _, shapes in groups]
    tables = [torch.tensor([[w.data_ptr(), w.numel() * w.element_size()] for w in ws], dtype=torch.int64,
                           device=device) for ws in weights]
    max_bytes = [max(w.numel() * w.element_size() for w in ws) for ws in weights]
    total_bytes = sum(w.numel() * w.element_size() for ws in weights for w in ws)
    x0 = torch.randn(groups[0][1][0][1], device=device, dtype=bf, generator=gen)  # the residual's width
    side = torch.cuda.Stream(device)
    xs = {k: torch.randn(k, device=device, dtype=bf, generator=gen) for k in {w.size(1) for ws in weights for w in ws}}

    def step(small, how, ahead, stream):
        def issue(t):  # the prefetch of group t's weights, as the step reaches this point
            if stream == "side":
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    launch[how](tables[t], max_bytes[t])
            else:
                launch[how](tables[t], max_bytes[t])
        outs, v = [], x0
        if how is not None:
            for t in range(1, min(ahead, len(weights))):  # the groups before the first one's reach: at the start
                issue(t)
        for g, ws in enumerate(weights):
            if how is not None and g + ahead < len(weights):
                issue(g + ahead)
            for _ in range(small):  # one pointwise kernel each
                v = v.add(v, alpha=1e-4)
            for w in ws:
                outs.append(F.linear(xs[w.size(1)][None], w))
        if how is not None and stream == "side":
            torch.cuda.current_stream().wait_stream(side)
        outs.append(v[None])
        return torch.cat([o.flatten() for o in outs])

    rows, base = [], {}
    variants = [(None, 0, "main")] + [(h, a, s) for h in hows for a in aheads for s in streams]
    for small in smalls:
        ref = None
        for how, ahead, stream in variants:
            row = {"small": small, "prefetch": how or "none", "ahead": ahead if how else None,
                   "stream": stream if how else None}
            try:
                holder = {}

                def run():
                    holder["out"] = step(small, how, ahead, stream)
                replay = cuda_graphed(run)
                replay()
                torch.cuda.synchronize(device)
                out = holder["out"].clone()
                ref = out if ref is None else ref
                row["same"] = "yes" if torch.equal(out, ref) else "NO"  # a prefetch changes no value
                us = timed_ms(replay, args.iters, device) * 1e3
                row.update(us=us, us_group=us / len(weights), tbs=total_bytes / us / 1e6)
                if how is None:
                    base[small] = us
                row["vs_none"] = base[small] / us if small in base else None
            except Exception as e:  # one variant's failure (an asm the card rejects) leaves the others
                row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
            rows.append(row)
            progress(row)
    print_table(f"decode step skeleton of the d{args.depth} hybrid: {len(weights)} groups, "
                f"{sum(len(ws) for ws in weights)} matrices, {total_bytes / 1e9:.2f} GB of bf16 weights, one row, "
                f"one CUDA graph (median of {args.iters} replays)", rows,
                [("small", "small kernels a group", "d"), ("prefetch", "prefetch", ""), ("ahead", "ahead", "d"),
                 ("stream", "stream", ""), ("us", "us a step", ".1f"), ("us_group", "us a group", ".2f"),
                 ("tbs", "TB/s", ".2f"), ("vs_none", "x none", ".3f"), ("same", "output = none's", "")])
    return finish("prefetch", args, device, {"rows": rows, "groups": len(weights), "bytes": total_bytes})

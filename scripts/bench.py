"""
Benchmarks on one device, each printing a table with its targets (pass/fail) and, as its LAST line,
one JSON object with the environment (device, torch, date, kernel versions) and every number.

    python -m scripts.bench mamba   # Mamba/Mamba2 fwd+bwd: mamba-ssm itself, our kernel and PyTorch paths eager and compiled; step()
    python -m scripts.bench moe     # MoE fwd+bwd: torch._grouped_mm vs bmm vs the per-expert loop vs a dense FFN of equal active FLOPs
    python -m scripts.bench train   # training tokens/s and MFU: dense GPT vs hybrids, phase-1 and phase-2 settings
    python -m scripts.bench decode  # prefill/decode tokens/s and KV + SSM cache memory: dense GPT vs hybrid modes

Timing: CUDA events around each timed iteration after warmup, median over iterations (perf_counter on
CPU); the first call's wall time (compilation, autotuning) is reported apart. Weights are fresh inits:
the work done does not depend on their values, except where routing or gating decides it (MoE
loads, decode mode 'auto'), which the tables say. --profile adds the top kernels (torch.profiler,
self device time) of the rows the targets compare, so a missed target comes with its cause.

The mamba and moe subcommands and the shared helpers (timing, tables, targets, the JSON line) are here;
train is in scripts/bench_train.py (with the FLOP convention of its MFU), decode in scripts/bench_decode.py.
"""
import os
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
import gc
import sys
import json
import time
import argparse
import statistics
import subprocess
from datetime import datetime, timezone
from importlib import metadata

import torch
import torch.nn.functional as F

from nanochat.common import autodetect_device_type, autocast_context, synchronize as sync


# -----------------------------------------------------------------------------
# shared helpers

def environment(device):
    env = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "torch": torch.__version__,
           "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({os.cpu_count()} cores)",
           "cuda": torch.version.cuda if device.type == "cuda" else None, "python": sys.version.split()[0]}
    for pkg in ("mamba_ssm", "causal_conv1d", "triton"):
        try:
            env[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            env[pkg] = "not installed"
    try:
        r = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=os.path.dirname(__file__))
        env["git"] = r.stdout.strip() if r.returncode == 0 else "not a git checkout"
    except FileNotFoundError:
        env["git"] = "git not installed"
    return env


def free_memory(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def median_ms(fn, iters, device):
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def error_text(e):
    first = (str(e).strip().splitlines() or [""])[0]
    return f"{type(e).__name__}: {first[:200]}"


def measure(fn, device, warmup, iters):
    """{"ms": median, "first_s": wall time of the first call, "peak_gib"} or {"error": why}.
    Any exception of the measured call (out of memory, a kernel or the compiler refusing, a bug in the code
    under test) becomes the row's 'error' and is printed in the table; the other rows still run."""
    free_memory(device)
    try:
        t0 = time.perf_counter()
        fn()
        sync(device)
        first_s = time.perf_counter() - t0
        for _ in range(max(0, warmup - 1)):
            fn()
        ms = median_ms(fn, iters, device)
    except Exception as e:  # noqa: BLE001 -- reported, not swallowed: the table and the JSON carry it
        msg = error_text(e)
        del e
        free_memory(device)
        return {"error": msg}
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return {"ms": ms, "first_s": first_s, "peak_gib": peak}


def cuda_graphed(fn, warmup=3):
    """fn captured as one CUDA graph (after warmup calls on a side stream, as capture requires); returns its replay.
    Host launch time drops out, so a timed replay measures the device. fn must not sync with the host."""
    # backward on the side stream (warmup) and then on the capture stream makes autograd warn that a leaf's
    # gradient accumulator changed streams; the gradients are right, the warning is about a possible sync
    torch.autograd.graph.set_warn_on_accumulate_grad_stream_mismatch(False)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def progress(row):
    """One line per finished row, flushed, so a later crash or timeout cannot lose it."""
    print("row " + json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items() if k != "profile"},
                              default=str), flush=True)


def top_kernels(fn, device, n=12, steps=2):
    """The n device kernels (CPU ops on a CPU) with the most self time over `steps` calls of fn, and their
    share of the total. On CUDA only kernel events count: an op's own entry would count its kernels twice."""
    from torch.profiler import profile, ProfilerActivity
    cuda = device.type == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts) as prof:
        for _ in range(steps):
            fn()
        sync(device)
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    events = [e for e in prof.key_averages() if not cuda or e.device_type == torch.autograd.DeviceType.CUDA]
    events.sort(key=lambda e: getattr(e, key), reverse=True)
    total = sum(getattr(e, key) for e in events) or 1.0
    rows = [{"name": e.key[:100], "ms_per_call": getattr(e, key) / 1e3 / steps, "pct": 100 * getattr(e, key) / total,
             "count_per_call": e.count / steps} for e in events[:n] if getattr(e, key) > 0]
    rows.append({"name": f"(total of all {len(events)} kinds)", "ms_per_call": total / 1e3 / steps, "pct": 100.0,
                 "count_per_call": sum(e.count for e in events) / steps})
    return rows


def print_profile(title, rows):
    print(f"  profile: {title} (top {'device kernels' if rows and 'aten::' not in rows[0]['name'] else 'ops'} by self time per call)")
    for r in rows:
        print(f"    {r['pct']:5.1f}%  {r['ms_per_call']:9.3f} ms  x{r['count_per_call']:<6g} {r['name']}")


def fmt(v, spec):
    if v is None:
        return "-"
    if isinstance(v, str):
        return v
    return format(v, spec)


def print_table(title, rows, cols):
    """cols: (key, header, format spec). A row with 'error' shows it after its first columns."""
    print(f"\n== {title}")
    lines = [[h for _, h, _ in cols]] + [[fmt(r.get(k), f) for k, _, f in cols] for r in rows if "error" not in r]
    widths = [max(len(line[i]) for line in lines) for i in range(len(cols))]
    print("  " + "  ".join(h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(lines[0], widths))))
    for r in rows:
        cells = [fmt(r.get(k), f) for k, _, f in cols]
        if "error" in r:  # the identifying columns (all but the numbers), then the reason
            ident = [c for (k, _, f), c in zip(cols, cells) if f == "" and c != "-"]
            print("  " + "  ".join(ident) + "  " + r["error"])
        else:
            print("  " + "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))))


def target(name, value, limit, op, note=""):
    """A target row: value op limit, pass None when the value could not be measured."""
    ok = None if value is None else (value <= limit if op == "<=" else value >= limit)
    return {"target": name, "value": value, "limit": f"{op} {limit:g}", "pass": ok, "note": note}


def print_targets(targets):
    print("\n== targets")
    for t in targets:
        verdict = "n/a (not measured)" if t["pass"] is None else ("PASS" if t["pass"] else "FAIL")
        value = "-" if t["value"] is None else f"{t['value']:.3f}"
        print(f"  {verdict:<5} {t['target']:<58} {value:>9} (target {t['limit']}) {t['note']}")


def finish(kind, args, device, result):
    result.update(bench=kind, env=environment(device), args=vars(args))
    if "targets" in result:
        print_targets(result["targets"])
    print(json.dumps(result, default=str))
    return result


def ratio(a, b):
    """a / b of two measurements' ms, None if either failed."""
    return a["ms"] / b["ms"] if "ms" in a and "ms" in b else None


def model_dims(depth):
    """(width, heads) of nanochat's depth dial (GPTConfig.from_depth)."""
    from nanochat.gpt import GPTConfig
    c = GPTConfig.from_depth(depth)
    return c.n_embd, c.n_head


# -----------------------------------------------------------------------------
# mamba: our mixers (kernel path and PyTorch path, eager and compiled) against mamba-ssm's own modules

def mamba_ssm_classes():
    """mamba-ssm's own (Mamba, Mamba2) modules, or None and why they cannot be imported."""
    try:
        from mamba_ssm.modules.mamba_simple import Mamba
        from mamba_ssm.modules.mamba2 import Mamba2
    except ImportError as e:
        return None, error_text(e)
    return (Mamba, Mamba2), None


def cmd_mamba(args, device):
    import copy
    from nanochat import mamba_block as mb
    ms_classes, ms_why = mamba_ssm_classes()
    kernel_why = mb.KERNEL_IMPORT_ERROR or (None if device.type == "cuda" else "needs CUDA")
    actx = autocast_context(device.type)
    rows, steps, targets, profiles = [], [], [], {}
    lengths = [int(s) for s in args.seqlens.split(",")]
    for v in [int(s) for s in args.versions.split(",")]:
        mixer = "Mamba" if v == 1 else "Mamba2"
        torch.manual_seed(0)
        ours = (mb.Mamba if v == 1 else mb.Mamba2)(args.d_model, layer_idx=0, device=device)
        impls = {}  # name -> module, or the reason it cannot run here
        if ms_classes is None or kernel_why:
            impls["mamba-ssm"] = f"unavailable: {ms_why or kernel_why}"
        else:
            ref = ms_classes[v - 1](args.d_model, layer_idx=0, device=device)
            ref.load_state_dict(ours.state_dict())  # strict: the same parameters, so the same function
            impls["mamba-ssm"] = ref
        kern, tor = copy.deepcopy(ours), copy.deepcopy(ours)
        kern.path, tor.path = "kernel", "torch"
        impls["ours kernel"] = f"unavailable: {kernel_why}" if kernel_why else kern
        # compiled, the kernel path runs mamba_ops' custom ops (what `bench train --compile` and training run)
        impls["ours kernel compiled"] = (f"unavailable: {kernel_why}" if kernel_why else
                                         torch.compile(kern, dynamic=False, backend=args.compile_backend))
        impls["ours torch eager"] = tor
        impls["ours torch compiled"] = torch.compile(tor, dynamic=False, backend=args.compile_backend)
        for L in lengths:
            B = args.batch if L == lengths[0] else max(1, args.batch * lengths[0] // L)
            x = torch.randn(B, L, args.d_model, device=device, requires_grad=True)
            g = torch.randn(B, L, args.d_model, device=device)
            res = {}
            for name, m in impls.items():
                row = res[name] = {"mixer": mixer, "impl": name, "batch": B, "seqlen": L}
                rows.append(row)
                if isinstance(m, str):
                    row["error"] = m
                    progress(row)
                    continue

                def fwd_bwd(m=m):
                    with actx:
                        y = m(x)
                    y.backward(g.to(y.dtype))
                row.update(measure(fwd_bwd, device, args.warmup, args.iters))
                m.zero_grad(set_to_none=True)
                x.grad = None
                if "ms" in row:
                    row["tok_per_s"] = B * L / row["ms"] * 1e3
                progress(row)
                if "ms" in row and args.profile and L == lengths[0] and name != "ours torch eager":
                    profiles[f"{mixer} {name} fwd+bwd B={B} L={L}"] = top_kernels(fwd_bwd, device)
            targets.append(target(f"{mixer} L={L}: ours kernel / mamba-ssm time", ratio(res["ours kernel"], res["mamba-ssm"]), 1.05, "<="))
            targets.append(target(f"{mixer} L={L}: torch compiled / ours kernel time",
                                  ratio(res["ours torch compiled"], res["ours kernel"]), 5.0 if v == 1 else 3.0, "<="))
        # decode: one step() at each batch, bf16 weights and states (fp32 on CPU)
        dt = torch.bfloat16 if device.type == "cuda" else torch.float32
        for Bd in [int(s) for s in args.decode_batches.split(",")]:
            for name in ("mamba-ssm", "ours kernel", "ours torch eager"):
                row = {"mixer": mixer, "impl": name.replace(" eager", ""), "batch": Bd}
                steps.append(row)
                if isinstance(impls[name], str):
                    row["error"] = impls[name]
                    progress(row)
                    continue
                m = copy.deepcopy(impls[name]).to(dt)
                conv, ssm = m.allocate_inference_cache(Bd, 1)
                h = torch.randn(Bd, 1, args.d_model, device=device, dtype=dt)

                @torch.inference_mode()
                def one_step(m=m, h=h, conv=conv, ssm=ssm):
                    m.step(h, conv, ssm)
                row.update(measure(one_step, device, 10, args.decode_iters))
                if "ms" in row:
                    row["us"] = row["ms"] * 1e3
                progress(row)
    print_table("Mamba fwd+bwd, " + ("bf16 autocast, fp32 weights" if device.type == "cuda" else "fp32"), rows,
                [("mixer", "mixer", ""), ("impl", "impl", ""), ("batch", "B", "d"), ("seqlen", "L", "d"), ("ms", "ms", ".2f"),
                 ("tok_per_s", "tokens/s", ",.0f"), ("peak_gib", "peak GiB", ".2f"), ("first_s", "first call s", ".1f")])
    print_table("Mamba decode step latency, " + ("bf16 weights and states" if device.type == "cuda" else "fp32"), steps,
                [("mixer", "mixer", ""), ("impl", "impl", ""), ("batch", "B", "d"), ("us", "us/step", ".1f")])
    for k, p in profiles.items():
        print_profile(k, p)
    return finish("mamba", args, device, {"rows": rows, "decode": steps, "targets": targets, "profiles": profiles})


# -----------------------------------------------------------------------------
# moe: grouped_mm vs bmm vs per-expert loop vs dense FFN of equal active FLOPs

def cmd_moe(args, device):
    from nanochat.moe import MoE, moe_reference, grouped_mm_supported
    dt = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    D, H, E, k = args.d_model, args.expert_dim, args.experts, args.top_k
    moe = MoE(D, E, H, top_k=k, capacity_factor=args.capacity_factor, device=device, dtype=dt)
    with torch.no_grad():
        moe.w_out.normal_(0.0, H ** -0.5)  # init is 0 (a fresh block adds nothing); any values cost the same
    w1 = (torch.randn(k * H, D, device=device, dtype=dt) * D ** -0.5).requires_grad_()  # dense: top_k * expert_dim units
    w2 = (torch.randn(D, k * H, device=device, dtype=dt) * H ** -0.5).requires_grad_()
    T = min(args.tokens, 1024)
    x = torch.randn(args.tokens // T, T, D, device=device, dtype=dt, requires_grad=True)
    g = torch.randn_like(x)

    def dense(t):
        return F.linear(F.relu(F.linear(t, w1)).square(), w2)
    # --compile: MoE (both dispatches, one graph each: dynamo guards on moe.dispatch) and the dense FFN through
    # torch.compile, fullgraph so that a graph break or a host sync fails loudly; the loop reference stays eager
    wrap = (lambda f: torch.compile(f, fullgraph=True, backend=args.compile_backend)) if args.compile else (lambda f: f)
    moe_fn, dense_fn = wrap(moe), wrap(dense)

    def run(kind):
        if kind == "dense":
            return dense_fn(x)
        if kind == "loop":
            return moe_reference(moe, x)[0]
        moe.dispatch = kind
        return moe_fn(x)

    rows, out, profiles = [], {}, {}
    names = {"grouped_mm": "MoE grouped_mm", "bmm": "MoE bmm (padded)", "loop": "MoE per-expert loop", "dense": "dense ReLU^2 FFN"}
    graph = args.cuda_graph and device.type == "cuda"
    for kind in ("grouped_mm", "bmm", "loop", "dense"):
        def fwd_bwd(kind=kind):
            run(kind).backward(g)
        ok, why = grouped_mm_supported(dt, device, (D, H), compiled=args.compile) if kind == "grouped_mm" else (True, "")
        fn = fwd_bwd
        if ok and graph and kind != "loop":  # the loop syncs (nonzero per expert): it stays eager
            try:
                fn = cuda_graphed(fwd_bwd)
            except Exception as e:  # noqa: BLE001 -- the row reports it
                ok, why = False, f"CUDA graph capture failed: {error_text(e)}"
        r = measure(fn, device, args.warmup, args.iters) if ok else {"error": f"unavailable: {why}"}
        row = {"impl": names[kind], **r}
        if "ms" in r:
            row["tok_per_s"] = x.shape[0] * T / r["ms"] * 1e3
            with torch.no_grad():
                out[kind] = run(kind).float()
            if args.profile and kind in ("grouped_mm", "dense"):
                profiles[names[kind]] = top_kernels(fwd_bwd, device)
        progress(row)
        rows.append(row)
    for row, kind in zip(rows, ("grouped_mm", "bmm", "loop", "dense")):
        if kind in out and "loop" in out and kind != "dense":
            row["max_diff_vs_loop"] = (out[kind] - out["loop"]).abs().max().item()
    stats = moe.last_stats
    by = {k: r for k, r in zip(("grouped_mm", "bmm", "loop", "dense"), rows)}
    targets = [target(f"loop / grouped_mm time ({E} experts, top-{k})", ratio(by["loop"], by["grouped_mm"]), 3.0, ">="),
               target("grouped_mm / dense FFN of equal active FLOPs time", ratio(by["grouped_mm"], by["dense"]), 1.3, "<=")]
    how = f"torch.compile ({args.compile_backend}, fullgraph; the loop eager)" if args.compile else "eager"
    if graph:
        how += ", each fwd+bwd replayed as one CUDA graph (device time; the loop not)"
    print_table(f"MoE fwd+bwd: {x.shape[0] * T} tokens, d_model {D}, {E} experts x {H}, top-{k}, capacity factor "
                f"{args.capacity_factor}, {str(dt).replace('torch.', '')} weights and activations, {how}", rows,
                [("impl", "impl", ""), ("ms", "ms", ".3f"), ("tok_per_s", "tokens/s", ",.0f"), ("peak_gib", "peak GiB", ".2f"),
                 ("max_diff_vs_loop", "max|y - loop|", ".2e")])
    load = stats["tokens_per_expert"].tolist() if stats else None
    print(f"  tokens kept per expert {load}, dropped {stats['dropped'] if stats else '-'} (fresh router: near-uniform)")
    for name, p in profiles.items():
        print_profile(name, p)
    return finish("moe", args, device, {"rows": rows, "targets": targets, "tokens_per_expert": load,
                                        "dropped": stats["dropped"] if stats else None, "profiles": profiles,
                                        "compile": args.compile, "compile_backend": args.compile_backend if args.compile else None,
                                        "cuda_graph": graph})


# -----------------------------------------------------------------------------

def get_args(argv=None):
    from nanochat.engine import DECODE_PATHS
    p = argparse.ArgumentParser(description="Adamba benchmarks (see the module docstring)")
    p.add_argument("--device", type=str, default="", help="cuda|cpu (empty = autodetect)")
    p.add_argument("--warmup", type=int, default=3, help="untimed calls first (the first also reports its wall time)")
    p.add_argument("--iters", type=int, default=10, help="timed calls; the median is reported")
    p.add_argument("--profile", action="store_true", help="top kernels of the rows the targets compare")
    p.add_argument("--compile-backend", type=str, default="inductor", help="torch.compile backend ('eager' for smoke tests)")
    sub = p.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("mamba", help="Mamba/Mamba2 mixers: fwd+bwd and decode step")
    m.add_argument("--batch", type=int, default=8, help="batch at the first length; longer lengths keep batch*length")
    m.add_argument("--seqlens", type=str, default="2048,8192")
    m.add_argument("--d-model", type=int, default=1024)
    m.add_argument("--versions", type=str, default="1,2")
    m.add_argument("--decode-batches", type=str, default="1,8")
    m.add_argument("--decode-iters", type=int, default=50)
    e = sub.add_parser("moe", help="MoE dispatch vs loop vs dense FFN")
    e.add_argument("--tokens", type=int, default=16384)
    e.add_argument("--d-model", type=int, default=1024)
    e.add_argument("--expert-dim", type=int, default=4096)
    e.add_argument("--experts", type=int, default=8)
    e.add_argument("--top-k", type=int, default=1)
    e.add_argument("--capacity-factor", type=float, default=1.25, help="HybridConfig's default")
    e.add_argument("--compile", action="store_true", help="torch.compile (--compile-backend, fullgraph) the grouped_mm "
                   "and bmm MoE and the dense FFN, to compare compiled with compiled; the loop reference stays eager")
    e.add_argument("--cuda-graph", action="store_true", help="CUDA only: time each fwd+bwd (but the loop's) as a "
                   "replayed CUDA graph, so host launch overhead drops out and the ratios are the device's")
    for name, helptext in (("train", "training step throughput and MFU"), ("decode", "prefill/decode speed and cache memory")):
        t = sub.add_parser(name, help=helptext)
        t.add_argument("--depth", type=int, default=20, help="nanochat depth dial: width 64*depth, heads of 128")
        t.add_argument("--vocab-size", type=int, default=65536, help="nanochat's tokenizer")
        t.add_argument("--mamba", type=int, default=1, choices=(1, 2), help="Mamba version (scripts.surgery's default: 1)")
        t.add_argument("--seq-len", type=int, default=2048)
        t.add_argument("--batch", type=int, default=16 if name == "train" else 1,
                       help="rows per step (train: halved on out-of-memory, the table says so)")
        t.add_argument("--seed", type=int, default=0)
        if name == "train":
            t.add_argument("--models", type=str, default="dense,hybrid,hybrid-eq")
            t.add_argument("--phases", type=str, default="1,2")
            t.add_argument("--exit-strides", type=str, default="1,8", help="phase 2: readouts after every Nth block (1 = the default config)")
            t.add_argument("--exit-loss-weight", type=float, default=0.1, help="as scripts.fractal_train")
            t.add_argument("--grad-accum", type=int, default=1, help="micro-batches (fwd+bwd of every plan) per optimizer "
                           "step, as fractal_train's total batch / (device batch x seq len); 1 pays the update every batch")
            t.add_argument("--compile", type=str, default="blocks", choices=("blocks", "model", "none"),
                           help="torch.compile each block (identical blocks share graphs), the whole model, or nothing")
            t.add_argument("--readouts", type=str, default="compiled", choices=("compiled", "eager"),
                           help="phase 2's exit readouts after lm_head: HybridGPT.READOUT_COMPILE (CUDA) on or off")
        else:
            t.add_argument("--contexts", type=str, default="1024,8192,32768")
            t.add_argument("--modes", type=str, default="think,normal,whisper,ghost,auto")
            t.add_argument("--decode-tokens", type=int, default=16)
            t.add_argument("--exit-stride", type=int, default=1, help="the hybrids' gated exits: after every Nth block "
                           "(1 = HybridConfig's default); in gated modes (auto) each gate costs a host-device sync")
            t.add_argument("--prefill-reps", type=int, default=2)
            t.add_argument("--engine-decode", type=str, default="auto", choices=DECODE_PATHS,
                           help="the hybrids' decode path (nanochat.engine.Engine): auto = CUDA graphs on CUDA where the "
                           "step allows them (one plan for every row, and one row when gates are on), else the eager step")
            t.add_argument("--weights", type=str, default="fp32", choices=("fp32", "bf16"),
                           help="fp32 weights under bf16 autocast (scripts.generate's setting), or bf16 weights and caches")
            t.add_argument("--memory-only", action="store_true", help="only the cache formula per mode (checked against "
                           "the engine's tensors by tests/test_bench.py): no model is built, so any size runs on a CPU")
    return p.parse_args(argv)


def main(argv=None):
    # train and decode import the shared helpers from this module: imported here, not at its top
    from scripts.bench_train import cmd_train
    from scripts.bench_decode import cmd_decode
    args = get_args(argv)
    device = torch.device(args.device or autodetect_device_type())
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return {"mamba": cmd_mamba, "moe": cmd_moe, "train": cmd_train, "decode": cmd_decode}[args.cmd](args, device)


if __name__ == "__main__":
    main()

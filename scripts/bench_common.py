"""
What the benchmarks of scripts.bench share: timing, tables, targets, the JSON line, and the benchmarked models
(nanochat's dense GPT at a depth and the hybrids made from it). python -m scripts.bench --help for the commands.
"""
import os
import gc
import sys
import json
import time
import statistics
from datetime import datetime, timezone
from importlib import metadata

import torch

from nanochat.common import synchronize as sync
from nanochat.run_report import git_commit


def environment(device):
    env = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "torch": torch.__version__,
           "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({os.cpu_count()} cores)",
           "cuda": torch.version.cuda if device.type == "cuda" else None, "python": sys.version.split()[0]}
    for pkg in ("mamba_ssm", "causal_conv1d", "triton"):
        try:
            env[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            env[pkg] = "not installed"
    env["git"] = git_commit()[0]  # "unknown" outside this project's checkout or without git
    return env


def free_memory(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def timed_ms(fn, iters, device, stat=statistics.median):
    """stat (the median unless given) of `iters` timed calls, in ms."""
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
    return stat(times)


def error_text(e):
    first = (str(e).strip().splitlines() or [""])[0]
    return f"{type(e).__name__}: {first[:200]}"


def measure(fn, device, warmup, iters, stat=statistics.median):
    """{"ms": median (or `stat`) of the timed calls, "first_s": wall time of the first call, "warmup_s": of all the
    untimed calls, "peak_gib"} or {"error": why}.
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
        sync(device)
        warmup_s = time.perf_counter() - t0
        ms = timed_ms(fn, iters, device, stat)
    except Exception as e:  # noqa: BLE001 -- reported, not swallowed: the table and the JSON carry it
        msg = error_text(e)
        del e
        free_memory(device)
        return {"error": msg}
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return {"ms": ms, "first_s": first_s, "warmup_s": warmup_s, "peak_gib": peak}


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


def progress_record(row):
    """What progress() prints of a row: floats to 4 places, the profile left out."""
    return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items() if k != "profile"}


def progress(row):
    """One line per finished row, flushed, so a later crash or timeout cannot lose it."""
    print("row " + json.dumps(progress_record(row), default=str), flush=True)


def printed_rows(text):
    """The rows progress() printed into text, parsed back."""
    return [json.loads(line[len("row "):]) for line in text.splitlines() if line.startswith("row {")]


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


def bench_configs(args, seq_len, **hybrid):
    """{name: (kind, config)} of the benchmarked models at args.depth / vocab_size / mamba: the dense GPT
    (nanochat's depth dial, GPTConfig.from_depth), the hybrid scripts.surgery makes from it (pattern AM: one
    Mamba block after each attention block), a hybrid of depth blocks in all (about the dense model's parameter
    count), and, when args.models names it, "hybrid-grown": the surgery hybrid grown to 1.5x the width as the
    speedrun's phase 3 trains it. args.layers (when given and not None): every hybrid gets that many blocks of the
    same shapes, for a model whose unsharded optimizer states would not fit one GPU. `hybrid`: more HybridConfig
    fields for the hybrids."""
    from nanochat.gpt import GPTConfig
    from nanochat.hybrid_gpt import HybridConfig
    from nanochat.surgery import hybrid_n_layer
    dense = GPTConfig.from_depth(args.depth, vocab_size=args.vocab_size, sequence_len=seq_len)
    layers = getattr(args, "layers", None)
    if layers is not None and layers < 1:
        raise ValueError(f"--layers {layers}: give a positive number of blocks")
    common = dict(sequence_len=seq_len, vocab_size=args.vocab_size, n_head=dense.n_head, n_kv_head=dense.n_kv_head,
                  n_embd=dense.n_embd)
    hyb = dict(layer_pattern="AM", ffn_pattern="DD", mamba_version=args.mamba, **common, **hybrid)
    out = {"dense": ("gpt", dense),  # --layers: every hybrid with that many blocks (same shapes, fewer of them)
           "hybrid": ("hybrid", HybridConfig(n_layer=layers or hybrid_n_layer(args.depth, "AM"), **hyb)),
           "hybrid-eq": ("hybrid", HybridConfig(n_layer=layers or args.depth, **hyb))}
    names = [n for n in (getattr(args, "models", None) or "").split(",") if n]
    bad = [n for n in names if n not in (*out, "hybrid-grown")]
    if bad:
        raise ValueError(f"--models: {', '.join(map(repr, bad))} not among {', '.join([*out, 'hybrid-grown'])}")
    if "hybrid-grown" in names:  # built only when asked for (a growth on meta tensors)
        out["hybrid-grown"] = ("hybrid", grown_config(out["hybrid"][1]))
    return out


GROW_FACTOR = 1.5  # runs/speedrun.sh grows d32's hybrid from width 2048 to 3072 for phase 3


def grown_config(config):
    """The hybrid `config` grown as runs/speedrun.sh grows it for phase 3 (scripts.surgery --expand-from: width x1.5,
    rounded to the head dim): the config nanochat.surgery.grow returns, run on meta tensors."""
    from nanochat import surgery
    from nanochat.hybrid_gpt import HybridGPT
    hd = config.n_embd // config.n_head
    new_dim = round(config.n_embd * GROW_FACTOR / hd) * hd
    with torch.device("meta"):
        state = dict(HybridGPT(config).state_dict())
        _, grown, _ = surgery.grow(state, config, new_dim)
    return grown


def build_model(kind, config, device):
    from nanochat.gpt import GPT
    from nanochat.hybrid_gpt import HybridGPT
    with torch.device(device):
        model = GPT(config) if kind == "gpt" else HybridGPT(config)
        model.init_weights()
    return model

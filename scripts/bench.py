"""
Benchmarks on one device (moe-ep: on the ranks of torchrun), each printing a table with its targets (pass/fail)
and, as its LAST line, one JSON object with the environment (device, torch, date, kernel versions) and every number.

    python -m scripts.bench mamba   # Mamba/Mamba2 fwd+bwd: mamba-ssm itself, our kernel and PyTorch paths eager and compiled; step()
    python -m scripts.bench moe     # MoE fwd+bwd: torch._grouped_mm vs bmm vs the per-expert loop vs a dense FFN of equal active
                                    # FLOPs, and the expert GEMMs alone on equal and on the routed groups (the floor under
                                    # the dispatch, and what the 1.3x target leaves routing beside it)
    python -m scripts.bench train   # training tokens/s and MFU: dense GPT vs hybrids, phase-1 and phase-2 settings
    python -m scripts.bench decode  # prefill/decode tokens/s and KV + SSM cache memory: dense GPT vs hybrid modes
    python -m scripts.bench adaptive --checkpoint PATH  # a trained hybrid's modes: held-out decode loss and tokens/s
    python -m scripts.bench muon    # Muon's step over a model's matrices: one Newton-Schulz per matrix vs same shapes stacked
    python -m scripts.bench matvec  # decode's matrix products (CUDA): cuBLAS vs inductor's tuned reduction vs a Triton kernel
    python -m scripts.bench prefetch  # an experiment (CUDA, sm_90): a decode step's weights prefetched into L2 ahead of use
    python -m scripts.bench host --checkpoint PATH  # the host's time a token on the graph path, the graphs taken out
    torchrun --standalone --nproc_per_node=2 -m scripts.bench moe-ep  # MoE fwd+bwd, experts replicated vs sharded

Timing: CUDA events around each timed iteration after warmup, median over iterations (perf_counter on
CPU); the first call's wall time (compilation, autotuning) is reported apart. Weights are fresh inits:
the work done does not depend on their values, except where routing or gating decides it (MoE
loads, decode mode 'auto'), which the tables say; `adaptive` loads a trained checkpoint instead.
--profile adds the top kernels (torch.profiler, self device time) of the rows the targets compare, so a
missed target comes with its cause. --inductor-option KEY=VALUE (repeatable) tries an option of torch's inductor
on the command's compiles (e.g. `--inductor-option combo_kernels=true decode ... --engine-decode tuned`).

The mamba and moe subcommands and the command line are here; train is in scripts/bench_train.py (with the FLOP
convention of its MFU), decode in scripts/bench_decode.py, adaptive in scripts/bench_adaptive.py, moe-ep in scripts/bench_ep.py, matvec in
scripts/bench_matvec.py, prefetch in scripts/bench_prefetch.py, host in scripts/bench_host.py, and what all
of them share (timing, tables, targets, the JSON line, the benchmarked models) in scripts/bench_common.py.
"""
import contextlib
import json
import os
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
import argparse

import torch
import torch.nn.functional as F

from nanochat.common import autodetect_device_type, autocast_context, add_runtime_args, run_script
from scripts.bench_common import (measure, cuda_graphed, error_text, progress, top_kernels, print_profile, print_table,
                                  target, finish, ratio)
from scripts.bench_train import cmd_train
from scripts.bench_decode import cmd_decode
from scripts import bench_adaptive, bench_ep, bench_host, bench_matvec, bench_prefetch


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
    from nanochat.mamba2_block import Mamba2
    ms_classes, ms_why = mamba_ssm_classes()
    kernel_why = mb.KERNEL_IMPORT_ERROR or (None if device.type == "cuda" else "needs CUDA")
    actx = autocast_context(device.type)
    rows, steps, targets, profiles = [], [], [], {}
    lengths = [int(s) for s in args.seqlens.split(",")]
    for v in [int(s) for s in args.versions.split(",")]:
        mixer = "Mamba" if v == 1 else "Mamba2"
        torch.manual_seed(0)
        ours = (mb.Mamba if v == 1 else Mamba2)(args.d_model, layer_idx=0, device=device)
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
    # --weights bf16: bf16 weights and inputs on CUDA, fp32 on a CPU (no autocast); --weights fp32: fp32 weights
    # and inputs under bf16 autocast on any device, as a fractal_train step (the residual stream and its rms_norm
    # are fp32 there), so the MoE's and the dense FFN's weight casts and fp32 gradients are in the times
    amp = args.weights == "fp32"
    dt = torch.float32 if amp or device.type != "cuda" else torch.bfloat16  # weights and inputs
    ct = torch.bfloat16 if amp else dt  # matmul inputs
    actx = (lambda: autocast_context(device.type, torch.bfloat16)) if amp else contextlib.nullcontext
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
    # the floor under the dispatch: the same expert GEMMs on tokens already grouped into E equal groups (no router,
    # no permutation, no uneven groups), so grouped_mm - experts is what routing, dispatch and uneven groups cost;
    # and on the group sizes this MoE's router gives x ("routed groups"): grouped_mm - that row is what routing and
    # dispatch alone cost, and 1.3 * dense - that row is all that the target leaves them
    n_tok = x.shape[0] * T
    offs_eq = torch.tensor([(i + 1) * n_tok * k // E for i in range(E)], device=device, dtype=torch.int32)
    with torch.no_grad(), actx():
        moe(x)
    offs_routed = moe.last_stats["tokens_per_expert"].cumsum(0).to(torch.int32)
    n_kept = int(offs_routed[-1])  # rows past it (dropped assignments) are in no group: not computed

    def experts(t, offs, rows):  # top-k: each token's k rows, summed back (as the MoE's gather does), without the
        # gates; only the first `rows` (= offs[-1], an int so that the shapes stay static) are in a group
        xs = t.to(ct).reshape(n_tok, 1, D).expand(n_tok, k, D).reshape(n_tok * k, D)[:rows]
        with torch.autocast(device.type, enabled=False):  # casts as the MoE's forward makes them
            hs = F.relu(torch._grouped_mm(xs, moe.w_in.to(ct).transpose(1, 2), offs=offs)).square()
            ys = torch._grouped_mm(hs, moe.w_out.to(ct).transpose(1, 2), offs=offs)
        if ys.shape[0] < n_tok * k:
            ys = F.pad(ys, (0, 0, 0, n_tok * k - ys.shape[0]))
        return ys.view(*t.shape[:2], k, D).sum(2)
    # --compile: MoE (both dispatches, one graph each: dynamo guards on moe.dispatch) and the dense FFN through
    # torch.compile, fullgraph so that a graph break or a host sync fails loudly; the loop reference stays eager
    wrap = (lambda f: torch.compile(f, fullgraph=True, backend=args.compile_backend)) if args.compile else (lambda f: f)
    moe_fn, dense_fn, experts_fn = wrap(moe), wrap(dense), wrap(experts)

    def run(kind):
        with actx():
            if kind == "dense":
                return dense_fn(x)
            if kind in ("experts", "experts_routed"):
                return experts_fn(x, offs_eq, n_tok * k) if kind == "experts" else experts_fn(x, offs_routed, n_kept)
            if kind == "loop":
                return moe_reference(moe, x)[0]
            moe.dispatch = kind
            return moe_fn(x)

    rows, out, profiles, to_profile = [], {}, {}, {}
    kinds = ("grouped_mm", "bmm", "loop", "dense", "experts", "experts_routed")
    names = {"grouped_mm": "MoE grouped_mm", "bmm": "MoE bmm (padded)", "loop": "MoE per-expert loop", "dense": "dense ReLU^2 FFN",
             "experts": "experts only (equal groups)", "experts_routed": "experts only (routed groups)"}
    graph = args.cuda_graph and device.type == "cuda"
    for kind in kinds:
        def fwd_bwd(kind=kind):
            run(kind).backward(g)
        needs_gmm = kind in ("grouped_mm", "experts", "experts_routed")
        ok, why = grouped_mm_supported(ct, device, (D, H), compiled=args.compile) if needs_gmm else (True, "")
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
            if not kind.startswith("experts"):  # a different function (no router): nothing to compare
                with torch.no_grad():
                    out[kind] = run(kind).float()
            if args.profile and kind in ("grouped_mm", "dense"):
                to_profile[kind] = fwd_bwd
        progress(row)
        rows.append(row)
    # profiles after every row is timed: a CUDA graph captured after a profiler session failed on the H100
    for kind, fwd_bwd in to_profile.items():
        profiles[names[kind]] = top_kernels(fwd_bwd, device)
    for row, kind in zip(rows, kinds):
        if kind in out and "loop" in out and kind != "dense":
            row["max_diff_vs_loop"] = (out[kind] - out["loop"]).abs().max().item()
    stats = moe.last_stats
    by = dict(zip(kinds, rows))
    targets = [target(f"loop / grouped_mm time ({E} experts, top-{k})", ratio(by["loop"], by["grouped_mm"]), 3.0, ">="),
               target("grouped_mm / dense FFN of equal active FLOPs time", ratio(by["grouped_mm"], by["dense"]), 1.3, "<=")]
    precision = ("fp32 weights and inputs under bf16 autocast" if amp
                 else f"{str(dt).replace('torch.', '')} weights and activations")
    how = f"torch.compile ({args.compile_backend}, fullgraph; the loop eager)" if args.compile else "eager"
    if graph:
        how += ", each fwd+bwd replayed as one CUDA graph (device time; the loop not)"
    print_table(f"MoE fwd+bwd: {x.shape[0] * T} tokens, d_model {D}, {E} experts x {H}, top-{k}, capacity factor "
                f"{args.capacity_factor}, {precision}, {how}", rows,
                [("impl", "impl", ""), ("ms", "ms", ".3f"), ("tok_per_s", "tokens/s", ",.0f"), ("peak_gib", "peak GiB", ".2f"),
                 ("max_diff_vs_loop", "max|y - loop|", ".2e")])
    load = stats["tokens_per_expert"].tolist() if stats else None
    print(f"  tokens kept per expert {load}, dropped {stats['dropped'] if stats else '-'} (fresh router: near-uniform)")
    floor = ratio(by["experts"], by["dense"])
    dispatch_ms = by["grouped_mm"]["ms"] - by["experts"]["ms"] if "ms" in by["grouped_mm"] and "ms" in by["experts"] else None
    if floor is not None:
        extra = f"; router + dispatch + uneven groups add {dispatch_ms:.3f} ms" if dispatch_ms is not None else ""
        print(f"  experts alone / dense {floor:.2f}x{extra}")
    # what the 1.3x target leaves routing and dispatch (router fwd+bwd, the token permutations and their gradients)
    # once the expert GEMMs on the groups the router made are paid for, against what they take
    budget = None
    if all("ms" in by[kd] for kd in ("grouped_mm", "dense", "experts_routed")):
        routed_ms = by["experts_routed"]["ms"]
        budget = {"experts_routed_over_dense": routed_ms / by["dense"]["ms"],
                  "routing_budget_ms": 1.3 * by["dense"]["ms"] - routed_ms,
                  "routing_ms": by["grouped_mm"]["ms"] - routed_ms,
                  # x gathered into rows, the rows back to tokens, and both gradients: each reads and writes n*k*D
                  "permutation_mb": 4 * 2 * n_tok * k * D * ct.itemsize / 1e6}
        print(f"  experts on the routed groups / dense {budget['experts_routed_over_dense']:.2f}x; at 1.3x dense, routing "
              f"+ dispatch may take {budget['routing_budget_ms']:.3f} ms, they take {budget['routing_ms']:.3f} ms; the token "
              f"permutations alone (fwd + bwd) move {budget['permutation_mb']:.0f} MB")
    for name, p in profiles.items():
        print_profile(name, p)
    return finish("moe", args, device, {"rows": rows, "targets": targets, "tokens_per_expert": load,
                                        "experts_over_dense": floor, "dispatch_ms": dispatch_ms, "routing_budget": budget,
                                        "dropped": stats["dropped"] if stats else None, "profiles": profiles,
                                        "weights": args.weights, "precision": precision,
                                        "compile": args.compile, "compile_backend": args.compile_backend if args.compile else None,
                                        "cuda_graph": graph})


# -----------------------------------------------------------------------------

# -----------------------------------------------------------------------------
# muon: the optimizer step over a benchmarked model's matrices, per matrix against stacked

def cmd_muon(args, device):
    from nanochat.optim import Muon, setup_optimizers
    from scripts.bench_common import bench_configs, build_model, free_memory
    configs = bench_configs(args, 2048)
    rows = []
    for name in args.models.split(","):
        kind, config = configs[name]
        free_memory(device)
        torch.manual_seed(args.seed)
        model = build_model(kind, config, device)
        muon, = [o for o in setup_optimizers(model) if isinstance(o, Muon)]
        params = [p for g in muon.param_groups for p in g["params"]]
        for p in params:
            p.grad = torch.randn_like(p)
        shapes = {tuple(p.shape) for p in params}
        row = {"model": name, "matrices": len(params), "shapes": len(shapes),
               "params_M": sum(p.numel() for p in params) / 1e6}
        for stack in (False, True):
            muon.stack = stack
            r = measure(muon.step, device, args.warmup, args.iters)
            row["stacked" if stack else "per_matrix"] = r.get("ms", r.get("error"))
            row["peak_gib_" + ("stacked" if stack else "per_matrix")] = r.get("peak_gib")
        if all(isinstance(row[k], float) for k in ("stacked", "per_matrix")):
            row["speedup"] = row["per_matrix"] / row["stacked"]
        rows.append(row)
        progress(row)
        del model, muon, params
    print_table(f"Muon step (momentum, Newton-Schulz, update) over each model's matrices, depth {args.depth}, "
                f"fp32 parameters, ms", rows,
                [("model", "model", ""), ("matrices", "matrices", "d"), ("shapes", "shapes", "d"),
                 ("params_M", "params M", ",.0f"), ("per_matrix", "per matrix ms", ".1f"), ("stacked", "stacked ms", ".1f"),
                 ("speedup", "speedup", ".2f"), ("peak_gib_per_matrix", "peak GiB (per matrix)", ".1f"),
                 ("peak_gib_stacked", "peak GiB (stacked)", ".1f")])
    return finish("muon", args, device, {"rows": rows})


def get_args(argv=None):
    from nanochat.engine import DECODE_PATHS
    p = argparse.ArgumentParser(description="Adamba benchmarks (see the module docstring)")
    p.add_argument("--device", type=str, default="", help="cuda|cpu (empty = autodetect)")
    p.add_argument("--warmup", type=int, default=3, help="untimed calls first (the first also reports its wall time)")
    p.add_argument("--iters", type=int, default=10, help="timed calls; the median is reported")
    p.add_argument("--profile", action="store_true", help="top kernels of the rows the targets compare")
    p.add_argument("--profile-top", type=int, default=12, metavar="N",
                   help="with --profile, how many kernel kinds `decode` lists for think's step (default 12; the rest "
                   "summed in its total row)")
    p.add_argument("--compile-backend", type=str, default="inductor", help="torch.compile backend ('eager' for smoke tests)")
    p.add_argument("--inductor-option", action="append", default=[], metavar="KEY=VALUE",
                   help="set torch._inductor.config's KEY (dotted: triton.enable_pdl) to the JSON VALUE (true, 8, "
                   "\"x\") for the command's compiles, on top of what the code passes; repeatable")
    add_runtime_args(p)  # --debug, --threads, --require-kernels (before the command; read by run_script)
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
                   "and bmm MoE, the dense FFN and the experts-only row, to compare compiled with compiled; the loop "
                   "reference stays eager")
    e.add_argument("--weights", type=str, default="bf16", choices=("bf16", "fp32"),
                   help="bf16 weights and inputs (fp32 on a CPU), or fp32 weights and inputs under bf16 autocast "
                   "(scripts.fractal_train's setting, on any device)")
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
            t.add_argument("--models", type=str, default="dense,hybrid,hybrid-eq",
                           help="comma-separated: dense, hybrid (what scripts.surgery makes), hybrid-eq (as many blocks "
                                "as dense), hybrid-grown (hybrid grown 1.5x wide: the speedrun's phase 3)")
            t.add_argument("--layers", type=int, default=None,
                           help="every hybrid with this many blocks instead of its own (same widths and shapes, fewer "
                                "of them): the grown d32 model's per-GPU rate where its unsharded optimizer states "
                                "would not fit one GPU (the table's params say what ran)")
            t.add_argument("--phases", type=str, default="1,2")
            t.add_argument("--exit-strides", type=str, default="1,8", help="phase 2: readouts after every Nth block (1 = the default config)")
            t.add_argument("--exit-loss-weight", type=float, default=0.1, help="as scripts.fractal_train")
            t.add_argument("--grad-accum", type=int, default=1, help="micro-batches (fwd+bwd of every plan) per optimizer "
                           "step, as fractal_train's total batch / (device batch x seq len); 1 pays the update every batch")
            t.add_argument("--compile", type=str, default="blocks", choices=("blocks", "model", "none"),
                           help="torch.compile each block (identical blocks share graphs), the whole model, or nothing")
            t.add_argument("--recipes", type=str, default="adaptive",
                           help="phase 2's step, comma-separated: adaptive = scripts.fractal_train's (full + every width "
                                "level, uniform and menu plans on alternate steps, distillation, exit loss, gates and "
                                "router: nanochat.adaptive_train), cycle = the same with --plan-schedule cycle (full + one "
                                "narrow plan per step, in turn), sandwich = the earlier full + smallest + one random level")
            t.add_argument("--fake-world", type=int, default=0, metavar="N",
                           help="one rank of an N-rank FSDP2 run on this device (fake process group: buffers as on a "
                                "rank, no communication), at full depth; see scripts.bench_train")
            t.add_argument("--fsdp-keep-params", action="store_true", help="with --fake-world: fractal_train's flag")
            t.add_argument("--fsdp-bf16", action="store_true", help="with --fake-world: fractal_train's flag (CUDA)")
            t.add_argument("--fsdp-reduce", default="step", choices=("step", "pass"),
                           help="with --fake-world: fractal_train's flag")
            t.add_argument("--readouts", type=str, default="compiled", choices=("compiled", "eager"),
                           help="phase 2's exit readouts after lm_head: HybridGPT.READOUT_COMPILE (CUDA) on or off")
            t.add_argument("--exit-readouts", type=int, default=0, help="adaptive recipes: the exits before the last "
                           "each pass reads, in turn (fractal_train's flag; 0: every one)")
            t.add_argument("--readout-checkpoint", type=str, default="on", choices=("on", "off"),
                           help="phase 2's exit readouts: recompute each chunk's logits in backward (HybridGPT."
                                "READOUT_CHECKPOINT), or keep them (B*T*V*2 bytes per exit per pass)")
        else:
            t.add_argument("--contexts", type=str, default="1024,8192,32768")
            t.add_argument("--modes", type=str, default="think,normal,whisper,ghost,auto")
            t.add_argument("--decode-tokens", type=int, default=16)
            t.add_argument("--exit-stride", type=int, default=1, help="the hybrids' gated exits: after every Nth block "
                           "(1 = HybridConfig's default); in gated modes (auto) each gate costs a host-device sync")
            t.add_argument("--prefill-reps", type=int, default=2)
            t.add_argument("--models", type=str, default="dense,hybrid,hybrid-eq",
                           help="comma-separated: dense, hybrid (what scripts.surgery makes), hybrid-eq (as many blocks as dense), "
                           "hybrid-grown (hybrid grown 1.5x wide, think only)")
            t.add_argument("--mixer-path", type=str, default="auto", choices=("auto", "kernel", "torch"),
                           help="the Mamba mixers' path (MambaMixer.path): auto = mamba-ssm's kernels where they run, "
                           "except in a compiled decode step (the PyTorch ops, which inductor fuses); kernel = always "
                           "the kernels; torch = never")
            t.add_argument("--attention-path", type=str, default=None, choices=("torch", "triton", "reduce"),
                           help="decode steps' and the verify pass's attention over the key buffer (nanochat."
                           "decode_attention.PATH; default: $ADAMBA_DECODE_ATTENTION or reduce): reduce = PyTorch's, the "
                           "products written as broadcast sums in compiled steps (--engine-decode compiled/tuned), "
                           "torch = PyTorch's (matrix-vector products, SDPA), triton = the split-key Triton kernel (CUDA)")
            t.add_argument("--matvec-path", type=str, default=None, choices=("torch", "triton"),
                           help="decode steps' and the verify pass's projections and head (nanochat.decode_matvec.PATH; "
                           "default: $ADAMBA_DECODE_MATVEC or torch): torch = F.linear (cuBLAS, or inductor's reductions "
                           "under --engine-decode tuned), triton = nanochat.decode_matvec's kernel (CUDA, bf16 weights)")
            t.add_argument("--head-path", type=str, default=None, choices=("torch", "cublas"),
                           help="the readout's product in compiled steps (nanochat.decode_matvec.HEAD_PATH; default: "
                           "$ADAMBA_DECODE_HEAD or torch): torch = as the projections (under tuned: one reduction with "
                           "the final norm and soft-cap), cublas = F.linear kept out of inductor's fusion")
            t.add_argument("--mamba-step-path", type=str, default=None, choices=("torch", "triton"),
                           help="a Mamba-1 decode position between its projections (nanochat.decode_mamba.PATH; "
                           "default: $ADAMBA_DECODE_MAMBA or torch): torch = the PyTorch ops (fused by inductor when "
                           "compiled), triton = nanochat.decode_mamba's two kernels (CUDA; weights and activations "
                           "of one dtype)")
            t.add_argument("--engine-decode", type=str, default="auto", choices=DECODE_PATHS,
                           help="the hybrids' decode path (nanochat.engine.Engine): auto = CUDA graphs on CUDA where the "
                           "step allows them (one plan for every row, and one row when gates are on), else the eager step; "
                           "compiled = the same with each segment compiled by torch.compile first; tuned = compiled "
                           "with inductor's coordinate-descent tuning (matrix-vector products as tuned Triton kernels)")
            t.add_argument("--weights", type=str, default="fp32", choices=("fp32", "bf16"),
                           help="fp32 weights under bf16 autocast (scripts.generate's setting), or bf16 weights and caches")
            t.add_argument("--memory-only", action="store_true", help="only the cache formula per mode (checked against "
                           "the engine's tensors by tests/test_bench.py): no model is built, so any size runs on a CPU")
            t.add_argument("--speculate", type=int, default=0, help="also self-speculative decoding of the 'hybrid' "
                           "model with k = 1..K drafted tokens per round, against think (scripts/bench_speculate.py)")
            t.add_argument("--draft", type=str, default="plan:ghost", help="with --speculate: plan:<mode or widths> or "
                           "exit:<block> (nanochat.speculative.Draft)")
            t.add_argument("--speculate-from", type=int, default=1, metavar="K0", help="with --speculate K: the rows "
                           "for k = K0..K only (each k is its own set of graphs to capture or compile)")
    u = sub.add_parser("muon", help="Muon's step: one Newton-Schulz per matrix vs same-shaped matrices stacked")
    u.add_argument("--depth", type=int, default=20, help="nanochat depth dial of the benchmarked models")
    u.add_argument("--models", type=str, default="dense,hybrid")
    u.add_argument("--vocab-size", type=int, default=65536)
    u.add_argument("--mamba", type=int, default=1, choices=(1, 2))
    u.add_argument("--seed", type=int, default=0)
    bench_adaptive.add_args(sub, DECODE_PATHS)
    bench_ep.add_args(sub)
    bench_matvec.add_args(sub)
    bench_prefetch.add_args(sub)
    bench_host.add_args(sub)
    args = p.parse_args(argv)
    if args.profile_top < 1:
        p.error(f"--profile-top {args.profile_top}: list at least one kernel kind")
    return args


def _same_kind(default, value):
    """Whether a JSON value fits an inductor option whose value now is `default` (ints for floats too)."""
    if default is None:
        return True
    if isinstance(default, bool) or isinstance(value, bool):
        return isinstance(default, bool) and isinstance(value, bool)
    if isinstance(default, float):
        return isinstance(value, (int, float))
    return isinstance(value, type(default))


def inductor_options(pairs):
    """--inductor-option KEY=VALUE flags as {key: value} for torch._inductor.config.patch: each key one of the
    installed torch's options, each value JSON of that option's type (an option whose default is None takes any)."""
    import torch._inductor.config as inductor_config
    known, out = inductor_config.get_config_copy(), {}
    for pair in pairs:
        key, eq, text = pair.partition("=")
        if not eq or not key:
            raise ValueError(f"--inductor-option {pair!r}: give KEY=VALUE")
        if key not in known:
            raise ValueError(f"--inductor-option {key}: torch {torch.__version__}'s inductor has no such option")
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            raise ValueError(f"--inductor-option {key}={text}: the value is not JSON (true, 8, 0.5, \"name\")") from None
        default = known[key]
        if not _same_kind(default, value):
            raise ValueError(f"--inductor-option {key}={text}: {key} takes a value of type {type(default).__name__} "
                             f"(now {default!r})")
        out[key] = value
    return out


def main(argv=None):
    args = get_args(argv)
    options = inductor_options(args.inductor_option)
    device = torch.device(args.device or autodetect_device_type())
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if options:
        import torch._inductor.config as inductor_config
        print("inductor options: " + ", ".join(f"{k}={v!r}" for k, v in options.items()), flush=True)
        with inductor_config.patch(options):  # restored when the command ends
            return COMMANDS[args.cmd](args, device)
    return COMMANDS[args.cmd](args, device)


COMMANDS = {"mamba": cmd_mamba, "moe": cmd_moe, "train": cmd_train, "decode": cmd_decode,
            "adaptive": bench_adaptive.cmd_adaptive, "moe-ep": bench_ep.cmd_moe_ep, "muon": cmd_muon,
            "matvec": bench_matvec.cmd_matvec, "prefetch": bench_prefetch.cmd_prefetch,
            "host": bench_host.cmd_host}


if __name__ == "__main__":
    run_script(main)

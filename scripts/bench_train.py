"""
Training benchmark: tokens/s and MFU of one training step, dense GPT vs hybrids, phase-1 and phase-2
settings. Flags: python -m scripts.bench train --help (timing and output: scripts.bench's docstring).

FLOP convention (MFU), as scripts.fractal_train: FLOPs/token = model.estimate_flops(plan) = 3 x forward
(2 per multiply-accumulate of every weight matmul, attention at the mean causal context T/2, Mamba conv
and scan, MoE router + top-k experts), summed over the plans a step runs; MFU = that x tokens/s / peak,
peak = dense bf16 of H100 SXM and H200 (same chip): 989.4e12. The 'exec' MFU column adds what the
convention leaves out or removes what does not run (exit readouts; frozen weights' gradients in phase 1).
'update ms' is the clip + optimizer step alone (timed apart, on random gradients of the same shapes), and 'MFU w/o
update' the step's MFU with that time taken out: the rate of the micro-batches themselves, which a step of many
micro-batches (the speedrun accumulates 16 per GPU) approaches. 'same, readouts counted' adds to the convention the
exit readouts' model FLOPs (3 x 2 x n_embd x vocab per exit read before the last, per token of every pass that reads
them out; no recomputation): the work the exit loss and the gates' agreement need, which the convention leaves out.
'warm-up s' is the wall time of every untimed step (compiles of every plan's graphs). The adaptive recipes change
plans from step to step, with costs that differ (a narrow pass at width 2048 costs several at 128): their warm-up is at
least one period of the schedule (every plan's graphs compiled) and their ms/step the mean over whole periods (--iters
rounded up to them), not a median, so the time and the FLOPs (the period's mean) cover the same steps.

--fake-world N runs one rank of an N-rank FSDP2 run (scripts.fractal_train --parallel=fsdp: a shard group per block,
the controllers replicated, the gradients reduced after a step's last backward) on this one device, over torch's fake
process group: the collectives return at once and move nothing (the gathered weights hold garbage, so losses are not
meaningful), but every buffer is allocated as on a real rank. Its rows are one rank's memory (sharded weights,
gradients and optimizer states at 1/N, the gathered weights, the unsharded gradients a step accumulates) and compute
time without communication, at the full depth: what one GPU could not hold unsharded. --fsdp-keep-params and
--fsdp-bf16 and --fsdp-reduce are fractal_train's flags.
"""
import statistics

import torch

from nanochat.common import autocast_context
from nanochat.train_utils import (peak_flops, compile_model, apply_fsdp, allreduce_gradients, clip_grad_norm,
                                  fsdp_before_backward)
from scripts.bench_common import (free_memory, measure, progress, top_kernels, print_profile, print_table, finish,
                                  bench_configs, build_model)


# -----------------------------------------------------------------------------
# train: tokens/s and MFU of one training step (fwd+bwd of every plan, clip, Muon + AdamW step)

def train_models(args):
    """(name, kind, config) of the models args.models names (scripts.bench_common.bench_configs), without the
    adaptive controllers."""
    configs = bench_configs(args, args.seq_len, adaptive=False)
    return [(n, *configs[n]) for n in args.models.split(",")]


RECIPES = ("adaptive", "cycle", "sandwich")


def recipe_step_plans(config, step, recipe="adaptive"):
    """The adaptive recipes' plans at a step (fractal_train with --matryoshka, no random plans, --plan-schedule every
    for "adaptive", cycle for "cycle"): a function of step."""
    from nanochat.adaptive_train import step_plans
    return step_plans(config, True, None, 0, False, step, "cycle" if recipe == "cycle" else "every")


def recipe_period(config, recipe):
    """Steps after which the recipe's plans repeat (its FLOPs are their mean over these)."""
    from nanochat.adaptive_train import schedule_period
    return schedule_period(config, "cycle" if recipe == "cycle" else "every")


def train_flops(model, kind, phase, plans, T, exits, per_pass=0):
    """(convention FLOPs per token, executed FLOPs per token, the exit readouts' model FLOPs per token of one pass) of
    one step; see the module docstring. per_pass: the exits before the last that a pass reads (0: every one)."""
    if kind == "gpt":
        f = model.estimate_flops()
        return f, f, 0
    conv = sum(model.estimate_flops(p) for p in plans)
    c = model.config
    if phase == "1":  # frozen weights get no weight gradient: 2x forward, + 1x forward of the trainable matmuls
        rows = model.flops_breakdown(T / 2)
        trainable = sum(r.get("mamba_proj", 0) + r.get("mlp", 0) + r.get("moe", 0) for r in rows[:-1] if r["kind"][0] == "M")
        return conv, 2 * model.forward_flops_per_token(T / 2) + trainable, 0
    if not exits:
        return conv, conv, 0
    # HybridGPT.forward(return_exits=True): every exit but the last (which reuses the final logits) is read out in
    # chunks: forward, the forward again in backward when checkpointed (READOUT_CHECKPOINT), backward (2x) = 4 (3)
    # readouts' FLOPs each; as model FLOPs (no recomputation) 3
    from nanochat.adaptive_train import rotating_exits
    readout = 2 * c.n_embd * c.vocab_size * len(rotating_exits(c, per_pass, 0) or c.exit_blocks()[:-1])
    passes = 4 if type(model).READOUT_CHECKPOINT else 3
    return conv, conv + passes * readout, 3 * readout


def train_one(args, device, name, kind, config, phase, exit_stride, recipe="sandwich"):
    """One row: build, freeze (phase 1), compile, then time whole optimizer steps; halve the batch on OOM. recipe
    (phase 2): "sandwich", "adaptive" or "cycle" (see scripts.bench's --recipes)."""
    import dataclasses
    from nanochat.optim import setup_optimizers
    from nanochat.matryoshka import sample_plans, plan_rng
    actx = autocast_context(device.type)
    T = args.seq_len
    if exit_stride is not None:
        config.exit_stride = exit_stride
    adaptive = phase == "2" and recipe in ("adaptive", "cycle")
    if kind != "gpt":
        config = dataclasses.replace(config, adaptive=adaptive)  # the controllers train in the adaptive recipe only
    free_memory(device)
    torch.manual_seed(args.seed)
    model = build_model(kind, config, device)
    model.train()
    if phase == "1":  # as fractal_train: the blocks surgery added (Mamba mixer + its FFN) train, the rest is frozen
        for n, p in model.named_parameters():
            p.requires_grad_(n.startswith("transformer.h.") and config.mixer_kind(int(n.split(".")[2])) == "M")
    controllers = getattr(model, "controllers", None)
    ctrl_params = list(controllers.parameters()) if controllers is not None else []
    replicated = []
    if args.fake_world:  # one rank of fractal_train --parallel=fsdp (the optimizers are built on the DTensors)
        replicated = apply_fsdp(model, model.transformer.h, ctrl_params, device.type, separate=[model.transformer.wte],
                                reshard_after_forward=not args.fsdp_keep_params, bf16_matrices=args.fsdp_bf16)
    # Muon + AdamW over the trainable parameters (the controllers a group of their own, as fractal_train)
    optimizers = setup_optimizers(model, controller_lr=1e-3 if adaptive else None)
    params = [p for p in model.parameters() if p.requires_grad]
    # fractal_train's compile (the recompile limit stays cmd_train's 64, above what these models need)
    run_model = model if args.compile == "none" else compile_model(model, args.compile, backend=args.compile_backend)
    if phase != "2":
        plans = [None]
    elif adaptive:  # the plans of even steps; odd steps run the router's menu (the same widths after the first blocks)
        plans = recipe_step_plans(config, 0, recipe)
    else:  # the sandwich: full, smallest, one random uniform level (fixed here, so compiled graphs are reused)
        plans = sample_plans(config.width_levels, config.n_layer, plan_rng(args.seed), 1, per_block=False)
    exits = phase == "2" and len(config.exit_blocks()) > 1
    row = {"model": name, "params_M": sum(p.numel() for p in model.parameters()) / 1e6,
           "trainable_M": sum(p.numel() for p in params) / 1e6, "phase": phase + (f" {recipe}" if phase == "2" else ""),
           "plans": "full" if plans == [None] else "+".join(str(p[-1]) for p in plans), "exit_stride": exit_stride}
    counter = [0]  # steps run: the adaptive recipe alternates uniform and menu plans
    warmup, iters, stat = args.warmup, args.iters, statistics.median
    if adaptive:  # the plans change from step to step: warm up (compile) a whole period of them, then time whole
        period = recipe_period(config, recipe)  # periods from where the warm-up ended, and take their mean
        warmup, iters, stat = max(warmup, period), -(-iters // period) * period, statistics.mean
        row.update(timed_steps=iters)

    def backward(loss, micro, i, n):  # fractal_train's: under FSDP2 reduce once, after the step's last backward
        if args.fake_world:
            fsdp_before_backward(model, micro == args.grad_accum - 1 and i == n - 1, args.fsdp_keep_params,
                                 args.fsdp_reduce == "pass")
        loss.backward()

    def update():
        if replicated:  # the all-reduce of what FSDP left replicated (fractal_train's)
            allreduce_gradients([p for p in replicated if p.requires_grad], divide_by=args.fake_world)
        clip_grad_norm(params, 1.0)
        for opt in optimizers:
            opt.step()
    B, oom = args.batch, []
    while True:
        x = torch.randint(0, config.vocab_size, (B, T), device=device)
        y = torch.randint(0, config.vocab_size, (B, T), device=device)

        def step():
            if adaptive:  # fractal_train's micro-batch: every plan's forward + backward, distillation, gates, router
                from nanochat.adaptive_train import train_micro_batch
                step_plans = recipe_step_plans(config, counter[0], recipe)
                scale, n = 1.0 / (len(step_plans) * args.grad_accum), len(step_plans)
                for micro in range(args.grad_accum):
                    with actx:
                        train_micro_batch(model, run_model, x, y, step_plans, model.controllers, args.exit_loss_weight,
                                          1.0, backward=lambda objective, i, micro=micro: backward(objective * scale,
                                                                                                   micro, i, n),
                                          exit_readouts=args.exit_readouts,
                                          micro_index=counter[0] * args.grad_accum + micro)
                counter[0] += 1
            else:
                for micro in range(args.grad_accum):  # the same rows each time: only the timing matters here
                    for i, plan in enumerate(plans):
                        with actx:
                            if exits and i == 0:  # fractal_train's full-width forward: exit readouts + their CE
                                out = run_model(x, y, width=plan, return_exits=True)
                                loss = out.loss + args.exit_loss_weight * out.exit_losses[:-1].mean()
                            elif kind == "gpt":
                                loss = run_model(x, y)
                            else:
                                loss = run_model(x, y, width=plan)
                        backward(loss / (len(plans) * args.grad_accum), micro, i, len(plans))
            update()
            model.zero_grad(set_to_none=True)
        r = measure(step, device, warmup, iters, stat)
        if r.get("error", "").startswith("OutOfMemoryError") and B > 1:
            oom.append(B)
            model.zero_grad(set_to_none=True)
            B //= 2
            continue
        break
    row.update(r, batch=B, grad_accum=args.grad_accum)
    if oom:
        row["note"] = f"OOM at batch {oom}"
    if "ms" in r:  # the update alone (clip + every optimizer) on gradients of the same shapes: what accumulation amortises
        for p in params:
            p.grad = torch.randn_like(p).mul_(1e-3)
        u = measure(update, device, 1, 3)
        model.zero_grad(set_to_none=True)
        if "ms" in u:
            row["update_ms"] = u["ms"]
    if "ms" in r:
        if adaptive:  # mean over the recipe's period of steps; every plan reads out its exits
            def at_step(s):  # (the gates and the router train on every plan's exits)
                p = recipe_step_plans(config, s, recipe)
                c, e, ro = train_flops(model, kind, phase, p, T, exits, args.exit_readouts)
                return c, c + len(p) * (e - c), c + len(p) * ro
            period = recipe_period(config, recipe)
            conv, execf, withro = [sum(v) / period for v in zip(*[at_step(s) for s in range(period)])]
        else:  # the sandwich reads out the full-width plan's exits only
            conv, execf, ro = train_flops(model, kind, phase, plans, T, exits)
            withro = conv + ro
        tps = args.grad_accum * B * T / r["ms"] * 1e3
        row.update(tok_per_s=tps, flops_per_tok_G=conv / 1e9, exec_flops_per_tok_G=execf / 1e9,
                   readout_flops_per_tok_G=(withro - conv) / 1e9)
        peak = peak_flops(device)
        if peak:
            row.update(mfu=100 * conv * tps / peak, mfu_exec=100 * execf * tps / peak)
            if row.get("update_ms") is not None and r["ms"] > row["update_ms"]:  # the micro-batches' own rate
                micro_tps = args.grad_accum * B * T / ((r["ms"] - row["update_ms"]) / 1e3)
                row["mfu_micro"] = 100 * conv * micro_tps / peak
                row["mfu_micro_readouts"] = 100 * withro * micro_tps / peak
        if args.profile:
            row["profile"] = top_kernels(step, device, n=25, steps=1)
    return row


def run_rows(args, device, models, rows):
    for name, kind, config in models:
        for phase in (["all"] if kind == "gpt" else args.phases.split(",")):
            for stride in ([int(s) for s in args.exit_strides.split(",")] if phase == "2" else [None]):
                for recipe in (args.recipes.split(",") if phase == "2" else ["-"]):
                    rows.append(train_one(args, device, name, kind, config, phase, stride, recipe))
                    progress(rows[-1])


def cmd_train(args, device):
    import torch._dynamo
    torch._dynamo.config.cache_size_limit = 64  # one graph per (block kind, width, grad mode) is expected
    from nanochat.hybrid_gpt import HybridGPT
    HybridGPT.READOUT_COMPILE = args.readouts == "compiled"
    HybridGPT.READOUT_CHECKPOINT = args.readout_checkpoint == "on"
    if args.exit_readouts < 0:
        raise ValueError(f"--exit-readouts {args.exit_readouts}: give the exits a pass reads (0: every one)")
    bad = [r for r in args.recipes.split(",") if r not in RECIPES]
    if bad:
        raise ValueError(f"--recipes: {', '.join(map(repr, bad))} not among {', '.join(RECIPES)}")
    if (args.fsdp_keep_params or args.fsdp_bf16 or args.fsdp_reduce != "step") and not args.fake_world:
        raise ValueError("--fsdp-keep-params / --fsdp-bf16 / --fsdp-reduce shape an FSDP2 run: give --fake-world N too")
    if args.fake_world and args.fake_world < 2:
        raise ValueError(f"--fake-world {args.fake_world}: give the ranks of the run to stand for, N >= 2")
    if args.fsdp_bf16 and device.type != "cuda":
        raise ValueError("--fsdp-bf16 gathers bf16 weights for bf16 autocast, which runs on CUDA only here")
    rows, models = [], train_models(args)
    if args.fake_world:
        import torch.distributed as dist
        from torch.testing._internal.distributed.fake_pg import FakeStore  # registers the "fake" backend
        dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=args.fake_world)
    try:
        run_rows(args, device, models, rows)
    finally:
        if args.fake_world:
            dist.destroy_process_group()
    widths = ", ".join(f"{name} {config.n_embd}" for name, _, config in models)
    blocks = f"; --layers {args.layers}: every hybrid {args.layers} blocks" if args.layers else ""
    fsdp = (f"; one rank of a {args.fake_world}-rank FSDP2 run (fake process group: no communication)"
            f"{', keep-params' if args.fsdp_keep_params else ''}{', bf16 gathered matrices' if args.fsdp_bf16 else ''}"
            f", reduce-scatter every {args.fsdp_reduce}"
            if args.fake_world else "")
    print_table(f"training step (accum x fwd+bwd of every plan, clip, Muon + AdamW), T={args.seq_len}, vocab {args.vocab_size}, "
                f"depth {args.depth} (widths: {widths}{blocks}), compile={args.compile}, Mamba-{args.mamba}{fsdp}", rows,
                [("model", "model", ""), ("phase", "phase", ""), ("plans", "plans", ""), ("exit_stride", "exits every", "d"),
                 ("params_M", "params M", ",.0f"), ("trainable_M", "trainable M", ",.0f"), ("batch", "B", "d"),
                 ("grad_accum", "accum", "d"),
                 ("ms", "ms/step", ".0f"), ("tok_per_s", "tokens/s", ",.0f"), ("flops_per_tok_G", "GFLOP/tok", ".2f"),
                 ("mfu", "MFU %", ".1f"), ("exec_flops_per_tok_G", "exec GFLOP/tok", ".2f"), ("mfu_exec", "MFU exec %", ".1f"),
                 ("update_ms", "update ms", ".0f"), ("mfu_micro", "MFU w/o update %", ".1f"),
                 ("mfu_micro_readouts", "same, readouts counted %", ".1f"),
                 ("peak_gib", "peak GiB", ".1f"), ("first_s", "first step s", ".0f"), ("warmup_s", "warm-up s", ".0f"),
                 ("note", "note", "")])
    for r in rows:
        if "profile" in r:
            print_profile(f"{r['model']} phase {r['phase']} exits every {r['exit_stride']}", r["profile"])
    return finish("train", args, device, {"rows": rows, "peak_flops": peak_flops(device)})

"""
`python -m scripts.bench host [--checkpoint PATH]`: what a batch-1 decode costs the host on the engine's CUDA-graph
path, with the graphs taken out (nanochat.cuda_graphs.HOST_ONLY: each segment runs once, for its first key, and its
output is handed out ever after, nothing captured or computed): the Python around the replays (the step's
bookkeeping, sampling, a speculative round's drafts, verify pass, acceptance and rollback). Issue #29: on the tiny
chat checkpoint a step is kernel latency, so the host's share of a token decides what speculation can gain there.
Without --checkpoint the model is bench decode's d20 hybrid (fresh weights) narrowed to --n-embd: its 40 blocks, at
a width that keeps the CPU's one computed run of each segment short.

Per setting (think, then every --draft at k = 1..--speculate, greedy, without the fallback), --reps generations of
--tokens tokens from one prompt of --prompt-len token ids, each timed to its first token (the prefill(s) and the
prompt's next token) and from there to its last; the table gives medians: ms to the first token, ms a token after
it, rounds a generation and host ms a round, and each setting's ms a token against think's. Runs on any device;
off CUDA the prefill is the eager forward's compute, not host alone. The replayed outputs are stale, so acceptance
is not the model's: only the host's time a round (and, from it, a token at any acceptance) is meaningful.
"""
import statistics
import time

import torch

from nanochat import cuda_graphs
from nanochat.common import synchronize as sync
from scripts.bench_common import finish, print_table, progress

COLUMNS = [("what", "decode", ""), ("k", "k", "d"), ("first_ms", "ms to the first token", ".2f"),
           ("ms_per_token", "host ms a token after", ".3f"), ("rounds", "rounds a generation", ".1f"),
           ("ms_per_round", "host ms a round", ".3f"), ("vs_think", "x think's ms a token", ".2f")]


def add_args(sub):
    p = sub.add_parser("host", help="the host's time a token on the CUDA-graph decode path, the graphs taken out "
                       "(think and speculation)")
    p.add_argument("--checkpoint", type=str, default=None, help="hybrid checkpoint directory (latest step) or "
                   "model_<step>.pt; without it a fresh hybrid of bench decode's at --depth, narrowed to --n-embd")
    p.add_argument("--depth", type=int, default=20, help="without --checkpoint: the depth dial (d20: 40 blocks)")
    p.add_argument("--n-embd", type=int, default=128, help="without --checkpoint: the width, a multiple of 128 (one "
                   "head of 128 each; the host's work depends on the blocks, not their width)")
    p.add_argument("--vocab-size", type=int, default=4096, help="without --checkpoint (small: off CUDA the copies "
                   "of the logits and the sampling over them are the CPU's compute, which a GPU's host leaves to it)")
    p.add_argument("--mamba", type=int, default=1, choices=(1, 2), help="without --checkpoint")
    p.add_argument("--prompt-len", type=int, default=12, help="prompt tokens (ids 1..)")
    p.add_argument("--tokens", type=int, default=20, help="tokens a timed generation produces (at least 2)")
    p.add_argument("--speculate", type=int, default=3, help="k = 1..K for every draft (0: think only)")
    p.add_argument("--draft", type=str, default="exit:1;plan:ghost", help="drafts separated by ';' (plan:<mode or "
                   "widths>, exit:<block>)")
    p.add_argument("--reps", type=int, default=5, help="timed generations a setting (medians reported)")


def host_only(on):
    """Set cuda_graphs.HOST_ONLY; returns the value it had."""
    was, cuda_graphs.HOST_ONLY = cuda_graphs.HOST_ONLY, on
    return was


def measure(engine, prompt, n, reps, kw, device):
    """(median ms to the first token handed out: the prefill(s) and the prompt's next token, median ms a token after
    it, median rounds a generation or None), each from one generation of n tokens (the same shapes every time, so
    the workspace and its segments are reused)."""
    def gen():
        sync(device)
        t0 = time.perf_counter()
        t1 = None
        for _ in engine.generate([prompt], n, **kw):
            if t1 is None:
                t1 = time.perf_counter()
        sync(device)
        return (t1 - t0) * 1e3, (time.perf_counter() - t1) * 1e3 / (n - 1)

    gen()  # each key's first (computed) run, outside the timing
    gen()
    firsts, afters, rounds = [], [], []
    for _ in range(reps):
        first, after = gen()
        firsts.append(first)
        afters.append(after)
        if kw:
            rounds.append(engine.spec_stats.rounds)
    return statistics.median(firsts), statistics.median(afters), statistics.median(rounds) if rounds else None


def fresh_model(args, device):
    """bench decode's 'hybrid' at args.depth (its blocks and pattern), narrowed to args.n_embd (heads of 128), in
    eval mode: the host's part of a step depends on the blocks, not their width."""
    import dataclasses
    from scripts.bench_common import bench_configs, build_model
    if args.n_embd < 128 or args.n_embd % 128:
        raise SystemExit(f"--n-embd {args.n_embd}: a positive multiple of 128")
    if args.depth < 1 or args.vocab_size < 2:
        raise SystemExit("--depth >= 1 and --vocab-size >= 2, please")
    kind, config = bench_configs(args, args.prompt_len + args.tokens)["hybrid"]
    heads = args.n_embd // 128
    config = dataclasses.replace(config, n_embd=args.n_embd, n_head=heads, n_kv_head=heads, width_levels=[])
    torch.manual_seed(0)
    return build_model(kind, config, device).eval()


def cmd_host(args, device):
    from nanochat.engine import Engine
    from nanochat.checkpoint_manager import load_model
    from nanochat.speculative_rules import Draft
    if args.prompt_len < 1 or args.tokens < 2 or args.reps < 1 or args.speculate < 0:
        raise SystemExit("--prompt-len >= 1, --tokens >= 2, --reps >= 1 and --speculate >= 0, please")
    if args.checkpoint:
        model, meta = load_model(args.checkpoint, device)
        what = f"{meta['checkpoint_dir']}, step {meta['checkpoint_step']}"
    else:
        model = fresh_model(args, device)
        what = f"a fresh d{args.depth} hybrid at n_embd {args.n_embd}"
    c = model.config
    if not hasattr(c, "layer_pattern"):
        raise SystemExit(f"{args.checkpoint} holds a dense GPT: bench host measures the hybrid engine's decode")
    if args.prompt_len + args.tokens > c.sequence_len:
        raise SystemExit(f"--prompt-len + --tokens = {args.prompt_len + args.tokens} exceeds the checkpoint's "
                         f"sequence_len {c.sequence_len}")
    drafts = [d for d in args.draft.split(";") if d] if args.speculate else []
    for d in drafts:  # a bad draft stops before anything is timed
        try:
            Draft.parse(d, c.n_layer)
        except ValueError as e:
            raise SystemExit(str(e)) from None
    prompt = [1 + i % (c.vocab_size - 1) for i in range(args.prompt_len)]
    rows = []
    was = host_only(True)
    try:
        engine = Engine(model, decode="graph")
        settings = [("think", 0, {})] + [(f"speculate {d}", k, dict(speculate=k, draft=d, fallback=False))
                                         for d in drafts for k in range(1, args.speculate + 1)]
        for name, k, kw in settings:
            with torch.inference_mode():
                first, per_token, rounds = measure(engine, prompt, args.tokens, args.reps, kw, device)
            row = {"what": name, "k": k, "first_ms": first, "ms_per_token": per_token}
            if rounds:
                row.update(rounds=rounds, ms_per_round=per_token * (args.tokens - 1) / rounds)
            row["vs_think"] = per_token / rows[0]["ms_per_token"] if rows else 1.0
            progress(row)
            rows.append(row)
    finally:
        host_only(was)
    print_table(f"host time of batch-1 decode on the graph path, the graphs taken out ({what}; {device.type}; "
                f"prompt {args.prompt_len}, {args.tokens} tokens, "
                f"medians of {args.reps}; acceptance is not the model's: stale outputs)", rows, COLUMNS)
    print(f"  {c.n_layer} blocks ({c.layer_pattern}/{c.ffn_pattern}), n_embd {c.n_embd}: the host's ms a token is "
          f"what a graph-path token costs beyond its kernels unless the device works beside it")
    return finish("host", args, device, {"rows": rows, "model": what})

"""
The stages of the tiny experiment, each a thin call into the project's own code:

    corpus      task pages -> parquet shards (train shards + a val shard of calib-split pages)
    tokenizer   scripts.tok_train on those shards
    pretrain    a dense nanochat GPT, our own short loop (see pretrain())
    surgery     scripts.surgery (create: Mamba blocks interleaved, logits unchanged)
    phase 1     scripts.fractal_train --phase=1 (the new Mamba blocks only)
    phase 2     scripts.fractal_train --phase=2 (everything + Matryoshka widths + gates + predictor)
    grow        scripts.surgery --expand-from (wider, logits unchanged)
    phase 3     scripts.fractal_train --phase=3
    calibrate   confidence_probe.calibrate_gates on calib-split pages, then auto's operating point by Learn-then-Test
                on other calib-split problems (nanochat.operating_point), then the final checkpoint

Pretraining is our own loop (the project's GPT, optim.setup_optimizers and lr schedule) rather than
scripts.base_train, on rows encoded here. The phases use fractal_train's standard loader; the corpus shards
carry each page's answer spans (loss_spans: every completion '=answer\n'), so the loader sets every other target
to -1 and the phases, exit readouts, gates and router train on the answers only, as pretraining does. (The
question digits are uniformly random: a loss on them is an irreducible floor that diluted the answer signal ~8x.)
"""
import os
import random
import time
from dataclasses import dataclass, asdict

import torch

from nanochat.dataset import shard_filename, write_synthetic_shard
from nanochat.gpt import GPT, GPTConfig
from nanochat.engine import Engine
from nanochat.optim import setup_optimizers, lr_multiplier, set_lr_multiplier, muon_momentum, set_muon_momentum
from nanochat.tokenizer import Tokenizer
from nanochat import checkpoint_manager as cm
from tiny_experiment.tasks import make_pages, page_text, encode_page, answer_spans


@dataclass
class Settings:
    """The training recipe. Evaluation settings are not here: they are the engine's defaults."""
    # data
    train_pages: int = 6000        # pages in the train shards (pretraining and phases sample from them)
    calib_pages: int = 600         # pages of calib-split problems: the val shard and the gate calibration
    problems_per_page: int = 4     # ~13 tokens each: a page is longer than seq_len + 1, so a packed row is one page
    vocab_size: int = 288          # 256 bytes + 9 specials + 23 merges (op names, frequent two-digit sums)
    seq_len: int = 32
    # dense GPT
    n_layer: int = 4
    n_embd: int = 128
    n_head: int = 4                # head_dim 32
    pretrain_steps: int = 600
    pretrain_batch: int = 32
    # hybrid
    layer_pattern: str = "AM"
    mamba_version: int = 2         # on CPU the Mamba-2 (chunked SSD) path runs ~10x faster than Mamba-1's scan here
    mamba_headdim: int = 32
    mamba_ffn: str = "dense"
    width_levels: str = "32,64,128"
    exit_stride: int = 2
    phase_batch: int = 16
    phase_lr_scale: float = 0.25   # times fractal_train's default learning rates (at 1.0 phase 2 cut hard accuracy 0.99 -> 0.54)
    controller_lr: float = 1e-3
    phase1_steps: int = 60
    phase2_steps: int = 300
    # phases 2 and 3 keep full width where phase 1 left it (chosen on seeds 1 and 2's calib split, phase 2 alone:
    # full-width hard accuracy 0.920 / 0.935 -> 0.955 / 0.973, the dense GPT's 0.965 / 0.965; each alone gave less)
    phase_warmdown: float = 0.6    # fractal_train --warmdown-ratio (default 0.2)
    full_weight: float = 2.0       # --full-weight: the full plan weighs as two narrow plans
    anchor_weight: float = 1.0     # --anchor-weight: KL(phase input || full) on the answer tokens
    plan_schedule: str = "every"   # --plan-schedule of phases 2, 3 and chat SFT (python -m tiny_experiment --plan-schedule)
    exit_readouts: int = 0         # --exit-readouts of phases 2, 3 and chat SFT (0: every exit each pass)
    # growth and phase 3
    grow_dim: int = 256
    grown_width_levels: str = "32,64,128,256"
    phase3_steps: int = 60
    phase3_batch: int = 16
    phase3_lr_scale: float = 0.025  # growth then 0.25 cut hard accuracy 0.875 -> 0.770 (seed 0, calib split); 0.1 kept 0.870.
                                    # With phase 2's full-width settings, seeds 1 / 2 calib hard from the grown 0.955 / 0.973:
                                    # 0.1 -> 0.925 / 0.955, 0.05 -> 0.943 / 0.970, 0.025 -> 0.953 / 0.975
    # evaluation sizes (how many held-out problems, not how they are scored)
    eval_problems: int = 200       # per difficulty, test split
    calib_gate_pages: int = 300  # calib pages used to fit the gate calibration
    ltt_problems: int = 600        # per difficulty (at most; ~590-670 are free): calib-split problems in none of those pages
    risk: float = 0.01             # alpha: the answers that may differ from full width (per difficulty)
    delta: float = 0.1             # the guarantee holds with probability >= 1 - delta
    log_every: int = 50            # phase logs: one line every N steps
    # chat stage (tiny_experiment/chat.py)
    chat_train_problems: int = 3600  # train-split problems as conversations (~2 per packed row: one epoch)
    chat_sft_steps: int = 100
    chat_lr_scale: float = 0.25    # times fractal_train's default rates; at 0.1 (phase 3's) 100 steps left seed 2's
                                   # calib-split chat val bpb at 0.695 (0.25: 0.084), and its test answers collapsed
    chat_warmdown: float = 0.6     # SFT's --warmdown-ratio and --full-weight (chosen on seeds 1 and 2's calib split: chat
    chat_full_weight: float = 2.0  # think hard 0.930 / 0.880 -> 0.920 / 0.930 against the base's 0.925 / 0.955). An
                                   # anchor to the base checkpoint collapsed it (0.107 / 0.345): the base never saw chat
    # chat_rl, chosen on seed 0's calibration split (the calibrated operating point's compute; README): at router
    # temperature 1 the policy drew the w128 plan ~98% of the time and learned nothing about the others
    chat_rl_steps: int = 40
    chat_rl_prompts: int = 16      # prompts per RL step
    chat_rl_samples: int = 4       # answers sampled per prompt
    chat_rl_compute_cost: float = 0.5  # lambda: reward = exact match - lambda x compute fraction
    chat_rl_router_temperature: float = 4.0  # the router policy's softmax temperature while sampling (exploration)
    chat_rl_router_only: bool = False  # RL trains the router alone (the model's learning rates 0): lambda_sweep --router-only
    chat_rl_temperature: float = 0.3  # the answers' sampling temperature (at 1 a narrow plan's answers were noisier than
                                      # its greedy ones, which is what auto runs)

    def to_dict(self):
        return asdict(self)


def quick_settings():
    """--quick: the same pipeline, smaller and shorter (for tests; its numbers mean little)."""
    return Settings(train_pages=600, calib_pages=60, n_embd=64, n_head=2, pretrain_steps=60, pretrain_batch=16,
                    width_levels="32,64", phase_batch=4, phase1_steps=4, phase2_steps=6, grow_dim=128,
                    grown_width_levels="32,64,128", phase3_steps=4, phase3_batch=4, eval_problems=24, calib_gate_pages=40,
                    ltt_problems=30, log_every=2, chat_train_problems=120, chat_sft_steps=4,
                    chat_rl_steps=2, chat_rl_prompts=4, chat_rl_samples=2)


class Timer:
    """Wall and CPU seconds per stage (CPU seconds say what the work costs when the cores are shared)."""

    def __init__(self):
        self.stages = {}

    def __call__(self, name, fn, *args, **kwargs):
        w0, c0 = time.time(), time.process_time()
        print(f"\n==== {name}", flush=True)
        out = fn(*args, **kwargs)
        self.stages[name] = {"wall_s": round(time.time() - w0, 2), "cpu_s": round(time.process_time() - c0, 2)}
        print(f"==== {name}: {self.stages[name]['wall_s']:.1f}s wall, {self.stages[name]['cpu_s']:.1f}s cpu", flush=True)
        return out


# -----------------------------------------------------------------------------
# Corpus and tokenizer

def write_corpus(data_dir, splits, settings, seed, n_train_shards=4):
    """
    Train pages (train-split problems) in n_train_shards shards, then one val shard of calib-split pages
    (the last shard in sorted order is the val split). Marked synthetic in the parquet metadata.
    Returns (train_pages, calib_pages) as lists of (difficulty, [Problem]).
    """
    if os.path.isdir(data_dir) and os.listdir(data_dir):
        raise FileExistsError(f"{data_dir} is not empty; tiny_experiment writes its corpus into a fresh --out")
    os.makedirs(data_dir)
    rng = random.Random(f"corpus:{seed}")
    train = make_pages(splits["train"], settings.train_pages, settings.problems_per_page, rng)
    calib = make_pages(splits["calib"], settings.calib_pages, settings.problems_per_page, rng)
    per = -(-len(train) // n_train_shards)
    chunks = [train[i:i + per] for i in range(0, len(train), per)] + [calib]
    for index, pages in enumerate(chunks):
        write_synthetic_shard(os.path.join(data_dir, shard_filename(index)), [page_text(p) for p in pages], 128,
                              loss_spans=[answer_spans(p) for p in pages])
    return train, calib


def train_tokenizer(data_dir, tokenizer_dir, settings):
    from scripts import tok_train
    tok_train.main(["--data-dir", data_dir, "--out-dir", tokenizer_dir, "--vocab-size", str(settings.vocab_size)])
    return Tokenizer.from_directory(tokenizer_dir)


def _rows(tokenizer, pages, T, cache, target):
    """(idx (N, T), targets (N, T)) from each page's first T+1 tokens; target(ids, mask, t) is the target of
    input position t (-1: no loss there)."""
    idx, tgt = [], []
    for page in pages:
        ids, mask = encode_page(tokenizer, page, cache)
        if len(ids) < T + 1:
            raise ValueError(f"a page has {len(ids)} tokens < seq_len + 1 = {T + 1}: raise problems_per_page")
        ids, mask = ids[:T + 1], mask[:T + 1]
        idx.append(ids[:-1])
        tgt.append([target(ids, mask, t) for t in range(T)])
    return torch.tensor(idx, dtype=torch.long), torch.tensor(tgt, dtype=torch.long)


def page_rows(tokenizer, pages, T, cache):
    """
    Training rows: targets are the next token where that token belongs to a completion ('=', answer,
    newline) and -1 elsewhere (answer-only loss).
    """
    return _rows(tokenizer, pages, T, cache, lambda ids, mask, t: ids[t + 1] if mask[t + 1] else -1)


def gate_rows(tokenizer, pages, T, cache):
    """
    Rows for gate calibration: targets kept only where the INPUT token is inside a completion and the
    target is the next token of the same completion ('=' -> first digit, digit -> next digit or newline):
    exactly the positions where, at decode time, a gate decides.
    """
    return _rows(tokenizer, pages, T, cache, lambda ids, mask, t: ids[t + 1] if mask[t] and mask[t + 1] else -1)


# -----------------------------------------------------------------------------
# Pretraining: a dense nanochat GPT, loss on the answers only

def pretrain(tokenizer, tokenizer_dir, train_pages, out_dir, settings, seed):
    """
    nanochat's GPT (meta-device build, init_weights), Muon + AdamW (optim.setup_optimizers), nanochat's
    lr schedule (constant, then a linear warmdown over the last 30%), batches of pages drawn with a
    seeded generator. Saves a checkpoint that scripts.surgery reads (tokenizer copied beside it).
    Returns {"losses": [...], "checkpoint_dir": out_dir}.
    """
    s, T = settings, settings.seq_len
    cache = {}
    idx, targets = page_rows(tokenizer, train_pages, T, cache)
    config = GPTConfig(sequence_len=T, vocab_size=tokenizer.get_vocab_size(), n_layer=s.n_layer, n_head=s.n_head,
                       n_kv_head=s.n_head, n_embd=s.n_embd)
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device="cpu")
    torch.manual_seed(seed)
    model.init_weights()
    model.train()
    optimizers = setup_optimizers(model)
    gen = torch.Generator().manual_seed(seed)
    losses = []
    t0 = time.time()
    for step in range(s.pretrain_steps):
        rows = torch.randint(0, idx.size(0), (s.pretrain_batch,), generator=gen)
        loss = model(idx[rows], targets[rows])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        lrm = lr_multiplier(step, s.pretrain_steps, 0.0, 0.3)
        set_lr_multiplier(optimizers, lrm)
        set_muon_momentum(optimizers, muon_momentum(step))
        for opt in optimizers:
            opt.step()
        model.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step % 50 == 0 or step == s.pretrain_steps - 1:
            print(f"pretrain step {step:04d}/{s.pretrain_steps} | answer loss {losses[-1]:.4f} | lrm {lrm:.2f} | "
                  f"{time.time() - t0:.0f}s", flush=True)
    os.makedirs(out_dir, exist_ok=True)
    cm.save_model(out_dir, s.pretrain_steps, model, extra_meta={
        "produced_by": "tiny_experiment.pipeline.pretrain (answer-only loss on synthetic task pages)",
        "final_loss": losses[-1]})
    cm.copy_tokenizer_files(tokenizer_dir, out_dir, overwrite=True)
    return {"losses": losses, "checkpoint_dir": out_dir}


# -----------------------------------------------------------------------------
# Surgery and phases: the project's scripts, called in-process

def surgery_create(src, dst, settings, seed):
    from scripts import surgery
    return surgery.main(["--src", src, "--dst", dst, "--new-dim", str(settings.n_embd), "--pattern", settings.layer_pattern,
                         "--mamba", str(settings.mamba_version), "--mamba-headdim", str(settings.mamba_headdim),
                         "--mamba-ffn", settings.mamba_ffn, "--adaptive", "--exit-stride", str(settings.exit_stride),
                         "--width-levels", settings.width_levels, "--seed", str(seed)])


def surgery_grow(src, dst, settings, seed):
    from scripts import surgery
    return surgery.main(["--src", src, "--dst", dst, "--expand-from", str(settings.n_embd),
                         "--new-dim", str(settings.grow_dim), "--width-levels", settings.grown_width_levels,
                         "--seed", str(seed)])


def fractal_phase(phase, checkpoint, out_dir, data_dir, steps, settings, seed):
    from scripts import fractal_train
    B, T = (settings.phase3_batch if phase == 3 else settings.phase_batch), settings.seq_len
    argv = [f"--phase={phase}", f"--checkpoint={checkpoint}", f"--out-dir={out_dir}", f"--data-dir={data_dir}",
            "--device=cpu", f"--num-iterations={steps}", f"--device-batch-size={B}", f"--max-seq-len={T}",
            f"--total-batch-size={B * T}", "--eval-every=-1", f"--seed={seed}", f"--controller-lr={settings.controller_lr}",
            f"--log-every={settings.log_every}"]
    if phase > 1:
        argv += [f"--warmdown-ratio={settings.phase_warmdown}", f"--full-weight={settings.full_weight}",
                 f"--anchor-weight={settings.anchor_weight}", f"--plan-schedule={settings.plan_schedule}",
                 f"--exit-readouts={settings.exit_readouts}"]
    defaults = fractal_train.get_args(["--phase=1", "--checkpoint=unused"])  # fractal_train's own default rates
    scale = settings.phase3_lr_scale if phase == 3 else settings.phase_lr_scale
    argv += [f"--{name.replace('_', '-')}={scale * getattr(defaults, name)}"
             for name in ("matrix_lr", "embedding_lr", "unembedding_lr", "scalar_lr")]
    if phase == 3:
        argv.append(f"--expanded-dim={settings.grow_dim}")
    return fractal_train.main(argv)


def ltt_problems(splits, gate_pages, n_per_difficulty, seed):
    """{difficulty: [Problem]}: up to n calib-split problems in none of the pages the gates were calibrated on (the
    operating point's units must be independent of what was fitted), a fixed sample for the seed."""
    used = {p for _, page in gate_pages for p in page}
    rng = random.Random(f"ltt:{seed}")
    out = {}
    for d, pool in splits["calib"].items():
        free = [p for p in pool if p not in used]
        out[d] = rng.sample(free, min(n_per_difficulty, len(free)))  # fewer: Learn-then-Test says if too few
    return out


def calibrate_and_save(checkpoint, out_dir, tokenizer, calib_pages, splits, settings, seed):
    """Fit the gates' isotonic maps on calib-split pages (the decode positions only); choose auto's operating point by
    Learn-then-Test on other calib-split problems (every third of each difficulty orders the grid, the rest tests it;
    answers that differ from full width's are the loss, difficulties the strata); print the guarantee; save."""
    from nanochat.confidence_probe import calibrate_gates
    from tiny_experiment.evaluate import generate_rows, prompts_of, newline_id
    model, meta = cm.load_model(checkpoint)
    gate_pages = calib_pages[:settings.calib_gate_pages]
    idx, targets = gate_rows(tokenizer, gate_pages, settings.seq_len, {})
    batches = [(idx[i:i + 32], targets[i:i + 32]) for i in range(0, idx.size(0), 32)]
    info = calibrate_gates(model, batches)
    units = ltt_problems(splits, gate_pages, settings.ltt_problems, seed)
    problems = [p for d in units for p in units[d]]
    strata = [d for d in units for _ in units[d]]
    learn = [i % 3 == 0 for d in units for i in range(len(units[d]))]
    engine, newline = Engine(model), newline_id(tokenizer)
    prompts = prompts_of(tokenizer, problems)

    def run(plan, exit_t, widen_t):
        rows = generate_rows(engine, tokenizer, problems, plan, newline, exit_threshold=exit_t, expand_threshold=widen_t)
        return [r["text"] for r in rows], [r["flops"] / r["full_flops"] for r in rows]

    guarantee = operating_point(model, prompts, run, strata, learn, settings,
                                "calib-split problems outside the gate pages; loss: the answer differs from full width's")
    step = save_calibrated(model, meta, out_dir, info, guarantee, ("phase", "lineage", "surgery", "source"),
                           "calib-split pages, positions whose input and target are in one completion")
    return {"checkpoint_dir": out_dir, "checkpoint": cm.model_path(out_dir, step), "calibration": info,
            "guarantee": guarantee}


def operating_point(model, prompts, run, strata, learn, settings, units):
    """auto's operating point by Learn-then-Test over the router's menu x the exit settings (nanochat.operating_point):
    run(plan, exit, widen) -> (outputs, compute fractions) per unit; the loss of a unit is its output differing from full
    width's. Writes the chosen point into model.controllers; returns the guarantee."""
    from nanochat.operating_point import router_probs, grid_losses, choose_and_apply, EXIT_SETTINGS
    probs = router_probs(model, prompts)
    outcomes = {}
    for m, plan in enumerate(model.controllers.predictor.menu):
        for exit_t, widen_t in EXIT_SETTINGS:
            outcomes[(m, exit_t, widen_t)] = run(plan, exit_t, widen_t)
    configs, losses, costs = grid_losses(probs, outcomes, lambda a, b: float(a != b), learn)
    guarantee = choose_and_apply(model, configs, losses, costs, settings.risk, settings.delta, strata, learn)
    guarantee["units"] = units
    return guarantee


def save_calibrated(model, meta, out_dir, info, guarantee, keys, data):
    """The calibrated model with the meta keys it keeps and its calibration record, tokenizer beside it. Returns the step."""
    step = meta["checkpoint_step"]
    keep = {k: meta[k] for k in keys if k in meta}
    cm.save_model(out_dir, step, model, extra_meta=dict(keep, calibration={"data": data, **info, "guarantee": guarantee}))
    cm.copy_tokenizer_files(meta["checkpoint_dir"], out_dir, overwrite=True)
    return step

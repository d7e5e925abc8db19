"""
The chat stage of the tiny experiment: the task's problems as user / assistant conversations.

    sft         scripts.chat_sft on the final checkpoint: train-split problems as conversations (user: the question,
                assistant: the answer), loss on the assistant's tokens; widths, distillation, exits, gates and router
                keep training as in phase 3
    calibrate   the gates' isotonic maps refitted on calib-split conversations (SFT changed the model and the prompt
                format), then auto's operating point by Learn-then-Test on other calib-split conversations, as the base
                pipeline does (nanochat.operating_point), with the same alpha and delta
    evaluate    scripts.chat_eval per mode on the test problems (the base pipeline's sample), through the engine; the
                same problems are written to <out>/chat_test/<difficulty>.jsonl, so that
                `python -m scripts.chat_eval --checkpoint <out>/chat_final --data <those files> --max-new-tokens 4`
                scores them on any device
    rl          scripts.chat_rl with a compute cost on train-split conversations, recalibrated the same way, evaluated

chat_cli answers these problems on the final chat checkpoint: its prompt is a user turn such as "sum:3,7,1,5".
"""
import json
import os
import random

import torch

from nanochat import checkpoint_manager as cm
from nanochat.engine import Engine
from tiny_experiment.tasks import DIFFICULTIES, sample_eval


class ChatProblems:
    """A generative task over tiny Problems: the conversation asks the question, the assistant answers the number.
    Scored by exact match of the generated turn with the answer (the same rule as the base pipeline's '=answer')."""
    eval_type = "generative"

    def __init__(self, problems, name="tiny"):
        self.problems, self.name = list(problems), name

    def __len__(self):
        return len(self.problems)

    def __getitem__(self, i):
        p = self.problems[i]
        return {"messages": [{"role": "user", "content": p.question}, {"role": "assistant", "content": p.answer}]}

    def evaluate(self, conversation, completion):
        return int(completion.strip() == conversation["messages"][-1]["content"])

    def reward(self, conversation, completion):
        return float(self.evaluate(conversation, completion))


def write_conversations(path, problems):
    task = ChatProblems(problems)
    with open(path, "w") as f:
        for i in range(len(task)):
            f.write(json.dumps(task[i]) + "\n")
    return path


def pool(splits, split, n, seed, exclude=()):
    """Up to n problems of a split, difficulties in turn (n // 3 each at most), none in exclude; a fixed sample."""
    rng = random.Random(f"chat:{seed}:{split}")
    skip = set(exclude)
    out = []
    for d in DIFFICULTIES:
        free = [p for p in splits[split][d] if p not in skip]
        out.append(rng.sample(free, min(n // len(DIFFICULTIES), len(free))))
    return [p for trio in zip(*out) for p in trio] + [p for rest in out for p in rest[min(map(len, out)):]]


def sft(checkpoint, out_dir, splits, settings, seed):
    from scripts import chat_sft, fractal_train
    os.makedirs(out_dir, exist_ok=True)
    train = write_conversations(os.path.join(out_dir, "train.jsonl"), pool(splits, "train", settings.chat_train_problems, seed))
    val = write_conversations(os.path.join(out_dir, "val.jsonl"), pool(splits, "calib", 96, seed))
    B, T = settings.phase3_batch, settings.seq_len
    defaults = fractal_train.get_args(["--phase=1", "--checkpoint=unused"])
    argv = [f"--checkpoint={checkpoint}", f"--out-dir={os.path.join(out_dir, 'ckpt')}", f"--data={train}",
            f"--val-data={val}", "--device=cpu", f"--num-iterations={settings.chat_sft_steps}", f"--device-batch-size={B}",
            f"--max-seq-len={T}", f"--total-batch-size={B * T}", f"--eval-every={settings.chat_sft_steps}",
            f"--seed={seed}", f"--controller-lr={settings.controller_lr}", f"--log-every={settings.log_every}",
            f"--warmdown-ratio={settings.chat_warmdown}", f"--full-weight={settings.chat_full_weight}",
            f"--plan-schedule={settings.plan_schedule}", f"--exit-readouts={settings.exit_readouts}"]
    argv += [f"--{name.replace('_', '-')}={settings.chat_lr_scale * getattr(defaults, name)}"
             for name in ("matrix_lr", "embedding_lr", "unembedding_lr", "scalar_lr")]
    return chat_sft.main(argv)


def gate_batches(tokenizer, problems, T):
    """Rows for the gates' calibration: targets only where input and target are both the assistant's (the decode
    positions where a gate decides; the first answer token comes from the prompt's forward, no gate)."""
    task, rows = ChatProblems(problems), []
    for i in range(len(task)):
        ids, mask = tokenizer.render_conversation(task[i], max_tokens=T + 1)
        ids, mask = ids + [0] * (T + 1 - len(ids)), mask + [0] * (T + 1 - len(mask))
        rows.append((ids[:-1], [ids[t + 1] if mask[t] and mask[t + 1] else -1 for t in range(T)]))
    x, y = torch.tensor([r[0] for r in rows]), torch.tensor([r[1] for r in rows])
    return [(x[i:i + 64], y[i:i + 64]) for i in range(0, len(rows), 64)]


def calibrate(checkpoint, out_dir, splits, settings, seed, exclude):
    """Refit the gates on calib-split conversations, choose auto's operating point by Learn-then-Test on other ones
    (every third of each difficulty orders the grid, the rest tests it), save. Returns the guarantee."""
    from nanochat.confidence_probe import calibrate_gates
    from scripts.chat_eval import generate_turns
    from tiny_experiment.pipeline import operating_point, save_calibrated
    model, tokenizer, meta = cm.load_model_and_tokenizer(checkpoint)
    gate_problems = pool(splits, "calib", settings.calib_gate_pages * settings.problems_per_page, seed + 1, exclude)
    info = calibrate_gates(model, gate_batches(tokenizer, gate_problems, settings.seq_len))
    used = set(exclude) | set(gate_problems)
    units = {d: [p for p in pool(splits, "calib", 3 * settings.ltt_problems, seed + 2, used) if p.difficulty == d]
             for d in DIFFICULTIES}
    problems = [p for d in DIFFICULTIES for p in units[d]]
    strata = [d for d in DIFFICULTIES for _ in units[d]]
    learn = [i % 3 == 0 for d in DIFFICULTIES for i in range(len(units[d]))]
    task = ChatProblems(problems)
    prompts = [tokenizer.render_for_completion(task[i]) for i in range(len(task))]
    engine = Engine(model)

    def run(plan, exit_t, widen_t):
        turns = generate_turns(engine, tokenizer, prompts, plan, 4, batch_size=256, exit_threshold=exit_t,
                               expand_threshold=widen_t)
        return [tuple(ids) for ids, _, _ in turns], [f / full for _, f, full in turns]

    guarantee = operating_point(model, prompts, run, strata, learn, settings,
                                "calib-split conversations outside the gate set; loss: the answer differs from full width's")
    save_calibrated(model, meta, out_dir, info, guarantee, ("phase", "lineage", "source", "user_args"),
                    "calib-split chat conversations, positions whose input and target are the assistant's")
    return {"checkpoint_dir": out_dir, "guarantee": guarantee}


def evaluate_modes(checkpoint, test):
    """{"modes": {mode: {"accuracy", "compute_fraction"}}, "difficulties": {d: {mode: ...}}} on the test problems."""
    from nanochat.mode_eval import default_modes
    from scripts.chat_eval import evaluate_task
    model, tokenizer, _ = cm.load_model_and_tokenizer(checkpoint)
    model.eval()
    engine = Engine(model)
    out = {"modes": {}, "difficulties": {d: {} for d in DIFFICULTIES}}
    for mode in default_modes(model):
        correct, flops, full = 0, 0.0, 0.0
        for d in DIFFICULTIES:
            task = ChatProblems(test[d], name=d)
            r = evaluate_task(engine, tokenizer, task, mode, list(range(len(task))), max_new_tokens=4, batch_size=256,
                              tool=None)
            out["difficulties"][d][mode] = {"accuracy": r["accuracy"], "compute_fraction": r["compute_fraction"]}
            correct, flops, full = correct + sum(r["correct"]), flops + r["flops"], full + r["full_flops"]
        n = sum(len(test[d]) for d in DIFFICULTIES)
        out["modes"][mode] = {"accuracy": correct / n, "compute_fraction": flops / full}
        print(f"chat {mode:<8} accuracy {correct / n:.4f} | compute {flops / full:.3f} | " + " | ".join(
            f"{d} {out['difficulties'][d][mode]['accuracy']:.3f}" for d in DIFFICULTIES), flush=True)
    return out


def rl(checkpoint, out_dir, splits, settings, seed, exclude):
    """scripts.chat_rl.train with the compute cost on train-split conversations (the gates off while sampling; the
    router and the model learn). Returns the history."""
    from scripts import chat_rl
    model, tokenizer, _ = cm.load_model_and_tokenizer(checkpoint)
    task = ChatProblems(pool(splits, "train", settings.chat_rl_steps * settings.chat_rl_prompts, seed + 3, exclude))
    args = chat_rl.get_args([f"--checkpoint={checkpoint}", f"--out-dir={out_dir}", f"--num-steps={settings.chat_rl_steps}",
                             f"--prompts-per-step={settings.chat_rl_prompts}", f"--samples-per-prompt={settings.chat_rl_samples}",
                             "--max-new-tokens=4", f"--compute-cost={settings.chat_rl_compute_cost}", "--device=cpu",
                             "--eval-every=-1", "--save-every=-1", f"--seed={seed}", "--device-batch-size=64",
                             f"--router-temperature={settings.chat_rl_router_temperature}",
                             f"--temperature={settings.chat_rl_temperature}"]
                            + (["--matrix-lr=0", "--embedding-lr=0", "--unembedding-lr=0", "--scalar-lr=0"]
                               if settings.chat_rl_router_only else []))
    return chat_rl.train(model, tokenizer, task, args)


def run_chat_stage(timer, final_checkpoint, out, splits, settings, seed, eval_problems):
    """The chat stage end to end; returns results.json's "chat" block."""
    test = sample_eval(splits, "test", eval_problems, seed)
    os.makedirs(os.path.join(out, "chat_test"), exist_ok=True)  # the same problems for scripts.chat_eval --data
    for d in DIFFICULTIES:
        write_conversations(os.path.join(out, "chat_test", f"{d}.jsonl"), test[d])
    paths = {k: os.path.join(out, k) for k in ("chat_sft", "chat_final", "chat_rl", "chat_rl_final")}
    s = timer("chat_sft", sft, final_checkpoint, paths["chat_sft"], splits, settings, seed)
    val_problems = pool(splits, "calib", 96, seed)
    cal = timer("chat_calibrate", calibrate, s["checkpoint"], paths["chat_final"], splits, settings, seed, val_problems)
    ev = timer("chat_evaluate", evaluate_modes, paths["chat_final"], test)
    block = dict(ev, sft={"steps": settings.chat_sft_steps, "loss": {"first": s["loss"][0], "last": s["loss"][-1]},
                          "val": s["val"].get(settings.chat_sft_steps)},
                 guarantee=cal["guarantee"], checkpoint=paths["chat_final"])
    if settings.chat_rl_steps:
        block["rl"] = rl_stage(timer, paths["chat_final"], paths["chat_rl"], paths["chat_rl_final"], splits, settings,
                               seed, test)
    return block


def rl_stage(timer, chat_final, rl_dir, final_dir, splits, settings, seed, test):
    """chat_rl from chat_final at settings.chat_rl_compute_cost, recalibrated into final_dir, evaluated per mode on
    test: results.json's chat["rl"] block (also each row of tiny_experiment.lambda_sweep)."""
    sft_train = pool(splits, "train", settings.chat_train_problems, seed)
    val_problems = pool(splits, "calib", 96, seed)
    h = timer("chat_rl", rl, chat_final, rl_dir, splits, settings, seed, sft_train)
    cal = timer("chat_rl_calibrate", calibrate, rl_dir, final_dir, splits, settings, seed, val_problems)
    ev = timer("chat_rl_evaluate", evaluate_modes, final_dir, test)
    return dict(ev, compute_cost=settings.chat_rl_compute_cost, steps=settings.chat_rl_steps,
                guarantee=cal["guarantee"], checkpoint=final_dir,
                train={k: {"first": h[k][0], "last": h[k][-1]} for k in ("reward", "accuracy", "compute")})

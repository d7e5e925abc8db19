"""
Supervised fine-tuning on conversations: a hybrid checkpoint (any phase, grown or not) or a dense GPT.

    torchrun --standalone --nproc_per_node=8 -m scripts.chat_sft --checkpoint=<phase 3 out-dir>
    python -m scripts.chat_sft --checkpoint=<dir> --data=my_chats.jsonl --device=cpu --num-iterations=200

Conversations are rendered with the chat template (the special tokens the tokenizer reserves) and packed into rows
(nanochat.chat_data); the loss is on the tokens the assistant writes only. A hybrid keeps training what phases 2/3
train, each switchable: every width level with distillation from the step's full width (--matryoshka / --distill),
the exit readouts (--exit-loss-weight), and the gates and router (--controllers) on the same assistant tokens.
A dense GPT trains at its one width. The step, logging, checkpoints, Ctrl-C and --resume are fractal_train's
(fractal_train.train with this data), so every flag of a phase means the same here; --help lists them.

Data: --data FILE.jsonl (one {"messages": [...]} per line; a line of a bare message list, as nanochat's identity file,
is accepted), or by default nanochat's SFT mixture (tasks.sft_mixture: fetch it first with
`python -m scripts.fetch_tasks`). Validation: --val-data FILE.jsonl, the mixture's "val" split, or, with --data alone,
every 50th conversation of the file (held out of training).
"""
import argparse
import functools
import os

import torch

from nanochat.common import get_base_dir, expand_path, run_script, print0
from nanochat.chat_data import conversation_loader, conversation_rows
from nanochat import checkpoint_manager as cm
from scripts import fractal_train
from scripts.fractal_train import Phase
from tasks.conversations import read_conversations

VAL_EVERY = 50  # --data without --val-data: conversations 49, 99, ... are the val split


def get_args(argv=None):
    p = fractal_train.build_parser("SFT of a hybrid or dense checkpoint on conversations (assistant tokens only)",
                                   phase_flag=False)
    p.add_argument("--data", type=str, default=None, help="jsonl of conversations (default: nanochat's SFT mixture)")
    p.add_argument("--val-data", type=str, default=None, help="jsonl of val conversations")
    p.add_argument("--controllers", action=argparse.BooleanOptionalAction, default=None,
                   help="train the gates and router beside the model (default: on where the checkpoint has them)")
    p.set_defaults(out_dir=None, eval_tokens=0, phase="sft")
    args = p.parse_args(argv)
    if args.continue_data or args.data_dir:
        raise ValueError("--continue-data / --data-dir read text shards; chat_sft reads conversations (--data)")
    args.out_dir = expand_path(args.out_dir) or os.path.join(get_base_dir(), "chatsft_checkpoints")
    return args


def sft_phase(args):
    """The phase entry for this checkpoint: what phases 2/3 train, where the model has it (a dense GPT: none)."""
    source_dir, step = cm.resolve_checkpoint(args.checkpoint)
    meta = cm.load_meta(source_dir, step)
    kind, config = cm.model_kind_of(meta), meta.get("model_config", {})
    hybrid = kind == "hybrid"
    adaptive = hybrid and bool(config.get("adaptive"))
    if args.controllers and not adaptive:
        raise ValueError(f"--controllers: {args.checkpoint} holds a {kind} model without gates and router")
    controllers = adaptive if args.controllers is None else args.controllers
    if not hybrid and (args.matryoshka or args.distill):
        raise ValueError(f"--matryoshka / --distill train width levels; {args.checkpoint} holds a dense {kind} model")
    return Phase(new_only=False, matryoshka=hybrid, controllers=controllers, exit_loss=adaptive, grown=False,
                 distill=hybrid, chat=True)


def conversations(args, split):
    """The train or val conversations (an indexable): --val-data for val, --data (every VAL_EVERY-th held out for val
    when there is no --val-data), else the SFT mixture."""
    if split == "val" and args.val_data:
        return read_conversations(expand_path(args.val_data))
    if args.data:
        convs = read_conversations(expand_path(args.data))
        if args.val_data:
            return convs
        return [c for i, c in enumerate(convs) if (i % VAL_EVERY == VAL_EVERY - 1) == (split == "val")]
    from tasks import sft_mixture  # the hub data: fetched by scripts.fetch_tasks, a one-line error if it is not
    return sft_mixture(split)


def chat_data(args, tokenizer, meta, paths, loader_states, geo, train=None):
    """fractal_train.train's data hook: a conversation stream per data shard of this rank, val rows kept. train: the
    train conversations, if already read."""
    if geo.rank == 0:  # the tokenizer travels with the checkpoints
        cm.copy_tokenizer_files(meta["tokenizer_dir"], paths.out_dir)
    train = conversations(args, "train") if train is None else train
    loaders = {j: conversation_loader(tokenizer, train, geo.B, geo.T, device=geo.device, resume_state=loader_states[j],
                                      rank=j, world_size=geo.data_ranks) for j in geo.my_shards}
    val_batches = []
    if args.eval_every > 0:
        rows = conversation_rows(tokenizer, conversations(args, "val"), geo.T)
        rows = rows[:len(rows) - len(rows) % geo.world_size][geo.rank::geo.world_size]  # as many on every rank
        if args.eval_tokens:
            rows = rows[:max(1, args.eval_tokens // (geo.T * geo.world_size))]
        if len(rows) < geo.B:
            raise ValueError(f"the val conversations fill {len(rows)} rows on this rank, fewer than one batch of "
                             f"{geo.B}: add val data or lower --device-batch-size")
        for i in range(0, len(rows) - geo.B + 1, geo.B):  # whole batches (each rank the same count: rows split evenly)
            x = torch.tensor([r[0] for r in rows[i:i + geo.B]], device=geo.device)
            y = torch.tensor([r[1] for r in rows[i:i + geo.B]], device=geo.device)
            val_batches.append((x, y))
    print0(f"conversations: {len(train):,} train" + (f" | val batches {len(val_batches)}" if val_batches else ""))
    return loaders, val_batches


def main(argv=None):
    args = get_args(argv)
    phase = sft_phase(args)
    fractal_train.check_args(args, phase)
    train = conversations(args, "train")  # missing or malformed data stops here, before the model loads
    return fractal_train.train(args, phase, functools.partial(chat_data, train=train), "scripts.chat_sft", argv)


if __name__ == "__main__":
    run_script(main)

"""
Chat tasks: the conversations SFT trains on and the benchmarks chat_eval scores, by name.

    get_task("MMLU", split="test")                 a Task (tasks.common): len, [i] -> conversation, evaluate
    get_task("Conversations", path="my.jsonl")     a local jsonl file of conversations
    get_task("ExactAnswers", path="my.jsonl")      the same, scored by exact match of the last assistant turn
    sft_mixture("train")                           nanochat's SFT mixture, one seeded shuffle of its tasks
    CHAT_EVAL_TASKS, RANDOM_BASELINE               ChatCORE: mean over tasks of (acc - base) / (1 - base)

Data comes from the hub's parquet exports and two plain URLs, cached under <base_dir>/task_data
(tasks.hub); `python -m scripts.fetch_tasks` downloads it ahead of an offline run.
"""
from nanochat.common import UserError
from tasks.common import Task, TaskMixture, render_mc
from tasks.arc import ARC
from tasks.mmlu import MMLU
from tasks.gsm8k import GSM8K
from tasks.humaneval import HumanEval
from tasks.spelling import SpellingBee, SimpleSpelling
from tasks.conversations import SmolTalk, Identity, Conversations, ExactAnswers

# name -> (class, the keyword arguments the name fixes)
TASKS = {
    "ARC-Easy": (ARC, {"subset": "ARC-Easy"}),
    "ARC-Challenge": (ARC, {"subset": "ARC-Challenge"}),
    "MMLU": (MMLU, {}),
    "GSM8K": (GSM8K, {}),
    "HumanEval": (HumanEval, {}),
    "SpellingBee": (SpellingBee, {}),
    "SimpleSpelling": (SimpleSpelling, {}),
    "SmolTalk": (SmolTalk, {}),
    "Identity": (Identity, {}),
    "Conversations": (Conversations, {}),
    "ExactAnswers": (ExactAnswers, {}),
}

CHAT_EVAL_TASKS = ["ARC-Easy", "ARC-Challenge", "MMLU", "GSM8K", "HumanEval", "SpellingBee"]
# the accuracy of guessing: 1 in 4 for the four-option tasks (ARC's few 3- and 5-option questions aside, as in
# nanochat), 0 for open-ended answers
RANDOM_BASELINE = {"ARC-Easy": 0.25, "ARC-Challenge": 0.25, "MMLU": 0.25, "GSM8K": 0.0, "HumanEval": 0.0,
                   "SpellingBee": 0.0}

# nanochat's SFT mixture (scripts/chat_sft.py before its spelling and identity data were removed on 2026-07-03):
# name, split, keyword arguments, times in the mixture
SFT_MIXTURE = {
    "train": [
        ("SmolTalk", "train", {}, 1),  # 460K general conversations
        ("Identity", "train", {}, 2),  # 1K conversations about the assistant itself, twice
        ("MMLU", "auxiliary_train", {}, 3),  # 100K multiple-choice questions, 3 epochs
        ("GSM8K", "train", {}, 4),  # 7.5K math problems with calculator calls, 4 epochs
        ("SimpleSpelling", "train", {"size": 200_000}, 1),
        ("SpellingBee", "train", {"size": 80_000}, 1),
    ],
    "val": [
        ("SmolTalk", "test", {}, 1),  # 24K
        ("MMLU", "test", {"stop": 5200}, 1),  # of 14K, in about the train mixture's proportions
        ("GSM8K", "test", {"stop": 420}, 1),  # of 1.3K
    ],
}
SFT_TASKS = list(dict.fromkeys(name for rows in SFT_MIXTURE.values() for name, *_ in rows))


def _entry(name):
    if name not in TASKS:
        raise UserError(f"unknown task {name!r}; tasks: {', '.join(TASKS)}")
    return TASKS[name]


def get_task(name, split="test", **kwargs):
    """The task `name` on `split`; kwargs go to its class (start/stop/step, size, path, ...)."""
    cls, fixed = _entry(name)
    return cls(split=split, **fixed, **kwargs)


def task_splits(name):
    """The splits get_task accepts for `name`."""
    return _entry(name)[0].SPLITS


def task_data_files(name, split):
    """What `name` on `split` needs on disk (tasks.hub.HubSplit / UrlFile), for scripts.fetch_tasks."""
    cls, fixed = _entry(name)
    return cls.data_files(split, fixed.get("subset"))


def sft_mixture(split, mmlu_epochs=3, gsm8k_epochs=4, seed=42):
    """nanochat's SFT mixture for split "train" or "val" as one TaskMixture. A task repeated in the mixture is
    one object listed several times (loaded once)."""
    if split not in SFT_MIXTURE:
        raise UserError(f"the SFT mixture has no split {split!r}; its splits: {', '.join(SFT_MIXTURE)}")
    times_override = {"MMLU": mmlu_epochs, "GSM8K": gsm8k_epochs} if split == "train" else {}
    tasks = []
    for name, task_split, kwargs, times in SFT_MIXTURE[split]:
        task = get_task(name, task_split, **kwargs)
        tasks += [task] * times_override.get(name, times)
    return TaskMixture(tasks, seed=seed)


__all__ = ["Task", "TaskMixture", "render_mc", "get_task", "task_splits", "task_data_files", "sft_mixture",
           "TASKS", "CHAT_EVAL_TASKS", "RANDOM_BASELINE", "SFT_MIXTURE", "SFT_TASKS"]

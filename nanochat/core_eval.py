"""
CORE (DCLM, arXiv 2406.11794): the in-context-learning task ensemble nanochat reports for base models, scored
the way nanochat scores it, with the model's forward passed in (so every compute mode runs through the same code:
nanochat/mode_eval.py).

The bundle (nanochat's eval_bundle.zip, unpacked into <base_dir>/eval_bundle):
    core.yaml             icl_tasks: a list of {label, icl_task_type, dataset_uri, num_fewshot: [k],
                          continuation_delimiter (default " ")}; the first entry of num_fewshot is used
    eval_meta_data.csv    one row per task: "Eval Task" (the label) and "Random baseline" (chance accuracy in
                          percent), among other columns
    eval_data/<dataset_uri>   jsonl, one item a line, by icl_task_type:
        multiple_choice    {"query", "choices": [...], "gold": i}: one shared context, several continuations
        schema             {"context_options": [...], "continuation", "gold": i}: several contexts, one continuation
        language_modeling  {"context", "continuation"}: greedy decoding must reproduce the continuation

An item is scored like this:
- The task's items are shuffled once with random.Random(1337) and cut to max_per_task (so a subsample is the same
  on every run); few-shot examples for item i are num_fewshot others drawn by random.Random(1234 + i) from that
  (cut) list, never item i itself.
- Prompts: each example "<context><delimiter><answer>\\n\\n", then the item; a multiple-choice item gives one prompt
  per choice, a schema item one per context option, a language-modeling item the prompt with and without the
  continuation (contexts stripped of surrounding whitespace, the prompt without it stripped too).
- Tokens: <|bos|> + the prompt. The continuation is where the options differ: after the options' common token
  prefix (multiple choice), their common token suffix (schema), after the shorter prompt (language modeling);
  at least one token of each option is scored (an option that is a prefix of another would score none). Rows longer than the model's sequence length lose tokens on the left.
- An item's rows run as one batch (right-padded with <|bos|>), through forward(ids, prompt_lens) -> logits.
  multiple_choice / schema: the option with the lowest mean loss over its continuation tokens is the answer
  (the first on ties); language_modeling: correct when every continuation token is the argmax of the logits
  before it.
- Accuracy per task; centered accuracy = (accuracy - baseline) / (1 - baseline) with the random baseline as a
  fraction (0 = chance, 1 = perfect); CORE = the mean of the centered accuracies over the tasks.

The bundle is fetched on first use (download_bundle: a .part file, unpacked into a temporary directory, then
renamed into place); offline, a missing bundle stops with the command that fetches it (DOWNLOAD_COMMAND).
"""
import os
import csv
import json
import random
import shutil
import zipfile
import tempfile
import urllib.request
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from nanochat.common import get_base_dir, UserError
from nanochat.loss_eval import all_reduce_sums

EVAL_BUNDLE_URL = "https://karpathy-public.s3.us-west-2.amazonaws.com/eval_bundle.zip"
DOWNLOAD_COMMAND = "python -m scripts.base_eval --download-only"
TASK_TYPES = ("multiple_choice", "schema", "language_modeling")
SHUFFLE_SEED = 1337   # the order items are kept in (and cut by max_per_task)
FEWSHOT_SEED = 1234   # + the item's index: which examples it is shown


@dataclass(frozen=True)
class CoreTask:
    label: str
    task_type: str          # one of TASK_TYPES
    dataset_uri: str        # path under <bundle>/eval_data
    num_fewshot: int
    delimiter: str          # between a context and its continuation
    random_baseline: float  # chance accuracy, a fraction in [0, 1)


# -----------------------------------------------------------------------------
# The bundle on disk

def default_bundle_dir():
    return os.path.join(get_base_dir(), "eval_bundle")


def bundle_files(bundle_dir):
    return os.path.join(bundle_dir, "core.yaml"), os.path.join(bundle_dir, "eval_meta_data.csv")


def is_complete(bundle_dir):
    return all(os.path.isfile(p) for p in bundle_files(bundle_dir)) and os.path.isdir(os.path.join(bundle_dir, "eval_data"))


def download_bundle(bundle_dir, url=None):
    """Fetch the bundle zip into bundle_dir: bytes into <bundle_dir>.zip.part, unpacked into a temporary directory
    beside it, the complete eval_bundle/ renamed to bundle_dir; an interrupted run leaves no half bundle behind."""
    url = url or EVAL_BUNDLE_URL
    bundle_dir = os.path.abspath(bundle_dir)
    parent = os.path.dirname(bundle_dir)
    os.makedirs(parent, exist_ok=True)
    part = bundle_dir + ".zip.part"
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(part, "wb") as f:
            shutil.copyfileobj(response, f, 1 << 20)
    except OSError as e:  # URLError (no network, no such host, refused), timeouts, HTTP errors
        if os.path.exists(part):
            os.remove(part)
        raise UserError(f"the CORE eval bundle is not in {bundle_dir} and downloading {url} failed "
                        f"({getattr(e, 'reason', e)}); on a machine with internet run `{DOWNLOAD_COMMAND}` "
                        f"(it writes <base_dir>/eval_bundle) and copy that directory here, or pass --bundle-dir") from None
    tmp = tempfile.mkdtemp(prefix=".eval_bundle.", dir=parent)
    try:
        try:
            with zipfile.ZipFile(part) as z:
                z.extractall(tmp)
        except zipfile.BadZipFile:
            raise UserError(f"{url} did not give a zip file (a proxy page or a cut download?); run `{DOWNLOAD_COMMAND}` "
                            f"again") from None
        unpacked = os.path.join(tmp, "eval_bundle")
        if not is_complete(unpacked):
            raise UserError(f"the zip from {url} has no eval_bundle/ with core.yaml, eval_meta_data.csv and eval_data/")
        os.rename(unpacked, bundle_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        os.remove(part)
    return bundle_dir


def ensure_bundle(bundle_dir, url=None):
    """bundle_dir when it holds a bundle; downloaded there when it does not exist; an error when it is partial."""
    if is_complete(bundle_dir):
        return bundle_dir
    if os.path.exists(bundle_dir):
        raise UserError(f"{bundle_dir} exists but lacks core.yaml, eval_meta_data.csv or eval_data/: remove it and run "
                        f"`{DOWNLOAD_COMMAND}`")
    return download_bundle(bundle_dir, url)


def load_tasks(bundle_dir):
    """The bundle's tasks (core.yaml's order) with their random baselines, checked."""
    import yaml  # a dependency of huggingface_hub, imported here so the rest of the module works without it
    config_path, meta_path = bundle_files(bundle_dir)
    with open(config_path, encoding="utf-8") as f:
        config = yaml.safe_load(f)
    if not isinstance(config, dict) or not isinstance(config.get("icl_tasks"), list) or not config["icl_tasks"]:
        raise ValueError(f"{config_path} must hold a non-empty list under 'icl_tasks'")
    with open(meta_path, encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows or not {"Eval Task", "Random baseline"} <= set(rows[0]):
        raise ValueError(f"{meta_path} needs the columns 'Eval Task' and 'Random baseline'")
    baselines = {row["Eval Task"]: float(row["Random baseline"]) / 100 for row in rows}
    tasks = []
    for entry in config["icl_tasks"]:
        missing = {"label", "icl_task_type", "dataset_uri", "num_fewshot"} - set(entry)
        if missing:
            raise ValueError(f"{config_path}: task {entry.get('label', '?')!r} lacks {sorted(missing)}")
        label, task_type = entry["label"], entry["icl_task_type"]
        if task_type not in TASK_TYPES:
            raise ValueError(f"{config_path}: task {label!r} has icl_task_type {task_type!r}; known: {', '.join(TASK_TYPES)}")
        if label not in baselines:
            raise ValueError(f"{meta_path} has no row for task {label!r}, so its random baseline is unknown")
        shots = entry["num_fewshot"]
        tasks.append(CoreTask(label, task_type, entry["dataset_uri"], int(shots[0] if isinstance(shots, list) else shots),
                              entry.get("continuation_delimiter", " "), baselines[label]))
    return tasks


def load_task_data(bundle_dir, task, max_per_task=-1):
    """The task's items in the fixed shuffled order, the first max_per_task of them (-1: all)."""
    path = os.path.join(bundle_dir, "eval_data", task.dataset_uri)
    with open(path, encoding="utf-8") as f:
        data = [json.loads(line) for line in f if line.strip()]
    random.Random(SHUFFLE_SEED).shuffle(data)
    if max_per_task > 0:
        data = data[:max_per_task]
    if task.num_fewshot > len(data) - 1:
        raise ValueError(f"task {task.label}: {task.num_fewshot} few-shot examples need at least {task.num_fewshot + 1} "
                         f"items, and {len(data)} are kept (raise --max-per-task)")
    return data


# -----------------------------------------------------------------------------
# One item: few-shot examples, prompts, token rows

def fewshot_examples(data, idx, num_fewshot):
    """num_fewshot items of data other than data[idx], the same ones on every run."""
    if num_fewshot == 0:
        return []
    others = [i for i in range(len(data)) if i != idx]
    return [data[i] for i in random.Random(FEWSHOT_SEED + idx).sample(others, num_fewshot)]


def render_prompts(task, item, examples):
    """The item's prompts (strings) after its few-shot examples: one per option; language modeling: the prompt
    without the continuation, then with it."""
    d = task.delimiter
    if task.task_type == "multiple_choice":
        shots = "".join(f"{ex['query']}{d}{ex['choices'][ex['gold']]}\n\n" for ex in examples)
        return [f"{shots}{item['query']}{d}{choice}" for choice in item["choices"]]
    if task.task_type == "schema":
        shots = "".join(f"{ex['context_options'][ex['gold']]}{d}{ex['continuation']}\n\n" for ex in examples)
        return [f"{shots}{context}{d}{item['continuation']}" for context in item["context_options"]]
    if task.task_type == "language_modeling":
        # contexts carry stray whitespace in some datasets; the prompt without the continuation is stripped whole so
        # that its tokens are a prefix of the prompt with it (a trailing space would merge into the next token)
        shots = "".join(f"{ex['context'].strip()}{d}{ex['continuation']}\n\n" for ex in examples)
        prompt = f"{shots}{item['context'].strip()}{d}"
        return [prompt.strip(), prompt + item["continuation"]]
    raise ValueError(f"unknown task type {task.task_type!r}")


def common_length(rows, from_end=False):
    """Tokens the rows share at their start (or end), at most the shortest row's length."""
    n = min(len(r) for r in rows)
    for i in range(n):
        at = -1 - i if from_end else i
        if any(r[at] != rows[0][at] for r in rows[1:]):
            return i
    return n


@dataclass
class ItemRows:
    """One item as a batch: ids (B, T) long, right-padded; row b's continuation is ids[b, starts[b]:ends[b]]."""
    ids: torch.Tensor
    starts: list
    ends: list
    gold: int  # the right option (None for language modeling)


def prepare_item(tokenizer, task, data, idx, max_len):
    """ItemRows of data[idx] (few-shot examples included), each row at most max_len tokens."""
    item = data[idx]
    prompts = render_prompts(task, item, fewshot_examples(data, idx, task.num_fewshot))
    bos = tokenizer.get_bos_token_id()
    rows = tokenizer(prompts, prepend=bos)
    if task.task_type == "multiple_choice":
        # at least one token of every option is scored, even when one option is a prefix of another
        start = min(common_length(rows), min(len(r) for r in rows) - 1)
        starts, ends = [start] * len(rows), [len(r) for r in rows]
    elif task.task_type == "schema":
        suffix = min(common_length(rows, from_end=True), min(len(r) for r in rows) - 1)
        starts, ends = [len(r) - suffix for r in rows], [len(r) for r in rows]
    else:
        without, with_cont = rows
        if len(without) >= len(with_cont) or with_cont[:len(without)] != without:
            raise ValueError(f"task {task.label} item {idx}: the prompt without its continuation does not tokenize to a "
                             f"prefix of the prompt with it, so the continuation's tokens cannot be found")
        rows, starts, ends = [with_cont], [len(without)], [len(with_cont)]
    for b, row in enumerate(rows):
        cut = len(row) - max_len
        if cut > 0:  # keep the last max_len tokens: the continuation and as much context as fits
            if starts[b] - cut < 1:
                raise ValueError(f"task {task.label} item {idx}: its continuation does not fit in {max_len} tokens "
                                 f"with one token of context")
            rows[b], starts[b], ends[b] = row[cut:], starts[b] - cut, ends[b] - cut
    ids = torch.full((len(rows), max(len(r) for r in rows)), bos, dtype=torch.long)
    for b, row in enumerate(rows):
        ids[b, :len(row)] = torch.tensor(row, dtype=torch.long)
    return ItemRows(ids, starts, ends, item.get("gold"))


# -----------------------------------------------------------------------------
# Scoring

def token_losses(logits, ids):
    """(B, T) loss of each token given those before it: column t scores ids[:, t] from logits[:, t - 1]; column 0
    has no prediction (nan)."""
    B, T, V = logits.shape
    losses = torch.full((B, T), float("nan"), device=logits.device)
    losses[:, 1:] = F.cross_entropy(logits[:, :-1].reshape(-1, V).float(), ids[:, 1:].reshape(-1),
                                    reduction="none").view(B, T - 1)
    return losses


def score_item(task, rows, logits):
    """(correct, predicted option or None) of one item from its rows' logits (B, T, V)."""
    ids = rows.ids.to(logits.device)
    if task.task_type == "language_modeling":
        s, e = rows.starts[0], rows.ends[0]
        return bool((logits[0, s - 1:e - 1].argmax(-1) == ids[0, s:e]).all()), None
    losses = token_losses(logits, ids)
    means = [losses[b, s:e].mean().item() for b, (s, e) in enumerate(zip(rows.starts, rows.ends))]
    pred = means.index(min(means))
    return pred == rows.gold, pred


def prepare_task(tokenizer, task, data, max_len, rank=0, world_size=1):
    """{index: ItemRows} of this rank's items (every world_size-th from rank), prepared once for every forward."""
    return {i: prepare_item(tokenizer, task, data, i, max_len) for i in range(rank, len(data), world_size)}


@torch.no_grad()
def evaluate_task(forward, task, items, n_items, device):
    """Accuracy over all ranks of one task: forward(ids (B, T), prompt_lens (B ints)) -> logits (B, T, V) on this
    rank's items ({index: ItemRows}, prepare_task); the correct counts are summed over ranks (n_items in all).
    prompt_lens: the tokens before each row's continuation (what an adaptive forward may read to plan)."""
    correct = torch.zeros((), dtype=torch.float64, device=device)
    for rows in items.values():
        ok, _ = score_item(task, rows, forward(rows.ids.to(device), rows.starts))
        correct += float(ok)
    all_reduce_sums(correct)
    return correct.item() / n_items


def centered_accuracy(accuracy, random_baseline):
    """0 at chance, 1 when every item is right (random_baseline a fraction)."""
    return (accuracy - random_baseline) / (1.0 - random_baseline)


def core_metric(centered):
    """The CORE number: the mean centered accuracy over tasks ({label: centered})."""
    return sum(centered.values()) / len(centered)

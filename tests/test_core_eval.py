"""
nanochat/core_eval.py on a small CORE bundle written in the real on-disk format (core.yaml, eval_meta_data.csv with
DCLM's columns, eval_data/**/*.jsonl of each task type) and loaded by the real loader: rendering and few-shot
sampling, each task type scored by forwards whose answer the test controls, the centered-accuracy arithmetic, and
the bundle's download (a local zip through a file:// URL) and offline error.
"""
import os
import csv
import json
import random
import zipfile

import pytest
import torch
import yaml

from nanochat import core_eval
from nanochat.common import UserError
from nanochat.tokenizer import Tokenizer

_NOUNS = ["bridge", "river", "lamp", "stone", "garden", "window", "teacher", "farmer", "kettle", "ladder"]

# DCLM's eval_meta_data.csv columns (nanochat reads two of them); a description with commas, quoted
META_COLUMNS = ["Eval Task", "Task Category", "Task Type", "#shots", "#datapoints", "Random baseline",
                "Centered Metric?", "Description"]
TASKS = [  # (label, type, uri, shots, delimiter or None = the default, baseline %)
    ("tiny_mc", "multiple_choice", "world_knowledge/tiny_mc.jsonl", 2, None, 25),
    ("tiny_schema", "schema", "language_understanding/tiny_schema.jsonl", 1, " ", 50),
    ("tiny_lm", "language_modeling", "symbolic/tiny_lm.jsonl", 1, "\nAnswer:", 0),
]


def task_items(task_type, n=8):
    rng = random.Random(task_type)
    if task_type == "multiple_choice":
        return [{"query": f"Which one is near the {_NOUNS[i]}?", "choices": rng.sample(_NOUNS, 4), "gold": i % 4}
                for i in range(n)]
    if task_type == "schema":
        return [{"context_options": [f"The {a} was heavy, so the {b}", f"The {b} was heavy, so the {a}"],
                 "continuation": "stayed by the sea.", "gold": i % 2}
                for i, (a, b) in enumerate(rng.sample(_NOUNS, 2) for _ in range(n))]
    return [{"context": f"  one {_NOUNS[i]} counts {i} apples, and then 2 more, so the total is ",
             "continuation": f" {i + 2}"} for i in range(n)]


def write_bundle(root, n_items=8):
    """A CORE bundle at root (core.yaml, eval_meta_data.csv, eval_data/) of the three TASKS; returns root."""
    icl = []
    for label, task_type, uri, shots, delim, _ in TASKS:
        entry = {"label": label, "dataset_uri": uri, "num_fewshot": [shots], "icl_task_type": task_type}
        if delim is not None:
            entry["continuation_delimiter"] = delim
        icl.append(entry)
        path = root / "eval_data" / uri
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(item) + "\n" for item in task_items(task_type, n_items)), encoding="utf-8")
    (root / "core.yaml").write_text(yaml.safe_dump({"max_seq_len": 2048, "icl_tasks": icl}, sort_keys=False))
    with open(root / "eval_meta_data.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(META_COLUMNS)
        w.writerow(["unused_task", "x", "multiple choice", 0, 10, 20, "", "not in core.yaml"])
        for label, task_type, _, shots, _, baseline in TASKS:
            w.writerow([label, "toy", task_type.replace("_", " "), shots, n_items, baseline, "", f"{label}, a toy, for tests"])
    return root


@pytest.fixture
def bundle(tmp_path):
    return write_bundle(tmp_path / "eval_bundle")


@pytest.fixture(scope="module")
def tokenizer(tiny_data):
    return Tokenizer.from_directory(str(tiny_data["tokenizer_dir"]))


def task_named(tasks, label):
    return next(t for t in tasks if t.label == label)


def test_loader_reads_tasks_baselines_and_default_delimiter(bundle):
    tasks = core_eval.load_tasks(str(bundle))
    assert [t.label for t in tasks] == ["tiny_mc", "tiny_schema", "tiny_lm"]  # core.yaml's order
    mc, schema, lm = tasks
    assert (mc.task_type, mc.num_fewshot, mc.delimiter, mc.random_baseline) == ("multiple_choice", 2, " ", 0.25)
    assert (schema.delimiter, schema.random_baseline) == (" ", 0.5)
    assert (lm.delimiter, lm.random_baseline, lm.dataset_uri) == ("\nAnswer:", 0.0, "symbolic/tiny_lm.jsonl")


def test_loader_errors_name_what_is_wrong(bundle):
    rows = (bundle / "eval_meta_data.csv").read_text().splitlines()
    (bundle / "eval_meta_data.csv").write_text("\n".join(r for r in rows if not r.startswith("tiny_lm")) + "\n")
    with pytest.raises(ValueError, match="no row for task 'tiny_lm'"):
        core_eval.load_tasks(str(bundle))
    write_bundle(bundle)
    text = (bundle / "core.yaml").read_text().replace("icl_task_type: schema", "icl_task_type: generation")
    (bundle / "core.yaml").write_text(text)
    with pytest.raises(ValueError, match="'tiny_schema' has icl_task_type 'generation'"):
        core_eval.load_tasks(str(bundle))


def test_items_keep_one_shuffled_order_and_a_subsample_is_its_prefix(bundle):
    task = task_named(core_eval.load_tasks(str(bundle)), "tiny_mc")
    full = core_eval.load_task_data(str(bundle), task)
    assert full == core_eval.load_task_data(str(bundle), task)
    assert full != task_items("multiple_choice")  # shuffled ...
    assert sorted(map(json.dumps, full)) == sorted(map(json.dumps, task_items("multiple_choice")))  # ... not changed
    assert core_eval.load_task_data(str(bundle), task, max_per_task=3) == full[:3]
    with pytest.raises(ValueError, match="2 few-shot examples need at least 3 items"):
        core_eval.load_task_data(str(bundle), task, max_per_task=2)


def test_fewshot_examples_are_fixed_per_item_and_never_the_item():
    data = [{"query": f"q{i}"} for i in range(12)]
    for idx in range(len(data)):
        shots = core_eval.fewshot_examples(data, idx, 3)
        assert len(shots) == 3 and data[idx] not in shots and len({s["query"] for s in shots}) == 3
        assert shots == core_eval.fewshot_examples(data, idx, 3)
        assert shots == [data[i] for i in random.Random(1234 + idx).sample([i for i in range(12) if i != idx], 3)]
    assert core_eval.fewshot_examples(data, 0, 3) != core_eval.fewshot_examples(data, 1, 3)
    assert core_eval.fewshot_examples(data, 5, 0) == []


def test_render_prompts_of_each_task_type():
    T = core_eval.CoreTask
    mc = T("mc", "multiple_choice", "-", 2, "Answer: ", 0.25)
    shots = [{"query": "Q1?", "choices": ["a", "b"], "gold": 1}, {"query": "Q2?", "choices": ["c", "d"], "gold": 0}]
    assert core_eval.render_prompts(mc, {"query": "Q?", "choices": ["x", "y"], "gold": 0}, shots) == [
        "Q1?Answer: b\n\nQ2?Answer: c\n\nQ?Answer: x", "Q1?Answer: b\n\nQ2?Answer: c\n\nQ?Answer: y"]
    schema = T("s", "schema", "-", 1, " ", 0.5)
    shot = [{"context_options": ["A1", "A2"], "continuation": "end.", "gold": 1}]
    assert core_eval.render_prompts(schema, {"context_options": ["B1", "B2"], "continuation": "fin."}, shot) == [
        "A2 end.\n\nB1 fin.", "A2 end.\n\nB2 fin."]
    lm = T("l", "language_modeling", "-", 1, " ", 0.0)
    shot = [{"context": " 2 + 2 = ", "continuation": "4"}]
    # contexts are stripped; the prompt without the continuation is stripped whole (its trailing delimiter too)
    assert core_eval.render_prompts(lm, {"context": "3 + 3 =  ", "continuation": "6"}, shot) == [
        "2 + 2 = 4\n\n3 + 3 =", "2 + 2 = 4\n\n3 + 3 = 6"]
    assert core_eval.render_prompts(lm, {"context": "x", "continuation": "y"}, []) == ["x", "x y"]


def test_item_rows_mark_each_options_continuation(bundle, tokenizer):
    tasks = core_eval.load_tasks(str(bundle))
    bos = tokenizer.get_bos_token_id()
    for task in tasks:
        data = core_eval.load_task_data(str(bundle), task)
        rows = core_eval.prepare_item(tokenizer, task, data, 3, max_len=1000)
        prompts = core_eval.render_prompts(task, data[3], core_eval.fewshot_examples(data, 3, task.num_fewshot))
        assert (rows.ids[:, 0] == bos).all() and rows.gold == data[3].get("gold")
        for b, (s, e) in enumerate(zip(rows.starts, rows.ends)):
            assert 1 <= s < e and (rows.ids[b, e:] == bos).all()  # right-padded with bos
            if task.task_type == "multiple_choice":  # the option's text (after the shared prefix)
                assert tokenizer.decode(rows.ids[b, s:e].tolist()).strip() in data[3]["choices"][b]
                assert rows.ids[b, :s].tolist() == rows.ids[0, :s].tolist()
            elif task.task_type == "schema":  # the shared continuation
                assert tokenizer.decode(rows.ids[b, s:e].tolist()).strip() == data[3]["continuation"].strip()
            else:
                assert len(rows.starts) == 1 and tokenizer.decode(rows.ids[0, s:e].tolist()) == data[3]["continuation"]
                assert rows.ids[0, :e].tolist() == tokenizer(prompts[1], prepend=bos)


def test_an_option_that_is_a_prefix_of_another_still_scores_a_token(tokenizer):
    task = core_eval.CoreTask("mc", "multiple_choice", "-", 0, " ", 0.5)
    data = [{"query": "Where is the lamp?", "choices": ["near the bridge", "near the bridge by the sea"], "gold": 1}]
    rows = core_eval.prepare_item(tokenizer, task, data, 0, max_len=100)
    assert rows.starts[0] == rows.starts[1] == rows.ends[0] - 1 < rows.ends[1]
    assert core_eval.score_item(task, rows, favouring(1)(rows.ids, rows.starts)) == (True, 1)


def test_long_rows_lose_tokens_on_the_left(bundle, tokenizer):
    for task in core_eval.load_tasks(str(bundle)):
        data = core_eval.load_task_data(str(bundle), task)
        full = core_eval.prepare_item(tokenizer, task, data, 0, max_len=1000)
        cut = core_eval.prepare_item(tokenizer, task, data, 0, max_len=24)
        assert cut.ids.size(1) <= 24 < full.ids.size(1)
        for b in range(cut.ids.size(0)):
            n = full.ends[b] - cut.ends[b]  # tokens dropped from the left
            assert n > 0 and cut.starts[b] == full.starts[b] - n >= 1
            assert cut.ids[b, :cut.ends[b]].tolist() == full.ids[b, n:full.ends[b]].tolist()
        with pytest.raises(ValueError, match="does not fit in 2 tokens"):
            core_eval.prepare_item(tokenizer, task, data, 0, max_len=2)


def favouring(row, margin=8.0, vocab=512):
    """A forward whose logits predict every next token of row `row` (by margin) and are flat elsewhere: that row's
    continuation is the cheapest."""
    def forward(ids, prompt_lens):
        logits = torch.zeros(*ids.shape, vocab)
        logits[row, torch.arange(ids.size(1) - 1), ids[row, 1:]] = margin
        return logits
    return forward


def test_multiple_choice_and_schema_pick_the_cheapest_option(bundle, tokenizer):
    for label in ("tiny_mc", "tiny_schema"):
        task = task_named(core_eval.load_tasks(str(bundle)), label)
        data = core_eval.load_task_data(str(bundle), task)
        for idx in range(len(data)):
            rows = core_eval.prepare_item(tokenizer, task, data, idx, max_len=1000)
            for favoured in range(rows.ids.size(0)):
                ok, pred = core_eval.score_item(task, rows, favouring(favoured)(rows.ids, rows.starts))
                assert pred == favoured and ok == (favoured == data[idx]["gold"])


def test_language_modeling_needs_every_continuation_token_as_the_argmax(bundle, tokenizer):
    task = task_named(core_eval.load_tasks(str(bundle)), "tiny_lm")
    data = core_eval.load_task_data(str(bundle), task)
    rows = core_eval.prepare_item(tokenizer, task, data, 0, max_len=1000)
    s, e = rows.starts[0], rows.ends[0]
    good = favouring(0)(rows.ids, rows.starts)
    assert core_eval.score_item(task, rows, good) == (True, None)
    context_wrong = good.clone()
    context_wrong[0, :s - 1] = 0  # the context's own predictions do not count
    assert core_eval.score_item(task, rows, context_wrong)[0]
    last_wrong = good.clone()
    last_wrong[0, e - 2, (rows.ids[0, e - 1] + 1) % 512] = 99.0  # the continuation's last token is not the argmax
    assert not core_eval.score_item(task, rows, last_wrong)[0]


def key(ids):
    return tuple(ids.shape), tuple(ids.flatten().tolist())


def test_evaluate_task_with_an_oracle_and_a_contrarian(bundle, tokenizer):
    """Over a whole task: a forward favouring the gold option scores 1, one favouring another option 0; the items
    of two ranks are disjoint and cover the task."""
    for task in core_eval.load_tasks(str(bundle)):
        data = core_eval.load_task_data(str(bundle), task)
        items = core_eval.prepare_task(tokenizer, task, data, max_len=64)
        assert sorted(core_eval.prepare_task(tokenizer, task, data, 64, rank=0, world_size=2)) == list(range(0, 8, 2))
        assert sorted(core_eval.prepare_task(tokenizer, task, data, 64, rank=1, world_size=2)) == list(range(1, 8, 2))
        gold = {key(r.ids): r.gold for r in items.values()}

        def oracle(ids, prompt_lens):
            return favouring(gold[key(ids)] or 0)(ids, prompt_lens)

        def contrarian(ids, prompt_lens):  # another option; language modeling: flat logits (argmax id 0 everywhere)
            if task.task_type == "language_modeling":
                return favouring(0, margin=0.0)(ids, prompt_lens)
            return favouring((gold[key(ids)] + 1) % ids.size(0))(ids, prompt_lens)

        assert core_eval.evaluate_task(oracle, task, items, len(data), torch.device("cpu")) == 1.0
        assert core_eval.evaluate_task(contrarian, task, items, len(data), torch.device("cpu")) == 0.0


def test_centered_accuracy_and_core():
    assert core_eval.centered_accuracy(0.25, 0.25) == 0.0
    assert core_eval.centered_accuracy(1.0, 0.25) == 1.0
    assert core_eval.centered_accuracy(0.625, 0.25) == pytest.approx(0.5)
    assert core_eval.centered_accuracy(0.4, 0.5) == pytest.approx(-0.2)  # below chance is negative
    assert core_eval.centered_accuracy(0.3, 0.0) == pytest.approx(0.3)
    assert core_eval.core_metric({"a": 0.5, "b": -0.2, "c": 0.3}) == pytest.approx(0.2)


def zip_bundle(bundle, path):
    with zipfile.ZipFile(path, "w") as z:
        for f in bundle.rglob("*"):
            z.write(f, os.path.join("eval_bundle", f.relative_to(bundle)))
    return path


def test_download_unpacks_atomically(bundle, tmp_path):
    url = zip_bundle(bundle, tmp_path / "eval_bundle.zip").as_uri()
    dest = tmp_path / "base" / "eval_bundle"
    assert core_eval.ensure_bundle(str(dest), url) == str(dest)
    assert [t.label for t in core_eval.load_tasks(str(dest))] == ["tiny_mc", "tiny_schema", "tiny_lm"]
    assert sorted(os.listdir(dest.parent)) == ["eval_bundle"]  # no .part file, no temporary directory left
    assert core_eval.ensure_bundle(str(dest), "http://127.0.0.1:1/never-fetched.zip") == str(dest)  # present: kept


def test_offline_and_absent_is_one_line_naming_the_fetch_command(tmp_path, monkeypatch):
    monkeypatch.setattr(core_eval, "EVAL_BUNDLE_URL", "http://127.0.0.1:1/eval_bundle.zip")  # refused at once
    dest = tmp_path / "eval_bundle"
    with pytest.raises(UserError, match=r"python -m scripts\.base_eval --download-only") as e:
        core_eval.ensure_bundle(str(dest))
    assert "\n" not in str(e.value) and os.listdir(tmp_path) == []
    not_a_zip = tmp_path / "page.html"
    not_a_zip.write_text("<html>login</html>")
    with pytest.raises(UserError, match="did not give a zip file"):
        core_eval.ensure_bundle(str(dest), not_a_zip.as_uri())
    assert os.listdir(tmp_path) == ["page.html"]
    dest.mkdir()
    (dest / "core.yaml").write_text("icl_tasks: []\n")
    with pytest.raises(UserError, match="lacks core.yaml, eval_meta_data.csv or eval_data"):
        core_eval.ensure_bundle(str(dest))

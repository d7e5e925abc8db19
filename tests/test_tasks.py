"""
The chat tasks (tasks/): every loader reads small files in the hub's real on-disk format (parquet written here
in each dataset's exact schema, placed where the cache keeps them, with the cached listing), every scorer
scores a right and a wrong answer, the offline and download-failure errors name the fetch command, the fetch
script downloads (through a stand-in for the hub's two calls) and a later offline run uses what it fetched, and
the calculator tool refuses what is not arithmetic. No network.
"""
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import tasks
from nanochat.common import UserError
from tasks import get_task, sft_mixture, TaskMixture, CHAT_EVAL_TASKS, RANDOM_BASELINE
from tasks.common import Task, render_mc
from tasks.gsm8k import solution_parts, extract_answer
from tasks.tools import calculator
from scripts import fetch_tasks

FIXTURES = Path(__file__).parent / "fixtures" / "tasks"

# the parquet schemas of the hub's exports (dataset cards' features: a Sequence of dicts is a struct of lists,
# a ClassLabel an int64, a list of dicts a list of structs)
ARC_SCHEMA = pa.schema([("id", pa.string()), ("question", pa.string()),
                        ("choices", pa.struct([("text", pa.list_(pa.string())), ("label", pa.list_(pa.string()))])),
                        ("answerKey", pa.string())])
MMLU_SCHEMA = pa.schema([("question", pa.string()), ("subject", pa.string()), ("choices", pa.list_(pa.string())),
                         ("answer", pa.int64())])
GSM8K_SCHEMA = pa.schema([("question", pa.string()), ("answer", pa.string())])
HUMANEVAL_SCHEMA = pa.schema([(c, pa.string()) for c in ("task_id", "prompt", "canonical_solution", "test", "entry_point")])
SMOLTALK_SCHEMA = pa.schema([("messages", pa.list_(pa.struct([("content", pa.string()), ("role", pa.string())]))),
                             ("source", pa.string())])

ARC_ROWS = [
    {"id": "q1", "question": "Which is a mammal?", "answerKey": "B",
     "choices": {"text": ["trout", "whale", "frog", "eagle"], "label": ["A", "B", "C", "D"]}},
    {"id": "q2", "question": "What melts ice?", "answerKey": "3",
     "choices": {"text": ["cold", "wind", "heat"], "label": ["1", "2", "3"]}},
    {"id": "q3", "question": "The Sun is a", "answerKey": "A",
     "choices": {"text": ["star", "planet", "moon", "comet", "asteroid"], "label": ["A", "B", "C", "D", "E"]}},
]
MMLU_ROWS = [
    {"question": "2 + 2 =", "subject": "elementary_mathematics", "choices": ["3", "4", "5", "6"], "answer": 1},
    {"question": "H2O is", "subject": "high_school_chemistry", "choices": ["water", "salt", "air", "gold"], "answer": 0},
]
GSM8K_ANSWER = ("Tom buys 3 packs of 4 pens, so he has 3*4 = <<3*4=12>>12 pens.\n"
                "He gives away 5, which leaves 12-5 = <<12-5=7>>7 pens.\n#### 7")
GSM8K_ROWS = [{"question": "Tom buys 3 packs of 4 pens and gives away 5. How many pens are left?", "answer": GSM8K_ANSWER},
              {"question": "What is 1,000 + 250?", "answer": "1,000 + 250 = <<1000+250=1250>>1,250\n#### 1,250"}]
HUMANEVAL_ROWS = [{"task_id": "HumanEval/0", "prompt": 'def add(a, b):\n    """Return the sum of a and b."""\n',
                   "canonical_solution": "    return a + b\n", "entry_point": "add",
                   "test": "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n"}]
SMOLTALK_ROWS = [
    {"messages": [{"content": "Hi", "role": "user"}, {"content": "Hello!", "role": "assistant"}], "source": "a"},
    {"messages": [{"content": "Be brief.", "role": "system"}, {"content": "Name a colour", "role": "user"},
                  {"content": "Red.", "role": "assistant"}], "source": "b"},
]


def write_split(base_dir, repo_id, config, split, rows, schema):
    """One split as the hub's parquet export lays it out in the cache, with the listing a fetch keeps."""
    repo_dir = Path(base_dir) / "task_data" / repo_id.replace("/", "--")
    name = f"{config}/{split}/0000.parquet"
    (repo_dir / name).parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), repo_dir / name)
    listing = repo_dir / "parquet_files.json"
    files = json.loads(listing.read_text())["files"] if listing.exists() else []
    listing.write_text(json.dumps({"repo_id": repo_id, "revision": "refs/convert/parquet", "files": sorted(set(files + [name]))}))


def write_url_files(base_dir):
    (Path(base_dir) / "task_data").mkdir(parents=True, exist_ok=True)
    for name in ("words_alpha.txt", "identity_conversations.jsonl"):
        shutil.copy(FIXTURES / name, Path(base_dir) / "task_data" / name)


def seeded_order(n):
    return [int(i) for i in np.random.default_rng(42).permutation(n)]


class Numbers(Task):
    name = "numbers"

    def __init__(self, n, tag="a", **view):
        super().__init__(**view)
        self.n, self.tag = n, tag

    def num_examples(self):
        return self.n

    def get_example(self, index):
        return (self.tag, index)


def test_task_view_slicing():
    assert [x for x in Numbers(10)] == [("a", i) for i in range(10)]
    view = Numbers(10, start=2, stop=9, step=3)  # 2, 5, 8
    assert len(view) == 3 and [view[i][1] for i in range(3)] == [2, 5, 8]
    assert len(Numbers(3, stop=100)) == 3  # a stop past the end is the end
    with pytest.raises(IndexError):
        view[3]
    for bad in ({"start": -1}, {"start": 5, "stop": 2}, {"step": 0}):
        with pytest.raises(ValueError):
            Numbers(10, **bad)
    with pytest.raises(NotImplementedError, match="no scorer"):
        Numbers(1).evaluate({}, "x")


def test_task_mixture_is_a_seeded_shuffle_with_repeats():
    a, b = Numbers(3, "a"), Numbers(5, "b")
    first = [TaskMixture([a, b, a], seed=7)[i] for i in range(11)]
    assert first == [TaskMixture([a, b, a], seed=7)[i] for i in range(11)]  # the same seed, the same order
    assert first != [TaskMixture([a, b, a], seed=8)[i] for i in range(11)]
    assert sorted(first) == sorted([("a", i) for i in range(3)] * 2 + [("b", i) for i in range(5)])
    assert first != sorted(first, key=lambda x: x[0] == "b")  # interleaved, not one task after the other
    mixture = TaskMixture([a, b], seed=7, start=1, step=2)
    assert [mixture.source_of(i).tag for i in range(len(mixture))] == [mixture[i][0] for i in range(len(mixture))]


def test_render_mc_layout():
    assert render_mc("Pick one", ["A", "B"], ["cat", "dog"]) == (
        "Multiple Choice question: Pick one\n- cat=A\n- dog=B\n\nRespond only with the letter of the correct answer.")


def test_arc_loads_the_export_and_scores_letters(base_dir):
    write_split(base_dir, "allenai/ai2_arc", "ARC-Easy", "test", ARC_ROWS, ARC_SCHEMA)
    write_split(base_dir, "allenai/ai2_arc", "ARC-Challenge", "test", ARC_ROWS[:1], ARC_SCHEMA)
    task = get_task("ARC-Easy")
    assert task.name == "ARC-Easy" and task.eval_type == "categorical" and len(task) == 3
    for i, row_index in enumerate(seeded_order(3)):  # nanochat's order: the seed-42 permutation of the rows
        row, conversation = ARC_ROWS[row_index], task[i]
        assert conversation["letters"] == row["choices"]["label"]
        assert conversation["messages"][0]["content"] == render_mc(row["question"], row["choices"]["label"],
                                                                   row["choices"]["text"])
        assert conversation["messages"][1] == {"role": "assistant", "content": row["answerKey"]}
        assert task.evaluate(conversation, row["answerKey"]) == 1
        wrong = next(letter for letter in conversation["letters"] if letter != row["answerKey"])
        assert task.evaluate(conversation, wrong) == 0 and task.reward(conversation, wrong) == 0.0
    assert len(get_task("ARC-Challenge")) == 1


def test_mmlu_loads_both_splits_and_scores_letters(base_dir):
    write_split(base_dir, "cais/mmlu", "all", "test", MMLU_ROWS, MMLU_SCHEMA)
    write_split(base_dir, "cais/mmlu", "all", "auxiliary_train", MMLU_ROWS * 2, MMLU_SCHEMA)
    task = get_task("MMLU", "test")
    by_question = {task[i]["messages"][0]["content"]: task[i] for i in range(len(task))}
    conversation = by_question[render_mc("2 + 2 =", "ABCD", ["3", "4", "5", "6"])]
    assert conversation["letters"] == ["A", "B", "C", "D"] and conversation["subject"] == "elementary_mathematics"
    assert conversation["messages"][1]["content"] == "B"
    assert task.evaluate(conversation, "B") == 1 and task.evaluate(conversation, "C") == 0
    assert len(get_task("MMLU", "auxiliary_train")) == 4


def test_gsm8k_renders_calculator_calls_and_scores_the_final_number(base_dir):
    parts = solution_parts(GSM8K_ANSWER)
    assert parts == [
        {"type": "text", "text": "Tom buys 3 packs of 4 pens, so he has 3*4 = "},
        {"type": "python", "text": "3*4"}, {"type": "python_output", "text": "12"},
        {"type": "text", "text": "12 pens.\nHe gives away 5, which leaves 12-5 = "},
        {"type": "python", "text": "12-5"}, {"type": "python_output", "text": "7"},
        {"type": "text", "text": "7 pens.\n#### 7"},
    ]
    write_split(base_dir, "openai/gsm8k", "main", "test", GSM8K_ROWS, GSM8K_SCHEMA)
    task = get_task("GSM8K")
    assert task.eval_type == "generative" and len(task) == 2
    for conversation in task:
        content = conversation["messages"][1]["content"]
        for call, output in zip(content, content[1:]):  # the tool reproduces every annotated result
            if call["type"] == "python":
                assert calculator(call["text"]) == output["text"].replace(",", "")
        truth = extract_answer(content[-1]["text"])
        assert task.evaluate(conversation, f"Working... so the answer is\n#### {truth}") == 1
        assert task.reward(conversation, f"#### {truth}") == 1.0
        assert task.evaluate(conversation, "#### 99") == 0
        assert task.evaluate(conversation, f"the answer is {truth}") == 0  # no "####": no answer
    assert extract_answer("#### 1,250 pens") == "1250" and extract_answer("#### -3.5") == "-3.5"


def test_humaneval_runs_right_and_wrong_solutions_in_the_sandbox(base_dir):
    write_split(base_dir, "openai/openai_humaneval", "openai_humaneval", "test", HUMANEVAL_ROWS, HUMANEVAL_SCHEMA)
    task = get_task("HumanEval")
    conversation = task[0]
    assert conversation["entry_point"] == "add" and conversation["task_id"] == "HumanEval/0"
    assert task.evaluate(conversation, conversation["messages"][1]["content"]) == 1  # the canonical solution
    assert task.evaluate(conversation, "    return a + b") == 1  # a body continuing the prompt
    assert task.evaluate(conversation, "Here:\n```python\ndef add(a, b):\n    return b + a\n```\nDone.") == 1
    assert task.evaluate(conversation, "def add(a, b):\n    return a - b") == 0


def test_spelling_tasks_are_seeded_and_scored(base_dir):
    write_url_files(base_dir)
    bee = get_task("SpellingBee")  # test split, nanochat's eval size
    assert len(bee) == 256 and bee.eval_type == "generative"
    assert [bee[i] for i in range(5)] == [get_task("SpellingBee")[i] for i in range(5)]
    assert bee[0] != get_task("SpellingBee", "train", size=10)[0]  # the splits draw from different seeds
    for conversation in [bee[i] for i in range(20)]:
        parts = conversation["messages"][1]["content"]
        call, output = parts[2], parts[3]
        assert call["type"] == "python" and output["type"] == "python_output"
        assert calculator(call["text"]) == output["text"]  # 'word'.count('letter') runs in the tool
        assert parts[-1]["text"].endswith(f"#### {output['text']}")
        assert bee.evaluate(conversation, f"#### {output['text']}") == 1
        assert bee.evaluate(conversation, f"#### {int(output['text']) + 1}") == 0
    spell = get_task("SimpleSpelling", "train", size=50)
    assert len(spell) == 50
    conversation = spell[3]
    word = conversation["messages"][0]["content"].removeprefix("Spell the word: ")
    assert conversation["messages"][1]["content"] == f"{word}:{','.join(word)}"
    assert spell.evaluate(conversation, f" {word}:{','.join(word)}\n") == 1
    assert spell.evaluate(conversation, f"{word}:{word}") == 0


def test_smoltalk_rows_become_conversations(base_dir):
    bad = {"messages": [{"content": "a", "role": "user"}, {"content": "b", "role": "user"}], "source": "c"}
    write_split(base_dir, "HuggingFaceTB/smol-smoltalk", "default", "train", SMOLTALK_ROWS + [bad], SMOLTALK_SCHEMA)
    task = get_task("SmolTalk", "train")
    order = seeded_order(3)
    for i, row_index in enumerate(order):
        if row_index == 2:
            with pytest.raises(ValueError, match=r"SmolTalk train row 2: message 1 has role 'user'"):
                task[i]
        else:
            expected = [{"role": m["role"], "content": m["content"]} for m in SMOLTALK_ROWS[row_index]["messages"]]
            assert task[i] == {"messages": expected}


def test_identity_and_local_conversations(base_dir, tmp_path):
    write_url_files(base_dir)
    identity = get_task("Identity", "train")
    assert len(identity) == 3 and identity[1]["messages"][2]["content"] == "Can you browse the web?"
    path = tmp_path / "chats.jsonl"
    parts = [{"type": "text", "text": "2+2 is "}, {"type": "python", "text": "2+2"},
             {"type": "python_output", "text": "4"}, {"type": "text", "text": "4."}]
    good = [json.dumps({"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": parts}]}),
            json.dumps([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}])]
    path.write_text("\n".join(good) + "\n\n")
    local = get_task("Conversations", "train", path=str(path))
    assert len(local) == 2 and local[0]["messages"][1]["content"] == parts
    cases = [('{"messages": [', "not valid JSON"),
             (json.dumps([{"role": "user", "content": "hi"}]), "at least one user and one assistant"),
             (json.dumps([{"role": "assistant", "content": "x"}, {"role": "user", "content": "y"}]), "message 0 has role"),
             (json.dumps([{"role": "user", "content": "q"}, {"role": "assistant", "content": [{"type": "code", "text": "x"}]}]),
              "part 0 must be")]
    for bad_line, problem in cases:
        path.write_text("\n".join(good + [bad_line]) + "\n")
        with pytest.raises(UserError) as excinfo:
            get_task("Conversations", path=str(path))
        assert str(excinfo.value).startswith(f"{path}:3: ") and problem in str(excinfo.value)
    with pytest.raises(UserError, match="does not exist"):
        get_task("Conversations", path=str(tmp_path / "missing.jsonl"))


def test_exact_answers_scores_the_last_assistant_turn(tmp_path):
    path = tmp_path / "sums.jsonl"
    rows = [[{"role": "user", "content": "sum:1,2"}, {"role": "assistant", "content": "3"}],
            [{"role": "user", "content": "sum:4,4"}, {"role": "assistant", "content": " 8\n"}]]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    task = get_task("ExactAnswers", path=str(path))
    assert task.name == "sums" and len(task) == 2 and task.eval_type == "generative"
    assert [task.evaluate(task[0], c) for c in ("3", " 3\n", "33", "3.", "")] == [1, 1, 0, 0, 0]
    assert task.evaluate(task[1], "8") == 1 and task.reward(task[1], "9") == 0.0
    parts = [{"type": "text", "text": "3"}]
    for last, problem in (([{"role": "user", "content": "q"}, {"role": "assistant", "content": parts}], "conversation 2"),):
        path.write_text(json.dumps(rows[0]) + "\n" + json.dumps(last) + "\n")
        with pytest.raises(UserError, match=problem + " must end with an assistant message"):
            get_task("ExactAnswers", path=str(path))


def test_offline_without_cache_names_the_fetch_command(base_dir, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for name, split in (("MMLU", "test"), ("SpellingBee", "test"), ("Identity", "train")):
        with pytest.raises(UserError) as excinfo:
            get_task(name, split)
        message = str(excinfo.value)
        assert "\n" not in message and f"`python -m scripts.fetch_tasks {name}`" in message
        assert "HF_HUB_OFFLINE=1" in message


def test_failed_download_names_the_fetch_command(base_dir, monkeypatch, tmp_path):
    import huggingface_hub
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)

    def unreachable(self, *args, **kwargs):
        raise ConnectionError("Name or service not known")
    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", unreachable)
    with pytest.raises(UserError, match=r"the download failed \(ConnectionError.*`python -m scripts.fetch_tasks GSM8K`"):
        get_task("GSM8K")
    monkeypatch.setattr(tasks.spelling.WORD_LIST, "url", (tmp_path / "nowhere.txt").as_uri())
    with pytest.raises(UserError, match=r"download failed .*`python -m scripts.fetch_tasks SimpleSpelling`"):
        get_task("SimpleSpelling", "train")


def test_fetch_script_downloads_then_offline_runs_use_the_cache(base_dir, monkeypatch, capsys):
    import huggingface_hub
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    export = ["ARC-Challenge/test/0000.parquet"] + [f"ARC-Easy/{s}/0000.parquet" for s in ("train", "validation", "test")]
    calls = []

    def list_repo_files(self, repo_id, repo_type=None, revision=None):
        assert (repo_id, repo_type, revision) == ("allenai/ai2_arc", "dataset", "refs/convert/parquet")
        return export + [".gitattributes"]

    def hf_hub_download(repo_id, filename, repo_type=None, revision=None, local_dir=None):
        assert (repo_type, revision) == ("dataset", "refs/convert/parquet")
        calls.append(filename)
        path = Path(local_dir) / filename
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_pylist(ARC_ROWS, schema=ARC_SCHEMA), path)
        return str(path)
    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", list_repo_files)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hf_hub_download)
    fetch_tasks.main(["ARC-Easy"])
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("ARC-Easy |")]
    assert sorted(calls) == sorted(export[1:])  # every split of ARC-Easy, nothing of ARC-Challenge
    assert len(lines) == 3 and all("downloaded" in line for line in lines)

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert len(get_task("ARC-Easy", "validation")) == 3
    fetch_tasks.main(["ARC-Easy"])
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("ARC-Easy |")]
    assert len(lines) == 3 and all(line.endswith("| cached") for line in lines) and len(calls) == 3
    with pytest.raises(UserError, match="fetch_tasks ARC-Challenge"):  # listed, but never downloaded
        get_task("ARC-Challenge")


def test_names_and_splits_are_checked_in_one_line(base_dir):
    with pytest.raises(UserError, match="unknown task 'Nope'; tasks: ARC-Easy, ARC-Challenge, MMLU"):
        get_task("Nope")
    with pytest.raises(UserError, match="MMLU has no split 'train'; its splits: auxiliary_train, dev, validation, test"):
        get_task("MMLU", "train")
    with pytest.raises(UserError, match="nothing to fetch for Nope, Conversations; tasks with data: ARC-Easy"):
        fetch_tasks.main(["Nope", "Conversations"])
    with pytest.raises(UserError, match="the SFT mixture has no split 'test'"):
        sft_mixture("test")
    assert list(RANDOM_BASELINE) == CHAT_EVAL_TASKS


def test_sft_mixture_is_nanochats(base_dir):
    write_url_files(base_dir)
    write_split(base_dir, "HuggingFaceTB/smol-smoltalk", "default", "train", SMOLTALK_ROWS, SMOLTALK_SCHEMA)
    write_split(base_dir, "HuggingFaceTB/smol-smoltalk", "default", "test", SMOLTALK_ROWS, SMOLTALK_SCHEMA)
    write_split(base_dir, "cais/mmlu", "all", "auxiliary_train", MMLU_ROWS, MMLU_SCHEMA)
    write_split(base_dir, "cais/mmlu", "all", "test", MMLU_ROWS, MMLU_SCHEMA)
    write_split(base_dir, "openai/gsm8k", "main", "train", GSM8K_ROWS, GSM8K_SCHEMA)
    write_split(base_dir, "openai/gsm8k", "main", "test", GSM8K_ROWS, GSM8K_SCHEMA)
    train = sft_mixture("train")
    # SmolTalk 2 + Identity 3 x 2 + MMLU 2 x 3 + GSM8K 2 x 4 + SimpleSpelling 200K + SpellingBee 80K
    assert len(train) == 2 + 6 + 6 + 8 + 200_000 + 80_000
    assert sorted({task.name for task in train.tasks}) == sorted(tasks.SFT_TASKS)
    assert len(sft_mixture("train", mmlu_epochs=1, gsm8k_epochs=0)) == 2 + 6 + 2 + 280_000
    val = sft_mixture("val")
    assert len(val) == 2 + 2 + 2 and all(val[i]["messages"] for i in range(len(val)))


def test_calculator_does_arithmetic_only():
    for expression, result in [("12/60", "0.2"), ("0.2*50", "10"), ("1,000*3", "3000"), ("2**10", "1024"),
                               ("(7 - 2) * -3", "-15"), ("7 // 2", "3"), ("7 % 3", "1"), ("2**-2", "0.25"),
                               ("1/3", "0.3333333333"), ("'strawberry'.count('r')", "3")]:
        assert calculator(expression) == result, expression
    for refused in ["x + 1", "abs(-1)", "__import__('os').system('true')", "(1).__class__", "'ab' * 3",
                    "'abc'.upper()", "word.count('a')", "[1, 2][0]", "lambda: 1", "2**100000", "10**10**10",
                    "9**9**9", "1/0", "(-8)**0.5", "1e308*10", "True + 1", "1" * 300, "", "1 +"]:
        assert calculator(refused) is None, refused

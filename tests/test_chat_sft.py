"""
scripts/chat_sft and nanochat/chat_data on CPU: conversations packed into rows with the loss on the assistant's tokens
only, an exact resume of the stream, SFT of a tiny adaptive hybrid (widths, distillation, gates, router) and of a dense
GPT, and the inputs that must stop it.
"""
import json
import random

import pytest
import torch

from nanochat.checkpoint_manager import load_model, load_meta, find_last_step
from nanochat.chat_data import conversation_loader, conversation_rows
from nanochat.common import UserError
from nanochat.tokenizer import Tokenizer
from scripts import chat_sft
from scripts import surgery as surgery_cli
from test_fractal_train import write_tiny_gpt

T, B = 32, 2


def make_conversations(n, seed=0):
    rng = random.Random(seed)
    out = []
    for i in range(n):
        a, b = rng.randrange(10), rng.randrange(10)
        msgs = [{"role": "user", "content": f"add {a} {b}"}, {"role": "assistant", "content": f"{a + b}"}]
        if i % 3 == 0:  # some two-turn ones
            msgs += [{"role": "user", "content": "again"}, {"role": "assistant", "content": f"{a + b}!"}]
        out.append({"messages": msgs})
    return out


def write_jsonl(path, convs):
    path.write_text("".join(json.dumps(c) + "\n" for c in convs))
    return path


@pytest.fixture(scope="module")
def tok(tiny_data):
    return Tokenizer.from_directory(tiny_data["tokenizer_dir"])


def test_rows_carry_loss_on_assistant_tokens_only(tok):
    convs = make_conversations(12)
    rows = conversation_rows(tok, convs, T)
    # every target that is not -1 is a token the assistant wrote, and every such token is a target exactly once
    written = []
    for c in convs:
        ids, mask = tok.render_conversation(c, max_tokens=T + 1)
        written += [t for t, m in zip(ids, mask) if m]
    targets = [t for _, y in rows for t in y if t != -1]
    assert targets == written
    assistant_end = tok.encode_special("<|assistant_end|>")
    assert targets.count(assistant_end) == sum(len(c["messages"]) // 2 for c in convs)
    for x, y in rows:
        assert len(x) == len(y) == T
        for t in range(T - 1):  # inputs are the row's tokens: the target at t is the input at t + 1
            if y[t] != -1:
                assert x[t + 1] == y[t]


def test_loader_resumes_exactly_and_splits_ranks(tok):
    convs = make_conversations(40)
    ref = conversation_loader(tok, convs, B, T)
    batches = [next(ref) for _ in range(6)]
    resumed = conversation_loader(tok, convs, B, T, resume_state=batches[2][2])
    for want in batches[3:]:
        got = next(resumed)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]) and got[2] == want[2]
    # one epoch, two data ranks: together they read every conversation's assistant tokens once
    seen = []
    for r in range(2):
        for x, y, _ in conversation_loader(tok, convs, 1, T, rank=r, world_size=2, epochs=1):
            seen += [t for t in y[0].tolist() if t != -1]
    assert sorted(seen) == sorted(t for c in convs for t, m in zip(*tok.render_conversation(c, T + 1)) if m)
    with pytest.raises(ValueError, match="exact resume"):
        next(conversation_loader(tok, convs[:-1], B, T, resume_state=batches[2][2]))
    with pytest.raises(ValueError, match="fewer than B"):
        next(conversation_loader(tok, convs[:1], 8, T, epochs=1))


def test_jsonl_errors_name_the_line(models, tmp_path):
    """--data is read by the tasks package's conversation reader: a bad line stops chat_sft, before the model loads,
    with the file and line; nanochat's identity layout (a bare list of messages) is accepted."""
    p = tmp_path / "c.jsonl"
    p.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\nnot json\n')
    args = [a for a in sft_args(models, "hybrid", tmp_path / "out", 1) if not a.startswith("--data=")]
    with pytest.raises(UserError, match=r"c.jsonl:2: not valid JSON"):
        chat_sft.main(args + [f"--data={p}"])
    assert not (tmp_path / "out").exists()
    p.write_text('[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]\n')  # nanochat identity
    val = chat_sft.conversations(chat_sft.get_args(args + [f"--data={p}", f"--val-data={p}"]), "val")
    assert val[0]["messages"][1]["content"] == "yo"


@pytest.fixture(scope="module")
def models(tiny_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("sft")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NANOCHAT_BASE_DIR", str(root / "base"))
        torch.set_num_threads(1)
        write_tiny_gpt(root / "gpt", tiny_data)
        surgery_cli.main([f"--src={root / 'gpt'}", f"--dst={root / 'hybrid'}", "--new-dim=64", "--width-levels=32,64",
                          "--adaptive", "--d-state=8"])
    data = write_jsonl(root / "chats.jsonl", make_conversations(200))
    return {"root": root, "data": data}


def sft_args(models, checkpoint, out, steps, *extra):
    return [f"--checkpoint={models['root'] / checkpoint}", f"--out-dir={out}", f"--data={models['data']}", "--device=cpu",
            f"--num-iterations={steps}", f"--device-batch-size={B}", f"--max-seq-len={T}", "--eval-every=3", *extra]


def test_sft_of_an_adaptive_hybrid_trains_widths_and_controllers(models, tmp_path, capsys, report_dir):
    res = chat_sft.main(sft_args(models, "hybrid", tmp_path / "a", 3))
    stage = json.loads(next(report_dir.glob("*_chat_sft.json")).read_text())  # the run report's stage
    assert stage["checkpoint"] == str(tmp_path / "a") and stage["val"]["bpb_w64"] == res["val"][3]["bpb_w64"]
    out = capsys.readouterr().out
    assert "scripts.chat_sft phase sft" in out and "gate" in out and "router" in out and "kl" in out
    # every width level and the router's plan were evaluated on the held-out conversations
    val = res["val"][3]
    assert {"bpb_w32", "bpb_w64", "bpb_pred", "exit_rate"} <= set(val)
    meta = load_meta(str(tmp_path / "a"), 3)
    assert meta["phase"] == "sft" and meta["user_args"]["data"] == str(models["data"])
    before, _ = load_model(str(models["root"] / "hybrid"))
    after, _ = load_model(str(tmp_path / "a"))
    moved = {n for n, p in after.named_parameters() if not torch.equal(p, dict(before.named_parameters())[n])}
    assert any("controllers" in n for n in moved) and any(".mamba." in n for n in moved) and any(".attn." in n for n in moved)
    # resume: two more steps from step 3 equal a run of 5 from the start
    whole = chat_sft.main(sft_args(models, "hybrid", tmp_path / "b", 5))
    chat_sft.main(sft_args(models, "hybrid", tmp_path / "c", 3, "--save-every=3"))
    resumed = chat_sft.main(sft_args(models, "hybrid", tmp_path / "c", 5, "--resume"))
    assert resumed["loss"] == whole["loss"][3:]
    a, _ = load_model(str(tmp_path / "b"))
    b, _ = load_model(str(tmp_path / "c"))
    for (n, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), n


def test_sft_switches_and_a_dense_gpt(models, tmp_path, capsys):
    res = chat_sft.main(sft_args(models, "hybrid", tmp_path / "plain", 2, "--no-matryoshka", "--no-controllers"))
    out = capsys.readouterr().out
    assert "router" not in out and "kl" not in out and all(len(labels) == 1 for labels in res["plan_labels"])
    dense = chat_sft.main(sft_args(models, "gpt", tmp_path / "dense", 2))
    assert dense["plan_labels"][0] == ["full"] and "bpb" in dense["val"][2]
    assert find_last_step(str(tmp_path / "dense")) == 2
    with pytest.raises(ValueError, match="dense"):
        chat_sft.main(sft_args(models, "gpt", tmp_path / "x", 1, "--matryoshka"))
    with pytest.raises(ValueError, match="conversations"):
        chat_sft.main(sft_args(models, "hybrid", tmp_path / "y", 1, "--continue-data"))


@pytest.mark.slow  # 2 gloo processes
def test_two_gloo_processes_equal_one_process(models, tmp_path):
    """2 ranks x 1 micro-batch against 1 rank x 2 micro-batches of the same 2 conversation shards (--data-ranks=2), as
    fractal_train's test (not bitwise: sums in another order; --no-distill for the reason given there)."""
    from test_fractal_train import parse_losses, state_of, max_diff
    from testutil import torchrun2
    args = ["--eval-every=-1", "--data-ranks=2", f"--total-batch-size={2 * B * T}", "--no-distill"]
    one = chat_sft.main(sft_args(models, "hybrid", tmp_path / "one", 3, *args))
    two = parse_losses(torchrun2("scripts.chat_sft", *sft_args(models, "hybrid", tmp_path / "two", 3, *args)))
    assert len(two) == 3 and max(abs(a - b) for a, b in zip(one["loss"], two)) < 1e-5, (one["loss"], two)
    assert max_diff(state_of(tmp_path / "one")[0], state_of(tmp_path / "two")[0]) < 1e-4


def test_sft_on_nanochats_mixture_by_default(models, tmp_path, monkeypatch):
    """Without --data: nanochat's SFT mixture (train) and its val split, read from the hub exports' cache (fixture files
    in their real schemas, as tests/test_tasks.py writes them)."""
    from test_tasks import (write_split, write_url_files, SMOLTALK_ROWS, SMOLTALK_SCHEMA, MMLU_ROWS, MMLU_SCHEMA,
                            GSM8K_ROWS, GSM8K_SCHEMA)
    base = tmp_path / "base"
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(base))
    write_url_files(base)
    for split in ("train", "test"):
        write_split(base, "HuggingFaceTB/smol-smoltalk", "default", split, SMOLTALK_ROWS, SMOLTALK_SCHEMA)
        write_split(base, "openai/gsm8k", "main", split, GSM8K_ROWS, GSM8K_SCHEMA)
    for split in ("auxiliary_train", "test"):
        write_split(base, "cais/mmlu", "all", split, MMLU_ROWS, MMLU_SCHEMA)
    args = [a for a in sft_args(models, "hybrid", tmp_path / "mix", 2, "--eval-every=2") if not a.startswith("--data=")]
    res = chat_sft.main(args)
    assert res["last_step"] == 2 and "bpb_w64" in res["val"][2]
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path / "empty"))
    with pytest.raises(Exception, match="fetch_tasks"):  # nothing cached, offline: the one line names the fetch
        chat_sft.main([a for a in args if not a.startswith("--out-dir")] + [f"--out-dir={tmp_path / 'none'}"])

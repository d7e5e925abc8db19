"""
scripts/chat_eval on CPU: the categorical pick is the model's own highest letter logit at the mode's plan, the compute
fraction is the engine's count (1 at think, below 1 narrower), a python tool call is answered and generation goes on,
and the script end to end on fixture tasks in the hub's on-disk format (table, JSON, plot, one-line errors).
"""
import json

import pytest
import torch

from nanochat.checkpoint_manager import save_checkpoint, copy_tokenizer_files, load_model_and_tokenizer
from nanochat.engine import Engine
from nanochat.gpt import GPT, GPTConfig
from nanochat.matryoshka import mode_plan
from scripts import chat_eval
from scripts import surgery as surgery_cli
from tasks import get_task
from test_tasks import write_split, ARC_ROWS, ARC_SCHEMA, GSM8K_ROWS, GSM8K_SCHEMA


@pytest.fixture(scope="module")
def checkpoints(tiny_data, tmp_path_factory):
    """A tiny dense GPT with a context long enough for the fixture prompts, and an adaptive hybrid made from it."""
    root = tmp_path_factory.mktemp("chat_eval")
    torch.manual_seed(0)
    config = GPTConfig(sequence_len=256, vocab_size=tiny_data["vocab_size"], n_layer=2, n_head=2, n_kv_head=2, n_embd=64)
    model = GPT(config)
    model.init_weights()
    with torch.no_grad():
        for p in model.parameters():
            if p.abs().sum() == 0:
                p.normal_(0, 0.05)
    save_checkpoint(root / "gpt", 0, model.state_dict(), {"model_config": config.to_dict(), "step": 0})
    copy_tokenizer_files(tiny_data["tokenizer_dir"], root / "gpt")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NANOCHAT_BASE_DIR", str(root / "base"))
        surgery_cli.main([f"--src={root / 'gpt'}", f"--dst={root / 'hybrid'}", "--new-dim=64", "--width-levels=32,64",
                          "--adaptive", "--d-state=8"])
    return root


@pytest.fixture
def task_data(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    write_split(tmp_path, "allenai/ai2_arc", "ARC-Easy", "test", ARC_ROWS, ARC_SCHEMA)
    write_split(tmp_path, "openai/gsm8k", "main", "test", GSM8K_ROWS, GSM8K_SCHEMA)
    return tmp_path


def test_categorical_pick_is_the_models_letter_logit(checkpoints, task_data):
    model, tokenizer, _ = load_model_and_tokenizer(str(checkpoints / "hybrid"))
    model.eval()
    engine, task = Engine(model), get_task("ARC-Easy")
    narrow = [32] * model.config.n_layer  # (every named mode is full width on a 64-wide model: ghost snaps to 64)
    for mode in (narrow, "think"):
        r = chat_eval.evaluate_task(engine, tokenizer, task, mode, list(range(len(task))))
        plan = mode if mode == narrow else mode_plan(mode, model.config.width_levels, model.config.n_layer)
        expect = []
        for i in range(len(task)):
            conv = task[i]
            ids = torch.tensor([tokenizer.render_for_completion(conv)])
            with torch.no_grad():
                logits = model(ids, width=plan)[0, -1]
            letter_ids = [tokenizer.encode(letter)[0] for letter in conv["letters"]]
            expect.append(int(conv["letters"][int(logits[letter_ids].argmax())] == conv["messages"][-1]["content"]))
        assert r["correct"] == expect and r["n"] == len(task) and r["skipped"] == 0
        assert r["accuracy"] == sum(expect) / len(expect)
        if mode == "think":
            assert r["compute_fraction"] == pytest.approx(1.0)
        else:
            assert r["compute_fraction"] < 0.9


class ScriptedEngine:
    """An engine whose generations are given: each call returns the next scripted tokens (and records its prompts)."""

    def __init__(self, model, scripts):
        self.inner, self.scripts, self.prompts = Engine(model), list(scripts), []

    def generate_batch(self, prompts, max_tokens, stop_tokens=(), **kwargs):
        self.prompts.append([list(p) for p in prompts])
        script = self.scripts.pop(0)
        self.inner.generate_batch = Engine.generate_batch.__get__(self.inner)
        real_generate = self.inner.generate

        def forced(prompts_, max_tokens_, **kw):  # the engine's own steps, with the scripted tokens put in
            for k, step in enumerate(real_generate(prompts_, len(script), **{**kw, "stop_tokens": ()})):
                step.tokens[:] = [script[k]] * len(prompts_)
                yield step
                if script[k] in stop_tokens:
                    return
        self.inner.generate = forced
        return self.inner.generate_batch(prompts, max_tokens, stop_tokens=stop_tokens, **kwargs)

    def release(self):
        self.inner.release()


def test_a_tool_call_is_answered_and_generation_goes_on(checkpoints):
    model, tokenizer, _ = load_model_and_tokenizer(str(checkpoints / "hybrid"))
    sp = tokenizer.encode_special
    call = [sp("<|python_start|>")] + tokenizer.encode("3*4") + [sp("<|python_end|>")]
    tail = tokenizer.encode("12") + [sp("<|assistant_end|>")]
    engine = ScriptedEngine(model, [call, tail])
    prompt = tokenizer.render_for_completion({"messages": [{"role": "user", "content": "3*4?"},
                                                           {"role": "assistant", "content": "x"}]})
    (ids, flops, full), = chat_eval.generate_turns(engine, tokenizer, [prompt], "think", 32, tool=lambda e: str(eval(e)))
    output = [sp("<|output_start|>")] + tokenizer.encode("12") + [sp("<|output_end|>")]
    assert ids == call + output + tokenizer.encode("12")  # the stop token ends the turn and is not part of it
    assert engine.prompts[1] == [prompt + call + output]  # the second round starts after the tool's output
    assert flops == pytest.approx(full) and full > 0


def test_script_end_to_end(checkpoints, task_data, tmp_path, capsys, report_dir):
    out_json, png = tmp_path / "r.json", tmp_path / "r.png"
    res = chat_eval.main([f"--checkpoint={checkpoints / 'hybrid'}", "--tasks=ARC-Easy,GSM8K", "--modes=ghost,think,auto",
                          "--max-new-tokens=6", "--device=cpu", f"--out-json={out_json}", f"--plot={png}"])
    text = capsys.readouterr().out
    assert "ARC-Easy" in text and "GSM8K" in text and png.stat().st_size > 1000
    on_disk = json.loads(out_json.read_text())
    assert on_disk["tasks"] == res["tasks"] and set(on_disk["tasks"]["GSM8K"]) == {"ghost", "think", "auto"}
    assert on_disk["chatcore"] == {}  # not every benchmark ran
    assert on_disk["tasks"]["ARC-Easy"]["think"]["compute_fraction"] == pytest.approx(1.0)
    assert json.loads(text.strip().splitlines()[-2]) == res or json.loads(text.strip().splitlines()[-3]) == res
    stage = json.loads(next(report_dir.glob("*_chat_eval.json")).read_text())  # the run report's stage
    assert stage["tasks"] == res["tasks"] and stage["provenance"]["command"]
    with pytest.raises(ValueError, match="do not run on this checkpoint"):
        chat_eval.main([f"--checkpoint={checkpoints / 'gpt'}", "--tasks=ARC-Easy", "--modes=auto", "--device=cpu"])
    dense = chat_eval.main([f"--checkpoint={checkpoints / 'gpt'}", "--tasks=ARC-Easy", "--device=cpu"])
    assert list(dense["tasks"]["ARC-Easy"]) == ["think"]


def test_local_files_are_scored_by_exact_match(checkpoints, tmp_path):
    """--data: each file a task named after it; the accuracy is the share of conversations whose reference is the
    model's own greedy turn at the mode (references here: the think turn for the first two, something else after)."""
    model, tokenizer, _ = load_model_and_tokenizer(str(checkpoints / "hybrid"))
    model.eval()
    questions = [f"sum:{a},{b}" for a, b in ((1, 2), (3, 4), (5, 6), (7, 8))]
    convs = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": "?"}]} for q in questions]
    prompts = [tokenizer.render_for_completion(c) for c in convs]
    turns = chat_eval.generate_turns(Engine(model), tokenizer, prompts, "think", 5, batch_size=2)
    refs = [tokenizer.decode(ids).strip() for ids, _, _ in turns]
    refs[2:] = [r + "x" for r in refs[2:]]
    path = tmp_path / "mine.jsonl"
    path.write_text("".join(json.dumps([c["messages"][0], {"role": "assistant", "content": r}]) + "\n"
                            for c, r in zip(convs, refs)))
    res = chat_eval.main([f"--checkpoint={checkpoints / 'hybrid'}", f"--data={path}", "--modes=think,auto",
                          "--max-new-tokens=5", "--batch-size=2", "--device=cpu"])
    assert list(res["tasks"]) == ["mine"] and res["tasks"]["mine"]["think"]["accuracy"] == 0.5
    assert res["tasks"]["mine"]["think"]["n"] == 4 and res["chatcore"] == {}
    with pytest.raises(ValueError, match="already evaluated"):
        chat_eval.main([f"--checkpoint={checkpoints / 'hybrid'}", f"--data={path},{path}", "--device=cpu"])
    with pytest.raises(ValueError, match="nothing to evaluate"):
        chat_eval.main([f"--checkpoint={checkpoints / 'hybrid'}", "--data=,", "--device=cpu"])


def test_each_engine_batch_samples_from_its_own_seed(checkpoints):
    """Two batches of one call (same prompt length) must not draw alike at temperature > 0: distinct seeds."""
    model, tokenizer, _ = load_model_and_tokenizer(str(checkpoints / "hybrid"))
    engine, seeds = Engine(model), []
    real = engine.generate_batch

    def recording(prompts, max_tokens, **kw):
        seeds.append(kw["seed"])
        return real(prompts, max_tokens, **kw)
    engine.generate_batch = recording
    prompt = tokenizer.render_for_completion({"messages": [{"role": "user", "content": "hi"},
                                                           {"role": "assistant", "content": "x"}]})
    chat_eval.generate_turns(engine, tokenizer, [prompt] * 3, "think", 3, temperature=1.0, seed=5, batch_size=1)
    assert len(seeds) == 3 and len(set(seeds)) == 3 and seeds[0] == 5

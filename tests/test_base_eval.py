"""
nanochat/mode_eval.py (teacher-forced forwards per compute mode) on a tiny hybrid, and scripts/base_eval end to end
on saved checkpoints (a hybrid with controllers, a dense GPT) with the fixture CORE bundle of test_core_eval and
the tiny corpus's val split for --bpb.
"""
import json

import pytest
import torch
import torch.nn.functional as F

from nanochat import core_eval
from nanochat.common import UserError, is_user_error, run_script
from nanochat.engine import Engine
from nanochat.gpt import GPT, GPTConfig
from nanochat.hybrid_gpt import HybridGPT, HybridConfig
from nanochat.checkpoint_manager import load_model, save_model, copy_tokenizer_files
from nanochat.dataloader import tokenizing_distributed_data_loader
from nanochat.loss_eval import evaluate_bpb
from nanochat.matryoshka import MODES
from nanochat.mode_eval import mode_plan, mode_logits, mode_loss, default_modes
from nanochat.tokenizer import Tokenizer, compute_token_bytes
from scripts import base_eval
from testutil import fill_zero_matrices, write_hybrid_checkpoint, torchrun2
from test_core_eval import write_bundle, TASKS

T, P = 24, 10  # sequence and prompt length of the mode_plan tests


@pytest.fixture(scope="module")
def hybrid():
    """testutil's checkpoint hybrid (levels 64/128/256: ghost = 128, whisper and normal snap to full width) with a
    router of random weights, so that its plan depends on the prompt."""
    config = HybridConfig(sequence_len=32, vocab_size=512, n_layer=4, n_head=4, n_kv_head=2, n_embd=256,
                          layer_pattern="AM", ffn_pattern="DD", d_state=8, width_levels=[64, 128, 256], gate_hidden=16,
                          predictor_hidden=16)
    model = HybridGPT(config)
    model.init_weights()
    g = torch.Generator().manual_seed(0)
    fill_zero_matrices(model, 0.3, g)
    with torch.no_grad():
        for p in (model.controllers.predictor.fc.weight, model.controllers.predictor.out.weight):
            p.copy_(torch.randn(p.shape, generator=g) * 3.0)
    return model.eval()


def ids(n, seed, T=T):
    return torch.randint(0, 500, (n, T), generator=torch.Generator().manual_seed(seed))


def test_fixed_modes_snap_to_the_levels_and_cost_less_only_when_narrow(hybrid):
    x = ids(3, 0)
    full = hybrid.forward_flops_per_token(T / 2)
    for mode, width in {"ghost": 128, "whisper": 256, "normal": 256, "think": 256}.items():
        plan, frac = mode_plan(hybrid, x, mode, P)
        assert plan.tolist() == [[width] * 4] * 3 and frac.dtype == torch.float64
        assert frac.tolist() == [hybrid.forward_flops_per_token(T / 2, [width] * 4) / full] * 3
        assert (frac < 1).all() if width < 256 else (frac == 1).all()
        logits, f = mode_logits(hybrid, x, mode, P)
        assert torch.equal(f, frac) and logits.dtype == torch.float32
        torch.testing.assert_close(logits, hybrid(x, width=width), rtol=0, atol=0)


def test_auto_plans_from_the_prompt_only_as_the_engine_does(hybrid):
    x = ids(8, 1)
    plan, frac = mode_plan(hybrid, x, "auto", P, plan_epsilon=0.5)
    assert len({tuple(r) for r in plan.tolist()}) > 1  # the random router makes different plans: the checks can fail
    assert (plan[:, :hybrid.config.predictor_after] == 256).all()
    tail_changed = x.clone()
    tail_changed[:, P:] = ids(8, 2)[:, P:]
    assert torch.equal(mode_plan(hybrid, tail_changed, "auto", P, plan_epsilon=0.5)[0], plan)
    head_changed = x.clone()
    head_changed[:, :P] = ids(8, 3)[:, :P]
    assert not torch.equal(mode_plan(hybrid, head_changed, "auto", P, plan_epsilon=0.5)[0], plan)
    # the engine's prefill of the prompt alone plans the same widths
    st = Engine(hybrid, decode="eager").prefill(x[:, :P], plan="auto", plan_epsilon=0.5)[0]
    assert torch.equal(st.plan, plan.cpu())
    full = hybrid.forward_flops_per_token(T / 2)
    assert frac.tolist() == [hybrid.forward_flops_per_token(T / 2, row) / full for row in plan.tolist()]
    assert ((frac < 1) == (plan < 256).any(1)).all() and (frac < 1).any()
    # per-row prompt lengths: each row as if planned alone
    lens = [3, 5, 7, 9, 11, 13, 15, 17]
    per_row = mode_plan(hybrid, x, "auto", lens, plan_epsilon=0.5)[0]
    for b, n in enumerate(lens):
        assert torch.equal(per_row[b], mode_plan(hybrid, x[b:b + 1], "auto", n, plan_epsilon=0.5)[0][0])
    with pytest.raises(ValueError, match="one int or one per row"):
        mode_plan(hybrid, x, "auto", [3, 4], plan_epsilon=0.5)
    with pytest.raises(ValueError, match=r"prompt lengths must be in \[1, 24\]"):
        mode_plan(hybrid, x, "auto", 0, plan_epsilon=0.5)
    # rows of different plans run at their own plan (the per-row width tensor)
    logits, _ = mode_logits(hybrid, x, "auto", P, plan_epsilon=0.5)
    for b in range(8):
        torch.testing.assert_close(logits[b], hybrid(x[b:b + 1], width=plan[b].tolist())[0], rtol=1e-5, atol=1e-5)
    # the calibrated threshold (the buffer) is the default: uncalibrated 0.98 plans at least as wide as 0.5
    default_plan, _ = mode_plan(hybrid, x, "auto", P)
    assert (default_plan >= plan).all()


def test_mode_loss_is_the_cross_entropy_of_mode_logits(hybrid):
    x, y = ids(2, 4), ids(2, 5)
    y[0, :3] = -1
    for mode in ("ghost", "auto"):
        loss, frac = mode_loss(hybrid, x, y, mode, P, plan_epsilon=0.5)
        logits, frac2 = mode_logits(hybrid, x, mode, P, plan_epsilon=0.5)
        ref = F.cross_entropy(logits.view(-1, 512), y.view(-1), ignore_index=-1, reduction="none").view(2, T)
        torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)
        assert torch.equal(frac, frac2) and (loss[0, :3] == 0).all()


def test_which_modes_a_model_runs():
    gpt = GPT(GPTConfig(sequence_len=16, vocab_size=64, n_layer=1, n_head=2, n_kv_head=2, n_embd=32))
    gpt.init_weights()
    assert default_modes(gpt) == ("think",)
    plan, frac = mode_plan(gpt, ids(2, 0, 8) % 64, "think", 4)
    assert plan is None and frac.tolist() == [1.0, 1.0]
    with pytest.raises(ValueError, match="dense GPT.*runs only 'think'"):
        mode_plan(gpt, ids(2, 0, 8) % 64, "ghost", 4)
    plain = HybridGPT(HybridConfig(sequence_len=16, vocab_size=64, n_layer=2, n_head=2, n_kv_head=2, n_embd=32,
                                   d_state=4, adaptive=False))
    assert default_modes(plain) == ("think",)
    with pytest.raises(ValueError, match="lacks"):
        mode_plan(plain, ids(1, 0, 8) % 64, "auto", 4)
    with pytest.raises(ValueError, match="unknown mode 'fast'"):
        mode_plan(plain, ids(1, 0, 8) % 64, "fast", 4)
    assert mode_plan(plain, ids(1, 0, 8) % 64, "ghost", 4)[0].tolist() == [[32, 32]]  # fixed widths need no router


# -----------------------------------------------------------------------------
# scripts.base_eval end to end

@pytest.fixture(scope="module")
def saved(tiny_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("base_eval")
    write_hybrid_checkpoint(root / "hybrid", tiny_data, gate_std=0.5)
    torch.manual_seed(0)
    gpt = GPT(GPTConfig(sequence_len=32, vocab_size=tiny_data["vocab_size"], n_layer=2, n_head=2, n_kv_head=2, n_embd=64))
    gpt.init_weights()
    fill_zero_matrices(gpt, 0.05, torch.Generator().manual_seed(1), skip_prefix="none")
    save_model(str(root / "gpt"), 0, gpt)
    copy_tokenizer_files(tiny_data["tokenizer_dir"], str(root / "gpt"))
    return {"root": root, "bundle": write_bundle(root / "eval_bundle", n_items=6)}


def run_eval(saved, tiny_data, capsys, *extra):
    argv = [f"--bundle-dir={saved['bundle']}", "--device=cpu", f"--data-dir={tiny_data['data_dir']}", *extra]
    result = base_eval.main(argv)
    return result, capsys.readouterr().out


def test_hybrid_end_to_end_every_mode_core_and_bpb(saved, tiny_data, capsys, tmp_path):
    out_json = tmp_path / "res" / "base_eval.json"
    result, out = run_eval(saved, tiny_data, capsys, f"--checkpoint={saved['root'] / 'hybrid'}", "--bpb",
                           "--bpb-tokens=128", "--device-batch-size=2", f"--out-json={out_json}")
    modes = tuple(MODES)
    assert tuple(result["core"]) == modes and tuple(result["bpb"]) == modes  # a hybrid with controllers: all five
    labels = [t[0] for t in TASKS]
    table = out[out.index("== CORE"):]
    header = table.splitlines()[1].split()
    assert header == ["task", *modes]
    for label in labels + ["CORE"]:
        assert any(line.split()[0] == label for line in table.splitlines())
    line = next(line for line in out.splitlines() if line.startswith('{"core"'))
    assert json.loads(line) == result == json.loads(out_json.read_text())
    core = result["core"]
    assert core["ghost"]["compute_fraction"] < 1 and core["think"]["compute_fraction"] == 1.0
    assert 0 < core["auto"]["compute_fraction"] <= 1
    for mode in modes:
        tasks = core[mode]["tasks"]
        assert list(tasks) == labels and all(t["items"] == 6 for t in tasks.values())
        assert core[mode]["core"] == pytest.approx(sum(t["centered"] for t in tasks.values()) / 3)
        for label, _, _, _, _, baseline in TASKS:
            assert tasks[label]["centered"] == pytest.approx(core_eval.centered_accuracy(tasks[label]["accuracy"], baseline / 100))
        assert result["bpb"][mode] > 0
    # think is the model's plain forward: CORE and bpb as the model itself scores them
    model, _ = load_model(str(saved["root"] / "hybrid"))
    tok = Tokenizer.from_directory(str(saved["root"] / "hybrid"))
    for task in core_eval.load_tasks(str(saved["bundle"])):
        data = core_eval.load_task_data(str(saved["bundle"]), task)
        items = core_eval.prepare_task(tok, task, data, model.config.sequence_len)
        acc = core_eval.evaluate_task(lambda x, p: model(x), task, items, len(data), torch.device("cpu"))
        assert core["think"]["tasks"][task.label]["accuracy"] == acc
    batches = tokenizing_distributed_data_loader(tok, 2, 32, "val", data_dir=str(tiny_data["data_dir"]))
    assert result["bpb"]["think"] == pytest.approx(evaluate_bpb(model, batches, 2, compute_token_bytes(tok)), rel=1e-6)
    assert result["bpb"]["ghost"] != result["bpb"]["think"]


def test_dense_gpt_runs_think_and_refuses_other_modes(saved, tiny_data, capsys):
    gpt_dir = saved["root"] / "gpt"
    result, out = run_eval(saved, tiny_data, capsys, f"--checkpoint={gpt_dir}", "--max-per-task=4")
    assert list(result["core"]) == ["think"] and result["bpb"] == {}
    assert all(t["items"] == 4 for t in result["core"]["think"]["tasks"].values())
    assert result["core"]["think"]["compute_fraction"] == 1.0 and result["env"]["model_kind"] == "gpt"
    with pytest.raises(ValueError, match="runs only 'think'") as e:
        run_eval(saved, tiny_data, capsys, f"--checkpoint={gpt_dir}", "--modes=think,auto")
    assert is_user_error(e.value)  # run_script prints it as one line


def test_offline_without_bundle_is_one_line_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(core_eval, "EVAL_BUNDLE_URL", "http://127.0.0.1:1/eval_bundle.zip")
    with pytest.raises(SystemExit) as e:
        run_script(base_eval.main, ["--download-only", f"--bundle-dir={tmp_path / 'eval_bundle'}"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 1 and "\n" not in err
    assert err.startswith("error: the CORE eval bundle is not in") and "python -m scripts.base_eval --download-only" in err
    with pytest.raises(UserError, match="download-only"):
        base_eval.main(["--checkpoint=unused", f"--bundle-dir={tmp_path / 'eval_bundle'}", "--device=cpu"])


@pytest.mark.slow
def test_two_ranks_split_the_items_and_sum_the_counts(saved, tiny_data, capsys, tmp_path):
    """torchrun with 2 gloo processes: each scores every other item; CORE and compute fractions equal one process's."""
    args = [f"--checkpoint={saved['root'] / 'hybrid'}", f"--bundle-dir={saved['bundle']}", "--device=cpu",
            "--modes=ghost,think"]
    one, _ = run_eval(saved, tiny_data, capsys, *args[:1], *args[2:])
    out = torchrun2("scripts.base_eval", *args, f"--out-json={tmp_path / 'two.json'}")
    two = json.loads(next(line for line in out.splitlines() if line.startswith('{"core"')))
    assert two["env"]["ranks"] == 2 and two == json.loads((tmp_path / "two.json").read_text())
    for mode in ("ghost", "think"):
        assert two["core"][mode]["tasks"] == one["core"][mode]["tasks"]
        assert two["core"][mode]["core"] == pytest.approx(one["core"][mode]["core"], abs=1e-12)
        assert two["core"][mode]["compute_fraction"] == pytest.approx(one["core"][mode]["compute_fraction"], rel=1e-12)

"""
scripts/chat_rl on CPU: the reward's compute term, the advantage, which parameters each loss term reaches, the tokens
that count, a short run on a tiny adaptive hybrid that must move its router toward cheaper plans when compute has a
price (and must not move it without one), exact resume, 2 gloo ranks, a dense GPT, and the flags that must stop it.
"""
import os
import random
import shutil
import signal

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from nanochat.checkpoint_manager import load_model, load_meta, load_model_and_tokenizer, list_steps
from nanochat.common import run_script, Interrupted
from nanochat.train_utils import GracefulStop
from scripts import chat_rl
from scripts import surgery as surgery_cli
from test_fractal_train import write_tiny_gpt
from testutil import exit_now


class TinyTask:
    """A generative task of short prompts; every non-empty answer is "correct" (reward 1), so all answers tie on the
    task and only the compute term tells them apart. reward_of overrides the reward (a tie at 0, say)."""
    name = "tiny"
    eval_type = "generative"

    def __init__(self, n=16, seed=0, reward_of=None):
        rng = random.Random(seed)
        self.convs = []
        for _ in range(n):
            a, b = rng.randrange(10), rng.randrange(10)
            self.convs.append({"messages": [{"role": "user", "content": f"add {a} {b}"},
                                            {"role": "assistant", "content": f"{a + b}"}]})
        self.reward_of = reward_of

    def __len__(self):
        return len(self.convs)

    def __getitem__(self, i):
        return self.convs[i]

    def evaluate(self, conversation, completion):
        return int(len(completion) > 0)

    def reward(self, conversation, completion):
        return self.reward_of(completion) if self.reward_of else float(self.evaluate(conversation, completion))


@pytest.fixture(scope="module")
def models(tiny_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("rl")
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls
    with pytest.MonkeyPatch.context() as mp_:
        mp_.setenv("NANOCHAT_BASE_DIR", str(root / "base"))
        write_tiny_gpt(root / "gpt", tiny_data)
        surgery_cli.main([f"--src={root / 'gpt'}", f"--dst={root / 'hybrid'}", "--new-dim=64", "--width-levels=32,64",
                          "--adaptive", "--d-state=8"])
    yield root
    torch.set_num_threads(n)


def rl_args(root, checkpoint, out, *extra):
    return chat_rl.get_args([f"--checkpoint={root / checkpoint}", f"--out-dir={out}", "--device=cpu", "--num-steps=4",
                             "--prompts-per-step=2", "--samples-per-prompt=4", "--max-new-tokens=6", "--eval-every=-1",
                             "--device-batch-size=4", *extra])


def load(root, checkpoint="hybrid"):
    model, tokenizer, _ = load_model_and_tokenizer(str(root / checkpoint))
    return model, tokenizer


def cheapest_prob(model, tokenizer, task, temperature):
    prompts = [tokenizer.render_for_completion(c) for c in task]
    with torch.no_grad():
        return chat_rl.router_log_probs(model, prompts, temperature).exp()[:, 0].mean().item()


def test_reward_subtracts_the_compute_cost_exactly():
    task = TinyTask(1)
    conv = task[0]
    assert chat_rl.sample_reward(task, conv, "7", 0.625, 0.2) == 0.875  # 1 - 0.2 * 0.625, exact in binary
    assert chat_rl.sample_reward(task, conv, "", 0.625, 0.2) == -0.125  # a wrong (empty) answer: 0 - 0.125
    assert chat_rl.sample_reward(task, conv, "7", 0.625, 0.0) == 1.0


def test_advantage_is_the_reward_minus_its_prompts_mean():
    rewards = torch.tensor([[1.0, 0.0, 0.5, 0.5], [0.25, 0.25, 0.25, 0.25]], dtype=torch.float64)
    adv = chat_rl.group_advantages(rewards)
    assert torch.equal(adv[0], torch.tensor([0.5, -0.5, 0.0, 0.0], dtype=torch.float64))  # not divided by the spread
    assert torch.equal(adv[1], torch.zeros(4, dtype=torch.float64))  # a tie teaches nothing


def test_sampled_mask_leaves_out_what_the_tool_wrote(models):
    _, tok = load(models)
    sp = tok.encode_special
    a, b = tok.encode("12")[0], tok.encode("x")[0]
    ids = [a, sp("<|python_start|>"), a, sp("<|python_end|>"), sp("<|output_start|>"), b, b, sp("<|output_end|>"), a,
           sp("<|output_start|>"), b]  # the last <|output_start|> follows no <|python_end|>: the model wrote it
    assert chat_rl.sampled_mask(ids, tok, True) == [1, 1, 1, 1, 0, 0, 0, 0, 1, 1, 1]
    assert chat_rl.sampled_mask(ids, tok, False) == [1] * len(ids)


def test_each_loss_term_reaches_its_own_parameters(models):
    model, tok = load(models)
    task = TinyTask(3)
    prompts = [tok.render_for_completion(c) for c in task]
    menu = chat_rl.plan_menu(model)
    assert len(menu) == 2 and menu[-1] == [64] * model.config.n_layer
    chat_rl.router_log_probs(model, prompts, 2.0)[:, 0].sum().backward()
    pred = model.controllers.predictor
    assert pred.out.weight.grad.abs().sum() > 0 and pred.out.bias.grad.abs().sum() > 0  # fc's: 0 while out is 0 (fresh)
    for name, p in model.named_parameters():
        if name.startswith("controllers.predictor."):
            assert p.grad is not None, name
        else:
            assert p.grad is None, name  # nothing of the trunk (nor the gates) from the router term
    model.zero_grad(set_to_none=True)
    answers = [tok.encode("3 4"), tok.encode("11"), tok.encode("5")]
    masks = [[1] * len(a) for a in answers]
    chat_rl.token_log_probs(model, prompts, answers, masks, menu[0]).sum().backward()
    trunk = [p for n, p in model.named_parameters() if not n.startswith("controllers.")]
    assert all(p.grad is not None for p in trunk) and model.lm_head.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.controllers.parameters())
    # the teacher-forced sum: exactly the log-probs of the answer tokens whose mask is 1, at the plan
    masks[0] = [0] + [1] * (len(answers[0]) - 1)
    with torch.no_grad():
        got = chat_rl.token_log_probs(model, prompts, answers, masks, menu[0])
        seq = prompts[0] + answers[0]
        logp = torch.log_softmax(model(torch.tensor([seq]), width=menu[0])[0], -1)
        P = len(prompts[0])
        want = sum(logp[P + k - 1, seq[P + k]] for k in range(1, len(answers[0])))
    assert torch.allclose(got[0], want, atol=1e-5)


def test_a_compute_cost_moves_the_router_to_cheaper_plans_and_resumes_exactly(models, tmp_path):
    task = TinyTask()
    model, tok = load(models)
    before = cheapest_prob(model, tok, task, 4.0)
    args = rl_args(models, "hybrid", tmp_path / "a", "--compute-cost=0.5", "--router-temperature=4",
                   "--controller-lr=0.05", "--save-every=2", "--eval-every=2")
    res = chat_rl.train(model, tok, task, args, eval_task=TinyTask(6, seed=1))
    after = cheapest_prob(model, tok, task, 4.0)
    assert after > before + 0.05, (before, after)
    for r, acc, c in zip(res["reward"], res["accuracy"], res["compute"]):  # every answer non-empty: reward = 1 - λ c
        assert acc == 1.0 and 0.4 < c <= 1.0 and abs(r - (1.0 - 0.5 * c)) < 1e-12
    assert sum(res["plans"][0].values()) == 8 and set(res["plans"][0]) == {"w32", "w64"}
    assert sorted(res["eval"]) == [0, 2, 4] and res["eval"][4]["n"] == 6
    meta = load_meta(str(tmp_path / "a"), 4)
    assert meta["calibration"] is None and "calibrate_gates" in meta["calibration_note"]
    assert meta["chat_rl"]["compute_cost"] == 0.5 and meta["user_args"]["router_temperature"] == 4.0
    saved, _ = load_model(str(tmp_path / "a"))
    assert not bool(saved.controllers.op_on) and saved.controllers.operating_point() is None
    assert list_steps(str(tmp_path / "a")) == [2, 4]
    # resume from step 2 (the step-4 files removed) gives the same steps 2, 3 and the same weights
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    for f in ("model_000004.pt", "meta_000004.json", "optim_000004_rank0.pt"):
        os.remove(tmp_path / "b" / f)
    model2, _ = load(models)
    args2 = rl_args(models, "hybrid", tmp_path / "b", "--compute-cost=0.5", "--router-temperature=4",
                    "--controller-lr=0.05", "--save-every=2", "--resume")
    res2 = chat_rl.train(model2, tok, task, args2)
    assert res2["steps"] == [2, 3] and res2["reward"] == res["reward"][2:] and res2["loss"] == res["loss"][2:]
    resumed, _ = load_model(str(tmp_path / "b"))
    for (name, p), q in zip(saved.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(p, q), name
    with pytest.raises(ValueError, match="compute-cost"):  # a changed objective is not a resume
        chat_rl.train(load(models)[0], tok, task, rl_args(models, "hybrid", tmp_path / "b", "--compute-cost=0.1",
                                                          "--router-temperature=4", "--controller-lr=0.05", "--resume"))


def test_without_a_price_tied_answers_leave_the_router_alone(models, tmp_path):
    model, tok = load(models)
    before = {n: p.clone() for n, p in model.controllers.predictor.named_parameters()}
    res = chat_rl.train(model, tok, TinyTask(), rl_args(models, "hybrid", tmp_path / "z", "--num-steps=2",
                                                        "--router-temperature=4", "--controller-lr=0.05"))
    assert all(r == 1.0 for r in res["reward"]) and res["loss"] == [0.0, 0.0]
    for n, p in model.controllers.predictor.named_parameters():
        assert torch.equal(p, before[n]), n


def test_a_dense_gpt_and_the_inputs_that_stop_a_run(models, tmp_path, capsys):
    model, tok = load(models, "gpt")
    # rewards that differ (by the answer's length) make the token term move the weights
    task = TinyTask(reward_of=lambda text: float(len(text) % 3))
    w0 = model.lm_head.weight.clone()
    res = chat_rl.train(model, tok, task, rl_args(models, "gpt", tmp_path / "d", "--num-steps=1"))
    assert res["plans"] == [{"full": 8}] and res["compute"] == [1.0] and not torch.equal(model.lm_head.weight, w0)
    with pytest.raises(ValueError, match="router"):
        chat_rl.train(model, tok, task, rl_args(models, "gpt", tmp_path / "e", "--compute-cost=0.1"))
    with pytest.raises(ValueError, match="already holds"):
        chat_rl.train(model, tok, task, rl_args(models, "gpt", tmp_path / "d"))
    categorical = TinyTask()
    categorical.eval_type = "categorical"
    with pytest.raises(ValueError, match="generative"):
        chat_rl.train(model, tok, categorical, rl_args(models, "gpt", tmp_path / "f"))
    with pytest.raises(ValueError, match="fit the context"):
        chat_rl.train(model, tok, task, rl_args(models, "gpt", tmp_path / "g", "--max-new-tokens=30"))
    capsys.readouterr()
    for bad in ("--samples-per-prompt=1", "--temperature=0", "--router-temperature=-1", "--compute-cost=-0.5"):
        with pytest.raises(SystemExit) as e:
            run_script(chat_rl.main, [f"--checkpoint={models / 'gpt'}", bad])
        err = capsys.readouterr().err
        assert e.value.code == 1 and err.startswith("error: ") and err.count("\n") == 1, (bad, err)


def test_ctrl_c_saves_the_step_and_prints_the_resume_command(models, tmp_path, monkeypatch, capsys):
    class SigintAfterOneStep(GracefulStop):  # as if Ctrl-C came during step 0
        calls = 0

        def requested(self, device=None):
            self.calls += 1
            if self.calls == 2:
                self.signum = signal.SIGINT
            return super().requested(device)

    monkeypatch.setattr(chat_rl, "GracefulStop", SigintAfterOneStep)
    model, tok = load(models)
    argv = [f"--checkpoint={models / 'hybrid'}", f"--out-dir={tmp_path / 'i'}", "--device=cpu", "--num-steps=4",
            "--prompts-per-step=2", "--samples-per-prompt=2", "--max-new-tokens=4", "--eval-every=-1"]
    with pytest.raises(Interrupted) as e:
        chat_rl.train(model, tok, TinyTask(), chat_rl.get_args(argv), argv=argv)
    assert e.value.signum == signal.SIGINT and list_steps(str(tmp_path / "i")) == [1]
    out = capsys.readouterr().out
    assert "stopped by SIGINT at step 1: saved step 1" in out and "-m scripts.chat_rl" in out and "--resume" in out


def _ddp_worker(rank, root, out, store):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.FileStore(store, 2), rank=rank, world_size=2)
    try:
        model, tok = load(root)
        chat_rl.train(model, tok, TinyTask(), rl_args(root, "hybrid", out, "--num-steps=2", "--compute-cost=0.5",
                                                      "--router-temperature=4", "--controller-lr=0.05"))
        flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
        both = [torch.empty_like(flat) for _ in range(2)]
        dist.all_gather(both, flat)
        assert torch.equal(both[0], both[1])  # the ranks' gradients were summed: one update on every rank
    finally:
        dist.destroy_process_group()
    exit_now()


@pytest.mark.slow  # 2 spawned processes
def test_two_ranks_split_the_prompts_and_stay_in_step(models, tmp_path):
    mp.spawn(_ddp_worker, args=(models, tmp_path / "ddp", str(tmp_path / "store")), nprocs=2, join=True)
    meta = load_meta(str(tmp_path / "ddp"), 2)
    assert meta["world_size"] == 2 and meta["step"] == 2

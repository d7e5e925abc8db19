"""
scripts.base_train on CPU with a tiny model on the synthetic corpus: the loss goes down, a
resumed run continues exactly like an uninterrupted one, bad inputs stop with clear errors.
Also nanochat.loss_eval.evaluate_bpb against a per-token computation written here.
"""
import json
import math
import shutil

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from scripts import base_train
from nanochat.checkpoint_manager import load_model, CheckpointError
from nanochat.gpt import GPT, GPTConfig
from nanochat.loss_eval import evaluate_bpb


def train_args(tiny_data, out_dir, *extra):
    return ["--device", "cpu", "--depth", "2", "--n-embd", "64", "--n-head", "2", "--max-seq-len", "64",
            "--device-batch-size", "4", "--total-batch-size", "512",  # 2 micro-batches per step
            "--num-iterations", "20", "--eval-every", "10", "--eval-tokens", "512", "--save-every", "10",
            "--data-dir", str(tiny_data["data_dir"]), "--tokenizer-dir", str(tiny_data["tokenizer_dir"]),
            "--out-dir", str(out_dir), *extra]


def test_loss_decreases_and_resume_is_exact(tiny_data, tmp_path):
    full_dir = tmp_path / "full"
    full = base_train.main(train_args(tiny_data, full_dir))
    losses = full["losses"]
    assert full["steps"] == list(range(20)) and len(losses) == 20
    assert all(math.isfinite(v) for v in losses)
    assert abs(losses[0] - math.log(tiny_data["vocab_size"])) < 0.05  # zero lm_head at init: uniform predictions
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < first - 1.0, (first, last)
    assert set(full["val_bpb"]) == {0, 10, 20} and full["val_bpb"][20] < full["val_bpb"][0]

    # the checkpoint directory: model, meta, per-rank optimizer, tokenizer alongside
    names = sorted(p.name for p in full_dir.iterdir())
    for step in (10, 20):
        assert f"model_{step:06d}.pt" in names and f"meta_{step:06d}.json" in names
        assert f"optim_{step:06d}_rank0.pt" in names
    assert "tokenizer.pkl" in names and "token_bytes.pt" in names
    meta = json.loads((full_dir / "meta_000020.json").read_text())
    assert meta["model_kind"] == "gpt" and meta["step"] == 20
    assert meta["model_config"] == full["model_config"]
    assert meta["val_bpb"] == full["val_bpb"][20]
    assert meta["user_config"]["num_iterations"] == 20 and len(meta["dataloader_state"]) == 1
    model, _ = load_model(full_dir)
    assert isinstance(model, GPT) and model.config.vocab_size == tiny_data["vocab_size"]

    # a run that stopped right after saving step 10, resumed: steps 10..19 are bit-for-bit the same
    resume_dir = tmp_path / "resumed"
    resume_dir.mkdir()
    for name in names:
        if "000010" in name or name.startswith("tok"):
            shutil.copy(full_dir / name, resume_dir / name)
    resumed = base_train.main(train_args(tiny_data, resume_dir, "--resume"))
    assert resumed["steps"] == list(range(10, 20))
    assert resumed["losses"] == losses[10:]
    assert resumed["val_bpb"][20] == full["val_bpb"][20]
    a, _ = load_model(full_dir)
    b, _ = load_model(resume_dir)
    for k, v in a.state_dict().items():
        assert torch.equal(b.state_dict()[k], v), k

    # a fresh run into a directory that already has checkpoints would mix two runs: refused
    with pytest.raises(ValueError, match="--resume"):
        base_train.main(train_args(tiny_data, full_dir))
    # resuming with a different model is refused, not silently reshaped
    with pytest.raises(ValueError, match="model_config"):
        base_train.main(train_args(tiny_data, resume_dir, "--resume", "--n-embd", "128"))


def test_bad_inputs_are_clear_errors(tiny_data, tmp_path, base_dir):
    out = tmp_path / "out"
    args = train_args(tiny_data, out)

    def with_flag(flag, value):
        i = args.index(flag)
        return args[:i + 1] + [value] + args[i + 2:]

    with pytest.raises(FileNotFoundError, match="nanochat.dataset"):
        base_train.main(with_flag("--data-dir", str(tmp_path / "no_data")))
    with pytest.raises(FileNotFoundError, match="tok_train"):
        base_train.main(with_flag("--tokenizer-dir", str(tmp_path / "no_tokenizer")))
    with pytest.raises(ValueError, match="vocab-size=1000"):
        base_train.main(args + ["--vocab-size", "1000"])
    with pytest.raises(ValueError, match="not divisible"):
        base_train.main(with_flag("--total-batch-size", "300"))
    with pytest.raises(CheckpointError, match="does not exist"):
        base_train.main(args + ["--resume"])
    assert not (out / "model_000000.pt").exists()


# -----------------------------------------------------------------------------
# evaluate_bpb

class RecordingModel(nn.Module):
    """A GPT that records the extra forward kwargs it was called with (as a width plan would be)."""

    def __init__(self, gpt):
        super().__init__()
        self.gpt = gpt
        self.seen = []

    def forward(self, x, y, loss_reduction="mean", **kwargs):
        self.seen.append(kwargs)
        return self.gpt(x, y, loss_reduction=loss_reduction)


def test_evaluate_bpb_matches_per_token_reference():
    torch.manual_seed(0)
    V = 40
    gpt = GPT(GPTConfig(sequence_len=16, vocab_size=V, n_layer=1, n_head=2, n_kv_head=2, n_embd=32))
    gpt.init_weights()
    with torch.no_grad():
        gpt.lm_head.weight.normal_(0, 0.5)
    gpt.eval()
    token_bytes = torch.randint(1, 5, (V,), dtype=torch.int32)
    token_bytes[0] = 0  # a special token: its loss and bytes are not counted
    batches = []
    for _ in range(3):
        x = torch.randint(0, V, (2, 8))
        y = torch.randint(0, V, (2, 8))
        y[0, :3] = 0
        y[1, -2:] = -1  # ignored targets
        batches.append((x, y, {"state": "ignored"}))
    model = RecordingModel(gpt)
    bpb = evaluate_bpb(model, iter(batches), 3, token_bytes, forward_kwargs={"width_plan": "full"})
    assert model.seen == [{"width_plan": "full"}] * 3

    nats, nbytes = 0.0, 0
    with torch.no_grad():
        for x, y, _ in batches:
            logp = F.log_softmax(gpt(x), dim=-1)  # (B, T, V)
            for b in range(y.size(0)):
                for t in range(y.size(1)):
                    target = y[b, t].item()
                    if target >= 0 and token_bytes[target] > 0:
                        nats -= logp[b, t, target].item()
                        nbytes += token_bytes[target].item()
    assert bpb == pytest.approx(nats / (math.log(2) * nbytes), rel=1e-6)

    with pytest.raises(ValueError, match="ran out after 3 of 4"):
        evaluate_bpb(gpt, iter(batches), 4, token_bytes)
    only_special = [(torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 4, dtype=torch.long))]
    with pytest.raises(ValueError, match="no target tokens with text"):
        evaluate_bpb(gpt, iter(only_special), 1, token_bytes)


def test_arch_modern_trains_todays_nanochat(tiny_data, tmp_path):
    from nanochat.gpt_modern import ModernGPT
    out = tmp_path / "modern"
    run = base_train.main(train_args(tiny_data, out, "--arch", "modern", "--window-pattern", "SL"))
    losses = run["losses"]
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 1.0
    meta = json.loads((out / "meta_000020.json").read_text())
    assert meta["model_kind"] == "modern" and meta["model_config"]["window_pattern"] == "SL"
    model, _ = load_model(out)
    assert isinstance(model, ModernGPT) and model.config.vocab_size == tiny_data["vocab_size"]
    assert run["val_bpb"][20] < run["val_bpb"][0]

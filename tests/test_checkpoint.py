"""
Checkpoint manager: bitwise round trips, loud failures on every kind of bad checkpoint,
atomic saves, latest-step resolution and per-rank optimizer files.
"""
import os
import sys
import json
import dataclasses
import subprocess

import pytest
import torch

import nanochat
from nanochat.gpt import GPT, GPTConfig
from nanochat.checkpoint_manager import (CheckpointError, MODEL_KINDS, get_model_kind, save_model, save_checkpoint,
                                         load_model, load_model_and_tokenizer, load_optimizer_state, find_last_step,
                                         copy_tokenizer_files, model_path)
from nanochat.optim import setup_optimizers, optimizer_state_dicts, load_optimizer_state_dicts

CFG = GPTConfig(sequence_len=32, vocab_size=64, n_layer=2, n_head=2, n_kv_head=1, n_embd=32)


def make_model(seed=0):
    torch.manual_seed(seed)
    model = GPT(CFG)
    model.init_weights()
    with torch.no_grad():  # make the zero-initialised weights nonzero so logits say something
        for name, p in model.named_parameters():
            if "c_proj" in name or "lm_head" in name:
                p.normal_(0.0, 0.1)
    return model


def files(d):
    return sorted(os.listdir(d))


def test_round_trip_is_bitwise(tmp_path):
    model = make_model()
    meta = save_model(tmp_path, 7, model, extra_meta={"note": "hello"})
    assert meta["model_kind"] == "gpt" and meta["step"] == 7
    loaded, meta2 = load_model(tmp_path)
    assert meta2["checkpoint_step"] == 7 and meta2["note"] == "hello"
    assert meta2["model_config"] == CFG.to_dict()
    sd, sd2 = model.state_dict(), loaded.state_dict()
    assert sd.keys() == sd2.keys()
    for k in sd:
        assert sd[k].dtype == sd2[k].dtype and torch.equal(sd[k], sd2[k]), k
    idx = torch.randint(0, CFG.vocab_size, (2, 12))
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(idx), loaded(idx))
    # the rotary tables are recomputed on load, not left as uninitialised memory
    assert torch.equal(loaded.cos, model.cos) and torch.equal(loaded.sin, model.sin)


def test_truncated_model_file_is_a_clear_error(tmp_path):
    save_model(tmp_path, 1, make_model())
    path = tmp_path / "model_000001.pt"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_model(tmp_path)


def test_wrong_shape_lists_the_key(tmp_path):
    model = make_model()
    sd = model.state_dict()
    sd["transformer.h.1.mlp.c_fc.weight"] = torch.zeros(100, CFG.n_embd)
    meta = {"model_kind": "gpt", "model_config": CFG.to_dict(), "step": 3}
    save_checkpoint(tmp_path, 3, sd, meta)
    with pytest.raises(CheckpointError) as info:
        load_model(tmp_path)
    msg = str(info.value)
    assert "mis-shaped" in msg and "transformer.h.1.mlp.c_fc.weight" in msg and "(100, 32)" in msg


def test_missing_and_extra_keys_are_listed(tmp_path):
    sd = make_model().state_dict()
    del sd["transformer.h.0.attn.c_k.weight"]
    sd["transformer.h.0.attn.bias"] = torch.zeros(3)
    save_checkpoint(tmp_path, 3, sd, {"model_kind": "gpt", "model_config": CFG.to_dict(), "step": 3})
    with pytest.raises(CheckpointError) as info:
        load_model(tmp_path)
    msg = str(info.value)
    assert "missing keys" in msg and "transformer.h.0.attn.c_k.weight" in msg
    assert "unexpected keys" in msg and "transformer.h.0.attn.bias" in msg


def test_missing_meta_is_a_clear_error(tmp_path):
    save_model(tmp_path, 4, make_model())
    os.remove(tmp_path / "meta_000004.json")
    with pytest.raises(CheckpointError, match="meta"):
        load_model(tmp_path)  # directory: no complete step
    with pytest.raises(CheckpointError, match="meta_000004.json"):
        load_model(tmp_path / "model_000004.pt")  # the file itself: its meta is missing


def test_path_that_does_not_exist_is_an_error(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model(tmp_path / "no_such_checkpoint")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        load_model(empty)
    other = tmp_path / "notes.pt"
    other.write_bytes(b"")
    with pytest.raises(CheckpointError, match="not a model_<step>.pt"):
        load_model(other)


class Unpicklable:
    def __reduce__(self):
        raise TypeError("this object refuses to be pickled")


def test_failed_save_leaves_previous_step_loadable(tmp_path):
    model = make_model()
    save_model(tmp_path, 1, model)
    before = {name: (tmp_path / name).read_bytes() for name in files(tmp_path)}
    # 1) an unpicklable object in the state: torch.save fails midway through writing
    bad_state = dict(model.state_dict(), junk=Unpicklable())
    with pytest.raises(TypeError, match="refuses to be pickled"):
        save_checkpoint(tmp_path, 2, bad_state, {"model_kind": "gpt", "model_config": CFG.to_dict(), "step": 2})
    assert files(tmp_path) == sorted(before)  # no model_000002.pt, no meta, no temporary file left
    # 2) torch.save writes some bytes and then dies, also when overwriting an existing step
    real_save = torch.save

    def dying_save(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 partial bytes")
        raise OSError("disk full (simulated)")

    torch.save = dying_save
    try:
        for step in (2, 1):
            with pytest.raises(OSError, match="disk full"):
                save_model(tmp_path, step, make_model(seed=1))
    finally:
        torch.save = real_save
    assert {name: (tmp_path / name).read_bytes() for name in files(tmp_path)} == before
    loaded, meta = load_model(tmp_path)
    assert meta["checkpoint_step"] == 1
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v)


def test_latest_step_ignores_model_without_meta(tmp_path):
    save_model(tmp_path, 5, make_model(seed=0))
    save_model(tmp_path, 9, make_model(seed=1))
    assert find_last_step(tmp_path) == 9
    os.remove(tmp_path / "meta_000009.json")  # e.g. a save that died between the model and its meta
    assert find_last_step(tmp_path) == 5
    _, meta = load_model(tmp_path)
    assert meta["checkpoint_step"] == 5
    _, meta = load_model(tmp_path, step=5)
    assert meta["checkpoint_step"] == 5


def test_meta_without_kind_or_config_is_an_error(tmp_path):
    model = make_model()
    save_checkpoint(tmp_path, 2, model.state_dict(), {"step": 2})
    with pytest.raises(CheckpointError, match="neither model_kind nor model_config"):
        load_model(tmp_path)
    (tmp_path / "meta_000002.json").write_text(json.dumps({"model_kind": "teapot", "model_config": {}}))
    with pytest.raises(CheckpointError, match="unknown model kind 'teapot'"):
        load_model(tmp_path)


def test_optimizer_files_per_rank_and_exact_resume(tmp_path):
    """Each rank writes its own optimizer file; only rank 0 writes the model and meta. A restored
    optimizer continues exactly as the original would have."""
    model = make_model()
    optimizers = setup_optimizers(model, matrix_lr=0.02, embedding_lr=0.2, unembedding_lr=0.004)
    idx = torch.randint(0, CFG.vocab_size, (2, 16))
    tgt = torch.randint(0, CFG.vocab_size, (2, 16))

    def train_step(m, opts):
        m(idx, tgt).backward()
        for opt in opts:
            opt.step()
        m.zero_grad(set_to_none=True)

    train_step(model, optimizers)
    state = optimizer_state_dicts(optimizers)
    save_checkpoint(tmp_path, 1, None, None, optim_state={"rank": 1}, rank=1)  # rank 1: its optimizer file only
    assert files(tmp_path) == ["optim_000001_rank1.pt"]
    save_model(tmp_path, 1, model, optim_state=state, rank=0)
    assert files(tmp_path) == ["meta_000001.json", "model_000001.pt", "optim_000001_rank0.pt", "optim_000001_rank1.pt"]
    assert load_optimizer_state(tmp_path, 1, rank=1) == {"rank": 1}
    with pytest.raises(CheckpointError, match="optim_000001_rank2.pt"):
        load_optimizer_state(tmp_path, 1, rank=2)

    # resume: load model + optimizer state, take one more step each way, compare bitwise
    resumed, _ = load_model(tmp_path)
    resumed.train()
    resumed_opts = setup_optimizers(resumed, matrix_lr=0.02, embedding_lr=0.2, unembedding_lr=0.004)
    load_optimizer_state_dicts(resumed_opts, load_optimizer_state(tmp_path, 1, rank=0))
    train_step(model, optimizers)
    train_step(resumed, resumed_opts)
    for k, v in model.state_dict().items():
        assert torch.equal(resumed.state_dict()[k], v), k


def test_copy_tokenizer_files(tmp_path):
    src, other, dst = tmp_path / "src", tmp_path / "other", tmp_path / "dst"
    for d, body in ((src, b"A"), (other, b"B")):
        d.mkdir()
        (d / "tokenizer.pkl").write_bytes(body)
        (d / "token_bytes.pt").write_bytes(body * 2)
    copy_tokenizer_files(src, dst)
    copy_tokenizer_files(src, dst)  # the same tokenizer again is fine
    assert (dst / "tokenizer.pkl").read_bytes() == b"A" and (dst / "token_bytes.pt").read_bytes() == b"AA"
    with pytest.raises(CheckpointError, match="another tokenizer"):
        copy_tokenizer_files(other, dst)
    assert (dst / "tokenizer.pkl").read_bytes() == b"A"  # nothing replaced
    copy_tokenizer_files(other, dst, overwrite=True)
    assert (dst / "tokenizer.pkl").read_bytes() == b"B"
    assert sorted(p.name for p in dst.iterdir()) == ["token_bytes.pt", "tokenizer.pkl"]  # no temp files left


def save_gpt(d, vocab_size, tokenizer_dir=None):
    """A tiny GPT of this vocab_size at step 1 in d, with the tokenizer files of tokenizer_dir beside it."""
    torch.manual_seed(0)
    model = GPT(dataclasses.replace(CFG, vocab_size=vocab_size))
    model.init_weights()
    save_model(d, 1, model)
    if tokenizer_dir is not None:
        copy_tokenizer_files(tokenizer_dir, d)
    return model


def test_load_model_and_tokenizer_vocabulary_rule(tmp_path, tiny_data):
    """Every tokenizer id needs a row in the embedding: a padded (larger) vocab loads, a smaller one stops, before
    the weights are read; the tokenizer comes from the checkpoint directory unless tokenizer_dir says otherwise."""
    tok_dir, n = tiny_data["tokenizer_dir"], tiny_data["vocab_size"]
    for vocab_size in (n, n + 64):  # exact, and padded to a round size as nanochat pads
        d = tmp_path / f"v{vocab_size}"
        saved = save_gpt(d, vocab_size, tok_dir)
        model, tokenizer, meta = load_model_and_tokenizer(d)
        assert tokenizer.get_vocab_size() == n and model.config.vocab_size == vocab_size
        assert meta["tokenizer_dir"] == str(d) and meta["checkpoint_step"] == 1
        idx = torch.tensor([tokenizer.encode("hello world", prepend="<|bos|>")])
        assert torch.equal(model(idx), saved.eval()(idx))
    small = tmp_path / "small"
    save_gpt(small, n - 1, tok_dir)
    with open(model_path(str(small), 1), "r+b") as f:
        f.truncate(100)  # unreadable weights: the vocabulary check comes first
    with pytest.raises(CheckpointError, match=f"has {n} ids but the model's vocab_size is {n - 1}"):
        load_model_and_tokenizer(small)
    bare = tmp_path / "bare"
    save_gpt(bare, n)
    with pytest.raises(CheckpointError, match=f"no tokenizer.pkl in {bare}"):
        load_model_and_tokenizer(bare)
    model, tokenizer, meta = load_model_and_tokenizer(bare, tokenizer_dir=tok_dir)
    assert meta["tokenizer_dir"] == str(tok_dir) and tokenizer.get_vocab_size() == n
    with pytest.raises(CheckpointError, match=f"in {tok_dir} has {n} ids"):
        load_model_and_tokenizer(small, tokenizer_dir=tok_dir)


def test_model_kinds_table():
    for kind, (module, config_name, model_name) in MODEL_KINDS.items():
        config_cls, model_cls = get_model_kind(kind)
        assert (model_cls.kind, model_cls.__module__, config_cls.__name__, model_cls.__name__) == \
            (kind, module, config_name, model_name)
    with pytest.raises(CheckpointError, match=r"unknown model kind 'mamba_moe'.*known kinds: \['gpt', 'hybrid', 'modern'\]"):
        get_model_kind("mamba_moe")


@pytest.mark.parametrize("first, absent", [
    ("nanochat.checkpoint_manager", ("nanochat.gpt", "nanochat.hybrid_gpt")),  # the table imports on first use
    ("nanochat.hybrid_gpt", ("nanochat.checkpoint_manager",)),  # models know nothing of checkpoints
    ("nanochat.gpt", ("nanochat.checkpoint_manager",)),
])
def test_no_import_cycle_between_models_and_checkpoint_manager(first, absent):
    root = os.path.dirname(os.path.dirname(nanochat.__file__))
    code = f"import sys, {first}; print(sorted(m for m in {absent!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env=dict(os.environ, PYTHONPATH=root)).stdout
    assert out.strip() == "[]"

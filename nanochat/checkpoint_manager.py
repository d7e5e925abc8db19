"""
Checkpoints: the directory contract of shared/ARCHITECTURE.md.

    model_<step:06d>.pt            state_dict (rank 0)
    meta_<step:06d>.json           config + provenance; written last, so its presence marks a complete step
    optim_<step:06d>_rank<r>.pt    optional, one per rank

Every file is written atomically (temporary file in the same directory, fsync, rename), so a crash
mid-save never leaves a truncated checkpoint under a real name. Loading is strict: any missing,
unexpected or mis-shaped key stops with a list of them.

A nanochat directory (meta has `model_config` and no `model_kind`) loads as a GPT (the Oct-2025 layout) or, when
its model_config has `window_pattern` (today's nanochat writes it), as a ModernGPT; ours records
`model_kind` and the full config. MODEL_KINDS says which module defines each kind; it is imported
when a checkpoint of that kind is loaded, so the model files never import this one (no import cycle).
"""
import os
import re
import json
import glob
import importlib
import pickle
import zipfile

import torch

from nanochat.common import expand_path, get_logger, TOKENIZER_FILES, TOKENIZER_FILENAME, UserError
from nanochat.tokenizer import Tokenizer

log = get_logger(__name__)


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that cannot be used as asked; the message says why and what to do (scripts print it as one line)."""


# kind -> (module, config class, model class): what `model_kind` in a checkpoint's meta names. The module is
# imported on first use, so importing checkpoint_manager imports no model (and no model imports this file).
MODEL_KINDS = {
    "gpt": ("nanochat.gpt", "GPTConfig", "GPT"),
    "hybrid": ("nanochat.hybrid_gpt", "HybridConfig", "HybridGPT"),
    "modern": ("nanochat.gpt_modern", "ModernConfig", "ModernGPT"),
}


def get_model_kind(kind):
    """(config class, model class) of a model kind."""
    if kind not in MODEL_KINDS:
        raise CheckpointError(f"unknown model kind {kind!r} in checkpoint meta; known kinds: {sorted(MODEL_KINDS)}")
    module_name, config_name, model_name = MODEL_KINDS[kind]
    module = importlib.import_module(module_name)
    return getattr(module, config_name), getattr(module, model_name)


def config_to_dict(config):
    return config.to_dict() if hasattr(config, "to_dict") else dict(vars(config))


def config_from_dict(config_cls, d):
    if hasattr(config_cls, "from_dict"):
        return config_cls.from_dict(d)
    unknown = set(d) - set(config_cls.__dataclass_fields__)
    if unknown:
        raise CheckpointError(f"model_config has fields {config_cls.__name__} does not know: {sorted(unknown)}")
    return config_cls(**d)


# -----------------------------------------------------------------------------
# Atomic writes

def _atomic_write(path, write_fn):
    d = os.path.dirname(path) or "."
    tmp = os.path.join(d, f".{os.path.basename(path)}.tmp.{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write_fn(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_bytes_save(data, path):
    """bytes (a str is utf-8 encoded) to path, atomically."""
    data = data.encode() if isinstance(data, str) else data
    _atomic_write(path, lambda f: f.write(data))


def atomic_torch_save(obj, path):
    _atomic_write(path, lambda f: torch.save(obj, f))


def atomic_json_save(obj, path):
    atomic_bytes_save(json.dumps(obj, indent=2, sort_keys=False), path)


def model_path(checkpoint_dir, step):
    return os.path.join(checkpoint_dir, f"model_{step:06d}.pt")


def meta_path(checkpoint_dir, step):
    return os.path.join(checkpoint_dir, f"meta_{step:06d}.json")


def optim_path(checkpoint_dir, step, rank):
    return os.path.join(checkpoint_dir, f"optim_{step:06d}_rank{rank}.pt")


def save_checkpoint(checkpoint_dir, step, model_state, meta, optim_state=None, rank=0):
    """
    Every rank calls this: each writes its own optimizer file, rank 0 writes the model and
    then the meta (last). Callers synchronise ranks (barrier) before and after as needed.
    """
    checkpoint_dir = expand_path(checkpoint_dir)
    os.makedirs(checkpoint_dir, exist_ok=True)
    if optim_state is not None:
        atomic_torch_save(optim_state, optim_path(checkpoint_dir, step, rank))
    if rank == 0:
        atomic_torch_save(model_state, model_path(checkpoint_dir, step))
        atomic_json_save(meta, meta_path(checkpoint_dir, step))
        log.info(f"saved checkpoint step {step} to {checkpoint_dir}")


def save_model(checkpoint_dir, step, model, extra_meta=None, optim_state=None, rank=0):
    """Save a model of a MODEL_KINDS kind with its kind and config recorded in meta."""
    meta = {"model_kind": model.kind, "model_config": config_to_dict(model.config), "step": step}
    meta.update(extra_meta or {})
    save_checkpoint(checkpoint_dir, step, model.state_dict(), meta, optim_state=optim_state, rank=rank)
    return meta


def save_nanochat_layout(checkpoint_dir, step, model, extra_meta=None):
    """
    Write a ModernGPT as today's nanochat base_train does: model_<step>.pt holds the bare state_dict and
    meta_<step>.json the model_config (no model_kind: nanochat's loader does not know one) plus extra_meta.
    load_model recognises it by model_config's window_pattern.
    """
    if model.kind != "modern":
        raise CheckpointError(f"save_nanochat_layout writes today's nanochat GPT (kind 'modern'), not {model.kind!r}")
    meta = {"step": step, "model_config": config_to_dict(model.config)}
    meta.update(extra_meta or {})
    save_checkpoint(checkpoint_dir, step, model.state_dict(), meta)
    return meta


def copy_tokenizer_files(src_dir, dst_dir, names=TOKENIZER_FILES, overwrite=False):
    """
    Put the tokenizer's files beside a checkpoint (names that src_dir lacks are skipped), each copied
    atomically. A different file already under that name is an error unless overwrite: a checkpoint
    directory must not mix two tokenizers.
    """
    os.makedirs(dst_dir, exist_ok=True)
    for name in names:
        src, dst = os.path.join(src_dir, name), os.path.join(dst_dir, name)
        if not os.path.exists(src):
            continue
        with open(src, "rb") as f:
            data = f.read()
        if os.path.exists(dst) and not overwrite:
            with open(dst, "rb") as f:
                if f.read() != data:
                    raise CheckpointError(f"{dst} differs from {src}: this checkpoint directory was made with another "
                                          "tokenizer; use its own tokenizer or another output directory")
            continue
        atomic_bytes_save(data, dst)


# -----------------------------------------------------------------------------
# Reading

def list_steps(checkpoint_dir):
    """Steps that have both a model file and a meta file (i.e. were completely written)."""
    steps = []
    for p in glob.glob(os.path.join(checkpoint_dir, "model_*.pt")):
        m = re.fullmatch(r"model_(\d+)\.pt", os.path.basename(p))
        if m and os.path.exists(meta_path(checkpoint_dir, int(m.group(1)))):
            steps.append(int(m.group(1)))
    return sorted(steps)


def find_last_step(checkpoint_dir):
    checkpoint_dir = expand_path(checkpoint_dir)
    if not os.path.isdir(checkpoint_dir):
        raise CheckpointError(f"checkpoint directory {checkpoint_dir} does not exist")
    steps = list_steps(checkpoint_dir)
    if not steps:
        models = glob.glob(os.path.join(checkpoint_dir, "model_*.pt"))
        hint = " (model files exist but their meta_<step>.json files are missing)" if models else ""
        raise CheckpointError(f"no complete checkpoint (model_<step>.pt + meta_<step>.json) in {checkpoint_dir}{hint}")
    return steps[-1]


def resolve_checkpoint(path, step=None):
    """A directory (latest or given step) or a model_<step>.pt file -> (directory, step)."""
    path = expand_path(path)
    if os.path.isfile(path):
        m = re.fullmatch(r"model_(\d+)\.pt", os.path.basename(path))
        if not m:
            raise CheckpointError(f"{path} is not a model_<step>.pt checkpoint file")
        return os.path.dirname(path), int(m.group(1))
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint path {path} does not exist (check the spelling; nothing was loaded)")
    if step is None:
        step = find_last_step(path)
    return path, step


def load_torch_file(path, device="cpu", mmap=False):
    """torch.load with weights_only; mmap=True maps the file so pages are read on use (big checkpoints).
    A cut-off zip archive surfaces as RuntimeError, EOFError or (seen with torch 2.13) OSError."""
    if not os.path.exists(path):
        raise CheckpointError(f"missing checkpoint file {path}")
    try:
        return torch.load(path, map_location=device, weights_only=True, mmap=mmap)
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError) as e:
        raise CheckpointError(f"cannot read {path}: the file is truncated or corrupt ({type(e).__name__}: {e})") from e


def load_meta(checkpoint_dir, step):
    p = meta_path(checkpoint_dir, step)
    if not os.path.exists(p):
        raise CheckpointError(f"missing {p}: every model_<step>.pt needs its meta_<step>.json (config and provenance)")
    try:
        with open(p) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"cannot parse {p}: {e}") from e


def clean_state_dict(state_dict):
    """Strip the prefix torch.compile adds to every key."""
    return {k.removeprefix("_orig_mod."): v for k, v in state_dict.items()}


def check_state_dict(model, state_dict):
    """Raise with the full list of missing, unexpected and mis-shaped keys; return None if it fits."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    misshaped = sorted(f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(expected[k].shape)}"
                       for k in set(expected) & set(state_dict) if tuple(expected[k].shape) != tuple(state_dict[k].shape))
    if missing or unexpected or misshaped:
        parts = []
        if missing:
            parts.append(f"missing keys ({len(missing)}): {missing[:20]}")
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): {unexpected[:20]}")
        if misshaped:
            parts.append(f"mis-shaped keys ({len(misshaped)}): {misshaped[:20]}")
        raise CheckpointError("state_dict does not match the model: " + "; ".join(parts))


def load_state_dict_strict(model, state_dict, assign=False):
    check_state_dict(model, state_dict)
    model.load_state_dict(state_dict, strict=True, assign=assign)


def model_kind_of(meta):
    if "model_kind" in meta:
        return meta["model_kind"]
    if "model_config" in meta:  # nanochat's own layout: today's records window_pattern, Oct 2025's did not
        return "modern" if "window_pattern" in meta["model_config"] else "gpt"
    raise CheckpointError("checkpoint meta has neither model_kind nor model_config; cannot tell what model it holds")


def build_model_from_meta(meta, device="cpu"):
    """An uninitialised model of the meta's kind, materialised on `device` (weights are garbage until loaded)."""
    config_cls, model_cls = get_model_kind(model_kind_of(meta))
    config = config_from_dict(config_cls, meta["model_config"])
    with torch.device("meta"):
        model = model_cls(config)
    model.to_empty(device=device)
    return model


def load_model(path, device="cpu", step=None):
    """
    (model, meta) from a checkpoint directory (latest complete step, or `step`) or a model_<step>.pt file,
    nanochat's or ours. The model is in eval mode with its non-persistent buffers (rotary tables) computed.
    On CPU/MPS, bf16 tensors (nanochat stores wte in bf16) become fp32; on CUDA dtypes are kept as saved.
    """
    device = torch.device(device)
    checkpoint_dir, step = resolve_checkpoint(path, step)
    meta = load_meta(checkpoint_dir, step)
    kind = model_kind_of(meta)
    state_dict = clean_state_dict(load_torch_file(model_path(checkpoint_dir, step), device))
    if kind == "gpt":
        from nanochat.gpt import check_nanochat_state_dict
        check_nanochat_state_dict(state_dict, meta.get("model_config"))
    if device.type in ("cpu", "mps"):
        state_dict = {k: v.float() if v.dtype == torch.bfloat16 else v for k, v in state_dict.items()}
    model = build_model_from_meta(meta, device)
    load_state_dict_strict(model, state_dict, assign=True)
    model.init_buffers()
    model.eval()
    meta = dict(meta, checkpoint_dir=checkpoint_dir, checkpoint_step=step)
    return model, meta


def load_model_and_tokenizer(path, device="cpu", step=None, tokenizer_dir=None):
    """
    (model, tokenizer, meta): load_model's pair and the tokenizer from tokenizer_dir, by default the checkpoint's
    own directory (the tokenizer travels with the checkpoint); meta["tokenizer_dir"] says which was read.
    The vocabulary rule: every id of the tokenizer must have a row in the model's embedding, so the tokenizer may
    have fewer ids than config.vocab_size (a vocab padded to a round size, as nanochat's 50304 for GPT-2's 50257
    ids), never more. Both are checked before the weights are read.
    """
    checkpoint_dir, step = resolve_checkpoint(path, step)
    meta = load_meta(checkpoint_dir, step)
    vocab_size = config_from_dict(get_model_kind(model_kind_of(meta))[0], meta["model_config"]).vocab_size
    tokenizer_dir = expand_path(tokenizer_dir) or checkpoint_dir
    if not os.path.isfile(os.path.join(tokenizer_dir, TOKENIZER_FILENAME)):
        raise CheckpointError(f"no {TOKENIZER_FILENAME} in {tokenizer_dir}: the tokenizer travels with the checkpoint; "
                              f"copy the one the model was trained with there (scripts.tok_train writes it to "
                              f"<base_dir>/tokenizer), or point --tokenizer-dir at it where the script has one")
    tokenizer = Tokenizer.from_directory(tokenizer_dir)
    if tokenizer.get_vocab_size() > vocab_size:
        raise CheckpointError(f"the tokenizer in {tokenizer_dir} has {tokenizer.get_vocab_size()} ids but the model's "
                              f"vocab_size is {vocab_size}: ids past the embedding have no row, so it is not this "
                              f"model's tokenizer; use the one the model was trained with")
    model, meta = load_model(checkpoint_dir, device, step)
    return model, tokenizer, dict(meta, tokenizer_dir=tokenizer_dir)


def load_optimizer_state(checkpoint_dir, step, rank, device="cpu"):
    return load_torch_file(optim_path(expand_path(checkpoint_dir), step, rank), device)


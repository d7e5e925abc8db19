"""
Export a checkpoint as a folder ready for the Hugging Face hub, and optionally push it.

    python -m scripts.export --checkpoint DIR_OR_MODEL_PT --out FOLDER [--results JSON ...] [--push REPO_ID] [--private]
                             [--overwrite] [--step N] [--tokenizer-dir DIR] [--name NAME] [--license SPDX_ID]

The folder:
    model_<step>.pt, meta_<step>.json   the checkpoint's own files, byte for byte (so
                                        nanochat.checkpoint_manager.load_model(FOLDER) loads it; the weights are
                                        checked against the model's keys and shapes before anything is published)
    tokenizer.pkl, token_bytes.pt       the tokenizer (checked to fit the model's vocabulary)
    config.json                         model kind, config, parameter count, lineage, the calibration's guarantee
    README.md                           the model card: what the model is, how to run it with this repository's
                                        commands, and the tables measured in each --results JSON (chat_eval,
                                        base_eval, tiny_experiment's results.json, a run report stage file)
It is assembled in a temporary folder beside --out and renamed into place, so --out is either the previous export
or the new one, never a mix. A non-empty --out is replaced only with --overwrite, and only if it holds an export.
The card states a license only when known: --license, else this repository's LICENSE when it is MIT.
--push REPO_ID creates the model repository (exist_ok) and uploads the folder through huggingface_hub (a token from
`hf auth login` or $HF_TOKEN). Optimizer states are not exported (inference only).
"""
import argparse
import json
import os
import shutil

import torch

from nanochat.common import expand_path, add_runtime_args, run_script, UserError, TOKENIZER_FILES, TOKENIZER_FILENAME
from nanochat.checkpoint_manager import (resolve_checkpoint, load_meta, model_kind_of, get_model_kind, config_from_dict,
                                         config_to_dict, model_path, meta_path, load_torch_file, clean_state_dict,
                                         check_state_dict, copy_tokenizer_files, atomic_json_save, atomic_bytes_save)
from nanochat.matryoshka import MODES, snap_to_level
from nanochat.tokenizer import Tokenizer
from nanochat import run_report

EXPORT_FORMAT = "adamba-export-1"  # config.json's "format": what --overwrite recognises as a previous export
CARD_RESULT_LINES = 40  # values listed per --results file beyond its tables (the rest: see the JSON)
PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LICENSE_FILES = ("LICENSE", "LICENSE.md", "LICENSE.txt", "COPYING")
# what each model kind is, in the card's words
KIND_TEXT = {
    "gpt": "a dense nanochat GPT (the Oct-2025 layout: attention blocks only); it runs in compute mode think only",
    "modern": "a dense nanochat GPT of today's layout (sliding-window attention); it runs in compute mode think only",
    "hybrid": "an Adamba hybrid Mamba-attention model: Mamba blocks interleaved with a nanochat GPT's attention blocks, "
              "trained so that the first w channels of every block form a working narrower model (Matryoshka widths)",
}
MIXER_TEXT = {"A": "attention", "M": "Mamba"}
FFN_TEXT = {"D": "dense MLP", "E": "MoE", "N": "no FFN"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m scripts.export", description="Export a checkpoint as a hub-ready folder")
    p.add_argument("--checkpoint", type=str, required=True, help="checkpoint directory (latest step) or model_<step>.pt")
    p.add_argument("--step", type=int, default=None, help="the step of a checkpoint directory (default: the latest)")
    p.add_argument("--out", type=str, required=True, help="the folder to write (empty or absent, or --overwrite)")
    p.add_argument("--results", type=str, nargs="+", action="extend", default=[],
                   help="JSON files of measured metrics whose tables go into the model card")
    p.add_argument("--tokenizer-dir", type=str, default=None, help="default: the checkpoint directory")
    p.add_argument("--name", type=str, default=None, help="the card's title (default: --out's folder name)")
    p.add_argument("--license", type=str, default=None,
                   help="SPDX id for the card (default: this repository's LICENSE if it is MIT, else none stated)")
    p.add_argument("--push", type=str, default=None, metavar="REPO_ID", help="upload the folder to this hub model repo")
    p.add_argument("--private", action="store_true", help="with --push: create the repository private")
    p.add_argument("--overwrite", action="store_true", help="replace a previous export in --out")
    add_runtime_args(p, threads=False)  # --debug, --require-kernels (read by run_script)
    return p.parse_args(argv)


# -----------------------------------------------------------------------------
# Checks before anything is written

def is_export(folder):
    try:
        with open(os.path.join(folder, "config.json")) as f:
            return json.load(f).get("format") == EXPORT_FORMAT
    except (OSError, ValueError, AttributeError):  # no config.json, not JSON, not an object: not ours
        return False


def check_out(out, src_dir, overwrite):
    """--out may be absent or empty; a non-empty one only with --overwrite and only if it holds an export."""
    src = os.path.realpath(src_dir)
    if src == os.path.realpath(out) or src.startswith(os.path.realpath(out) + os.sep):
        raise UserError(f"--out {out} holds the source checkpoint {src_dir}: export into another folder")
    if os.path.exists(out) and not os.path.isdir(out):
        raise UserError(f"--out {out} is a file, not a folder")
    if os.path.isdir(out) and os.listdir(out):
        if not overwrite:
            raise UserError(f"--out {out} is not empty; pass --overwrite to replace a previous export there, or "
                            f"choose another --out")
        if not is_export(out):
            raise UserError(f"--out {out} does not hold an export (no config.json written by scripts.export); not "
                            f"replacing it: choose another --out")


def repo_license():
    """'mit' when this repository's LICENSE file is the MIT license, else None (not stated)."""
    for name in LICENSE_FILES:
        path = os.path.join(PROJECT_ROOT, name)
        if os.path.isfile(path):
            with open(path, errors="replace") as f:
                text = f.read()
            mit = "Permission is hereby granted, free of charge" in text and "MIT" in text
            return "mit" if mit else None
    return None


def describe_model(meta):
    """(kind, config, model class name, parameter count): the model is built on the meta device (no memory)."""
    kind = model_kind_of(meta)
    config_cls, model_cls = get_model_kind(kind)
    config = config_from_dict(config_cls, meta["model_config"])
    with torch.device("meta"):
        model = model_cls(config)
    return kind, config, model


def check_weights(path, model, kind, meta):
    """The exported weights load strictly into the model (keys and shapes; read through mmap, not into memory)."""
    state_dict = clean_state_dict(load_torch_file(path, mmap=True))
    if kind == "gpt":
        from nanochat.gpt import check_nanochat_state_dict
        check_nanochat_state_dict(state_dict, meta.get("model_config"))
    check_state_dict(model, state_dict)


def check_tokenizer(folder, vocab_size):
    """The rule of load_model_and_tokenizer: every tokenizer id has a row in the embedding."""
    n = Tokenizer.from_directory(folder).get_vocab_size()
    if n > vocab_size:
        raise UserError(f"the tokenizer has {n} ids but the model's vocab_size is {vocab_size}: not this model's "
                        f"tokenizer; point --tokenizer-dir at the one it was trained with")


# -----------------------------------------------------------------------------
# config.json and the model card

def guarantee_of(meta):
    """The calibration's guarantee (scripts.calibrate_gates), its headline fields, or None when uncalibrated."""
    g = (meta.get("calibration") or {}).get("guarantee")
    if not g:
        return None
    keys = ("alpha", "delta", "statement", "operating_point", "fallback_full_width", "n_test_units")
    return {k: g[k] for k in keys if k in g}


def surgery_chain(meta):
    """The surgery ops that made the model, oldest first (meta["surgery"] links to its source's as "previous")."""
    ops, s = [], meta.get("surgery")
    while isinstance(s, dict):
        ops.append(s.get("op"))
        s = s.get("previous")
    return ops[::-1]


def make_config(meta, kind, config, model, step, files):
    prov = run_report.provenance()
    return {"format": EXPORT_FORMAT, "model_kind": kind, "architecture": type(model).__name__, "step": step,
            "num_params": model.num_params(), "model_config": config_to_dict(config), "files": files,
            "phase": meta.get("phase"), "surgery": surgery_chain(meta), "lineage": meta.get("lineage", []),
            "calibrated": "calibration" in meta, "guarantee": guarantee_of(meta),
            "exported": {k: prov[k] for k in ("date", "commit", "dirty")}}


def model_rows(kind, config, cfg_json):
    """(field, value) rows of the card's model table."""
    rows = [("model kind", f"{kind} ({cfg_json['architecture']})"), ("parameters", f"{cfg_json['num_params']:,}"),
            ("blocks", str(config.n_layer)),
            ("width", f"{config.n_embd} channels, {config.n_head} heads ({config.n_kv_head} key/value heads)"),
            ("vocabulary", str(config.vocab_size)), ("context", f"{config.sequence_len} tokens")]
    if kind == "modern":
        rows.append(("window pattern", config.window_pattern))
    if kind != "hybrid":
        return rows
    blocks = [config.mixer_kind(j) + config.ffn_kind(j) for j in range(config.n_layer)]
    mixers = ", ".join(f"{k} {v}" for k, v in MIXER_TEXT.items() if k in config.layer_pattern)
    ffns = ", ".join(f"{k} {v}" for k, v in FFN_TEXT.items() if k in config.ffn_pattern)
    rows += [("layer pattern", f"`{config.layer_pattern}` ({mixers}; Mamba-{config.mamba_version})"),
             ("FFN pattern", f"`{config.ffn_pattern}` ({ffns})"), ("blocks in order", " ".join(blocks)),
             ("width levels", ", ".join(map(str, config.width_levels))),
             ("compute modes", "; ".join(f"{m} {'predicted plan' if MODES[m].predicted else snap_to_level(MODES[m].width, config.width_levels)}"
                                         for m in MODES)),
             ("exit readouts after blocks", ", ".join(map(str, config.exit_blocks()))),
             ("adaptive controllers", "gates and width router" if config.adaptive else "none")]
    if config.grown_from:
        rows.append(("grown from widths", ", ".join(map(str, config.grown_from))))
    return rows


def front_matter(kind, license_id):
    tags = ["adamba", "nanochat", "pytorch"] + (["mamba", "hybrid", "matryoshka", "adaptive-compute"]
                                                if kind == "hybrid" else ["gpt"])
    lines = ["---", "library_name: adamba"]
    if license_id:
        lines.append(f"license: {license_id}")
    lines += ["pipeline_tag: text-generation", "tags:", *(f"- {t}" for t in tags), "---"]
    return lines


def calibration_lines(meta, guarantee):
    if "calibration" not in meta:
        return ["Not calibrated: auto mode runs the engine's default thresholds (exit above 0.95, widen below 0.5), "
                "with no stated guarantee. `python -m scripts.calibrate_gates` calibrates a hybrid."]
    if guarantee is None:
        return ["The exit gates are calibrated (scripts.calibrate_gates); no operating point with a guarantee is "
                "recorded."]
    head = (f"Calibrated with scripts.calibrate_gates: α = {guarantee.get('alpha')}, δ = {guarantee.get('delta')} "
            f"(with probability at least 1 − δ over the calibration draw, auto's outputs differ from full width at a "
            f"rate of at most α).")
    if guarantee.get("fallback_full_width"):
        head += " No operating point was validated, so auto runs at full width."
    return [head, "", f"> {run_report.fmt(guarantee.get('statement', ''))}"]


def lineage_lines(meta):
    lines = []
    ops = surgery_chain(meta)
    if ops:
        lines.append(f"- surgery: {' → '.join(str(op) for op in ops)} (scripts.surgery; logits unchanged)")
    for entry in meta.get("lineage", []):
        if isinstance(entry, dict):
            src = os.path.basename(str(entry.get("checkpoint", "")).rstrip("/")) or "?"
            lines.append(f"- trained from `{src}` step {entry.get('step')} ({entry.get('model_kind')}, phase "
                         f"{entry.get('phase')})")
    if meta.get("phase") is not None:
        lines.append(f"- this checkpoint: phase {meta['phase']} (scripts.fractal_train), step {meta.get('step')}")
    return lines or ["- not recorded in the checkpoint's meta"]


def usage_lines(kind, repo_id, folder_name):
    mode = "auto" if kind == "hybrid" else "think"
    fetch = ([f"hf download {repo_id} --local-dir $MODEL_DIR     # huggingface_hub's CLI"] if repo_id else [])
    return ["The model's classes are this project's (Adamba): in a checkout of its repository, after "
            "`pip install -e .`:", "", "```bash", f"MODEL_DIR={folder_name}     # this folder",
            *fetch,
            f'python -m scripts.generate --checkpoint $MODEL_DIR --prompt "The capital of France is" --mode {mode} '
            f"--show-compute",
            f"python -m scripts.chat_cli --checkpoint $MODEL_DIR --mode {mode}     # a chat-tuned checkpoint", "```",
            "", "```python", "from nanochat.checkpoint_manager import load_model_and_tokenizer",
            f'model, tokenizer, meta = load_model_and_tokenizer("{folder_name}")  # eval mode, fp32 on CPU',
            "logits = model(idx)  # idx (B, T) token ids -> (B, T, vocab) logits: full width, no exits", "```", "",
            "Compute modes: " + ", ".join(MODES) + (" (`--mode`)." if kind == "hybrid" else
                                                   "; a dense GPT runs think only.")]


def results_lines(results):
    if not results:
        return ["No measurements were given to this export (`--results`)."]
    lines = []
    for i, (path, data) in enumerate(results, 1):
        title = os.path.basename(path) + (f" (stage {data['stage']})" if isinstance(data.get("stage"), str) else "")
        where = run_report.provenance_line(run_report.provenance_of(data))
        lines += [f"### {i}. {title}", "", f"Measured: {where}" if where else "Device, date and commit: not recorded "
                                                                              "in the file.", ""]
        lines += run_report.metrics_markdown(data, skip={"stage", *run_report.PROVENANCE_KEYS},
                                             limit=CARD_RESULT_LINES, source=os.path.basename(path))
        lines.append("")
    return lines


def model_card(name, folder_name, meta, kind, config, cfg_json, results, license_id, repo_id):
    files = cfg_json["files"]
    lines = [*front_matter(kind, license_id), "", f"# {name}", "",
             f"{name} is {KIND_TEXT[kind]}. Checkpoint step {cfg_json['step']}, {cfg_json['num_params']:,} parameters.",
             "", "| | |", "| --- | --- |", *(f"| {k} | {v} |" for k, v in model_rows(kind, config, cfg_json)), ""]
    if kind == "hybrid":
        lines += ["## Calibration", "", *calibration_lines(meta, cfg_json["guarantee"]), ""]
    lines += ["## Lineage", "", *lineage_lines(meta), "", "## How to run it", "", *usage_lines(kind, repo_id, folder_name), "",
              "## Measured results", "", *results_lines(results), "## Files", "",
              f"- `{files['model']}`, `{files['meta']}`: the checkpoint (`meta` holds the config and what produced "
              f"it)", f"- {', '.join(f'`{t}`' for t in files['tokenizer'])}: the tokenizer (nanochat's format)",
              "- `config.json`: model kind, config, parameter count, lineage, calibration", ""]
    if not license_id:
        lines += ["License: not stated (the export was given none)."]
    return "\n".join(lines) + "\n"


# -----------------------------------------------------------------------------
# Writing and pushing

def fsync_file(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_folder(folder, folder_name, src_dir, step, meta, tokenizer_dir, results, name, license_id, repo_id):
    """Assemble the export in `folder` (named folder_name once published); returns config.json's content."""
    kind, config, model = describe_model(meta)
    files = {"model": os.path.basename(model_path(folder, step)), "meta": os.path.basename(meta_path(folder, step)),
             "tokenizer": [n for n in TOKENIZER_FILES if os.path.exists(os.path.join(tokenizer_dir, n))]}
    for src in (model_path(src_dir, step), meta_path(src_dir, step)):  # byte for byte: large, and already ours
        dst = os.path.join(folder, os.path.basename(src))
        shutil.copyfile(src, dst)
        fsync_file(dst)
    check_weights(model_path(folder, step), model, kind, meta)
    copy_tokenizer_files(tokenizer_dir, folder)
    check_tokenizer(folder, config.vocab_size)
    cfg_json = make_config(meta, kind, config, model, step, files)
    atomic_json_save(cfg_json, os.path.join(folder, "config.json"))
    card = model_card(name, folder_name, meta, kind, config, cfg_json, results, license_id, repo_id)
    atomic_bytes_save(card, os.path.join(folder, "README.md"))
    return cfg_json


def publish(tmp, out):
    """Rename the assembled folder to `out`; a previous export there is moved aside first and deleted after."""
    previous = None
    if os.path.lexists(out):
        previous = f"{tmp}.previous"
        os.rename(out, previous)
    os.rename(tmp, out)
    if previous is not None:
        shutil.rmtree(previous)


def hub_errors():
    """What a failed push raises: the hub's HTTP errors and a bad repo id, and the network's (tasks.hub)."""
    from huggingface_hub.utils import HfHubHTTPError, HFValidationError
    from tasks.hub import network_errors
    return (HfHubHTTPError, HFValidationError) + network_errors()


def push(folder, repo_id, private):
    """Create the hub model repository (kept if it exists) and upload the folder; returns the repository's url."""
    import huggingface_hub
    if not huggingface_hub.get_token():
        raise UserError(f"--push {repo_id} needs a Hugging Face token: run `hf auth login` or set HF_TOKEN (the "
                        f"export in {folder} is written; push it again with the same command)")
    api = huggingface_hub.HfApi()
    try:
        url = api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        api.upload_folder(repo_id=repo_id, folder_path=folder, repo_type="model",
                          commit_message=f"Upload {os.path.basename(folder)} (scripts.export)")
    except hub_errors() as e:
        raise UserError(f"--push {repo_id} failed ({type(e).__name__}: {e}); the export in {folder} is written, push "
                        f"it again with the same command") from e
    return str(url)


def main(argv=None):
    args = parse_args(argv)
    src_dir, step = resolve_checkpoint(args.checkpoint, args.step)
    meta = load_meta(src_dir, step)
    out = expand_path(args.out)
    check_out(out, src_dir, args.overwrite)
    tokenizer_dir = expand_path(args.tokenizer_dir) or src_dir
    if not os.path.isfile(os.path.join(tokenizer_dir, TOKENIZER_FILENAME)):
        raise UserError(f"no {TOKENIZER_FILENAME} in {tokenizer_dir}: an export carries the model's tokenizer; point "
                        f"--tokenizer-dir at the one it was trained with")
    results = [(p, run_report.load_json(expand_path(p), "--results file")) for p in args.results]
    license_id = args.license or repo_license()
    name = args.name or os.path.basename(out)
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(out)}.export-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)  # a leftover of a killed export with this pid
    os.makedirs(tmp)
    try:
        cfg_json = write_folder(tmp, os.path.basename(out), src_dir, step, meta, tokenizer_dir, results, name, license_id, args.push)
        publish(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"exported {cfg_json['model_kind']} step {step} ({cfg_json['num_params']:,} parameters) to {out}: "
          f"{', '.join(sorted(os.listdir(out)))}")
    if not license_id:
        print("note: the model card states no license (this repository has no MIT LICENSE file): pass --license "
              "SPDX_ID to state one")
    url = push(out, args.push, args.private) if args.push else None
    if url:
        print(f"pushed {out} to {url}")
    return {"out": out, "config": cfg_json, "url": url}


if __name__ == "__main__":
    run_script(main)

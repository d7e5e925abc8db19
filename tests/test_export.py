"""
scripts.export: the hub-ready folder (files, config.json, the model card's tables), the exported checkpoint loading
to the very logits of its source, --overwrite's refusals, the license rule, and --push through a recorder of
huggingface_hub.HfApi (no network).
"""
import json
import os

import pytest
import torch

import huggingface_hub
from huggingface_hub.utils import HFValidationError
from nanochat import run_report
from nanochat.checkpoint_manager import load_model, load_model_and_tokenizer, meta_path
from nanochat.common import run_script, DEBUG_ENV
from scripts import export
from testutil import write_hybrid_checkpoint

GUARANTEE = {"alpha": 0.05, "delta": 0.1, "statement": "guarantee: with probability >= 0.9, the rate ... <= 0.05",
             "operating_point": {"router": 0.7, "exit": 0.95, "widen": 0.5}, "fallback_full_width": False,
             "n_test_units": {"all": 200}, "grid": {"router": [0.9, 0.7]}}
CHAT_EVAL = {"date": "2026-01-02T03:04:05+00:00", "device": "NVIDIA H100 80GB HBM3 x1", "commit": "abc1234",
             "tasks": {"ARC-Easy": {"think": {"accuracy": 0.5, "compute_fraction": 1.0},
                                    "auto": {"accuracy": 0.4375, "compute_fraction": 0.625}},
                       "GSM8K": {"think": {"accuracy": 0.125, "compute_fraction": 1.0}}},
             "ChatCORE": 0.0625}



@pytest.fixture(autouse=True)
def no_debug_env(monkeypatch):
    """run_script's one-line errors are what these tests check: ADAMBA_DEBUG=1 (left set by an earlier test, or a
    user's shell) would turn them into tracebacks."""
    monkeypatch.delenv(DEBUG_ENV, raising=False)

@pytest.fixture
def source(tmp_path, tiny_data):
    """A calibrated-looking phase-3 hybrid checkpoint (step 5) with the tiny tokenizer, and its model."""
    src = tmp_path / "phase3"
    model = write_hybrid_checkpoint(src, tiny_data)
    path = meta_path(str(src), 5)
    meta = json.load(open(path))
    meta.update(phase=3, surgery={"op": "grow", "previous": {"op": "create"}},
                lineage=[{"checkpoint": "/runs/grown", "step": 0, "phase": None, "model_kind": "hybrid"}],
                calibration={"guarantee": GUARANTEE})
    json.dump(meta, open(path, "w"))
    return src, model


def write_json(path, obj):
    path.write_text(json.dumps(obj))
    return str(path)


def test_export_folder_loads_to_the_same_logits_and_carries_the_tables(source, tmp_path, capsys):
    src, _ = source
    out = tmp_path / "hub" / "adamba-tiny"
    chat = write_json(tmp_path / "chat_eval.json", CHAT_EVAL)
    stage = run_report.record("base_eval", {"modes": {"ghost": {"core": 0.125, "compute_fraction": 0.25},
                                                      "think": {"core": 0.25, "compute_fraction": 1.0}}},
                              report_dir=str(tmp_path / "report"))
    res = export.main(["--checkpoint", str(src), "--out", str(out), "--results", chat, stage])
    assert sorted(os.listdir(out)) == ["README.md", "config.json", "meta_000005.json", "model_000005.pt",
                                       "token_bytes.pt", "tokenizer.pkl"]
    assert [n for n in os.listdir(out.parent) if n.startswith(".")] == []  # no temporary folder left behind
    assert (out / "meta_000005.json").read_bytes() == (src / "meta_000005.json").read_bytes()
    assert f"to {out}" in capsys.readouterr().out

    # the export is a checkpoint of ours: the same logits, and the tokenizer loads beside it
    a, _ = load_model(str(src))
    b, meta = load_model(str(out))
    idx = torch.randint(0, a.config.vocab_size, (2, 16))
    with torch.no_grad():
        assert torch.equal(a(idx), b(idx))
    assert meta["calibration"]["guarantee"]["alpha"] == 0.05
    load_model_and_tokenizer(str(out))

    cfg = json.loads((out / "config.json").read_text())
    assert cfg == res["config"]
    assert cfg["format"] == export.EXPORT_FORMAT and cfg["model_kind"] == "hybrid" and cfg["architecture"] == "HybridGPT"
    assert cfg["num_params"] == a.num_params() and cfg["step"] == 5 and cfg["phase"] == 3
    assert cfg["model_config"]["layer_pattern"] == "AM" and cfg["model_config"]["width_levels"] == [64, 128, 256]
    assert cfg["surgery"] == ["create", "grow"] and cfg["lineage"][0]["checkpoint"] == "/runs/grown"
    assert cfg["calibrated"] is True and cfg["guarantee"]["delta"] == 0.1 and "grid" not in cfg["guarantee"]
    assert cfg["files"] == {"model": "model_000005.pt", "meta": "meta_000005.json",
                            "tokenizer": ["tokenizer.pkl", "token_bytes.pt"]}
    assert set(cfg["exported"]) == {"date", "commit", "dirty"}

    card = (out / "README.md").read_text()
    front = card.split("---\n")[1]
    assert "library_name: adamba\n" in front and "- adaptive-compute\n" in front and "pipeline_tag: text-generation" in front
    # a license only where this repository's LICENSE says MIT (today it has none; the rule: test_license_...)
    assert ("license: mit\n" in front) == (export.repo_license() == "mit") and ("license:" in front) == bool(export.repo_license())
    assert "# adamba-tiny" in card and f"{a.num_params():,} parameters" in card
    assert "| layer pattern | `AM` (A attention, M Mamba; Mamba-1) |" in card
    assert "| width levels | 64, 128, 256 |" in card and "| blocks in order | AD MD AD MD |" in card
    assert "α = 0.05, δ = 0.1" in card and GUARANTEE["statement"] in card
    assert "- surgery: create → grow" in card and "trained from `grown` step 0" in card
    assert "python -m scripts.generate --checkpoint $MODEL_DIR" in card and "MODEL_DIR=adamba-tiny" in card
    # the tables of each --results file, with its provenance
    assert "### 1. chat_eval.json" in card
    assert "Measured: 2026-01-02T03:04:05+00:00 · commit abc1234 · NVIDIA H100 80GB HBM3 x1" in card
    assert "| task | metric | think | auto |" in card
    assert "| ARC-Easy | accuracy | 0.5 | 0.4375 |" in card and "| GSM8K | compute_fraction | 1.0 | n/a |" in card
    assert "- ChatCORE: 0.0625" in card
    assert "### 2. 01_base_eval.json (stage base_eval)" in card
    assert "| metric | ghost | think |" in card and "| core | 0.125 | 0.25 |" in card


def test_results_beyond_the_tables_are_listed_and_capped(source, tmp_path):
    src, _ = source
    big = {"chat": {"modes": {"auto": {"accuracy": 0.9}}}, "values": {f"v{i:02d}": i for i in range(50)}}
    out = tmp_path / "out"
    export.main(["--checkpoint", str(src), "--out", str(out), "--results", write_json(tmp_path / "results.json", big)])
    card = (out / "README.md").read_text()
    assert "**per mode (chat)**" in card and "| accuracy | 0.9 |" in card
    assert "Device, date and commit: not recorded in the file." in card
    assert "- values.v00: 0" in card and f"- values.v{export.CARD_RESULT_LINES - 1}: " in card
    assert f"- values.v{export.CARD_RESULT_LINES}: " not in card
    assert f"- … and {50 - export.CARD_RESULT_LINES} more values in results.json" in card


def test_dense_gpt_export(tmp_path, tiny_data):
    from nanochat.gpt import GPT, GPTConfig
    from nanochat.checkpoint_manager import save_model, copy_tokenizer_files
    gpt = GPT(GPTConfig(sequence_len=32, vocab_size=tiny_data["vocab_size"], n_layer=2, n_head=2, n_kv_head=2, n_embd=32))
    gpt.init_weights()
    save_model(str(tmp_path / "gpt"), 3, gpt)
    copy_tokenizer_files(tiny_data["tokenizer_dir"], str(tmp_path / "gpt"))
    res = export.main(["--checkpoint", str(tmp_path / "gpt" / "model_000003.pt"), "--out", str(tmp_path / "out")])
    card = (tmp_path / "out" / "README.md").read_text()
    assert res["config"]["model_kind"] == "gpt" and res["config"]["calibrated"] is False
    assert res["config"]["guarantee"] is None and res["config"]["lineage"] == []
    assert "| model kind | gpt (GPT) |" in card and "runs in compute mode think only" in card and "- gpt\n" in card
    assert "## Calibration" not in card and "width levels" not in card and "--mode think" in card
    assert "- not recorded in the checkpoint's meta" in card  # no lineage
    assert "No measurements were given to this export" in card
    assert sorted(os.listdir(tmp_path / "out"))[2:4] == ["meta_000003.json", "model_000003.pt"]


def one_line_error(capsys, argv):
    with pytest.raises(SystemExit) as exc:
        run_script(export.main, argv)
    assert exc.value.code == 1
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


def test_overwrite_refusals(source, tmp_path, capsys):
    src, _ = source
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    argv = ["--checkpoint", str(src), "--out", str(out)]
    assert "is not empty; pass --overwrite" in one_line_error(capsys, argv)
    assert "does not hold an export" in one_line_error(capsys, argv + ["--overwrite"])
    assert os.listdir(out) == ["keep.txt"]
    assert "holds the source checkpoint" in one_line_error(capsys, ["--checkpoint", str(src), "--out", str(src)])
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    fresh = ["--checkpoint", str(src), "--out", str(tmp_path / "fresh"), "--results", str(bad)]
    assert f"--results file {bad} is not valid JSON" in one_line_error(capsys, fresh)
    assert not (tmp_path / "fresh").exists()  # checked before anything is written

    (out / "keep.txt").unlink()  # an empty --out is fine; a previous export is replaced only with --overwrite
    export.main(argv)
    (out / "stale.txt").write_text("from the previous export")
    assert "is not empty" in one_line_error(capsys, argv)
    export.main(argv + ["--overwrite", "--name", "second"])
    assert "stale.txt" not in os.listdir(out) and "# second" in (out / "README.md").read_text()
    assert sorted(n for n in os.listdir(tmp_path) if n.startswith(".")) == []


def test_missing_tokenizer_is_an_error_and_writes_nothing(source, tmp_path, capsys):
    src, _ = source
    (src / "tokenizer.pkl").unlink()
    out = tmp_path / "out"
    assert "no tokenizer.pkl in" in one_line_error(capsys, ["--checkpoint", str(src), "--out", str(out)])
    assert not out.exists()


def test_license_is_stated_only_when_known(source, tmp_path, monkeypatch):
    src, _ = source
    repo = tmp_path / "repo"
    repo.mkdir()
    monkeypatch.setattr(export, "PROJECT_ROOT", str(repo))
    assert export.repo_license() is None
    (repo / "LICENSE").write_text("Apache License\nVersion 2.0, January 2004\n")
    assert export.repo_license() is None  # not recognised: not claimed
    (repo / "LICENSE").write_text("MIT License\n\nCopyright (c) 2025\n\nPermission is hereby granted, free of charge, "
                                  "to any person obtaining a copy\n")
    assert export.repo_license() == "mit"
    export.main(["--checkpoint", str(src), "--out", str(tmp_path / "a")])
    assert "\nlicense: mit\n" in (tmp_path / "a" / "README.md").read_text()
    export.main(["--checkpoint", str(src), "--out", str(tmp_path / "b"), "--license", "apache-2.0"])
    assert "\nlicense: apache-2.0\n" in (tmp_path / "b" / "README.md").read_text()


class HubRecorder:
    """Stands in for huggingface_hub.HfApi: records the calls; `fail` is raised by create_repo when set."""
    calls = []
    fail = None

    def create_repo(self, repo_id, **kw):
        HubRecorder.calls.append(("create_repo", repo_id, kw))
        if HubRecorder.fail is not None:
            raise HubRecorder.fail
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, **kw):
        HubRecorder.calls.append(("upload_folder", kw["repo_id"], kw))
        assert sorted(os.listdir(kw["folder_path"]))[:2] == ["README.md", "config.json"]  # the finished folder


@pytest.fixture
def hub(monkeypatch):
    HubRecorder.calls, HubRecorder.fail = [], None
    monkeypatch.setattr(huggingface_hub, "HfApi", HubRecorder)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: "hf_test")
    return HubRecorder


def test_push_creates_the_repo_and_uploads_the_folder(source, tmp_path, hub, capsys):
    src, _ = source
    out = tmp_path / "out"
    res = export.main(["--checkpoint", str(src), "--out", str(out), "--push", "someone/adamba-tiny", "--private"])
    assert [c[:2] for c in hub.calls] == [("create_repo", "someone/adamba-tiny"), ("upload_folder", "someone/adamba-tiny")]
    assert hub.calls[0][2] == {"repo_type": "model", "private": True, "exist_ok": True}
    assert hub.calls[1][2]["folder_path"] == str(out) and hub.calls[1][2]["repo_type"] == "model"
    assert res["url"] == "https://huggingface.co/someone/adamba-tiny"
    assert "pushed" in capsys.readouterr().out
    # the card tells how to fetch it from the repo it was pushed to
    assert "hf download someone/adamba-tiny --local-dir $MODEL_DIR" in (out / "README.md").read_text()


def push_failures():
    """What a failed push raises: requests' network errors are OSErrors, huggingface_hub >= 1.0 talks through httpx."""
    failures = [OSError("Connection refused"), HFValidationError("Repo id must use alphanumeric chars")]
    try:
        import httpx
        failures.append(httpx.ConnectError("Connection refused"))
    except ImportError:  # huggingface_hub < 1.0 has no httpx
        pass
    return failures


@pytest.mark.parametrize("failure", push_failures())
def test_push_without_token_or_network_is_one_line(source, tmp_path, hub, monkeypatch, capsys, failure):
    src, _ = source
    hub.fail = failure
    line = one_line_error(capsys, ["--checkpoint", str(src), "--out", str(tmp_path / "a"), "--push", "someone/m"])
    assert f"--push someone/m failed ({type(failure).__name__}: {failure})" in line and "is written" in line
    assert (tmp_path / "a" / "config.json").exists()  # the folder stays for a later push
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    hub.calls.clear()
    line = one_line_error(capsys, ["--checkpoint", str(src), "--out", str(tmp_path / "b"), "--push", "someone/m"])
    assert "needs a Hugging Face token" in line and hub.calls == []

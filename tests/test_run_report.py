"""
The per-run report (nanochat/run_report.py, scripts/report.py): stage files with provenance, their numbering and
overwriting, the markdown (per-mode tables, summary), and loud failures on a missing directory or a corrupt file.
"""
import json
import os
import subprocess

import pytest

from nanochat import run_report
from nanochat.common import UserError, run_script, DEBUG_ENV
from scripts import report as report_script

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SFT = {"loss": 1.25, "steps": 500, "mask": {"assistant_fraction": 0.4}}
EVAL = {"tasks": {"ARC-Easy": {"think": {"accuracy": 0.5, "compute_fraction": 1.0},
                               "ghost": {"accuracy": 0.25, "compute_fraction": 0.125},
                               "auto": {"accuracy": 0.5, "compute_fraction": 0.375}},
                  "GSM8K": {"think": {"accuracy": 0.0625, "compute_fraction": 1.0}}},
        "ChatCORE": 0.2}
BASE = {"modes": {"think": {"core": 0.3, "bpb": 0.875}, "whisper": {"core": 0.125, "bpb": 1.5, "compute_fraction": 0.5}},
        "tokens": 4096}



@pytest.fixture(autouse=True)
def no_debug_env(monkeypatch):
    """run_script's one-line errors are what these tests check: ADAMBA_DEBUG=1 (left set by an earlier test, or a
    user's shell) would turn them into tracebacks."""
    monkeypatch.delenv(DEBUG_ENV, raising=False)

def expected_commit():
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    return head.stdout.strip() if head.returncode == 0 else "unknown"


def test_record_render_write_round_trip(tmp_path):
    d = tmp_path / "report"
    p1 = run_report.record("chat_sft", {"loss": 9.0}, report_dir=str(d))
    p2 = run_report.record("chat_eval", EVAL, report_dir=str(d))
    p3 = run_report.record("base_eval", BASE, report_dir=str(d))
    assert run_report.record("chat_sft", SFT, report_dir=str(d)) == p1  # a stage run again overwrites its own file
    assert sorted(os.listdir(d)) == ["01_chat_sft.json", "02_chat_eval.json", "03_base_eval.json"]
    assert [os.path.basename(p) for p in (p2, p3)] == ["02_chat_eval.json", "03_base_eval.json"]

    saved = json.loads((d / "01_chat_sft.json").read_text())
    assert saved["stage"] == "chat_sft" and saved["loss"] == 1.25 and saved["mask"] == SFT["mask"]
    prov = saved["provenance"]
    assert set(prov) == {"date", "commit", "dirty", "device", "command"}
    assert prov["date"].endswith("+00:00") and prov["commit"] == expected_commit()
    assert isinstance(prov["dirty"], bool) and prov["device"].startswith("cpu: ") and "cores)" in prov["device"]

    text = run_report.render(str(d))
    assert text.startswith("# Run report")
    assert f"- commit: {prov['commit']}" in text and f"- device: {prov['device']}" in text
    # the stages in order, each with its provenance line and scalars
    assert text.index("## 01 chat_sft") < text.index("## 02 chat_eval") < text.index("## 03 base_eval")
    assert "- loss: 1.25" in text and "- steps: 500" in text and "- mask.assistant_fraction: 0.4" in text
    assert "- ChatCORE: 0.2" in text and "- tokens: 4096" in text
    # per task: rows task x metric, columns the modes in MODES order
    assert "| task | metric | ghost | think | auto |" in text
    assert "| ARC-Easy | accuracy | 0.25 | 0.5 | 0.5 |" in text
    assert "| ARC-Easy | compute_fraction | 0.125 | 1.0 | 0.375 |" in text
    assert "| GSM8K | accuracy | n/a | 0.0625 | n/a |" in text
    # per mode: accuracy / compute first, then the rest as recorded
    assert "| metric | whisper | think |" in text
    assert "| compute_fraction | 0.5 | n/a |" in text and "| core | 0.125 | 0.3 |" in text and "| bpb | 1.5 | 0.875 |" in text
    # the summary: one row per stage and task, the headline metric with the compute fraction
    summary = text[text.index("## Summary"):]
    assert "| stage | part | metric | ghost | whisper | think | auto |" in summary
    assert "| 02 chat_eval | ARC-Easy | accuracy | 0.25 (0.125) | n/a | 0.5 (1.0) | 0.5 (0.375) |" in summary
    assert "| 03 base_eval | - | core | n/a | 0.125 (0.5) | 0.3 | n/a |" in summary
    assert "chat_sft" not in summary  # no per-mode data, no row

    path = run_report.write(str(d))
    assert path == str(d / "report.md") and open(path).read() == text


def test_nested_per_mode_data_and_nan(tmp_path):
    """The shape may sit anywhere (tiny_experiment's results["chat"]["modes"]); NaN is stored as null."""
    data = {"chat": {"modes": {"auto": {"accuracy": 0.75, "compute_fraction": 0.5}, "think": {"accuracy": 0.8}}},
            "rl": {"lambda": 0.1, "reward": float("nan")}}
    path = run_report.record("tiny_chat", data, report_dir=str(tmp_path))
    assert json.loads(open(path).read())["rl"]["reward"] is None
    text = run_report.render(str(tmp_path))
    assert "**per mode (chat)**" in text and "| accuracy | 0.8 | 0.75 |" in text
    assert "- rl.lambda: 0.1" in text and "- rl.reward: n/a" in text
    assert "| 01 tiny_chat | chat | accuracy | 0.8 | 0.75 (0.5) |" in text


def test_report_dir_default_and_env(base_dir, monkeypatch, tmp_path):
    monkeypatch.delenv(run_report.REPORT_DIR_ENV, raising=False)
    assert run_report.resolve_report_dir() == str(base_dir / "report")
    monkeypatch.setenv(run_report.REPORT_DIR_ENV, str(tmp_path / "elsewhere"))
    path = run_report.record("surgery", {"max_abs_dlogit": 1e-6})
    assert path == str(tmp_path / "elsewhere" / "01_surgery.json")
    assert run_report.resolve_report_dir(str(tmp_path / "x")) == str(tmp_path / "x")  # an explicit dir wins


def test_missing_dir_and_corrupt_file_are_errors_naming_them(tmp_path):
    with pytest.raises(UserError, match="report directory .*nope does not exist"):
        run_report.render(str(tmp_path / "nope"))
    with pytest.raises(UserError, match="has no stage files"):
        run_report.render(str(tmp_path))
    run_report.record("chat_sft", SFT, report_dir=str(tmp_path))
    bad = tmp_path / "02_chat_eval.json"
    bad.write_text('{"stage": "chat_eval", "modes": ')  # cut off mid-write by something other than record()
    with pytest.raises(UserError, match=f"stage file {bad} is not valid JSON"):
        run_report.render(str(tmp_path))
    bad.write_text('{"accuracy": 0.5}')
    with pytest.raises(UserError, match="02_chat_eval.json has no provenance"):
        run_report.render(str(tmp_path))


def test_bad_stage_names_and_reserved_keys_are_refused(tmp_path):
    with pytest.raises(ValueError, match="stage name"):
        run_report.record("../escape", {}, report_dir=str(tmp_path))
    with pytest.raises(ValueError, match="provenance"):
        run_report.record("chat_eval", {"provenance": "mine"}, report_dir=str(tmp_path))
    assert os.listdir(tmp_path) == []


def test_only_rank0_writes(tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert run_report.record("chat_sft", SFT, report_dir=str(tmp_path)) is None
    assert os.listdir(tmp_path) == []


def test_commit_is_unknown_outside_this_checkout(tmp_path, monkeypatch):
    monkeypatch.setattr(run_report, "PROJECT_ROOT", str(tmp_path))  # no repository here
    assert run_report.git_commit() == ("unknown", None)
    monkeypatch.setattr(run_report, "PROJECT_ROOT", ROOT)
    monkeypatch.setenv("PATH", str(tmp_path))  # no git program
    assert run_report.git_commit() == ("unknown", None)


def test_report_script_writes_and_resets(tmp_path, capsys):
    d = tmp_path / "r"
    run_report.record("chat_eval", EVAL, report_dir=str(d))
    run_report.record("chat_rl", {"modes": {"auto": {"accuracy": 0.4, "compute_fraction": 0.3}}}, report_dir=str(d))
    (d / "notes.txt").write_text("mine")
    path = report_script.main(["--report-dir", str(d)])
    assert capsys.readouterr().out.strip() == path == str(d / "report.md") and os.path.exists(path)
    removed = report_script.main(["--report-dir", str(d), "--reset"])
    out = capsys.readouterr().out
    assert sorted(os.path.basename(p) for p in removed) == ["01_chat_eval.json", "02_chat_rl.json", "report.md"]
    assert all(f"removed {p}" in out for p in removed)
    assert os.listdir(d) == ["notes.txt"]  # files that are not the report's stay
    with pytest.raises(SystemExit) as exc:  # an empty report is one line, not a traceback
        run_script(report_script.main, ["--report-dir", str(d)])
    assert exc.value.code == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("error: ") and "has no stage files" in err[0]

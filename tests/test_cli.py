"""
What a user sees from the scripts (nanochat.common.run_script): a mistake the user can fix is one line
`error: ...` and exit 1, a bug keeps its traceback (as does every error under --debug / ADAMBA_DEBUG=1); CPU
thread choice; quiet logging; the Mamba kernels' warning on CUDA; scripts.generate's edge cases and --stop.
"""
import logging
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import nanochat
from nanochat import common
from nanochat.common import (UserError, run_script, is_user_error, choose_cpu_threads, setup_logging, DEBUG_ENV,
                             REQUIRE_KERNELS_ENV)
from nanochat.checkpoint_manager import CheckpointError, save_model, copy_tokenizer_files
from nanochat.gpt import GPT, GPTConfig
from nanochat import mamba_ops

ROOT = Path(__file__).resolve().parents[1]


def error_lines(capsys):
    return [line for line in capsys.readouterr().err.splitlines() if line.strip()]


def expect_one_line_error(capsys, main, argv, match):
    """run_script(main, argv) exits 1 with exactly one stderr line, 'error: ...' containing `match`."""
    with pytest.raises(SystemExit) as exc:
        run_script(main, argv)
    assert exc.value.code == 1
    lines = error_lines(capsys)
    assert len(lines) == 1 and lines[0].startswith("error: ") and match in lines[0], lines
    return lines[0]


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    # run_script exports --debug / --require-kernels to the environment (for torchrun's ranks): undo it per test
    for name in (DEBUG_ENV, REQUIRE_KERNELS_ENV):  # set, then deleted: undo restores the value before the test (or none),
        monkeypatch.setenv(name, "")                # even when run_script set it during the test
        monkeypatch.delenv(name)
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.fixture
def gpt_checkpoint(tmp_path, tiny_data):
    torch.manual_seed(0)
    gpt = GPT(GPTConfig(sequence_len=32, vocab_size=tiny_data["vocab_size"], n_layer=2, n_head=2, n_kv_head=2, n_embd=32))
    gpt.init_weights()
    d = tmp_path / "gpt"
    save_model(str(d), 1, gpt)
    copy_tokenizer_files(tiny_data["tokenizer_dir"], str(d))
    return d


# -----------------------------------------------------------------------------
# user error or bug

def fake_project_function(src, name="fake_module.py"):
    """A function compiled as if it were a file of nanochat/ (what is_user_error looks at) from `src`."""
    scope = {}
    exec(compile(src, os.path.join(os.path.dirname(nanochat.__file__), name), "exec"), scope)
    return scope["f"]


def raised(fn):
    try:
        fn()
    except BaseException as e:  # noqa: B902 (the exception object is what is tested)
        return e
    raise AssertionError("did not raise")


def raise_value_error_here():
    raise ValueError("raised in a test file")


def test_user_errors_are_told_from_bugs():
    assert is_user_error(UserError("a flag the user can fix"))
    assert is_user_error(CheckpointError("a checkpoint error is a user error"))
    assert is_user_error(raised(lambda: open("/nonexistent/file")))  # an OSError: a path the user gave
    # a ValueError that a `raise` statement of the project raised carries a message written for the user...
    from nanochat.dataset import split_parquet_files
    assert is_user_error(raised(lambda: split_parquet_files("test")))
    checked = fake_project_function("def f():\n    raise ValueError(\n        'a check'\n        ' that failed')\n")
    assert is_user_error(raised(checked))
    # ...one from an int(), an unpacking or inside torch is a bug, as is any other type
    assert not is_user_error(raised(fake_project_function("def f():\n    return int('x')\n")))
    assert not is_user_error(raised(fake_project_function("def f():\n    a, b = [1, 2, 3]\n")))
    assert not is_user_error(raised(lambda: torch.zeros(2).view(3)))
    assert not is_user_error(raised(fake_project_function("def f():\n    raise TypeError('a bug')\n")))
    # the same `raise ValueError` in a file outside the project's packages (a test, a user's script): not ours
    assert not is_user_error(raised(raise_value_error_here))


def test_run_script_one_line_for_user_errors_traceback_for_bugs(capsys, monkeypatch):
    def user_mistake(argv):
        raise CheckpointError("checkpoint path /x does not exist (check the spelling)\nsecond line")

    def script_exit(argv):
        raise SystemExit("--new-dim is required")

    line = expect_one_line_error(capsys, user_mistake, [], "does not exist")
    assert line.endswith("second line")  # a message over two lines is still one line
    expect_one_line_error(capsys, script_exit, [], "--new-dim is required")

    def bug(argv):
        return {}["missing"]

    with pytest.raises(KeyError):
        run_script(bug, [])
    # --debug (or ADAMBA_DEBUG=1): the user error keeps its traceback
    with pytest.raises(CheckpointError):
        run_script(user_mistake, ["--debug"])
    monkeypatch.delenv(DEBUG_ENV)
    monkeypatch.setenv(DEBUG_ENV, "1")
    with pytest.raises(CheckpointError):
        run_script(user_mistake, [])
    monkeypatch.delenv(DEBUG_ENV)

    def ctrl_c(argv):
        raise KeyboardInterrupt

    with pytest.raises(SystemExit) as exc:
        run_script(ctrl_c, [])
    assert exc.value.code == 130 and error_lines(capsys) == ["interrupted (Ctrl-C)"]
    assert run_script(lambda argv: argv, ["--threads", "1", "--x"]) == ["--threads", "1", "--x"]


def test_issue_cases_are_one_line_errors(capsys, tmp_path, tiny_data, gpt_checkpoint):
    from scripts import generate, chat_cli, fractal_train, surgery
    expect_one_line_error(capsys, generate.main, ["--checkpoint", str(tmp_path / "chekpoint"), "--prompt", "x"],
                          "does not exist")
    truncated = tmp_path / "truncated"
    truncated.mkdir()
    for f in gpt_checkpoint.iterdir():
        (truncated / f.name).write_bytes(f.read_bytes())
    model_file = truncated / "model_000001.pt"
    model_file.write_bytes(model_file.read_bytes()[:1000])
    expect_one_line_error(capsys, generate.main, ["--checkpoint", str(truncated), "--prompt", "x"], "truncated")
    ft = ["--phase=1", f"--checkpoint={gpt_checkpoint}", "--device=cpu"]
    expect_one_line_error(capsys, fractal_train.main, ft + [f"--data-dir={tmp_path / 'no_data'}"], "does not exist")
    expect_one_line_error(capsys, fractal_train.main, ft + [f"--data-dir={tiny_data['data_dir']}",
                                                            f"--out-dir={gpt_checkpoint}"], "already holds checkpoints")
    expect_one_line_error(capsys, surgery.main, [f"--src={gpt_checkpoint}", f"--dst={tmp_path / 'h'}", "--new-dim=16"],
                          "narrower")
    args = ["--checkpoint", str(gpt_checkpoint), "--device", "cpu"]
    expect_one_line_error(capsys, generate.main, args + ["--prompt", "hi", "--max-tokens", "0"], "--max-tokens=0")
    expect_one_line_error(capsys, generate.main, args + ["--prompt", ""], "--prompt is empty")
    expect_one_line_error(capsys, chat_cli.main, args + ["--prompt", ""], "--prompt is empty")
    expect_one_line_error(capsys, generate.main, args + ["--prompt", "hi", "--stop", ""], "--stop")


def test_the_real_entry_point_prints_one_line(tmp_path):
    """`python -m scripts.generate` with a misspelt path, as a user runs it: one stderr line, exit 1."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    env.pop(DEBUG_ENV, None)
    r = subprocess.run([sys.executable, "-m", "scripts.generate", "--checkpoint", str(tmp_path / "nope"), "--prompt", "x"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 1, r.stderr
    assert r.stderr.strip().startswith("error: checkpoint path") and len(r.stderr.strip().splitlines()) == 1, r.stderr


# -----------------------------------------------------------------------------
# generate: --stop and the text it cuts

def test_generate_stop_string_cuts_the_text(gpt_checkpoint, tiny_data, capsys):
    from scripts import generate
    from nanochat.tokenizer import Tokenizer
    tok = Tokenizer.from_directory(tiny_data["tokenizer_dir"])
    ids = tok.encode("abc\ndef")
    text, n = generate.cut_at_stop(tok, ids, ["\n"])
    assert text == "abc" and tok.decode(ids[:n]) == "abc"
    assert generate.cut_at_stop(tok, ids, ["zz"]) == ("abc\ndef", len(ids))
    assert generate.stop_token_ids(tok, ["\n"]) == tuple(tok.encode("\n"))  # one token: the engine stops there

    args = ["--checkpoint", str(gpt_checkpoint), "--device", "cpu", "--prompt", "the", "--max-tokens", "12"]
    res = generate.main(args)
    full = tok.decode(res.tokens[0])
    capsys.readouterr()
    stop = full[len(full) // 2:len(full) // 2 + 2]  # a string the greedy continuation contains
    assert stop
    generate.main(args + ["--stop", stop.replace("\n", "\\n")])  # backslash escapes, as typed in a shell
    printed = capsys.readouterr().out.splitlines()
    assert "\n".join(printed[1:]) == "the" + full[:full.find(stop)]


# -----------------------------------------------------------------------------
# CPU threads and logging

def test_cpu_threads_follow_flag_env_and_load(monkeypatch):
    assert choose_cpu_threads(3) == (3, "--threads")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert choose_cpu_threads()[1] == "OMP_NUM_THREADS"
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.setattr(torch, "get_num_threads", lambda: 8)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)))
    monkeypatch.setattr(os, "getloadavg", lambda: (0.2, 0.0, 0.0))
    assert choose_cpu_threads()[0] == 8  # an idle machine: torch's default
    monkeypatch.setattr(os, "getloadavg", lambda: (6.8, 0.0, 0.0))
    assert choose_cpu_threads()[0] == 1  # the other work keeps all but about one core busy
    monkeypatch.setattr(os, "getloadavg", lambda: (0.0, 0.0, 0.0))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert choose_cpu_threads()[0] == 2  # four ranks of torchrun share the cores
    monkeypatch.setattr(os, "getloadavg", lambda: (30.0, 0.0, 0.0))
    assert choose_cpu_threads()[0] == 1


def test_logging_keeps_other_packages_quiet():
    setup_logging()
    assert logging.getLogger("nanochat.mamba_block").isEnabledFor(logging.INFO)
    assert logging.getLogger("scripts.surgery").isEnabledFor(logging.INFO)
    # rustbpe logs a line per merge, matplotlib its font cache: WARNING and up only
    assert not logging.getLogger("rustbpe").isEnabledFor(logging.INFO)
    assert not logging.getLogger("matplotlib.font_manager").isEnabledFor(logging.INFO)


def test_peak_memory_is_said_only_where_measured():
    assert common.peak_memory_note(torch.device("cpu")) == ""


# -----------------------------------------------------------------------------
# Mamba kernels missing on CUDA: a WARNING once, or an error under --require-kernels

def test_missing_kernels_on_cuda_warn_once_or_stop(monkeypatch, caplog, tmp_path, tiny_data):
    from nanochat import mamba_block, mamba2_block
    monkeypatch.setattr(common, "_logged", set())
    monkeypatch.setattr(mamba_block, "KERNEL_IMPORT_ERROR", "ModuleNotFoundError: No module named 'mamba_ssm'")
    mixer = mamba2_block.Mamba2(d_model=32, d_state=8, headdim=16)  # the base both mixers share decides
    on_cuda, on_cpu = SimpleNamespace(is_cuda=True), SimpleNamespace(is_cuda=False)
    with caplog.at_level(logging.INFO):
        for _ in range(3):
            assert mixer._use_kernels(on_cuda, "forward") is False
            assert mixer._use_kernels(on_cuda, "step") is False
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1  # once per process, whichever mixer and call
        msg = warnings[0].getMessage()
        assert "No module named 'mamba_ssm'" in msg and mamba_ops.KERNEL_BUILD_COMMAND in msg
        assert REQUIRE_KERNELS_ENV in msg
        caplog.clear()
        mixer._use_kernels(on_cpu, "forward")  # on a CPU the PyTorch path is the only one: no warning
        assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    monkeypatch.setenv(REQUIRE_KERNELS_ENV, "1")
    with pytest.raises(mamba_ops.KernelsMissing, match="build_kernels.sh"):
        mixer._use_kernels(on_cuda, "forward")
    assert is_user_error(mamba_ops.KernelsMissing("x"))
    mixer._use_kernels(on_cpu, "forward")  # required on CUDA only: a CPU run (surgery's check, say) goes on
    # kernels present but causal-conv1d missing: warned (or stopped) too
    monkeypatch.setattr(mamba_block, "KERNEL_IMPORT_ERROR", None)
    monkeypatch.setattr(mamba_block, "CONV_IMPORT_ERROR", "ModuleNotFoundError: No module named 'causal_conv1d'")
    with pytest.raises(mamba_ops.KernelsMissing, match="causal_conv1d"):
        mixer._use_kernels(on_cuda, "forward")

"""
Ctrl-C (SIGINT) and SIGTERM during training (nanochat.train_utils.GracefulStop): the training scripts finish
the current step, save it atomically, print the exact command that resumes, and exit 128 + the signal's number;
the printed command continues the run. A second Ctrl-C stops at once.
"""
import os
import queue
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from nanochat.common import Interrupted
from nanochat.checkpoint_manager import load_meta, list_steps
from nanochat.train_utils import GracefulStop, resume_command
from testutil import write_hybrid_checkpoint

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 300  # seconds for a line to appear: torch's import alone takes several on a loaded 2-core machine


def test_first_signal_asks_second_ctrl_c_stops_now(capsys):
    before = signal.getsignal(signal.SIGINT)
    stop = GracefulStop()
    assert not stop.requested()
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(0.05)  # the handler runs in this thread between bytecodes
    assert stop.requested() and stop.signum == signal.SIGTERM
    os.kill(os.getpid(), signal.SIGTERM)  # a repeat SIGTERM waits for the step too
    os.kill(os.getpid(), signal.SIGINT)  # so does a Ctrl-C right after the first signal (torchrun forwards one)
    time.sleep(0.05)
    stop.REPEAT_GRACE_S = 0.0
    with pytest.raises(KeyboardInterrupt):  # a second Ctrl-C later: stop at once
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)
    with pytest.raises(Interrupted) as exc:
        stop.finish(7, saved=True, resume="python -m scripts.x --resume")
    assert exc.value.signum == signal.SIGTERM
    assert "stopped by SIGTERM at step 7: saved step 7" in capsys.readouterr().out
    assert signal.getsignal(signal.SIGINT) is before  # finish() put the previous handlers back


def test_resume_command_adds_resume_and_the_out_dir(monkeypatch):
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(k, raising=False)
    cmd = resume_command("scripts.base_train", ["--depth=2", "--prompt", "two words"], "/tmp/out dir")
    assert shlex.split(cmd) == ["python", "-m", "scripts.base_train", "--depth=2", "--prompt", "two words", "--resume",
                                "--out-dir=/tmp/out dir"]
    assert resume_command("m", ["--out-dir", "/x", "--resume"], "/x") == "python -m m --out-dir /x --resume"
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert resume_command("m", [], "/x").startswith("torchrun --standalone --nproc_per_node=2 -m m ")


class Run:
    """A script started as a user starts it, its output read line by line as it comes."""

    def __init__(self, argv, env):
        self.proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, bufsize=1)
        self.lines, self._queue = [], queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            self._queue.put(line.rstrip("\n"))
        self._queue.put(None)

    def wait_for(self, pattern):
        """The first line matching `pattern` (re.search), reading until it comes."""
        deadline = time.time() + TIMEOUT
        while time.time() < deadline:
            try:
                line = self._queue.get(timeout=1)
            except queue.Empty:
                continue
            if line is None:
                break
            self.lines.append(line)
            m = re.search(pattern, line)
            if m:
                return m
        self.proc.kill()
        raise AssertionError(f"no line matching {pattern!r}; output:\n" + "\n".join(self.lines))

    def stop(self, sig):
        """Send `sig`, wait for the exit; returns (exit code, the whole output)."""
        self.proc.send_signal(sig)
        rc = self.proc.wait(timeout=TIMEOUT)
        while (line := self._queue.get(timeout=TIMEOUT)) is not None:
            self.lines.append(line)
        return rc, "\n".join(self.lines)


def interrupt_and_resume(module, args, out_dir):
    """
    Start `python -m module args`; once two steps have finished, SIGINT: it must save the step it was in, print
    the command that resumes and exit 130. Run that command; once it has trained a step past the save, SIGTERM:
    the same, exit 143. Returns the two saved steps.
    """
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    run = Run([sys.executable, "-m", module, *args], env)
    run.wait_for(r"^step 00001/")
    rc, out = run.stop(signal.SIGINT)
    assert rc == 128 + signal.SIGINT, out
    first = int(re.search(r"stopped by SIGINT at step (\d+): saved step \1", out)[1])
    assert first >= 2 and list_steps(str(out_dir)) == [first], out
    assert load_meta(str(out_dir), first)["step"] == first
    assert not [p for p in os.listdir(out_dir) if ".tmp" in p]  # atomic writes leave no partial file behind
    assert "Traceback" not in out

    resume = shlex.split(out.split("resume with:\n", 1)[1].splitlines()[0])
    assert resume[:3] == ["python", "-m", module] and "--resume" in resume
    run = Run([sys.executable, *resume[1:]], env)
    run.wait_for(rf"resumed .* at step {first}\b")
    run.wait_for(rf"^step {first:05d}/")  # the step after the save: the run goes on where it stopped
    run.wait_for(rf"^step {first + 1:05d}/")
    rc, out = run.stop(signal.SIGTERM)
    assert rc == 128 + signal.SIGTERM, out
    second = int(re.search(r"stopped by SIGTERM at step (\d+): saved step \1", out)[1])
    assert second >= first + 2 and list_steps(str(out_dir)) == [first, second]
    return first, second


@pytest.mark.slow
def test_fractal_train_ctrl_c_saves_and_the_printed_command_resumes(tmp_path, tiny_data):
    write_hybrid_checkpoint(tmp_path / "hybrid", tiny_data)
    out = tmp_path / "p1"
    # --save-every -1 (the default) saves only at the end: without the graceful stop, Ctrl-C would keep nothing
    interrupt_and_resume("scripts.fractal_train", [
        "--phase=1", f"--checkpoint={tmp_path / 'hybrid'}", f"--out-dir={out}", f"--data-dir={tiny_data['data_dir']}",
        "--device=cpu", "--num-iterations=100000", "--device-batch-size=2", "--max-seq-len=32", "--eval-every=-1"], out)


@pytest.mark.slow
def test_base_train_ctrl_c_saves_and_the_printed_command_resumes(tmp_path, tiny_data):
    out = tmp_path / "base"
    interrupt_and_resume("scripts.base_train", [
        "--device", "cpu", "--depth", "2", "--n-embd", "64", "--n-head", "2", "--max-seq-len", "64",
        "--device-batch-size", "4", "--total-batch-size", "512", "--num-iterations", "100000", "--eval-every", "-1",
        "--data-dir", str(tiny_data["data_dir"]), "--tokenizer-dir", str(tiny_data["tokenizer_dir"]),
        "--out-dir", str(out)], out)

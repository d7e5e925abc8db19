"""
tasks.execution.run_program: a normal program passes with its output; a looping one, a sleeping one and a
memory-hungry one are stopped by their limits; output is capped; the program runs in a scratch directory with
a minimal environment and without the functions that delete files or start processes.
"""
import os
import time

from tasks.execution import run_program, MAX_OUTPUT_BYTES


def test_a_normal_program_passes():
    result = run_program("import math\nprint(math.factorial(5))\n")
    assert result.passed and result.returncode == 0 and result.stdout == "120\n"
    assert not result.timed_out and not result.memory_exceeded


def test_a_failing_program_fails_with_its_error():
    result = run_program("assert 1 + 1 == 3, 'arithmetic'\n")
    assert not result.passed and result.returncode == 1 and "AssertionError: arithmetic" in result.stderr
    assert not run_program("import sys\nsys.exit(3)\n").passed


def test_a_looping_program_is_killed_at_the_timeout():
    for code in ("while True:\n    pass\n", "import time\ntime.sleep(60)\n"):  # busy and idle
        t0 = time.time()
        result = run_program(code, timeout_s=0.5)
        assert result.timed_out and not result.passed and result.returncode < 0
        assert time.time() - t0 < 5


def test_a_memory_hungry_program_is_stopped():
    for code in ("block = bytearray(4 * 1024**3)\n", "chunks = []\nwhile True:\n    chunks.append(b'x' * 2**24)\n"):
        result = run_program(code, memory_mb=256, timeout_s=10)
        assert result.memory_exceeded and not result.passed and not result.timed_out


def test_output_is_capped():
    result = run_program("print('y' * 1_000_000)\n")
    assert result.passed and len(result.stdout) < MAX_OUTPUT_BYTES + 100 and "output cut" in result.stdout


def test_the_program_runs_in_a_scratch_directory_without_destructive_functions(tmp_path):
    keep = tmp_path / "keep.txt"
    keep.write_text("data")
    result = run_program(
        "import os, sys, subprocess\n"
        "print(os.getcwd())\n"
        "print(sorted(os.environ))\n"
        "for f in (os.remove, os.system, os.kill, subprocess.Popen):\n"
        "    assert f is None\n")
    assert result.passed, result.stderr
    cwd, env = result.stdout.splitlines()
    assert not os.path.exists(cwd)  # the scratch directory is gone afterwards
    assert "NANOCHAT_BASE_DIR" not in env and "PYTHONPATH" not in env
    assert keep.read_text() == "data"

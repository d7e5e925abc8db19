"""
Run a generated Python program with limits: HumanEval's scorer, and anything else that must execute model output.

Each run: a fresh `python -I` (no PYTHON* variables, no user site, no script directory on sys.path) in its own
temporary directory and its own session / process group, with a minimal environment and no stdin. Before the
program runs, the interpreter sets its own limits: address space (RLIMIT_AS, memory_mb), CPU seconds
(RLIMIT_CPU), the size of any file it writes (RLIMIT_FSIZE, which also bounds its output), no core files, and
no new processes (RLIMIT_NPROC = 0, which root ignores), and then removes the os / shutil / subprocess functions
that delete files, kill or start processes. The wall-clock timeout kills the whole process group.

The limits are set in the child's first lines rather than in a preexec_fn: preexec_fn is documented as unsafe
when the parent has threads, and the parent here is an evaluation process with torch's thread pools.

This guards against accidents (a loop, a runaway allocation, a stray rmtree), not against a hostile program:
there is no network or filesystem isolation, and Python's introspection can undo the removed functions.
"""
import os
import sys
import math
import signal
import tempfile
import subprocess
from dataclasses import dataclass

MAX_OUTPUT_BYTES = 64 * 1024  # kept of each of stdout and stderr
MAX_FILE_BYTES = 16 * 1024 * 1024  # RLIMIT_FSIZE: any file the program writes, its stdout and stderr included
PROGRAM_FILENAME = "program.py"

# the child's first lines: limits, then the removals, then the program (argv: memory bytes, cpu seconds, file bytes)
_GUARD = r"""
import sys, resource
memory_bytes, cpu_seconds, file_bytes = (int(a) for a in sys.argv[1:4])
resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
resource.setrlimit(resource.RLIMIT_CPU, (cpu_seconds, cpu_seconds + 1))
resource.setrlimit(resource.RLIMIT_FSIZE, (file_bytes, file_bytes))
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
resource.setrlimit(resource.RLIMIT_NPROC, (0, 0))
with open(%(program)r, encoding="utf-8") as f:
    source = f.read()
import os, shutil, subprocess, builtins
for name in ("system", "popen", "kill", "killpg", "fork", "forkpty", "execv", "execve", "execvp", "execvpe",
             "spawnv", "spawnve", "posix_spawn", "posix_spawnp", "remove", "unlink", "rmdir", "removedirs",
             "rename", "renames", "replace", "truncate", "chmod", "fchmod", "chown", "fchown", "lchown",
             "chroot", "setuid", "setgid", "putenv"):
    if hasattr(os, name):
        setattr(os, name, None)
for name in ("rmtree", "move", "chown"):
    setattr(shutil, name, None)
subprocess.Popen = None
sys.modules["resource"] = None
del resource
sys.argv = [%(program)r]
exec(compile(source, %(program)r, "exec"), {"__name__": "__main__", "__builtins__": builtins})
""" % {"program": PROGRAM_FILENAME}


@dataclass
class ExecResult:
    passed: bool  # exited with status 0 within the time limit
    returncode: int  # the exit status; negative: killed by that signal (-9 on timeout)
    stdout: str
    stderr: str
    timed_out: bool
    memory_exceeded: bool  # the program ran out of its address space (a MemoryError)


def _read_capped(path):
    with open(path, "rb") as f:
        data = f.read(MAX_OUTPUT_BYTES + 1)
    text = data[:MAX_OUTPUT_BYTES].decode("utf-8", errors="replace")
    if len(data) > MAX_OUTPUT_BYTES:
        text += f"\n[output cut at {MAX_OUTPUT_BYTES} bytes]"
    return text


def _kill_group(pgid):
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):  # the group is gone already
        pass


def run_program(code, timeout_s=5.0, memory_mb=512):
    """Run `code` as a Python program under the limits above; returns an ExecResult."""
    with tempfile.TemporaryDirectory(prefix="adamba_exec_") as root:
        workdir = os.path.join(root, "work")  # the program's cwd; its output files sit outside it
        os.mkdir(workdir)
        with open(os.path.join(workdir, PROGRAM_FILENAME), "w", encoding="utf-8") as f:
            f.write(code)
        out_path, err_path = os.path.join(root, "stdout"), os.path.join(root, "stderr")
        env = {"PATH": "/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8",
               "OMP_NUM_THREADS": "1"}
        argv = [sys.executable, "-I", "-c", _GUARD, str(memory_mb * 1024 * 1024), str(max(1, math.ceil(timeout_s))),
                str(MAX_FILE_BYTES)]
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            proc = subprocess.Popen(argv, cwd=workdir, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                    start_new_session=True)
            timed_out = False
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                timed_out = True
                _kill_group(proc.pid)
                proc.wait()
            _kill_group(proc.pid)  # anything the program left running in its group
        stdout, stderr = _read_capped(out_path), _read_capped(err_path)
    memory_exceeded = "MemoryError" in stderr or "Cannot allocate memory" in stderr
    return ExecResult(passed=proc.returncode == 0 and not timed_out, returncode=proc.returncode, stdout=stdout,
                      stderr=stderr, timed_out=timed_out, memory_exceeded=memory_exceeded)

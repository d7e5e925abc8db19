"""
Process-level plumbing shared by every script: device and dtype choice, torchrun
initialisation, the base directory, rank-0 printing and logging (each path choice said once per
process), CPU threads, and the entry point `run_script` that turns a user's mistake into one line.
Knows nothing about models.
"""
import os
import sys
import dis
import signal
import logging
import argparse
from contextlib import nullcontext

import torch
import torch.distributed as dist

_LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

# the tokenizer's files, nanochat's names; they travel with every checkpoint directory
TOKENIZER_FILENAME = "tokenizer.pkl"
TOKEN_BYTES_FILENAME = "token_bytes.pt"
TOKENIZER_FILES = (TOKENIZER_FILENAME, TOKEN_BYTES_FILENAME)


# this project's packages log at INFO; everything else (rustbpe's per-merge progress, matplotlib's font cache)
# only from WARNING up, so a tiny run's output is the project's own lines
PROJECT_PACKAGES = ("nanochat", "scripts", "tiny_experiment", "tasks")


def setup_logging(level=logging.INFO):
    """Configure logging once (later calls are no-ops): the project's loggers at `level`, the rest at WARNING."""
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(level=logging.WARNING, format=_LOG_FORMAT)
    for name in PROJECT_PACKAGES:
        if logging.getLogger(name).level == logging.NOTSET:
            logging.getLogger(name).setLevel(level)


def get_logger(name):
    setup_logging()
    return logging.getLogger(name)


_triton = None  # (triton, triton.language) once imported, False where Triton does not import


def load_triton():
    """(triton, triton.language), imported on the first call, or False where Triton does not import: the decode
    kernels (decode_attention, decode_matvec) import it only when asked for."""
    global _triton
    if _triton is None:
        try:
            import triton
            import triton.language as tl
            _triton = (triton, tl)
        except ImportError:
            _triton = False
    return _triton


def kernel_path_from_env(var, paths, default="torch"):
    """A decode kernel's path from environment variable `var` (`default` when unset), validated: one-line error."""
    path = os.environ.get(var, default)
    if path not in paths:
        raise ValueError(f"{var}={path!r}: use one of {', '.join(paths)}")
    return path


def set_kernel_path(what, path, paths, build):
    """Validate a decode kernel's path setting (one of paths); 'triton' builds the kernel (build() -> None
    where Triton does not import), which must succeed on a CUDA machine. Returns path. One-line errors."""
    if path not in paths:
        raise ValueError(f"{what} path {path!r}: use one of {', '.join(paths)}")
    if path == "triton" and build() is None and torch.cuda.is_available():
        raise ValueError(f"{what} path 'triton': Triton does not import on this machine")
    return path


_logged = set()


def autocast_keeps(t):
    """Whether autocast, if on for t's device, keeps t's dtype: the decode kernels (decode_matvec, decode_mamba)
    take a call only where they would compute in the dtype PyTorch's ops would. Read while torch.compile traces."""
    dev = t.device.type
    return not (torch.is_autocast_enabled(dev) and torch.get_autocast_dtype(dev) != t.dtype)


def log_once(logger, msg, level=logging.INFO):
    """logger.log(level, msg) the first time this process sees msg (which path runs, say). Silent while
    torch.compile traces: a log call there would break the graph."""
    if torch.compiler.is_compiling() or msg in _logged:
        return
    _logged.add(msg)
    setup_logging()  # a module that logs through logging.getLogger(__name__) gets the project's format and levels
    logger.log(level, msg)


def get_base_dir():
    """Where data, tokenizers and checkpoints live: $NANOCHAT_BASE_DIR or ~/.cache/nanochat."""
    base = os.environ.get("NANOCHAT_BASE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "nanochat")
    base = os.path.expanduser(base)
    os.makedirs(base, exist_ok=True)
    return base


def expand_path(path):
    """`~` and environment variables expanded; None stays None."""
    if path is None:
        return None
    return os.path.abspath(os.path.expandvars(os.path.expanduser(str(path))))


def get_dist_info():
    """(is_distributed, rank, local_rank, world_size) from torchrun's environment."""
    if all(k in os.environ for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE")):
        return True, int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
    return False, 0, 0, 1


def is_rank0():
    return get_dist_info()[1] == 0


def print0(*args, **kwargs):
    if is_rank0():
        kwargs.setdefault("flush", True)
        print(*args, **kwargs)


def autodetect_device_type():
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def autocast_dtype(device_type):
    """The compute dtype for autocast: bf16 on CUDA, none (fp32) elsewhere."""
    return torch.bfloat16 if device_type == "cuda" else None


def autocast_context(device_type, dtype=None):
    dtype = dtype if dtype is not None else autocast_dtype(device_type)
    if dtype is None:
        return nullcontext()
    return torch.amp.autocast(device_type=device_type, dtype=dtype)


def compute_init(device_type=None):
    """
    Set up the process: pick the device, seed, and join the process group under torchrun
    (NCCL on CUDA, gloo otherwise). Returns (ddp, rank, local_rank, world_size, device).
    """
    device_type = device_type or autodetect_device_type()
    if device_type not in ("cuda", "mps", "cpu"):
        raise ValueError(f"unknown device type {device_type!r}: use cuda, mps or cpu")
    if device_type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device=cuda was asked for but this PyTorch build sees no CUDA GPU")
    if device_type == "mps" and not torch.backends.mps.is_available():
        raise UserError("--device=mps was asked for but MPS is not available")
    ddp, rank, local_rank, world_size = get_dist_info()
    if ddp:
        if device_type == "cuda":
            device = torch.device("cuda", local_rank)
            torch.cuda.set_device(device)
            if not dist.is_initialized():
                dist.init_process_group(backend="nccl", device_id=device)
        else:
            device = torch.device(device_type)
            if not dist.is_initialized():
                dist.init_process_group(backend="gloo")
        dist.barrier()
    else:
        device = torch.device(device_type)
    if device_type == "cpu" and _threads_note and _threads_note[0] == torch.get_num_threads():
        print0(_threads_note[1])
    if device_type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return ddp, rank, local_rank, world_size, device


_last_barrier = []  # compute_cleanup's final barrier, freed by the interpreter at exit (see there)


def compute_cleanup():
    """End the process group of a torchrun run; a group this process did not join through compute_init (say,
    a test calling a script's main() in-process) is left alone."""
    if get_dist_info()[0] and dist.is_available() and dist.is_initialized():
        # On a normal exit every rank arrives first (not while an exception propagates, in a `finally`: the other
        # ranks may never get here). Then this thread keeps the barrier's work: gloo's worker thread drops its own
        # reference a moment after the wait returns, and a barrier holds the collectives still in flight when it
        # was queued (the checkpoint's all_gather_object). Where the worker's drop was the last, it freed their
        # tensors, which needs the GIL, while the interpreter was finalizing: std::terminate, "terminate called
        # without an active exception" (gdb on a core of tests/test_fractal_train.py's resumed expert-parallel
        # run, about 1 exit in 60-200 on a 2-core CPU). Kept here, the work is freed by this thread at exit.
        if sys.exc_info()[0] is None:
            work = dist.barrier(async_op=True)
            work.wait()
            _last_barrier.append(work)
        dist.destroy_process_group()


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_gib(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return 0.0


def peak_memory_note(device):
    """'peak memory X GiB | ' where it is measured (CUDA), '' elsewhere (a CPU run would print a meaningless 0.00)."""
    return f"peak memory {peak_memory_gib(device):.2f} GiB | " if device.type == "cuda" else ""


class DummyWandb:
    """Stands in for a wandb run when logging is off (the default)."""

    def log(self, *args, **kwargs):
        pass

    def finish(self):
        pass


def init_wandb(run_name, project, config, rank):
    """wandb only when a run name other than 'dummy' is given, and only on rank 0."""
    if run_name in (None, "", "dummy") or rank != 0:
        return DummyWandb()
    try:
        import wandb  # an optional extra: pip install -e '.[wandb]'
    except ImportError as e:
        raise UserError(f"--run={run_name} logs to wandb, which is not installed ({e}): pip install -e '.[wandb]', "
                        f"or leave --run out (no logging)") from e
    return wandb.init(project=project, name=run_name, config=config)


# -----------------------------------------------------------------------------
# CPU threads

def choose_cpu_threads(requested=0):
    """
    (threads, why) for torch's intra-op pool. `requested` > 0 (--threads) wins, then OMP_NUM_THREADS (which
    torch already read). Otherwise the cores this process may use, less the load average (what other processes
    keep busy), split over the ranks torchrun started on this node, at most torch's own default. Why not
    torch's default alone: it takes every core, and on a 2-core machine busy with other work fractal_train ran
    at 9-27 s per step with 2 threads and 0.2 s with 1 (the threads spin-wait on each other), same losses.
    """
    if requested and requested > 0:
        return requested, "--threads"
    if os.environ.get("OMP_NUM_THREADS"):
        return torch.get_num_threads(), "OMP_NUM_THREADS"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    ranks = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    free = max(1, int(cores - load + 0.5))
    threads = max(1, min(torch.get_num_threads(), free // ranks, cores // ranks))
    return threads, f"{cores} cores, load average {load:.1f}, {ranks} rank(s) on this node"


_threads_note = None  # (threads, why) when run_script chose fewer threads than torch would; compute_init prints it


def set_cpu_threads(requested=0):
    """Set torch's threads by choose_cpu_threads; returns (threads, why)."""
    threads, why = choose_cpu_threads(requested)
    torch.set_num_threads(threads)
    return threads, why


# -----------------------------------------------------------------------------
# Entry point: user errors as one line, tracebacks for bugs, interrupts as exit codes

DEBUG_ENV = "ADAMBA_DEBUG"
REQUIRE_KERNELS_ENV = "ADAMBA_REQUIRE_KERNELS"


class UserError(Exception):
    """A mistake the user can fix (a path, flag, shape, missing data or tokenizer); the message says what to do.
    run_script prints it as one line, `error: <message>`, and exits 1."""


class Interrupted(Exception):
    """A run stopped by a signal after it saved what it had (train_utils.GracefulStop); run_script exits with
    128 + the signal's number, as a shell reports a process killed by it, without a traceback."""

    def __init__(self, signum, message):
        super().__init__(message)
        self.signum = signum


def env_flag(name):
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no")


def kernels_required():
    """--require-kernels / ADAMBA_REQUIRE_KERNELS=1: on CUDA, the Mamba mixers must run mamba-ssm's kernels."""
    return env_flag(REQUIRE_KERNELS_ENV)


def add_runtime_args(parser, threads=True):
    """The flags every script takes (run_script reads them before main; the script's parser lists them in --help)."""
    g = parser.add_argument_group("runtime")
    g.add_argument("--debug", action="store_true", help=f"full Python tracebacks for user errors too (or {DEBUG_ENV}=1)")
    if threads:
        g.add_argument("--threads", type=int, default=0,
                       help="CPU threads (0: OMP_NUM_THREADS if set, else the cores not busy with other work)")
    g.add_argument("--require-kernels", action="store_true",
                   help=f"stop if a Mamba mixer on CUDA cannot run mamba-ssm's kernels (or {REQUIRE_KERNELS_ENV}=1)")
    return parser


_PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_PROJECT_DIRS = tuple(os.path.join(_PROJECT_ROOT, name) + os.sep for name in PROJECT_PACKAGES)
# raised on purpose by this project's own `raise` statements, these carry a message written for the user
_MESSAGE_TYPES = (ValueError, FloatingPointError)


def is_user_error(exc):
    """
    True for a mistake the user can fix, whose message is enough: a UserError (CheckpointError is one), an
    OSError (a path, a permission, a full disk), or a ValueError / FloatingPointError that a `raise` statement of
    this project raised (the checks of flags, shapes and data). False for everything else, a bug: a TypeError,
    an assert, a ValueError from inside torch or from an `int()` or an unpacking in our code.
    """
    if isinstance(exc, (UserError, OSError)):
        return True
    if not isinstance(exc, _MESSAGE_TYPES) or exc.__traceback__ is None:
        return False
    tb = exc.__traceback__
    while tb.tb_next is not None:
        tb = tb.tb_next
    code = tb.tb_frame.f_code
    ours = os.path.abspath(code.co_filename).startswith(_PROJECT_DIRS)
    return ours and dis.opname[code.co_code[tb.tb_lasti]] == "RAISE_VARARGS"


def one_line(exc):
    return " ".join(str(exc).split()) or type(exc).__name__


def run_script(main, argv=None):
    """
    Run a script's main(argv) as a command: `if __name__ == "__main__": run_script(main)`.
    Before main: --debug and --require-kernels (see add_runtime_args) become ADAMBA_DEBUG / ADAMBA_REQUIRE_KERNELS
    (torchrun's other ranks and the model code read them there), and torch's CPU threads are chosen
    (choose_cpu_threads; --threads overrides). Then a user error (is_user_error, or a SystemExit with a message)
    prints `error: <message>` on one line and exits 1; Ctrl-C outside a training loop's graceful stop exits 130
    with one line; a run that stopped on a signal after saving (Interrupted) exits 128 + the signal number. Any
    other exception is a bug and keeps its traceback, as does everything under --debug / ADAMBA_DEBUG=1.
    """
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    runtime = add_runtime_args(argparse.ArgumentParser(add_help=False, allow_abbrev=False))
    opts, _ = runtime.parse_known_args(argv)
    if opts.debug:
        os.environ[DEBUG_ENV] = "1"
    if opts.require_kernels:
        os.environ[REQUIRE_KERNELS_ENV] = "1"
    global _threads_note
    torch_default = torch.get_num_threads()
    threads, why = set_cpu_threads(opts.threads)
    if threads < torch_default and why not in ("--threads", "OMP_NUM_THREADS"):  # compute_init says it on a CPU run
        _threads_note = (threads, f"cpu threads: {threads} of torch's default {torch_default} ({why}); --threads N or "
                                  f"OMP_NUM_THREADS=N to choose")
    debug = env_flag(DEBUG_ENV)
    try:
        return main(argv)
    except Interrupted as e:
        sys.exit(128 + e.signum)
    except KeyboardInterrupt:
        if debug:
            raise
        print("interrupted (Ctrl-C)", file=sys.stderr)
        sys.exit(128 + signal.SIGINT)
    except SystemExit as e:
        if isinstance(e.code, str) and not debug:  # a script's own `raise SystemExit("what went wrong")`
            msg = one_line(e.code)
            print(msg if msg.startswith("error:") else f"error: {msg}", file=sys.stderr)
            sys.exit(1)
        raise
    except Exception as e:
        if debug or not is_user_error(e):
            raise
        print(f"error: {one_line(e)}", file=sys.stderr)
        sys.exit(1)

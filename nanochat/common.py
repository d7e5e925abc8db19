"""
Process-level plumbing shared by every script: device and dtype choice, torchrun
initialisation, the base directory, rank-0 printing and logging.
Knows nothing about models.
"""
import os
import logging
from contextlib import nullcontext

import torch
import torch.distributed as dist

_LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

# the tokenizer's files, nanochat's names; they travel with every checkpoint directory
TOKENIZER_FILENAME = "tokenizer.pkl"
TOKEN_BYTES_FILENAME = "token_bytes.pt"
TOKENIZER_FILES = (TOKENIZER_FILENAME, TOKEN_BYTES_FILENAME)


def setup_logging(level=logging.INFO):
    """Configure the root logger once; later calls are no-ops."""
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(level=level, format=_LOG_FORMAT)


def get_logger(name):
    setup_logging()
    return logging.getLogger(name)


_logged = set()


def log_once(logger, msg):
    """logger.info(msg) the first time this process sees msg (which path runs, say). Silent while torch.compile
    traces: a log call there would break the graph."""
    if torch.compiler.is_compiling() or msg in _logged:
        return
    _logged.add(msg)
    logger.info(msg)


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
        raise RuntimeError("--device=cuda was asked for but this PyTorch build sees no CUDA GPU")
    if device_type == "mps" and not torch.backends.mps.is_available():
        raise RuntimeError("--device=mps was asked for but MPS is not available")
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
    if device_type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return ddp, rank, local_rank, world_size, device


def compute_cleanup():
    """End the process group of a torchrun run; a group this process did not join through compute_init (say,
    a test calling a script's main() in-process) is left alone."""
    if get_dist_info()[0] and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_gib(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return 0.0


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
    import wandb
    return wandb.init(project=project, name=run_name, config=config)

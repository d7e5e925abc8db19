"""
Shared test setup: few threads (the CI machine is small and shared), fixed seeds, and a
session-wide tiny corpus + tokenizer (`tiny_data`) that any test file can reuse.
"""
import os
import random

import pytest
import torch

from nanochat.common import choose_cpu_threads

# at most 2 (tiny matmuls), and 1 when other work keeps the cores busy (or OMP_NUM_THREADS says so): on a loaded
# 2-core machine two threads spin-waiting on each other made the suite several times slower
torch.set_num_threads(min(2, choose_cpu_threads()[0]))

TINY_VOCAB_SIZE = 512


@pytest.fixture(autouse=True)
def fixed_seed():
    random.seed(0)
    torch.manual_seed(0)


@pytest.fixture(scope="session", autouse=True)
def report_dir(tmp_path_factory):
    """The run report (nanochat.run_report) that scripts record their stages in: a temporary one for the whole session,
    never the user's <base_dir>/report."""
    d = tmp_path_factory.mktemp("report")
    old = os.environ.get("ADAMBA_REPORT_DIR")
    os.environ["ADAMBA_REPORT_DIR"] = str(d)
    yield d
    if old is None:
        os.environ.pop("ADAMBA_REPORT_DIR", None)
    else:
        os.environ["ADAMBA_REPORT_DIR"] = old


@pytest.fixture
def base_dir(tmp_path, monkeypatch):
    """NANOCHAT_BASE_DIR pointed at a fresh temporary directory for this test."""
    d = tmp_path / "nanochat_base"
    d.mkdir()
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(d))
    return d


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """
    Synthetic parquet shards (4: the last is val) and a BPE tokenizer of TINY_VOCAB_SIZE ids
    trained on them with scripts.tok_train, written once per test session.
    Returns a dict of paths: base_dir, data_dir, tokenizer_dir, and vocab_size.
    """
    from nanochat.dataset import write_synthetic_shards
    from scripts import tok_train

    root = tmp_path_factory.mktemp("tiny_data")
    data_dir = root / "base_data"
    tokenizer_dir = root / "tokenizer"
    write_synthetic_shards(str(data_dir), docs_per_shard=256, num_shards=4, seed=0, row_group_size=32)
    old = os.environ.get("NANOCHAT_BASE_DIR")
    os.environ["NANOCHAT_BASE_DIR"] = str(root)  # anything tok_train writes by default stays in the tmp dir
    try:
        tok_train.main(["--data-dir", str(data_dir), "--out-dir", str(tokenizer_dir),
                        "--vocab-size", str(TINY_VOCAB_SIZE), "--max-chars", "200000"])
    finally:
        if old is None:
            os.environ.pop("NANOCHAT_BASE_DIR", None)
        else:
            os.environ["NANOCHAT_BASE_DIR"] = old
    return {"base_dir": root, "data_dir": data_dir, "tokenizer_dir": tokenizer_dir, "vocab_size": TINY_VOCAB_SIZE}

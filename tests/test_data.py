"""Parquet shards, download errors, synthetic corpus, and the BOS-aligned resumable data loader."""
import json
import os
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from nanochat.dataset import (write_synthetic_shards, list_parquet_files, split_parquet_files, parquets_iter_batched,
                              read_row_group, row_group_index, is_synthetic, download_shards)
from nanochat.dataloader import tokenizing_distributed_data_loader, _best_fit_row
from nanochat.tokenizer import Tokenizer

B, T = 4, 64
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("shards")
    # 3 shards of 6 row groups: train = 12 row groups, val = 6
    write_synthetic_shards(d, docs_per_shard=48, num_shards=3, seed=0, row_group_size=8)
    return str(d)


@pytest.fixture(scope="module")
def tok(data_dir):
    texts = [t for batch in parquets_iter_batched("train", data_dir) for t in batch]
    return Tokenizer.train_from_iterator(iter(texts), 400)


def loader(tok, data_dir, **kwargs):
    kwargs = {"B": B, "T": T, "split": "train", "data_dir": data_dir, "buffer_docs": 12, **kwargs}
    return tokenizing_distributed_data_loader(tok, **kwargs)


def take(it, n):
    return [next(it) for _ in range(n)]


def doc_tokens(tok, data_dir, split, ref):
    shard, rg, doc = ref
    path = split_parquet_files(split, data_dir)[shard]
    return tok.encode(read_row_group(path, rg)[doc], prepend=tok.get_bos_token_id())


# -----------------------------------------------------------------------------
# dataset.py

def test_missing_and_empty_data_dir(tmp_path, tok):
    for d in (tmp_path / "nope", tmp_path):
        with pytest.raises(FileNotFoundError, match="nanochat.dataset --download"):
            list_parquet_files(d)
        with pytest.raises(FileNotFoundError, match="--data-dir"):
            next(loader(tok, str(d)))


def test_single_shard_has_no_split(tmp_path):
    write_synthetic_shards(tmp_path, docs_per_shard=8, num_shards=1, seed=0)
    for split in ("train", "val"):
        with pytest.raises(ValueError, match="at least 2"):
            split_parquet_files(split, tmp_path)


def test_default_data_dir_is_under_base_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "base_data")):
        list_parquet_files()


def test_synthetic_shards_deterministic(tmp_path, data_dir):
    paths = write_synthetic_shards(tmp_path / "a", docs_per_shard=48, num_shards=3, seed=0, row_group_size=8)
    again = list_parquet_files(data_dir)
    assert [os.path.basename(p) for p in paths] == ["shard_00000.parquet", "shard_00001.parquet", "shard_00002.parquet"]
    for p, q in zip(paths, again):
        assert pq.read_table(p).column("text").to_pylist() == pq.read_table(q).column("text").to_pylist()
        assert is_synthetic(p)
    other = write_synthetic_shards(tmp_path / "b", docs_per_shard=48, num_shards=1, seed=1)
    assert pq.read_table(other[0]).column("text") != pq.read_table(paths[0]).column("text")
    assert any(ch.isdigit() for ch in read_row_group(paths[0], 0)[0] + read_row_group(paths[0], 0)[1])


def test_synthetic_refuses_to_mix_with_real_data(tmp_path):
    pq.write_table(pa.table({"text": ["real text"]}), tmp_path / "shard_00000.parquet")
    assert not is_synthetic(tmp_path / "shard_00000.parquet")
    with pytest.raises(FileExistsError, match="non-synthetic"):
        write_synthetic_shards(tmp_path, docs_per_shard=4, num_shards=2)


def test_splits_and_strided_row_groups(data_dir):
    paths = list_parquet_files(data_dir)
    assert split_parquet_files("val", data_dir) == paths[-1:]
    assert split_parquet_files("train", data_dir) == paths[:-1]
    val = [t for texts in parquets_iter_batched("val", data_dir) for t in texts]
    assert val == pq.read_table(paths[-1]).column("text").to_pylist()
    train = [t for texts in parquets_iter_batched("train", data_dir) for t in texts]
    assert len(train) == 96 and not set(train) & set(val)
    # start/step over the whole split: disjoint, and together everything
    parts = [[t for texts in parquets_iter_batched("train", data_dir, start=r, step=3) for t in texts] for r in range(3)]
    assert sorted(sum(parts, [])) == sorted(train)
    assert len(row_group_index(split_parquet_files("train", data_dir))) == 12
    with pytest.raises(ValueError, match="split"):
        split_parquet_files("test", data_dir)


def test_missing_text_column(tmp_path):
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "a.parquet")
    with pytest.raises(ValueError, match="`text` column"):
        read_row_group(tmp_path / "a.parquet", 0)


def test_download_offline_error(tmp_path):
    # a real run of the CLI with the hub forced offline: never touches the network
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "NANOCHAT_BASE_DIR": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-m", "nanochat.dataset", "--download", "2", "--data-dir", str(tmp_path / "d"),
                           "--repo", "someone/some-dataset"], env=env, cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode != 0
    assert "could not download shard_00000.parquet from the hub dataset repo someone/some-dataset" in proc.stderr
    assert "copy the shards by hand" in proc.stderr and "HF_HUB_OFFLINE" in proc.stderr


def test_download_keeps_present_shards(tmp_path, monkeypatch):
    import huggingface_hub
    write_synthetic_shards(tmp_path, docs_per_shard=4, num_shards=2)
    calls = []
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda *a, **k: calls.append(a) or 1 / 0)
    assert download_shards(2, tmp_path) == [str(tmp_path / "shard_00000.parquet"), str(tmp_path / "shard_00001.parquet")]
    assert calls == []
    with pytest.raises(ValueError, match="has 1823 shards"):
        download_shards(5000, tmp_path)


# -----------------------------------------------------------------------------
# dataloader.py

def test_best_fit_row():
    # documents are [BOS, ...]; BOS = 0 here
    buffer = [("a", [0, 1, 1, 1, 1, 1]), ("b", [0, 2, 2]), ("c", [0, 3, 3, 3, 3]), ("d", [0, 4])]
    row, used = _best_fit_row(buffer, 10)
    # largest fitting first (a: 6), then the largest that fits in 4 (b: 3), then d fits in 1? no: crop shortest
    assert used == [("a", 6), ("b", 3), ("d", 1)]
    assert row == [0, 1, 1, 1, 1, 1, 0, 2, 2, 0]
    assert buffer == [("c", [0, 3, 3, 3, 3])]
    assert _best_fit_row(buffer, 10) is None  # runs out before the row is full


def test_packing(tok, data_dir):
    bos = tok.get_bos_token_id()
    batches = take(loader(tok, data_dir, with_doc_refs=True), 6)
    used_refs = []
    for inputs, targets, state, rows in batches:
        assert inputs.shape == targets.shape == (B, T)
        assert inputs.dtype == targets.dtype == torch.int64
        assert torch.all(inputs[:, 0] == bos)  # every row starts at a document start
        assert torch.equal(inputs[:, 1:], targets[:, :-1])  # targets are inputs shifted by one
        full = torch.cat([inputs, targets[:, -1:]], dim=1)  # (B, T+1)
        for b, row in enumerate(rows):
            expect = []
            for k, (ref, n) in enumerate(row):
                tokens = doc_tokens(tok, data_dir, "train", ref)
                # only the last document of a row may be cropped, and only its tail is lost
                assert n == len(tokens) or (k == len(row) - 1 and n < len(tokens))
                expect += tokens[:n]
                used_refs.append(tuple(ref))
            assert full[b].tolist() == expect
    assert sum(len(r) for *_, rows in batches for r in rows) > B * len(batches)  # rows hold several docs
    # no document lost or repeated: used + still buffered == everything read so far
    state = batches[-1][2]
    buffered = [tuple(r) for r in state["buffer"]]
    assert len(set(used_refs)) == len(used_refs) and not set(used_refs) & set(buffered)
    read_rgs = row_group_index(split_parquet_files("train", data_dir))[:state["position"]]
    read = {(s, g, d) for s, g in read_rgs for d in range(8)}
    assert set(used_refs) | set(buffered) == read
    json.dumps(state)  # goes into checkpoint meta


def test_int32_inputs(tok, data_dir):
    inputs, targets, _ = next(loader(tok, data_dir, input_dtype=torch.int32))
    assert inputs.dtype == torch.int32 and targets.dtype == torch.int64


def test_resume_is_exact(tok, data_dir):
    reference = take(loader(tok, data_dir), 5)
    saved = json.loads(json.dumps(reference[1][2]))  # state after batch 2, through JSON like checkpoint meta
    resumed = take(loader(tok, data_dir, resume_state=saved), 3)
    for (x, y, s), (rx, ry, rs) in zip(reference[2:], resumed):
        assert torch.equal(x, rx) and torch.equal(y, ry)
        assert s == rs


def test_resume_across_epochs(tok, data_dir):
    # 12 train row groups of 8 docs; 40 batches go around the split several times
    reference = take(loader(tok, data_dir, buffer_docs=4), 40)
    assert reference[-1][2]["epoch"] >= 2
    for k in (7, 23):
        resumed = take(loader(tok, data_dir, buffer_docs=4, resume_state=reference[k][2]), 40 - k - 1)
        for (x, y, _), (rx, ry, _) in zip(reference[k + 1:], resumed):
            assert torch.equal(x, rx) and torch.equal(y, ry)


def test_resume_state_mismatch(tok, data_dir):
    state = next(loader(tok, data_dir, rank=0, world_size=2))[2]
    with pytest.raises(ValueError, match="world_size=2"):
        next(loader(tok, data_dir, resume_state=state))
    with pytest.raises(ValueError, match="split='train'"):
        next(loader(tok, data_dir, split="val", resume_state=state, rank=0, world_size=2))


def test_ranks_disjoint(tok, data_dir, monkeypatch):
    seen = []
    for rank in range(3):
        refs = set()
        for *_, rows in take(loader(tok, data_dir, rank=rank, world_size=3, with_doc_refs=True), 3):
            refs |= {tuple(ref) for row in rows for ref, _ in row}
        seen.append(refs)
        # rank r reads the split's row groups r, r+3, ...
        mine = set(row_group_index(split_parquet_files("train", data_dir))[rank::3])
        assert {(s, g) for s, g, _ in refs} <= mine
    assert not (seen[0] & seen[1]) and not (seen[0] & seen[2]) and not (seen[1] & seen[2])
    # under torchrun the rank comes from the environment
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "3")
    from_env = next(loader(tok, data_dir))
    explicit = next(loader(tok, data_dir, rank=1, world_size=3))
    assert torch.equal(from_env[0], explicit[0]) and from_env[2]["rank"] == 1
    with pytest.raises(ValueError, match="fewer row groups"):
        next(loader(tok, data_dir, rank=20, world_size=21))


def test_val_is_finite(tok, data_dir):
    val = list(loader(tok, data_dir, split="val"))
    assert len(val) >= 2
    again = list(loader(tok, data_dir, split="val"))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(val, again)) and len(val) == len(again)
    # the val docs are the last shard's
    val_path = list_parquet_files(data_dir)[-1]
    ids = {t for x, y, _ in val for t in x.flatten().tolist()}
    assert ids <= {t for text in pq.read_table(val_path).column("text").to_pylist() for t in tok.encode(text)} | {
        tok.get_bos_token_id()}
    two_epochs = list(loader(tok, data_dir, split="val", epochs=2))
    assert len(two_epochs) > len(val)
    with pytest.raises(ValueError, match="too little text"):
        next(loader(tok, data_dir, split="val", B=64, T=512))


def test_loss_spans_mask_targets_and_resume(tmp_path, tok):
    """A shard with loss_spans: targets outside the spans are -1, inside they are the next token of the text encoded
    span by span; the inputs are the plain ids; resume from a state mid-stream gives the same batches."""
    from nanochat.dataset import write_synthetic_shard, shard_filename
    from nanochat.dataloader import encode_documents
    texts = [f"q{i}:{i % 7},{i % 5}=ans{i}\n" * 3 for i in range(40)]
    spans = []
    for text in texts:
        sp, at = [], 0
        while (k := text.find("=", at)) >= 0:
            end = text.index("\n", k) + 1
            sp += [k, end]
            at = end
        spans.append(sp)
    for index in range(2):
        write_synthetic_shard(str(tmp_path / shard_filename(index)), texts, 8, loss_spans=spans)
    with pytest.raises(ValueError, match="not sorted"):
        write_synthetic_shard(str(tmp_path / "bad.parquet"), texts[:1], 8, loss_spans=[[5, 2]])
    bos = tok.get_bos_token_id()
    docs = encode_documents(tok, texts[:1], spans[:1], bos, 1)[0]
    assert docs[0] == -(bos + 1)  # BOS carries no loss in a masked document
    kept = tok.decode([t for t in docs if t >= 0])
    assert kept == "".join(texts[0][a:b] for a, b in zip(spans[0][::2], spans[0][1::2]))
    it = loader(tok, str(tmp_path), T=24, buffer_docs=4)
    batches = take(it, 4)
    for x, y, _ in batches:
        assert (y == -1).any() and (y != -1).any()
        assert (x >= 0).all()
        assert torch.equal(y[:, :-1][y[:, :-1] != -1], x[:, 1:][y[:, :-1] != -1])  # a kept target is the next input
    text_decoded = tok.decode(batches[0][1][0][batches[0][1][0] != -1].tolist())
    assert "=" in text_decoded and ":" not in text_decoded  # answers only, no question text
    resumed = loader(tok, str(tmp_path), T=24, buffer_docs=4, resume_state=batches[1][2])
    for (x, y, _), (x2, y2, _) in zip(batches[2:], take(resumed, 2)):
        assert torch.equal(x, x2) and torch.equal(y, y2)

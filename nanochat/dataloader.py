"""
Pretraining batches: parquet text -> tokens -> BOS-aligned rows, with an exact resume point.

Packing (best fit): every row of the (B, T+1) batch begins at the start of a document,
and every document is encoded as [BOS, tokens...]. A row is filled by repeatedly taking
the longest buffered document that still fits in the space left; when none fits, the
SHORTEST buffered document is cropped to fill the row exactly and the rest of it is
dropped. So rows have no padding, every row starts with BOS, and the only tokens lost
are the cropped tails (documents longer than T+1 always lose their tail).
inputs = row[:-1], targets = row[1:].

Loss mask: a shard may carry a `loss_spans` column (nanochat.dataset.write_synthetic_shard): per document the
character spans the loss counts on (a task's answers, as SFT counts assistant turns). Such a document is encoded
span by span and every target outside its spans (its BOS included) is -1, the ignore index every loss here uses.
Documents of shards without the column (pretraining text) keep the loss on every token. Inside the packer a no-loss
token is carried as -(id + 1), so packing, cropping and resume handle one list per document as before.

Sharding: the split's row groups are numbered over its shards; rank r reads r, r+world, ...
so ranks never see the same documents (nanochat.dataset.row_group_index).

Resume: each yield carries a JSON-serialisable state with the reading position (the
rank's next row group and the epoch) and the buffered documents as (shard, row group, doc)
references. Passing it back as resume_state re-reads the row groups of the buffered
documents, re-tokenises them, and continues, so the next batch is bit-for-bit the batch
that would have come next. The state is per rank: under torchrun save every rank's state
(e.g. dist.all_gather_object) and give each rank its own back, with the same world size.
"""
import os

import torch

from nanochat.common import get_dist_info
from nanochat.dataset import split_parquet_files, row_group_index, read_row_group, get_data_dir

STATE_VERSION = 1


def encode_documents(tokenizer, texts, spans, bos, num_threads):
    """[BOS] + ids per text; with spans (per text flat [s0, e0, ...] or None for all), the ids of tokens outside the
    spans as -(id + 1) (see the module docstring). Each piece between span boundaries is encoded on its own."""
    if spans is None:
        return tokenizer.encode(texts, prepend=bos, num_threads=num_threads)
    pieces, layout = [], []  # layout per text: [(n_pieces, loss flags)]
    for text, sp in zip(texts, spans):
        cuts = [0] + list(sp) + [len(text)]
        flags = []
        for k in range(len(cuts) - 1):
            if cuts[k + 1] > cuts[k]:
                pieces.append(text[cuts[k]:cuts[k + 1]])
                flags.append(k % 2 == 1)  # cuts alternate: outside, inside, outside, ...
        layout.append(flags)
    encoded = iter(tokenizer.encode(pieces, num_threads=num_threads))
    docs = []
    for flags in layout:
        ids = [-(bos + 1)]
        for keep in flags:
            ids += [t if keep else -(t + 1) for t in next(encoded)]
        docs.append(ids)
    return docs


def _best_fit_row(buffer, capacity):
    """
    Take documents out of `buffer` (list of (ref, tokens)) to fill one row of `capacity`
    tokens. Returns (row tokens, [(ref, n_tokens_used)]) or None when the buffer runs out
    before the row is full (documents taken stay taken: only the finite val stream, at its
    very end, gets here). The scan is linear in the buffer, ties go to the older document.
    """
    row, used = [], []
    while len(row) < capacity:
        if not buffer:
            return None
        space = capacity - len(row)
        best = -1
        for i, (_, tokens) in enumerate(buffer):
            if len(tokens) <= space and (best < 0 or len(tokens) > len(buffer[best][1])):
                best = i
        if best >= 0:
            ref, tokens = buffer.pop(best)
            row.extend(tokens)
            used.append((ref, len(tokens)))
        else:
            # nothing fits: crop the shortest document, it wastes the fewest tokens
            shortest = min(range(len(buffer)), key=lambda i: len(buffer[i][1]))
            ref, tokens = buffer.pop(shortest)
            row.extend(tokens[:space])
            used.append((ref, space))
    return row, used


def tokenizing_distributed_data_loader(tokenizer, B, T, split, data_dir=None, device="cpu", resume_state=None,
                                       tokenizer_threads=2, buffer_docs=512, epochs=None, rank=None,
                                       world_size=None, input_dtype=torch.int64, with_doc_refs=False):
    """
    Yields (inputs, targets, state): inputs (B, T) of input_dtype and targets (B, T) int64 on
    `device`; state is the resume point after this batch (a JSON-serialisable dict).

    split: "train" or "val". epochs: passes over the split before stopping; None = forever.
    Default None for train and 1 for val, so a val loader is finite (the last partial batch
    is dropped). buffer_docs: documents kept ready for best-fit packing; more means less
    cropping but a longer re-read on resume. rank/world_size: default from torchrun's env.
    with_doc_refs: also yield, 4th, for each row the [[shard, row_group, doc], n_tokens_used] it
    was packed from (to check the packing, or to trace a batch back to its text).
    """
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    if B < 1 or T < 1 or buffer_docs < 1:
        raise ValueError(f"B, T and buffer_docs must be >= 1, got B={B} T={T} buffer_docs={buffer_docs}")
    if epochs is None and split == "val":
        epochs = 1
    _, env_rank, _, env_world = get_dist_info()
    rank = env_rank if rank is None else rank
    world_size = env_world if world_size is None else world_size
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, {world_size})")

    paths = split_parquet_files(split, data_dir)
    shard_names = [os.path.basename(p) for p in paths]
    my_row_groups = row_group_index(paths)[rank::world_size]  # [(shard_idx, rg_idx)] this rank reads
    if not my_row_groups:
        raise ValueError(f"the {split} split in {get_data_dir(data_dir)} has fewer row groups than the "
                         f"{world_size} ranks, so rank {rank} has no data; add shards or use fewer ranks")
    bos = tokenizer.get_bos_token_id()
    capacity = T + 1

    def tokenize(texts, spans):
        return encode_documents(tokenizer, texts, spans, bos, tokenizer_threads)

    # --- reading position and buffer: fresh, or rebuilt from resume_state
    position, epoch = 0, 0  # index into my_row_groups of the next row group to read; full passes done
    buffer = []  # [((shard, rg, doc), tokens)], in insertion order (ties in best fit depend on it)
    if resume_state is not None:
        expected = {"version": STATE_VERSION, "split": split, "rank": rank, "world_size": world_size,
                    "shards": shard_names}
        for key, value in expected.items():
            if resume_state.get(key) != value:
                raise ValueError(f"resume_state was saved with {key}={resume_state.get(key)!r} but this loader has "
                                 f"{key}={value!r}; exact resume needs the same data, split and ranks "
                                 f"(start the loader without resume_state to read from the beginning)")
        position, epoch = resume_state["position"], resume_state["epoch"]
        refs = [tuple(ref) for ref in resume_state["buffer"]]
        tokens = {}  # ref -> tokens; read and encode each needed row group once
        for shard_idx, rg in sorted({(s, g) for s, g, _ in refs}):
            rows, spans = read_row_group(paths[shard_idx], rg, with_loss_spans=True)
            docs = sorted(d for s, g, d in refs if (s, g) == (shard_idx, rg))
            encoded = tokenize([rows[d] for d in docs], None if spans is None else [spans[d] for d in docs])
            tokens.update({(shard_idx, rg, d): ids for d, ids in zip(docs, encoded)})
        buffer = [(ref, tokens[ref]) for ref in refs]

    def refill():
        """Append the next row group's documents; False when the last epoch is done."""
        nonlocal position, epoch
        if epochs is not None and epoch >= epochs:
            return False
        shard_idx, rg = my_row_groups[position]
        texts, spans = read_row_group(paths[shard_idx], rg, with_loss_spans=True)
        refs = [(shard_idx, rg, d) for d in range(len(texts))]
        buffer.extend(zip(refs, tokenize(texts, spans)))
        position += 1
        if position == len(my_row_groups):
            position, epoch = 0, epoch + 1
        return True

    num_batches = 0
    pin = torch.device(device).type == "cuda"
    while True:
        rows, used_rows = [], []
        for _ in range(B):
            # keep the buffer full; at the end of a finite stream, pack what is left
            while len(buffer) < buffer_docs and refill():
                pass
            packed = _best_fit_row(buffer, capacity)
            if packed is None:
                break
            rows.append(packed[0])
            used_rows.append(packed[1])
        if len(rows) < B:
            if num_batches == 0:
                raise ValueError(f"the {split} split in {get_data_dir(data_dir)} (rank {rank} of {world_size}, "
                                 f"{epochs} epoch(s)) has too little text for one batch of B={B} rows of T+1={capacity} "
                                 f"tokens; use a smaller B or T, or more data")
            return
        num_batches += 1
        # the state after this batch: where reading continues and what is still buffered
        state = {"version": STATE_VERSION, "split": split, "rank": rank, "world_size": world_size,
                 "shards": shard_names, "position": position, "epoch": epoch,
                 "shard": my_row_groups[position][0], "row_group": my_row_groups[position][1],
                 "buffer": [list(ref) for ref, _ in buffer]}
        batch = torch.tensor(rows, dtype=torch.int64)  # (B, T+1); no-loss tokens as -(id + 1)
        ids = torch.where(batch < 0, -batch - 1, batch)
        inputs = ids[:, :-1].to(input_dtype).contiguous()  # (B, T)
        targets = torch.where(batch[:, 1:] < 0, -1, ids[:, 1:]).contiguous()  # (B, T), -1: no loss
        if pin:  # page-locked host memory lets the copy to the GPU run asynchronously
            inputs, targets = inputs.pin_memory(), targets.pin_memory()
        inputs = inputs.to(device, non_blocking=pin)
        targets = targets.to(device, non_blocking=pin)
        if with_doc_refs:
            yield inputs, targets, state, [[(list(ref), n) for ref, n in row] for row in used_rows]
        else:
            yield inputs, targets, state

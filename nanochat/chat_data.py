"""
Conversations as training rows: what scripts.chat_sft reads instead of text shards.

A conversation is rendered with the chat template (Tokenizer.render_conversation: ids, and a mask that is 1 on the
tokens the assistant writes). Rows of T+1 tokens are packed greedily in order: whole conversations while they fit,
a conversation longer than a row cropped to it, the rest of a row padding (input <|bos|>, no loss). A target is the
next token where the assistant wrote it and -1 elsewhere, so the loss (and everything trained on the loss-bearing
tokens: distillation, exit readouts, gates, router) sees the assistant's tokens only.

The stream is resumable exactly: a batch is whole conversations, so the state after it is the index of the next one.
Data ranks: rank r of n reads the conversations r, r + n, r + 2n, ... .
"""
import torch

STATE_VERSION = 1


def conversation_rows(tokenizer, conversations, T):
    """[(inputs (T,), targets (T,))] lists of one packed row each, over the conversations in order (for tests and
    for val batches)."""
    rows, row = [], []
    for conv in conversations:
        ids, mask = tokenizer.render_conversation(conv, max_tokens=T + 1)
        if row and len(row) + len(ids) > T + 1:
            rows.append(_finish(row, T, tokenizer.get_bos_token_id()))
            row = []
        row.extend(zip(ids, mask))
    if row:
        rows.append(_finish(row, T, tokenizer.get_bos_token_id()))
    return rows


def _finish(row, T, bos):
    """(inputs, targets) of one row of (id, mask) pairs, padded to T+1."""
    row = row + [(bos, 0)] * (T + 1 - len(row))
    inputs = [t for t, _ in row[:-1]]
    targets = [t if m else -1 for t, m in row[1:]]
    return inputs, targets


def conversation_loader(tokenizer, source, B, T, device="cpu", resume_state=None, rank=0, world_size=1, epochs=None):
    """
    Yields (inputs (B, T) long, targets (B, T) long, state) from source (an indexable of conversations: a Task, a
    TaskMixture, a list). epochs: passes before stopping (None = forever). state: the resume point after the batch.
    """
    n = len(source)
    mine = list(range(rank, n, world_size))
    if not mine:
        raise ValueError(f"{n} conversations give data rank {rank} of {world_size} none; use fewer ranks or more data")
    cursor, epoch = 0, 0
    if resume_state is not None:
        expected = {"version": STATE_VERSION, "n": n, "rank": rank, "world_size": world_size}
        for key, value in expected.items():
            if resume_state.get(key) != value:
                raise ValueError(f"resume_state was saved with {key}={resume_state.get(key)!r}, this loader has "
                                 f"{key}={value!r}: exact resume needs the same conversations and data ranks")
        cursor, epoch = resume_state["cursor"], resume_state["epoch"]
    bos, pending = tokenizer.get_bos_token_id(), None
    pin = torch.device(device).type == "cuda"
    num_batches = 0
    while True:
        rows = []
        row = []
        while len(rows) < B:
            if pending is None:
                if epochs is not None and epoch >= epochs:
                    break
                ids, mask = tokenizer.render_conversation(source[mine[cursor]], max_tokens=T + 1)
                pending = list(zip(ids, mask))
            if row and len(row) + len(pending) > T + 1:  # the row is full: it ends here, the conversation waits
                rows.append(_finish(row, T, bos))
                row = []
                continue
            row.extend(pending)
            pending = None
            cursor += 1
            if cursor == len(mine):
                cursor, epoch = 0, epoch + 1
        if row and len(rows) < B:  # the stream ended inside this row
            rows.append(_finish(row, T, bos))
        if len(rows) < B:
            if num_batches == 0:
                raise ValueError(f"{n} conversations ({len(mine)} on data rank {rank}) fill fewer than B={B} rows of "
                                 f"T+1={T + 1} tokens; use a smaller batch or more data")
            return
        pending = None  # drawn for a row it did not fit, not consumed (the cursor still points at it): next batch's first
        num_batches += 1
        state = {"version": STATE_VERSION, "n": n, "rank": rank, "world_size": world_size, "cursor": cursor,
                 "epoch": epoch}
        inputs = torch.tensor([r[0] for r in rows], dtype=torch.long)
        targets = torch.tensor([r[1] for r in rows], dtype=torch.long)
        if pin:
            inputs, targets = inputs.pin_memory(), targets.pin_memory()
        yield inputs.to(device, non_blocking=pin), targets.to(device, non_blocking=pin), state

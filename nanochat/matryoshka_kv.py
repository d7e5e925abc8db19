"""
The attention cache of nanochat.engine: K/V slots for every KV head of every position, filled at the width
each position ran at, with lacked heads written by the engine along with them (when widening is on) or
computed lazily from stored block inputs; plus the helpers that index batch rows of device tensors without
reading anything back from the device.
"""
import torch


class MatryoshkaKVCache:
    """
    Per attention block j:
    - k[j], v[j] (B, H_kv, T_max, hd): slots for every KV head of every position.
    - heads[j] (B, T_max) int16: how many KV heads of each position are valid (always a prefix: own heads
      first, lacked heads filled in order; 0 = position not stored yet). Only fill() reads it. The static step's
      full-width stores (store_at with every KV head: mode think's every block) leave it unwritten, one kernel a
      block and token fewer; note_static_store keeps those positions in `owed[j]` (ranges of every row, on the
      host) and settle(j) writes them before anything reads or overwrites their counts.
    - xn[j] (B, T_max, D), the cache's dtype: the normalised block input, kept only for positions stored
      with fewer than n_kv_head heads (the only ones fill() may read). Allocated (zeros) on block j's first
      such store, so a cache that only sees full-KV-width stores (mode think) has no xn[j]: the dict holds
      the allocated blocks only. Other positions' rows of xn[j] stay zero and are never read.
    - On the host, per block and row: `stored` (positions 0.. stored written without a gap) and `fewest` (the
      fewest heads any of them was written with). covers() answers from them whether fill() has anything to
      do without reading the device (a read is a host-device sync, once per block and token).
    - slots[j]: block j's key slots, max_len, or fewer for a sliding-window block (hybrid_modern.window_slots):
      then a ring, position p in slot p % slots[j]; views give the slots in slot order and the block's window
      mask (hybrid_modern.decode_keep) says which position each holds. No lazy fills or truncation there.
    Row arguments: `rows` a list (or 1-d tensor) of batch indices; `idx` what indexes them on the device
    (row_index(rows, B, device): slice(None) for every row, so stores and views need no gather).
    """

    def __init__(self, model, batch_size, max_len, dtype=torch.float32, slots=None):
        c = model.config
        dev = model.get_device()
        self.head_dim, self.max_len, self.n_kv_head = c.head_dim, max_len, c.n_kv_head
        self.layers = [j for j in range(c.n_layer) if c.mixer_kind(j) == "A"]
        self.slots = {j: (slots or {}).get(j, max_len) for j in self.layers}
        self.k = {j: torch.zeros(batch_size, c.n_kv_head, self.slots[j], c.head_dim, device=dev, dtype=dtype) for j in self.layers}
        self.v = {j: torch.zeros_like(self.k[j]) for j in self.layers}
        self.heads = {j: torch.zeros(batch_size, self.slots[j], device=dev, dtype=torch.int16) for j in self.layers}
        self.xn = {}  # block -> (B, slots, D), allocated by the first store with fewer than n_kv_head heads
        self._xn_shape = (batch_size, c.n_embd)
        self.stored = {j: [0] * batch_size for j in self.layers}
        self.fewest = {j: [c.n_kv_head] * batch_size for j in self.layers}
        self.owed = {j: [] for j in self.layers}  # block -> [(lo, hi)]: positions of every row whose heads[j] is due

    def reset(self):
        """Empty again, keeping every tensor (the CUDA graphs of nanochat.engine were captured on them)."""
        for t in [*self.k.values(), *self.v.values(), *self.heads.values(), *self.xn.values()]:
            t.zero_()
        for j in self.layers:
            self.stored[j] = [0] * len(self.stored[j])
            self.fewest[j] = [self.n_kv_head] * len(self.fewest[j])
            self.owed[j] = []

    def store(self, j, rows, idx, pos, k, v, xn):
        """Own heads of positions pos.. of `rows`: k, v (R, hkv, T, hd); xn (R, T, D), kept if hkv < n_kv_head."""
        hkv, T = k.size(1), k.size(2)
        if pos + T > self.max_len:
            raise RuntimeError(f"KV cache full: {pos + T} tokens > capacity {self.max_len}")
        if self.slots[j] < self.max_len:
            return self.store_ring(j, rows, idx, pos, k, v, xn)
        self.settle(j, pos, pos + T)  # a count due there would overwrite this store's
        self.k[j][idx, :hkv, pos:pos + T] = k.to(self.k[j].dtype)
        self.v[j][idx, :hkv, pos:pos + T] = v.to(self.v[j].dtype)
        if hkv < self.n_kv_head:  # a wider query may need the lacked heads later
            self.ensure_xn(j)
            self.xn[j][idx, pos:pos + T] = xn.to(self.xn[j].dtype)
        self.heads[j][idx, pos:pos + T] = self.heads[j].new_full((), hkv)  # a device scalar: a Python one is copied over, a sync
        self.note_store(j, rows, pos, T, hkv)

    def store_ring(self, j, rows, idx, pos, k, v, xn):
        """store() into a ring of slots: position p goes to slot p % slots[j] (T <= slots: no slot twice)."""
        hkv, T, S = k.size(1), k.size(2), self.slots[j]
        if T > S:
            raise RuntimeError(f"block {j}: {T} positions in one store exceed its ring of {S} slots")
        dev = self.k[j].device
        r = (torch.arange(self.k[j].size(0), device=dev) if isinstance(idx, slice) else idx)[:, None]  # (R, 1)
        s = (torch.arange(pos, pos + T, device=dev) % S)[None, :]  # (1, T)
        self.k[j][r, :hkv, s] = k.transpose(1, 2).to(self.k[j].dtype)  # (R, T, hkv, hd)
        self.v[j][r, :hkv, s] = v.transpose(1, 2).to(self.v[j].dtype)
        if hkv < self.n_kv_head:
            self.ensure_xn(j)
            self.xn[j][r, s] = xn.to(self.xn[j].dtype)
        self.heads[j][r, s] = self.heads[j].new_full((), hkv)
        self.note_store(j, rows, pos, T, hkv)

    def store_at(self, j, pos, k, v, xn):
        """store() of every row at positions held on the device, pos (T,) long, for the static steps, which read
        nothing back: k, v (B, hkv, T, hd), xn (B, T, D). The head counts are written only for a store with fewer
        than every KV head (see heads above); the caller owes note_static_store the host side."""
        hkv = k.size(1)
        if self.slots[j] < self.max_len:  # a ring: the position's slot
            pos = pos % self.slots[j]
        self.k[j][:, :hkv].index_copy_(2, pos, k.to(self.k[j].dtype))
        self.v[j][:, :hkv].index_copy_(2, pos, v.to(self.v[j].dtype))
        if hkv < self.n_kv_head:
            self.xn[j].index_copy_(1, pos, xn.to(self.xn[j].dtype))  # allocated (ensure_xn) before any capture
            self.heads[j].index_fill_(1, pos, hkv)

    def truncate(self, end):
        """Forget positions >= end of every row (speculative decoding's rollback): the host summary stops there, and
        later stores overwrite their slots before any query reads them. `fewest` stays as it was, which can only
        make covers() answer False too often (fill() then looks at the device), never True wrongly."""
        if any(self.slots[j] < self.max_len for j in self.layers):
            raise RuntimeError("a ring (sliding-window) cache cannot roll back: its older slots were overwritten")
        for j in self.layers:
            self.stored[j] = [min(s, end) for s in self.stored[j]]
            self.owed[j] = [(lo, min(hi, end)) for lo, hi in self.owed[j] if lo < end]

    def note_static_store(self, j, pos, T, hkv):
        """The host side of store_at's store of positions pos..pos+T-1 of every row with hkv heads: note_store, and
        the head counts it left unwritten (hkv = every KV head) owed, or, for a narrower store (which wrote its
        counts), no longer owed there."""
        self.note_store(j, range(self.k[j].size(0)), pos, T, hkv)
        if self.slots[j] < self.max_len:
            return  # a ring's counts are never read
        owed = self.owed[j]
        if hkv == self.n_kv_head and (not owed or owed[-1][1] <= pos):  # the usual case, past everything owed
            if owed and owed[-1][1] == pos:
                owed[-1] = (owed[-1][0], pos + T)
            else:
                owed.append((pos, pos + T))
            return
        owed = [(lo, min(hi, pos)) for lo, hi in self.owed[j] if lo < pos] + \
               [(max(lo, pos + T), hi) for lo, hi in self.owed[j] if hi > pos + T]
        if hkv == self.n_kv_head:
            owed.append((pos, pos + T))
        owed.sort()
        merged = []
        for lo, hi in owed:  # consecutive stores make one range
            if merged and lo <= merged[-1][1]:
                merged[-1] = (merged[-1][0], max(merged[-1][1], hi))
            else:
                merged.append((lo, hi))
        self.owed[j] = merged

    def settle(self, j, lo=0, hi=None):
        """Write block j's owed head counts (every KV head) when any of them lies in positions lo..hi-1 (all of
        them: a few slice fills); after it heads[j] holds every stored position's count."""
        hi = self.max_len if hi is None else hi
        if any(a < hi and b > lo for a, b in self.owed[j]):
            with torch.inference_mode():  # the engine's caches are inference tensors
                for a, b in self.owed[j]:
                    self.heads[j][:, a:b] = self.n_kv_head
            self.owed[j] = []

    def note_store(self, j, rows, pos, T, hkv):
        """The host-side summary of a store of positions pos..pos+T-1 of `rows` with hkv heads."""
        stored, fewest = self.stored[j], self.fewest[j]
        for b in rows:
            if stored[b] >= pos:  # no gap before pos
                stored[b] = max(stored[b], pos + T)
            fewest[b] = min(fewest[b], hkv)

    def ensure_xn(self, j):
        if j not in self.xn:
            B, D = self._xn_shape
            self.xn[j] = torch.zeros(B, self.slots[j], D, device=self.k[j].device, dtype=self.k[j].dtype)

    def covers(self, j, rows, need, end):
        """True when positions < end of `rows` are stored with at least `need` KV heads each (fill() would do
        nothing), from the host-side summary. False means fill() must look."""
        stored, fewest = self.stored[j], self.fewest[j]
        return all(stored[b] >= end and fewest[b] >= need for b in rows)

    def fill(self, j, rows, need, end, attn, cos, sin):
        """
        Give positions < end of `rows` their KV heads < need, computing the missing ones at full width from
        the stored normalised inputs (exactly the heads missing, grouped by how many a position has).
        cos, sin: the model's full rotary tables. Returns the FLOPs spent per row (R,) float64 on the CPU.
        This reads the head counts back to the host; the engine calls it only when covers() is False.
        """
        hd = self.head_dim
        if self.slots[j] < self.max_len:
            raise RuntimeError(f"block {j} keeps a ring of its window: lazy KV-head fills are not supported there "
                               "(a width plan that widens writes every head up front: expand_threshold > 0)")
        host_rows = rows.tolist() if torch.is_tensor(rows) else list(rows)
        self.settle(j)
        rows = torch.as_tensor(rows, dtype=torch.long, device=self.heads[j].device)
        have = self.heads[j][rows, :end]  # (R, end)
        flops = torch.zeros(len(rows), dtype=torch.float64)
        counts = sorted(set(have[have < need].tolist()))
        # a position lacking heads was stored with fewer than n_kv_head (its xn was kept), or never stored (0)
        if counts and counts[0] == 0:
            raise RuntimeError(f"block {j}: positions < {end} were never stored, so they have no K/V or input to fill from")
        if counts and j not in self.xn:
            raise RuntimeError(f"block {j}: positions lack KV heads but no normalised input was stored for them")
        for a in counts:
            r, s = (have == a).nonzero(as_tuple=True)  # (N,) row index into rows, position
            xn = self.xn[j][rows[r], s].unsqueeze(0)  # (1, N, D): the N positions as one sequence
            N, Din = s.numel(), xn.size(-1)
            k, v = attn.lacked_kv(xn, a, need, (cos[:, s], sin[:, s]))  # (1, need - a, N, hd)
            self.k[j][rows[r], a:need, s] = k[0].transpose(0, 1).to(self.k[j].dtype)  # (N, need - a, hd)
            self.v[j][rows[r], a:need, s] = v[0].transpose(0, 1).to(self.v[j].dtype)
            self.heads[j][rows[r], s] = need
            flops.index_add_(0, r.cpu(), torch.full((N,), 2.0 * 2 * Din * (need - a) * hd, dtype=torch.float64))
        for b in host_rows:  # every stored position of the row now has >= need heads
            if self.stored[j][b] <= end:
                self.fewest[j][b] = max(self.fewest[j][b], need)
        return flops

    def view(self, j, idx, hkv, end):
        return self.k[j][idx, :hkv, :end], self.v[j][idx, :hkv, :end]


def row_index(rows, B, device):
    """What indexes batch rows `rows` (a list) of a device tensor: slice(None) when they are all B rows in order
    (a view: no gather, no copy), else a long tensor on the device, copied there without waiting for the device
    (from pinned memory on CUDA)."""
    if len(rows) == B and rows == list(range(B)):
        return slice(None)
    return to_device(torch.tensor(rows, dtype=torch.long), device)


def to_device(t, device):
    """A small CPU tensor on `device`, without waiting for the device (a plain copy to CUDA synchronises)."""
    if torch.device(device).type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)

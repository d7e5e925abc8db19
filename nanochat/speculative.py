"""
Self-speculative decoding: the model's own cheap sub-models draft k tokens, the full model (mode think) checks
them in one pass over the k+1 positions, and the longest agreeing prefix is kept, so the output is the full
model's: token for token at temperature 0, and the same distribution when sampling (the speculative
rejection rule: accept a drafted token d with probability min(1, p(d) / q(d)), on rejection draw from
max(0, p - q) normalised; p the full model's distribution, q the draft's).

Drafts (Draft.parse):
- a width plan ("plan:ghost", any mode name or comma-separated widths): a DecodeState of its own (narrow KV,
  its own Mamba states), stepped by Engine.step;
- an early exit ("exit:N"): blocks 0..N at full width and the shared readout. They are the verifier's own first
  N+1 blocks, so the draft writes the verifier's cache for them (LayerSkip's shared cache) and the verify pass
  runs only blocks N+1.. for the drafted positions, from the residuals the draft left.

A round, from the input token t0 (emitted, not yet consumed): the draft consumes t0, d1 .. d(k-1) and proposes
d1 .. dk; the verifier consumes t0, d1 .. dk (k+1 positions) giving its distributions v0 .. vk; m drafts are
accepted and one more token comes from v_m (the correction, or a bonus when all k agree); then every cache
rolls back to the m+1 positions consumed: KV positions past them are forgotten (MatryoshkaKVCache.truncate),
and each Mamba block's conv and SSM states return to the ones kept after position m. The verify pass steps
Mamba blocks once per position (the decode step plain decoding runs, which also yields those per-position
states) and routes MoE FFNs per position (the capacities of one-token steps), so it computes what plain
decoding computes, up to the order of floating-point sums in attention and matmuls over k+1 rows.
Rows of a batch accept the same m (the smallest): tokens a row accepted past it are recomputed next round.
The acceptance rule runs on the device and the rollback is queued before the round's one host read (m and the
tokens together). On the static path (CUDA graphs) an exit draft's next round is queued whole before that read
(queue_ahead: its positions advance on the device by the accepted count, and the host's account of it waits for
its own read), so the device works through the read, the handing out of the tokens and the caller's work; a plan
draft's next round has its first draft queued right after the read, before the tokens are handed out. The loop
that runs rounds, plain steps and the fallback is speculative_loop.generate.
"""
import time
from dataclasses import dataclass, field

import torch

from nanochat.cuda_graphs import replay
from nanochat.engine_state import EagerCache, start_host_copy
from nanochat.engine_static import StaticCache
from nanochat.layers import norm, token_probs, sample_next_token
from nanochat.speculative_rules import accept


class VerifyCache(EagerCache):
    """An EagerCache that steps Mamba blocks once per position, keeping the states after each (rollback), and
    routes MoE FFNs per position: the verify pass computes what one-token decode steps compute."""
    moe_per_position = True

    def __init__(self, model, st, T, flops, pos, saved):
        super().__init__(model, st, T, flops, pos)
        self.saved = saved  # block -> [(conv, ssm) after each position], appended to

    def step_mamba(self, mamba, xn):
        kept = self.saved.setdefault(self.j, [])
        return mamba.steps(xn, *self.st.ssm[self.j], lambda t, c, s: kept.append((c.clone(), s.clone())))


class StaticVerifyCache(StaticCache):
    """The verify pass on the static path: T positions held on the device (pos (T,)), attention over key slots
    0..L-1 with each query's later slots masked out, Mamba stepped per position with each position's states copied
    into fixed buffers (saved: block -> (conv (T, ...), ssm (T, ...))), or for an exit draft's single position, into
    the slot `at` ((1,) on the device: one compiled function serves every draft position). Device tensors only: a
    CUDA graph captures it once per (T, L)."""
    moe_per_position = True

    def __init__(self, model, st, L, pos, saved, at=None):
        self.st, self.j, self.pos, self.L, self.saved, self.slot = st, None, pos, L, saved, at
        self.cos_sin = (model.cos.index_select(1, pos), model.sin.index_select(1, pos))
        self.keep = (torch.arange(L, device=pos.device)[None, :] <= pos[:, None]).view(1, 1, pos.numel(), L)

    def step_mamba(self, mamba, xn):
        conv_buf, ssm_buf = self.saved[self.j]
        at = self.slot
        conv_state, ssm_state = self.st.ssm[self.j]
        if at is not None:  # an exit draft's position: it steps from the states after the position before it (the
            # verifier's own at the round's first), copied, so that the verifier's stay as they were until the
            # rollback and a round begun but never finished leaves them alone (Speculator.can_begin_early)
            first, prev = at == 0, (at - 1).clamp(min=0)
            conv_state = torch.where(first, conv_state, conv_buf.index_select(0, prev)[0])
            ssm_state = torch.where(first, ssm_state, ssm_buf.index_select(0, prev)[0])

        def keep(t, conv_state, ssm_state):  # into the fixed buffers a CUDA graph writes
            if at is None:  # the positions are the buffers' own
                conv_buf[t].copy_(conv_state)
                ssm_buf[t].copy_(ssm_state)
            else:  # one position, its buffer slot held on the device
                conv_buf.index_copy_(0, at + t, conv_state[None])
                ssm_buf.index_copy_(0, at + t, ssm_state[None])
        return mamba.steps(xn, conv_state, ssm_state, keep)


def snapshot_ssm(st):
    return {j: (c.clone(), s.clone()) for j, (c, s) in st.ssm.items()}


def rollback(st, pos, saved, n):
    """Return st to n positions consumed from pos: KV past pos + n forgotten, Mamba states to those kept after the
    n-th position (saved: block -> per-position states from pos on; a block absent consumed nothing past n)."""
    st.cache.truncate(pos + n)
    for j, kept in saved.items():
        conv_state, ssm_state = st.ssm[j]
        conv_state.copy_(kept[n - 1][0])
        ssm_state.copy_(kept[n - 1][1])
    st.pos = pos + n


@dataclass
class _Round:
    """A round between Speculator.begin() and finish(): its input, the drafts so far and what they left."""
    t0: torch.Tensor
    k: int
    pos: int  # None for a round queued ahead until collect(): it begins where the round before it ends
    flops: list
    static: bool
    early: bool = False  # begun right after the last round's read, before its tokens were handed out
    ahead: bool = False  # queued whole before the last round's read (Speculator.queue_ahead)
    vb: dict = None
    L: int = None
    t_start: float = 0.0
    drafts: list = field(default_factory=list)
    qs: list = field(default_factory=list)  # the draft's distributions (sampling)
    snaps: list = field(default_factory=list)  # a plan draft's Mamba states after each of its steps
    saved: dict = field(default_factory=dict)  # the eager path's per-position Mamba states
    hidden: list = field(default_factory=list)  # the eager exit path's residuals after block N


@dataclass
class _Queued:
    """A round queue() put on the device and collect() has not read: the round, its verify logits (B, k+1, V), the
    drafts (B, k), the next round's input token (B,), the host buffer its read lands in and the copy's event."""
    r: _Round
    v: torch.Tensor
    d: torch.Tensor
    nxt: torch.Tensor
    host: torch.Tensor
    copied: object
    t1: float


class Speculator:
    """Drafts and verifies rounds for one generation (see the module docstring). Owns the draft's state."""

    def __init__(self, engine, st, prompts, draft, k, temperature, top_k, rng, max_len):
        self.engine, self.model, self.st, self.draft, self.k = engine, engine.model, st, draft, k
        self.temperature, self.top_k, self.rng = temperature, top_k, rng
        self.n = self.model.config.n_layer
        self.D = self.model.config.n_embd
        self.dst = None
        self.dflops = 0.0
        self.sync = engine.spec_sync  # wait for the device after the drafts, so draft and verify times are apart
        self._r = None  # the round begin() started and finish() has not
        self._host = {}  # (B, k, 0 or 1) -> the pinned host buffers of a round's one read (two: a round queued
        self._flip = 0  # ahead reads into the one its predecessor does not)
        if draft.kind == "plan":  # its own caches, on a workspace of its own (the engine keeps the verifier's)
            self.dst, _, fl, _ = engine.prefill(prompts, draft.plan, max_len=max_len, slot="draft")
            self.dflops = fl

    def _draft_logits_plan(self, tok):
        logits, _, _, _, fl = self.engine.step(self.dst, tok)
        return logits, fl

    def _exit_blocks(self, tok, pos, saved, flops):
        """Blocks 0..N at full width for one token at pos, on the verifier's state; returns the residual (B, 1, D)."""
        eng, st, N = self.engine, self.st, self.draft.exit_block
        B = tok.size(0)
        x = norm(self.model.transformer.wte(tok[:, None]))
        widths, active = [[self.D] * self.n for _ in range(B)], [True] * B
        x = eng._blocks(st, 0, N, x, widths, active, flops, view=VerifyCache(self.model, st, 1, flops, pos, saved))
        eng._count(st, 0, N, 1, widths, active, flops, pos=pos)
        return x

    @torch.inference_mode()
    def round(self, t0, k):
        """One round of k drafts from the input token t0 (B,) on the device: begin() then finish()."""
        self.begin(t0, k)
        return self.finish()

    def finish(self):
        """The rest of the round begin() started, queued, then read: collect(queue())."""
        return self.collect(self.queue())

    def can_run_ahead(self, B, k):
        """Whether the next round may be queued whole before this one's read (queue_ahead): an exit draft on the
        static path, whose every input is on the device (the position advanced there by the accepted count, the
        rollback a function of it), with room in the cache for two rounds from this one's start, and not while the
        bench times the drafts apart from the verify (engine.spec_sync), nor with engine.spec_ahead off (the bench's
        comparison). A plan draft's rollback of its own state needs the count on the host."""
        T = k + 1
        return (self.engine.spec_ahead and not self.sync and self.draft.kind == "exit" and self.static_round(B, T)
                and self.st.pos + 2 * T <= self.st.cache.max_len)

    @torch.inference_mode()
    def queue_ahead(self, q):
        """Queue the round after q (queued, not read) whole, from q's next token: the device runs it while the host
        reads q and hands its tokens out. Its key bucket covers the furthest it can reach (two rounds from q's
        start); its host-side accounting waits for collect(), when q's count is known. Returns its _Queued."""
        # (q's logits survive this round's replays: cuda_graphs.replay hands out a copy of a graph's output)
        self.begin(q.nxt, q.r.k, ahead=True)
        return self.queue()

    def can_begin_early(self, B, k):
        """Whether the generator may queue the next round's first draft before it hands out this round's tokens:
        on the static path, where an exit draft's steps leave the verifier's Mamba states as they were (a round that
        never finishes then changes nothing the next plain step reads), and not while the bench times the drafts
        apart from the verify (engine.spec_sync)."""
        return not self.sync and self.static_round(B, k + 1)

    @torch.inference_mode()
    def begin(self, t0, k, early=False, ahead=False):
        """A round's set-up and its first draft step, queued on the device; queue() does the rest. early: right
        after the last round's read, before its tokens are handed out; that round's queue() compared the weights'
        version just before its read (while the device worked), so the graphs need no refresh here, and the draft
        time counts from queue() (the caller's work comes between). ahead: queued before the last round's read
        (queue_ahead), right after that round's queue() made the same check; its positions are those the last
        round's accepted count advanced on the device."""
        eng, st = self.engine, self.st
        B, T = t0.size(0), k + 1
        r = self._r = _Round(t0=t0, k=k, pos=None if ahead else st.pos, flops=[0.0] * B,
                             static=self.static_round(B, T), early=early, ahead=ahead)
        if r.static:
            if not (early or ahead):
                eng.static.refresh(st.ws)  # stale graphs dropped once a round: the weights cannot change inside it
            r.vb = self._buffers(B, T)
            r.vb["seq"][:, 0].copy_(t0)
            if not ahead:
                torch.add(r.vb["base"], st.pos, out=r.vb["pos"])
            r.L = eng.static.bucket(st.pos + (2 * T if ahead else T), st.cache.max_len)
        r.t_start = time.perf_counter()
        self._draft(r, 0)

    def _draft(self, r, i):
        """Draft step i of the round: from t0 (i = 0) or the last draft, the next draft token, into r.drafts."""
        tok = r.t0 if i == 0 else r.drafts[-1]
        if self.draft.kind == "plan":
            logits, fl = self._draft_logits_plan(tok)
            for b in range(len(r.flops)):
                r.flops[b] += float(fl[b])
            r.snaps.append(snapshot_ssm(self.dst))
        elif r.static:  # blocks 0..N of position i, its residual kept in vb["hidden"], then the readout
            vb = r.vb
            logits = self._run(("exit", len(r.flops), r.k + 1, i, r.L),
                               lambda at=vb["at"][i]: self._exit_static(vb, at, r.L, readout=True))
        else:
            x = self._exit_blocks(tok, r.pos + i, r.saved, r.flops)
            r.hidden.append(x)
            logits = self.model.readout(x[:, 0])
        if not self.temperature == 0.0:
            r.qs.append(token_probs(logits, self.temperature, self.top_k))
        tok = sample_next_token(logits, self.rng, self.temperature, self.top_k)
        r.drafts.append(tok)
        if r.static:
            r.vb["seq"][:, i + 1].copy_(tok)

    def abandon(self):
        """Forget the round begin() started (the fallback stopped speculating): its draft step wrote K/V past the
        verifier's position (overwritten before any query reads them) and stepped copies of Mamba states, or a
        plan draft's own state, which nothing steps after the fallback. Returns None."""
        self._r = None

    def _note_exit(self, r, T):
        """The host's account of an exit draft's blocks 0..N over the round's T positions on the static path (its k
        steps and dk's in the verify pass): their cache stores and FLOPs, the T positions at once."""
        eng, N, B = self.engine, self.draft.exit_block, len(r.flops)
        self._note(0, N, r.pos, T)
        eng._count(self.st, 0, N, T, [[self.D] * self.n for _ in range(B)], [True] * B, r.flops, pos=r.pos)

    @torch.inference_mode()
    def queue(self):
        """The rest of the round begin() started, queued on the device: drafts 1 .. k-1, the verify pass, the
        acceptance rule, the rollback (on the static path: on the device, and the positions advanced by the accepted
        count) and the copy of the round's one read (the accepted count and the tokens, together). Returns a
        _Queued for collect()."""
        eng, st, model, r = self.engine, self.st, self.model, self._r
        self._r = None
        if r.early:  # its first draft step was queued before the caller's work: draft time counts from here
            r.t_start = time.perf_counter()
        B, k, pos, n, N, flops = len(r.flops), r.k, r.pos, self.n, self.draft.exit_block, r.flops
        T, vb, L = k + 1, r.vb, r.L
        widths, active = [[self.D] * n for _ in range(B)], [True] * B
        # (a round queued ahead follows its predecessor's check at the end of queue() with nothing between)
        if r.static and not r.ahead and eng.static.refresh(st.ws) and self.draft.kind == "exit":
            r.drafts, r.qs = [], []  # the weights changed since begin(): its draft step read them stale; the
            self._draft(r, 0)  # verifier reads what it wrote, so it runs again (it left the Mamba states alone)
        for i in range(k):
            if i:
                self._draft(r, i)
            if self.draft.kind == "exit":
                for b in range(B):
                    flops[b] += eng.flops.head
        d = torch.stack(r.drafts, 1)  # (B, k)
        if self.sync and d.is_cuda:
            torch.cuda.synchronize()  # time the drafts apart from the verify (benches)
        t1 = time.perf_counter()
        # verify t0, d1 .. dk: k+1 positions at full width (for an exit draft, dk's first blocks, then the rest)
        j0 = 0 if self.draft.kind == "plan" else N + 1
        if r.static:
            if self.draft.kind == "exit":
                self._run(("exit", B, T, k, L), lambda at=vb["at"][k]: self._exit_static(vb, at, L, readout=False))
            v = self._run(("verify", B, T, j0, L), lambda: self._verify_static(vb, j0, L))
        else:
            if self.draft.kind == "plan":
                x = norm(model.transformer.wte(torch.cat([r.t0[:, None], d], 1)))
            else:
                r.hidden.append(self._exit_blocks(d[:, -1], pos + k, r.saved, flops))
                x = torch.cat(r.hidden, 1)  # (B, k+1, D): the residuals after block N
            x = eng._blocks(st, j0, n - 1, x, widths, active, flops, view=VerifyCache(model, st, T, flops, pos, r.saved))
            v = model.readout(x)  # (B, k+1, V)
        m, nxt = accept(v, d, torch.stack(r.qs, 1) if r.qs else None, self.temperature, self.top_k, self.rng)
        if r.static:  # the Mamba states to those after position m: one static function of m on the device
            vb["m"].copy_(m.view(1))
            self._run(("rollback", B, T), lambda: self._rollback_static(vb, vb["m"]))
            vb["pos"].add_(m + 1)  # where a round queued ahead begins
        # the round's tokens d1 .. dm, nxt (in slots 0 .. m of k+1) and m, read back together
        out = torch.cat([d, nxt[:, None]], 1).scatter_(1, m.view(1, 1).expand(B, 1), nxt[:, None])
        packed = torch.cat([out, m.view(1, 1).expand(B, 1)], 1)
        if r.static:
            eng.static.refresh(st.ws)  # the next round's check, while the device works (begin(early=True))
        self._flip ^= 1
        host = self._host.get((B, k, self._flip))
        if host is None:
            host = self._host[(B, k, self._flip)] = torch.empty(B, k + 2, dtype=torch.long, pin_memory=packed.is_cuda)
        return _Queued(r, v, d, nxt, host, start_host_copy(packed, host), t1)

    @torch.inference_mode()
    def collect(self, q):
        """Wait for the read of the round queue() returned as q, then its host-side accounting: the cache's summary
        of its stores, its FLOPs, the rollback's host part (and a plan draft's own state's). Returns (tokens (B, m+1)
        on the host, logits (B, m+1, V) they are read from, FLOPs (B,) float64 of the round, m, the next round's input
        token (B,) on the device)."""
        eng, st, r = self.engine, self.st, q.r
        if q.copied is not None:
            q.copied.synchronize()
        m = int(q.host[0, -1])
        tokens = q.host[:, :m + 1].clone()
        if r.pos is None:  # queued ahead: it began where the round before it, collected just now, ended
            r.pos = st.pos
        B, k, pos, n, N, flops = len(r.flops), r.k, r.pos, self.n, self.draft.exit_block, r.flops
        T, j0 = k + 1, 0 if self.draft.kind == "plan" else N + 1
        if r.static:  # what the static functions stored, on the host
            if self.draft.kind == "exit":
                self._note_exit(r, T)
            self._note(j0, n - 1, pos, T)
        eng._count(st, j0, n - 1, T, [[self.D] * n for _ in range(B)], [True] * B, flops, pos=pos)
        for b in range(B):
            flops[b] += T * eng.flops.head
        rollback(st, pos, {} if r.static else r.saved, m + 1)  # the cache's account (and the eager path's states)
        if self.draft.kind == "plan":
            if m < k:  # the draft consumed t0, d1 .. d(k-1): back to m+1 of them
                rollback(self.dst, pos, {j: [s[j] for s in r.snaps] for j in self.dst.ssm}, m + 1)
            else:  # it consumed k; it still owes dk
                _, fl = self._draft_logits_plan(q.d[:, -1])
                for b in range(B):
                    flops[b] += float(fl[b])
        t2 = time.perf_counter()
        stats = self.engine.spec_stats
        stats.rounds += 1
        stats.drafted += k
        stats.accepted += m
        stats.accepted_hist.append(m)
        stats.draft_s += q.t1 - r.t_start
        stats.verify_s += t2 - q.t1
        return tokens, q.v[:, :m + 1], torch.tensor(flops, dtype=torch.float64), m, q.nxt

    # ---- the static path (a CUDA graph per shape on CUDA) -----------------------------------------
    def static_round(self, B, T):
        """Whether a round of T positions runs static (CUDA graphs on CUDA): when the engine's decode path is
        static or graph for this state, and the T positions fit the cache."""
        path, _ = self.engine.static.path(self.st, B)
        return path != "eager" and self.st.pos + T <= self.st.cache.max_len

    def _buffers(self, B, T):
        """The static round's device inputs and outputs: tokens (B, T), positions (T,), the residuals after an exit
        draft's blocks (B, T, D), and per Mamba block its states after each position. They live on the workspace,
        beside the graphs captured on them: a later generate() on the same workspace replays those graphs."""
        st, model = self.st, self.model
        dev = model.get_device()
        vb = st.ws.spec_buffers.get((B, T))
        if vb is None:
            vb = st.ws.spec_buffers[(B, T)] = {
                "seq": torch.zeros(B, T, dtype=torch.long, device=dev),
                "at": [torch.full((1,), i, dtype=torch.long, device=dev) for i in range(T)],
                "pos": torch.zeros(T, dtype=torch.long, device=dev), "base": torch.arange(T, device=dev),
                "m": torch.zeros(1, dtype=torch.long, device=dev),  # the accepted drafts: the rollback's slot
                "hidden": torch.zeros(B, T, self.D, dtype=model.transformer.wte.weight.dtype, device=dev),
                "saved": {j: (torch.zeros(T, *c.shape, dtype=c.dtype, device=dev),
                              torch.zeros(T, *s_.shape, dtype=s_.dtype, device=dev)) for j, (c, s_) in st.ssm.items()}}
        return vb

    def _run(self, key, fn):
        """fn() (device tensors only) on the static path, or as the workspace's CUDA graph `key` on the graph path;
        through torch.compile first under the engine's decode="compiled" or "tuned", as its own segments. round()
        drops stale graphs (StaticDecode.refresh) once, before its first call."""
        eng, st = self.engine, self.st
        if eng.static.compiles:  # compiled where it runs (a captured graph's replay does not call it)
            plain = fn

            def fn():
                return eng.static.compiled(plain)()
        if eng.static.wanted_path() != "graph":
            return fn()
        cast = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else None
        states = [t for pair in st.ssm.values() for t in pair]  # what a capture's warm-up steps
        return replay(st.ws, key + (cast,), fn, states, cast, eng.static.linears)

    def _blocks_static(self, vb, j0, j1, x, at, L):
        """Blocks j0..j1 at full width over the round's positions (x (B, T, D)), or over the one position `at`
        ((1,) on the device; x (B, 1, D)); each Mamba block's states after each position into vb["saved"]."""
        pos = vb["pos"] if at is None else vb["pos"].index_select(0, at)
        view = StaticVerifyCache(self.model, self.st, L, pos, vb["saved"], at)
        group = [(self.D, range(x.size(0)), slice(None))]
        for j in range(j0, j1 + 1):
            x = self.model.transformer.h[j].decode(x, view.at(j), group, group)
        return x

    def _exit_static(self, vb, at, L, readout):
        """An exit draft's blocks 0..N for the round's position `at` ((1,) on the device, so that torch.compile
        compiles one function for every position); the residual into vb["hidden"][:, at]."""
        x = norm(self.model.transformer.wte(vb["seq"].index_select(1, at)))
        x = self._blocks_static(vb, 0, self.draft.exit_block, x, at, L)
        vb["hidden"].index_copy_(1, at, x)
        return self.model.readout(x[:, 0]) if readout else None

    def _verify_static(self, vb, j0, L):
        """Blocks j0.. over the round's T positions: from the embeddings (j0 = 0) or the exit draft's residuals."""
        x = norm(self.model.transformer.wte(vb["seq"])) if j0 == 0 else vb["hidden"]
        return self.model.readout(self._blocks_static(vb, j0, self.n - 1, x, None, L))

    def _rollback_static(self, vb, at):
        """Every Mamba block's states to those the round kept after its position `at` ((1,) on the device): what
        rollback() does from per-position lists on the eager path, here from the round's fixed buffers."""
        for j, (conv_buf, ssm_buf) in vb["saved"].items():
            conv_state, ssm_state = self.st.ssm[j]
            conv_state.copy_(conv_buf.index_select(0, at)[0])
            ssm_state.copy_(ssm_buf.index_select(0, at)[0])

    def _note(self, j0, j1, pos, T):
        """The cache's host-side summary of a static store of positions pos..pos+T-1 in blocks j0..j1."""
        for j in range(j0, j1 + 1):
            if j in self.st.cache.k:
                self.st.cache.note_static_store(j, pos, T, self.st.cache.n_kv_head)

    def plain_step(self, tok):
        """One plain decode step of the verifier (think), queued (nothing read back). Returns (logits, FLOPs)."""
        logits, _, _, _, fl = self.engine.step(self.st, tok)
        return logits, fl



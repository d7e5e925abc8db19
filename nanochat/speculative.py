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
"""
import time
from dataclasses import dataclass, field, replace

import torch

from nanochat.cuda_graphs import replay
from nanochat.engine_state import EagerCache, TokenStep, start_host_copy
from nanochat.engine_static import StaticCache
from nanochat.layers import norm, token_probs, sample_next_token
from nanochat.matryoshka import MODES


@dataclass(frozen=True)
class Draft:
    kind: str          # "plan" or "exit"
    plan: object = None  # a mode name or a list of widths (kind "plan")
    exit_block: int = -1  # the last block the draft runs (kind "exit")

    @staticmethod
    def parse(spec, n_layer):
        """'plan:ghost', 'ghost' (any mode name), 'plan:64,64,128,...' or 'exit:N' -> Draft."""
        kind, _, arg = spec.partition(":") if ":" in spec else ("plan", "", spec)
        if kind == "exit":
            if not arg.isdigit() or not 0 <= int(arg) < n_layer - 1:
                raise ValueError(f"draft {spec!r}: exit:N needs a block N in [0, {n_layer - 2}]")
            return Draft("exit", exit_block=int(arg))
        if kind != "plan":
            raise ValueError(f"draft {spec!r}: use plan:<mode or widths> or exit:<block>")
        if arg in MODES:
            if MODES[arg].predicted or arg == "think":
                raise ValueError(f"draft {spec!r}: a draft plan must be a fixed narrower mode or widths, not {arg!r}")
            return Draft("plan", plan=arg)
        try:
            widths = [int(w) for w in arg.split(",")]
            return Draft("plan", plan=widths[0] if len(widths) == 1 else widths)  # one width: every block
        except ValueError:
            raise ValueError(f"draft {spec!r}: {arg!r} is neither a mode ({', '.join(MODES)}) nor widths") from None


@dataclass
class SpecStats:
    """What speculation did in one generate(): rounds, drafted and accepted tokens, time in draft and verify."""
    k: int
    draft: str
    rounds: int = 0
    drafted: int = 0
    accepted: int = 0
    emitted: int = 0
    draft_s: float = 0.0
    verify_s: float = 0.0
    between_s: float = 0.0       # host time from a round's return to the next round's start (its tokens handed out)
    betweens: int = 0            # such intervals (a plain step between two rounds ends one uncounted)
    think_step_s: float = None   # the fastest plain decode step timed (the fallback's yardstick)
    fell_back_at: int = None     # tokens emitted when speculation stopped paying and plain decoding took over
    remembered: bool = False     # plain from the start: an earlier generation of this engine measured it slower
    judged: bool = False         # the fallback compared rounds with the yardstick at least once
    accepted_hist: list = field(default_factory=list)
    round_log: list = field(default_factory=list)  # (tokens emitted, seconds, whether it captured graphs) per round

    @property
    def acceptance(self):
        return self.accepted / max(1, self.drafted)

    def summary(self):
        s = (f"speculative k={self.k} draft={self.draft}: {self.rounds} rounds, acceptance {self.acceptance:.3f} "
             f"({self.accepted}/{self.drafted}), {self.emitted / max(1, self.rounds):.2f} tokens/round")
        if self.rounds:
            s += f", draft {1e3 * self.draft_s / self.rounds:.2f} ms + verify {1e3 * self.verify_s / self.rounds:.2f} ms per round"
        if self.betweens:
            s += f", {1e3 * self.between_s / self.betweens:.2f} ms of host time between rounds"
        if self.remembered:
            s += (f"; plain decoding throughout: speculation with this draft and k measured slower than think in an "
                  f"earlier generation (retried once plain decoding has taken {1 / RETRY_OVERHEAD:.0f}x the time that "
                  f"attempt lost)")
        elif self.fell_back_at is not None:
            s += f"; fell back to plain decoding after {self.fell_back_at} tokens (slower than think)"
        return s


PROBE_STEPS = 4  # plain decode steps before speculating (with the fallback on); the 2nd and 3rd are timed
JUDGE_ROUNDS = 2  # the fallback judges the last (up to 3) rounds that captured no graphs, once there are this many
# An engine whose generation fell back decodes the next ones plain; it tries speculation again once the plain decoding
# since has taken 1 / RETRY_OVERHEAD times what the failed attempt lost against plain decoding, so that retries cost at
# most this share of the decode time. The fallback's floor is 0.95x think's tokens/s; 3% leaves room for the first
# attempt (whose loss no plain generation has yet priced) and for timing noise
RETRY_OVERHEAD = 0.03


@dataclass
class SpecMemory:
    """Engine.spec_memory's entry for a (draft, k, batch) whose speculation measured slower than plain decoding."""
    need_s: float             # plain decoding a retry waits for: what the failed attempt lost / RETRY_OVERHEAD
    plain_s: float = 0.0      # plain decoding since that attempt
    first_s: float = 0.0      # every plain generation remembered so far: seconds to its first token, summed,
    decode_s: float = 0.0     # and after it,
    decode_tokens: int = 0    # for this many tokens
    generations: int = 0

    def plain_cost(self, decode_tokens):
        """Seconds a plain generation of 1 + decode_tokens tokens takes (the mean of those remembered), or None."""
        if not self.generations:
            return None
        return self.first_s / self.generations + decode_tokens * self.decode_s / max(1, self.decode_tokens)

    def add_plain(self, first_s, total_s, decode_tokens):
        self.plain_s += total_s
        self.first_s += first_s
        self.decode_s += total_s - first_s
        self.decode_tokens += decode_tokens
        self.generations += 1


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

        def keep(t, conv_state, ssm_state):  # into the fixed buffers a CUDA graph writes
            if at is None:  # the positions are the buffers' own
                conv_buf[t].copy_(conv_state)
                ssm_buf[t].copy_(ssm_state)
            else:  # one position, its buffer slot held on the device
                conv_buf.index_copy_(0, at + t, conv_state[None])
                ssm_buf.index_copy_(0, at + t, ssm_state[None])
        return mamba.steps(xn, *self.st.ssm[self.j], keep)


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


def accept(v_logits, d_tokens, q_probs, temperature, top_k, rng):
    """
    The acceptance rule for B rows. v_logits (B, k+1, V): the verifier's logits at the k+1 positions; d_tokens
    (B, k): the drafts; q_probs (B, k, V) the draft's distributions (None when greedy). Returns (m, nxt): the number
    of drafts every row accepts (the smallest over rows) and each row's token after them (B,).
    """
    B, k = d_tokens.shape
    if temperature == 0.0:
        ok = v_logits[:, :k].argmax(-1) == d_tokens  # (B, k)
        m = int(torch.cumprod(ok.int(), 1).sum(1).min())  # the drafts every row agrees on
        # a row that agreed past m has argmax v_m == its draft there: argmax v_m is every row's next token
        return m, v_logits[:, m].argmax(-1)
    p = token_probs(v_logits.reshape(B * (k + 1), -1), temperature, top_k).view(B, k + 1, -1)
    pd = p[:, :k].gather(-1, d_tokens[..., None]).squeeze(-1)  # (B, k)
    qd = q_probs.gather(-1, d_tokens[..., None]).squeeze(-1)
    u = torch.rand(B, k, generator=rng, device=p.device)
    ok = u < accept_prob(pd, qd)
    m_rows = torch.cumprod(ok.int(), 1).sum(1)
    m = int(m_rows.min())
    if m == k:
        return m, torch.multinomial(p[:, k], 1, generator=rng).squeeze(-1)
    # rows rejected at position m draw from the residual there; rows that accepted past m keep their draft
    drawn = torch.multinomial(residual(p[:, m], q_probs[:, m]), 1, generator=rng).squeeze(-1)
    return m, torch.where(m_rows > m, d_tokens[:, m], drawn)


def accept_prob(p_d, q_d):
    """The probability of accepting a drafted token: min(1, p(d) / q(d)) (q(d) > 0: the draft drew d from q)."""
    return torch.clamp(p_d / q_d, max=1.0)


def residual(p, q):
    """What a rejection draws from: max(0, p - q) normalised (..., V); p itself where p == q (never rejected)."""
    r = (p - q).clamp(min=0)
    total = r.sum(-1, keepdim=True)
    return torch.where(total > 0, r / total.clamp(min=torch.finfo(r.dtype).tiny), p)


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
        """One round of k drafts from the input token t0 (B,). Returns (tokens (B, m+1), logits (B, m+1, V) they
        are read from, FLOPs (B,) float64 of the round, m)."""
        eng, st, model = self.engine, self.st, self.model
        B, pos, T, n, N = t0.size(0), st.pos, k + 1, self.n, self.draft.exit_block
        flops, saved, snaps = [0.0] * B, {}, []
        widths, active = [[self.D] * n for _ in range(B)], [True] * B
        static = self.static_round(B, T)
        vb = self._buffers(B, T) if static else None
        if static:
            eng.static.refresh(st.ws)  # stale graphs dropped once a round: the weights cannot change inside it
            vb["seq"][:, 0].copy_(t0)
            torch.add(vb["base"], pos, out=vb["pos"])
        L = eng.static.bucket(pos + T, st.cache.max_len)
        drafts, qs, hidden = [], [], []
        t_start = time.perf_counter()
        tok = t0
        for i in range(k):
            if self.draft.kind == "plan":
                logits, fl = self._draft_logits_plan(tok)
                for b in range(B):
                    flops[b] += float(fl[b])
                snaps.append(snapshot_ssm(self.dst))
            else:
                if static:  # blocks 0..N of position i, its residual kept in vb["hidden"], then the readout
                    logits = self._run(("exit", B, T, i, L),
                                       lambda at=vb["at"][i]: self._exit_static(vb, at, L, readout=True))
                    self._note(0, N, pos + i, 1)
                    eng._count(st, 0, N, 1, widths, active, flops, pos=pos + i)
                else:
                    x = self._exit_blocks(tok, pos + i, saved, flops)
                    hidden.append(x)
                    logits = model.readout(x[:, 0])
                for b in range(B):
                    flops[b] += eng.flops.head
            if not self.temperature == 0.0:
                qs.append(token_probs(logits, self.temperature, self.top_k))
            tok = sample_next_token(logits, self.rng, self.temperature, self.top_k)
            drafts.append(tok)
            if static:
                vb["seq"][:, i + 1].copy_(tok)
        d = torch.stack(drafts, 1)  # (B, k)
        if self.sync and d.is_cuda:
            torch.cuda.synchronize()  # time the drafts apart from the verify (benches)
        t1 = time.perf_counter()
        # verify t0, d1 .. dk: k+1 positions at full width (for an exit draft, dk's first blocks, then the rest)
        j0 = 0 if self.draft.kind == "plan" else N + 1
        if static:
            if self.draft.kind == "exit":
                self._run(("exit", B, T, k, L), lambda at=vb["at"][k]: self._exit_static(vb, at, L, readout=False))
                self._note(0, N, pos + k, 1)
                eng._count(st, 0, N, 1, widths, active, flops, pos=pos + k)
            v = self._run(("verify", B, T, j0, L), lambda: self._verify_static(vb, j0, L))
            self._note(j0, n - 1, pos, T)
        else:
            if self.draft.kind == "plan":
                x = norm(model.transformer.wte(torch.cat([t0[:, None], d], 1)))
            else:
                hidden.append(self._exit_blocks(d[:, -1], pos + k, saved, flops))
                x = torch.cat(hidden, 1)  # (B, k+1, D): the residuals after block N
            x = eng._blocks(st, j0, n - 1, x, widths, active, flops, view=VerifyCache(model, st, T, flops, pos, saved))
            v = model.readout(x)  # (B, k+1, V)
        eng._count(st, j0, n - 1, T, widths, active, flops, pos=pos)
        for b in range(B):
            flops[b] += T * eng.flops.head
        m, nxt = accept(v, d, torch.stack(qs, 1) if qs else None, self.temperature, self.top_k, self.rng)
        # roll back to t0, d1 .. dm consumed
        if static:  # the Mamba states from the round's buffers in one static function (one graph replay on CUDA)
            self._run(("rollback", B, T, m), lambda at=vb["at"][m]: self._rollback_static(vb, at))
            rollback(st, pos, {}, m + 1)
        else:
            rollback(st, pos, saved, m + 1)
        if self.draft.kind == "plan":
            if m < k:  # the draft consumed t0, d1 .. d(k-1): back to m+1 of them
                rollback(self.dst, pos, {j: [s[j] for s in snaps] for j in self.dst.ssm}, m + 1)
            else:  # it consumed k; it still owes dk
                _, fl = self._draft_logits_plan(d[:, -1])
                for b in range(B):
                    flops[b] += float(fl[b])
        t2 = time.perf_counter()
        stats = self.engine.spec_stats
        stats.rounds += 1
        stats.drafted += k
        stats.accepted += m
        stats.accepted_hist.append(m)
        stats.draft_s += t1 - t_start
        stats.verify_s += t2 - t1
        tokens = torch.cat([d[:, :m], nxt[:, None]], 1)
        return tokens, v[:, :m + 1], torch.tensor(flops, dtype=torch.float64), m

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
                self.st.cache.note_store(j, range(self.st.cache.k[j].size(0)), pos, T, self.st.cache.n_kv_head)

    def plain_step(self, tok):
        """One plain decode step of the verifier (think), queued (nothing read back). Returns (logits, FLOPs)."""
        logits, _, _, _, fl = self.engine.step(self.st, tok)
        return logits, fl


def generate(engine, prompts, max_tokens, speculate, draft, temperature=0.0, top_k=None, seed=42, stop_tokens=(),
             fallback=True):
    """Engine.generate(..., speculate=k, draft=...) for a hybrid model: yields TokenStep per generated position,
    the tokens and logits mode think gives. engine.spec_stats holds what speculation did. Every round drafts k
    (one shape for the CUDA graphs; tokens past max_tokens are dropped); a last single token is a plain step.
    Plain steps are pipelined as Engine.generate's think loop is (the next step is queued before the host waits
    for this token), and a plan draft does not step with them: it catches up on the tokens it missed before its
    next round (not charged to that round's time). With fallback, the first PROBE_STEPS decode tokens are plain, and the time from one resumption of
    this generator to the next (what the caller sees per token, its own work included) is the yardstick: the
    faster of the second and third probes (the first may capture graphs; after the last no step is queued).
    Rounds are timed the same way, from the resumption before the round to the one after its last token. Once
    JUDGE_ROUNDS rounds that captured no CUDA graphs have run, speculation stops for the rest of the generation
    when the last (up to three) of them gave tokens slower than the yardstick (from then on the draft is not
    stepped). The engine remembers it (SpecMemory): its next generations with this draft, k and batch size are plain
    think generations (Engine.generate's own loop, timed as the caller sees them), until their time reaches what the
    attempt lost / RETRY_OVERHEAD; the next one speculates again and is judged afresh (a retry too short to be judged
    leaves the memory as it was). What an attempt lost: the whole generation's time against a plain generation of as
    many tokens (the remembered ones' mean time to the first token + their mean time per later token), which counts
    the draft's prefill, the probes and the rounds; for the first attempt, with no plain generation to compare, what
    its rounds lost against the probes' plain steps. Retries so cost about RETRY_OVERHEAD of the plain decoding
    between them."""
    model = engine.model
    c = model.config
    if engine.dense:
        raise ValueError("speculative decoding drafts with the model's own narrow widths or early exits: a dense GPT "
                         "checkpoint has neither")
    if speculate < 1:
        raise ValueError(f"speculate must be >= 1 drafted tokens per round, got {speculate}")
    if not isinstance(draft, Draft):
        draft = Draft.parse(draft, c.n_layer)
    name = f"plan:{draft.plan}" if draft.kind == "plan" else f"exit:{draft.exit_block}"
    memo_key = (name, speculate, len(prompts))
    memo = engine.spec_memory.get(memo_key)  # a SpecMemory where an earlier attempt measured slower
    t0, first, tokens = time.perf_counter(), None, 0  # this generation's time as the caller sees it, its tokens
    if fallback and memo is not None and memo.plain_s < memo.need_s:
        # remembered: plain think decoding, the engine's own pipelined loop (no draft, no probes, no per-token sync)
        engine.spec_stats = SpecStats(k=speculate, draft=name, fell_back_at=0, remembered=True)
        try:
            for ts in engine.generate(prompts, max_tokens, "think", temperature=temperature, top_k=top_k, seed=seed,
                                      stop_tokens=stop_tokens):
                first, tokens = time.perf_counter() - t0 if first is None else first, tokens + 1
                yield ts
        finally:
            memo.add_plain(first or 0.0, time.perf_counter() - t0, max(0, tokens - 1))
        return
    engine.spec_memory.pop(memo_key, None)  # a retry (memo given) speculates and is judged afresh
    engine.spec_stats = SpecStats(k=speculate, draft=name)
    try:
        for ts in _speculate(engine, prompts, max_tokens, speculate, draft, name, temperature, top_k, seed,
                             stop_tokens, fallback, memo_key):
            tokens += 1
            yield ts
    finally:
        new = engine.spec_memory.get(memo_key)
        if memo is not None and not engine.spec_stats.judged and new is None:
            engine.spec_memory[memo_key] = memo  # not judged: the next generation retries
        elif memo is not None and new is not None and memo.generations:  # a retry that fell back: priced whole,
            lost = time.perf_counter() - t0 - memo.plain_cost(max(0, tokens - 1))  # and the plain prices kept
            engine.spec_memory[memo_key] = replace(memo, plain_s=0.0, need_s=max(new.need_s, lost / RETRY_OVERHEAD))


def _speculate(engine, prompts, max_tokens, speculate, draft, name, temperature, top_k, seed, stop_tokens, fallback,
               memo_key):
    """generate()'s speculative generation (see there)."""
    model = engine.model
    c = model.config
    dev = model.get_device()
    cuda = dev.type == "cuda"
    ids = torch.tensor(prompts, dtype=torch.long, device=dev)
    B, T = ids.shape
    rng = torch.Generator(device=dev).manual_seed(seed) if temperature > 0 else None
    max_len = T + max_tokens + speculate + 1
    st, logits, flops, full = engine.prefill(ids, "think", max_len=max_len)
    engine.state = st
    spec = Speculator(engine, st, ids, draft, speculate, temperature, top_k, rng, max_len)
    stats = engine.spec_stats

    def n_graphs():  # CUDA graphs captured so far on the verifier's and the draft's workspaces
        return len(st.ws.graphs) + (len(spec.dst.ws.graphs) if spec.dst is not None else 0)
    n, stop = c.n_layer, torch.tensor(sorted(stop_tokens), dtype=torch.long)
    widths = torch.full((B, n), c.n_embd, dtype=torch.long)
    no_exit, no_wide = torch.full((B,), n - 1, dtype=torch.long), torch.zeros(B, dtype=torch.bool)

    def step(tok, lg, fl, pos, source):
        """The TokenStep of a token read from the logits at input position pos (its context: pos + 1 positions)."""
        full = torch.full((B,), float(engine.flops.forward(pos + 1)), dtype=torch.float64)
        return TokenStep(tok.tolist(), lg.float(), no_exit, widths, no_wide, fl, full, source)

    tok = sample_next_token(logits, rng, temperature, top_k)
    yield TokenStep(tok.tolist(), logits.float(), no_exit, st.prompt_widths.clone(), no_wide, flops + spec.dflops, full,
                    "prompt")
    mark = time.perf_counter()  # when this generator last resumed after a yield
    emitted, done = 1, torch.isin(tok.cpu(), stop)
    speculating, plain_steps = True, 0
    owed = []  # tokens the verifier consumed in plain steps that a plan draft has not (it catches up before a round)
    pending = None  # a plain step already queued on tok: (position, logits, FLOPs)
    host_tok = torch.empty(B, dtype=torch.long, pin_memory=cuda)
    returned = None  # when the last round returned, until a plain step intervenes

    def plain_next():
        return not speculating or max_tokens - emitted < 2 or (fallback and plain_steps < PROBE_STEPS)

    def queue_plain(tok):
        if speculating and spec.dst is not None:
            owed.append(tok)
        pos = st.pos
        return (pos,) + spec.plain_step(tok)

    while emitted < max_tokens and not bool(done.all()):
        if plain_next():
            pos, lg, fl = pending if pending is not None else queue_plain(tok)
            pending, returned = None, None
            probing = fallback and speculating and plain_steps < PROBE_STEPS
            tok = sample_next_token(lg, rng, temperature, top_k)
            copied = start_host_copy(tok, host_tok)
            emitted, plain_steps = emitted + 1, plain_steps + 1
            if emitted < max_tokens and plain_next():  # pipelined: the device runs the next step while the host waits
                pending = queue_plain(tok)
            queued = pending is not None
            if copied is not None:
                copied.synchronize()
            yield step(host_tok, lg, fl, pos, "decode")
            now = time.perf_counter()
            if probing and plain_steps > 1 and queued:  # steady pipelining: not the first (graphs may be captured,
                # nothing was queued before it) nor the last (the round's work follows it, not a queued step)
                stats.think_step_s = now - mark if stats.think_step_s is None else min(now - mark, stats.think_step_s)
            mark = now
            done = done | torch.isin(host_tok, stop)
            continue
        caught_up = [engine.step(spec.dst, t)[4] for t in owed]  # the plan draft consumes what the verifier did
        if owed:
            owed.clear()
            mark = time.perf_counter()  # a one-off per plain stretch: not charged to the round the fallback judges
        pos, graphs = st.pos, n_graphs()
        if returned is not None:  # the GPU waits through this (the round's one device read came before it)
            stats.between_s += time.perf_counter() - returned
            stats.betweens += 1
        tokens, lg, fl, m = spec.round(tok, speculate)
        returned = time.perf_counter()
        fl = fl + sum(caught_up)
        tokens_host = tokens.cpu()
        out = 0
        for i in range(m + 1):
            if emitted >= max_tokens or bool(done.all()):
                break
            yield step(tokens_host[:, i], lg[:, i], fl / (m + 1), pos + i, "speculative")
            emitted, done = emitted + 1, done | torch.isin(tokens_host[:, i], stop)
            stats.emitted += 1
            out += 1
        now = time.perf_counter()
        stats.round_log.append((out, now - mark, n_graphs() > graphs))
        mark = now
        tok = tokens[:, -1]
        recent = [(n_, t_) for n_, t_, captured in stats.round_log if not captured][-3:]
        if fallback and len(recent) >= JUDGE_ROUNDS and stats.think_step_s is not None:
            stats.judged = True
            if sum(n_ for n_, _ in recent) * stats.think_step_s < sum(t_ for _, t_ in recent):
                stats.fell_back_at, speculating = emitted, False  # its tokens came slower than plain steps
                # what this generation's rounds lost against plain steps (graph captures included): a retry waits
                # for 1 / RETRY_OVERHEAD times that much plain decoding (generate() prices a retry's loss whole)
                lost = sum(t_ - n_ * stats.think_step_s for n_, t_, _ in stats.round_log)
                engine.spec_memory[memo_key] = SpecMemory(max(0.0, lost) / RETRY_OVERHEAD)

"""
Speculative decoding's rules, apart from the rounds that apply them (nanochat/speculative.py): what a draft is
(Draft.parse); what a generation's speculation did and what the fallback remembers (SpecStats, SpecMemory, and
the fallback's constants); and the acceptance rule, greedy or sampled, computed on the device with no host read,
so that a round's one read of its result comes after its rollback is queued.
"""
from dataclasses import dataclass, field

import torch

from nanochat.layers import token_probs
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
    between_s: float = 0.0       # host time from a round's device read to the next round's first draft queued (the
    #                              device idles through it): before the read's tokens are handed out on the static path
    betweens: int = 0            # such intervals (a plain step between two rounds ends one uncounted)
    ahead: int = 0               # rounds queued whole before the read of the round before them (no such interval)
    think_step_s: float = None   # the fastest plain decode step timed (the fallback's yardstick)
    fell_back_at: int = None     # tokens emitted when speculation stopped paying and plain decoding took over
    remembered: bool = False     # plain from the start: an earlier generation of this engine measured it slower
    retry_after: float = None    # remembered: the retry comes once plain decoding has taken this many times that loss
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
        if self.ahead:
            s += f", {self.ahead} rounds queued ahead of the last one's read"
        if self.remembered:
            s += (f"; plain decoding throughout: speculation with this draft and k measured slower than think in an "
                  f"earlier generation (retried once plain decoding has taken {self.retry_after:.0f}x the time that "
                  f"attempt lost)")
        elif self.fell_back_at is not None:
            s += f"; fell back to plain decoding after {self.fell_back_at} tokens (slower than think)"
        return s


PROBE_STEPS = 4  # plain decode steps before speculating (with the fallback on); the 2nd and 3rd are timed
JUDGE_ROUNDS = 2  # the fallback judges the last (up to 3) rounds that captured no graphs, once there are this many
# An engine whose generation fell back decodes the next ones plain; it tries speculation again once the plain decoding
# since has taken 1 / share times what the failed attempt lost against plain decoding, so that retries cost at most
# that share of the decode time. The share starts at RETRY_OVERHEAD and halves with each retry in a row that falls back
# again (at most RETRY_HALVINGS times): where speculation never pays, retries cost 3%, then 1.5%, ... of the decode
# time, not 3% for ever. The fallback's floor is 0.95x think's tokens/s; 3% leaves room for the first attempt (whose
# loss no plain generation has yet priced) and for timing noise
RETRY_OVERHEAD = 0.03
RETRY_HALVINGS = 4


def retry_share(failures):
    """The share of the decode time retries may cost after `failures` attempts in a row fell back (>= 1)."""
    return RETRY_OVERHEAD / 2 ** min(failures - 1, RETRY_HALVINGS)


@dataclass
class SpecMemory:
    """Engine.spec_memory's entry for a (draft, k, batch) whose speculation measured slower than plain decoding."""
    need_s: float             # plain decoding a retry waits for: what the failed attempt lost / retry_share(failures)
    plain_s: float = 0.0      # plain decoding since that attempt
    first_s: float = 0.0      # every plain generation remembered so far: seconds to its first token, summed,
    decode_s: float = 0.0     # and after it,
    decode_tokens: int = 0    # for this many tokens
    generations: int = 0
    failures: int = 1         # attempts in a row that fell back (the first, then each retry that fell back again)

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


def accept(v_logits, d_tokens, q_probs, temperature, top_k, rng):
    """
    The acceptance rule for B rows. v_logits (B, k+1, V): the verifier's logits at the k+1 positions; d_tokens
    (B, k): the drafts; q_probs (B, k, V) the draft's distributions (None when greedy). Returns (m, nxt), both on
    the device, nothing read back: m (0-dim long) the number of drafts every row accepts (the smallest over rows),
    nxt (B,) each row's token after them. Sampling draws both candidates for that token, one from v_k (taken when
    all k drafts pass) and one from the residual at min(m, k-1) (taken otherwise, by rows rejected at m), each
    with its own randomness: the choice depends on m only, so each row's token has the rule's distribution.
    """
    B, k = d_tokens.shape
    if temperature == 0.0:
        ok = v_logits[:, :k].argmax(-1) == d_tokens  # (B, k)
        m = torch.cumprod(ok.int(), 1).sum(1).min()  # the drafts every row agrees on
        # a row that agreed past m has argmax v_m == its draft there: argmax v_m is every row's next token
        return m, v_logits.index_select(1, m.view(1))[:, 0].argmax(-1)
    p = token_probs(v_logits.reshape(B * (k + 1), -1), temperature, top_k).view(B, k + 1, -1)
    pd = p[:, :k].gather(-1, d_tokens[..., None]).squeeze(-1)  # (B, k)
    qd = q_probs.gather(-1, d_tokens[..., None]).squeeze(-1)
    u = torch.rand(B, k, generator=rng, device=p.device)
    ok = u < accept_prob(pd, qd)
    m_rows = torch.cumprod(ok.int(), 1).sum(1)
    m = m_rows.min()
    bonus = torch.multinomial(p[:, k], 1, generator=rng).squeeze(-1)  # every draft accepted: a draw from v_k
    at = m.clamp(max=k - 1).view(1)
    # rows rejected at position m draw from the residual there; rows that accepted past m keep their draft
    drawn = torch.multinomial(residual(p.index_select(1, at)[:, 0], q_probs.index_select(1, at)[:, 0]), 1,
                              generator=rng).squeeze(-1)
    return m, torch.where(m == k, bonus, torch.where(m_rows > m, d_tokens.index_select(1, at)[:, 0], drawn))


def accept_prob(p_d, q_d):
    """The probability of accepting a drafted token: min(1, p(d) / q(d)) (q(d) > 0: the draft drew d from q)."""
    return torch.clamp(p_d / q_d, max=1.0)


def residual(p, q):
    """What a rejection draws from: max(0, p - q) normalised (..., V); p itself where p == q (never rejected)."""
    r = (p - q).clamp(min=0)
    total = r.sum(-1, keepdim=True)
    return torch.where(total > 0, r / total.clamp(min=torch.finfo(r.dtype).tiny), p)

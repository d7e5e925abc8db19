"""
What a generation carries between decode steps, shared by the engine (nanochat/engine.py) and speculative decoding
(nanochat/speculative.py): the DecodeState (a workspace of caches, plans, thresholds, the position), what each step
yields (TokenStep, GenerationResult), and EagerCache, the host-indexed view of the caches that a block's own decode
step (HybridBlock.decode) reads and writes on the eager path.
"""
from dataclasses import dataclass, field

import torch

from nanochat.cuda_graphs import Workspace
from nanochat.matryoshka_kv import row_index


@dataclass
class DecodeState:
    ws: Workspace
    plan: torch.Tensor        # (B, n_layer) long, CPU: each row's base plan
    prompt_widths: torch.Tensor  # (B, n_layer) long, CPU: widths the prompt ran at
    exit_threshold: float
    expand_threshold: float
    pos: int = 0
    all_heads: bool = False   # write every KV head of a position (its lacked ones at full width): widening is on
    prefill_id: int = 0       # ws.prefills after this state's prefill: while equal, the workspace is this state's

    @property
    def cache(self):
        return self.ws.cache

    @property
    def ssm(self):
        return self.ws.ssm

    @property
    def side(self):
        """hybrid_modern.Side of the positions being decoded (None for models without its features)."""
        return self.ws.side


@dataclass
class TokenStep:
    """One position of generation for all B rows; step 0 is the prompt (flops = the whole prompt's)."""
    tokens: list                      # B sampled token ids
    logits: torch.Tensor              # (B, V) fp32 the tokens were sampled from
    exit_block: torch.Tensor          # (B,) block after which the input token's residual froze
    widths: torch.Tensor              # (B, n_layer) widths the input token ran at
    widened: torch.Tensor             # (B,) bool: the gate widened this token
    flops: torch.Tensor               # (B,) float64 FLOPs that ran
    full_flops: torch.Tensor          # (B,) float64 the full model's FLOPs for the same tokens
    source: str = "decode"            # "prompt" for step 0


@dataclass
class GenerationResult:
    prompts: list
    tokens: list                      # per row: generated ids (stopped rows end before their stop token)
    steps: list = field(default_factory=list)
    prompt_widths: torch.Tensor = None
    plan: torch.Tensor = None

    def reference_inputs(self):
        """(idx, widths, exit_after) for HybridGPT.forward reproducing every step's logits: step 0's at
        position T_prompt - 1, step k's at T_prompt + k - 1."""
        B, Tp = len(self.prompts), len(self.prompts[0])
        gen = torch.tensor([s.tokens for s in self.steps[:-1]], dtype=torch.long).T.reshape(B, -1)  # (B, K-1)
        idx = torch.cat([torch.tensor(self.prompts, dtype=torch.long), gen], 1)
        n = self.prompt_widths.size(1)
        widths = torch.cat([self.prompt_widths.cpu()[:, None].expand(B, Tp, n)] +
                           [s.widths.cpu()[:, None] for s in self.steps[1:]], 1)
        exit_after = torch.cat([torch.full((B, Tp), n - 1, dtype=torch.long)] +
                               [s.exit_block.cpu()[:, None] for s in self.steps[1:]], 1)
        return idx, widths, exit_after


class EagerCache:
    """
    Block j's view of a DecodeState's caches for T new positions from pos (default st.pos; T = the prompt's length
    at prefill), for rows indexed on the host: K/V stored per row group, a wider query's lacked KV heads filled
    first where the cache lacks them (their FLOPs added to `flops`, per row), Mamba states stepped (one token) or
    advanced over the T positions (prefill).
    """
    moe_per_position = False  # MoE FFNs route all T positions in one call (see HybridBlock.decode)

    def __init__(self, model, st, T, flops, pos=None):
        self.model, self.st, self.T, self.flops, self.j = model, st, T, flops, None
        self.pos = st.pos if pos is None else pos
        self.cos_sin = model.rotary(self.pos, T)

    def at(self, j):
        self.j = j
        return self

    def write_kv(self, attn, rows, idx, xn, w, ids=None):
        k, v = attn.kv_to_store(xn, w, self.cos_sin, self.st.all_heads, ids)  # (R, heads, T, hd)
        self.st.cache.store(self.j, rows, idx, self.pos, k, v, xn)

    def read_kv(self, attn, rows, idx, w):
        cache, end, hkv = self.st.cache, self.pos + self.T, attn.heads_at(w)[1]
        if not cache.covers(self.j, rows, hkv, end):
            for b, f in zip(rows, cache.fill(self.j, rows, hkv, end, attn, self.model.cos, self.model.sin).tolist()):
                self.flops[b] += f
        k, v = cache.view(self.j, idx, hkv, end)
        return k, v, None

    def step_mamba(self, mamba, xn):
        conv_state, ssm_state = self.st.ssm[self.j]
        if self.T == 1 and self.pos > 0:
            return mamba.step(xn, conv_state, ssm_state)[0]
        from nanochat.mamba_block import InferenceParams
        B, T, _ = xn.shape
        params = InferenceParams(max_seqlen=self.pos + T, max_batch_size=B, seqlen_offset=self.pos)
        params.key_value_memory_dict[mamba.layer_idx] = (conv_state, ssm_state)
        return mamba(xn, inference_params=params)  # writes the states after the T tokens in place


def start_host_copy(src, dst):
    """Queue a copy of the device tensor src into the (pinned) host tensor dst; returns the CUDA event to wait on
    before reading dst, or None off CUDA (the copy is done). The decode loops queue the next step between the two."""
    cuda = src.is_cuda
    dst.copy_(src, non_blocking=cuda)
    if not cuda:
        return None
    event = torch.cuda.Event()
    event.record()
    return event


def width_groups(w_rows, active, device):
    """[(w, rows, idx)] in increasing w: the rows (among the active ones, if given) that run at width w, and their
    device index (row_index: a slice for a group of every row)."""
    by = {}
    for b, w in enumerate(w_rows):
        if active is None or active[b]:
            by.setdefault(w, []).append(b)
    return [(w, rows, row_index(rows, len(w_rows), device)) for w, rows in sorted(by.items())]

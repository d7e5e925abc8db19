"""
Generation for a HybridGPT (and the dense GPT): batched, with a KV cache for attention and conv/SSM
states for Mamba, a width plan per row, and per-token early exit and widening.

What a token computes (HybridGPT.forward with per-token widths (B, T, n_layer) and exit_after (B, T) is
the same function, and tests/test_engine.py compares the two):
- Every row has a base plan, one width per block: a fixed mode (ghost/whisper/normal/think, see
  matryoshka.mode_plan), an explicit plan, or "auto": the LayerDimPredictor's plan from the prompt. In
  auto the prompt's first config.predictor_after blocks run at full width (the predictor reads their
  output), so the plan keeps those blocks at full width for generated tokens too: prompt and generated
  tokens run one static plan, the kind training sees (a block whose prompt keys were computed at full
  width but whose later queries run narrow is a mix training never shows the model).
- Generated tokens, after each gated exit block j (config.exit_blocks() but the last), ask the gate
  (calibrated probability p that exiting is safe):
    p > exit_threshold: the token exits; its residual freezes and its logits are the readout of it.
    p < expand_threshold: the token runs its remaining blocks (j+1, ...) at full width ("widening");
      the next token starts from the row's base plan again.
  Prompt tokens never exit or widen.
- Exited tokens still feed the caches of deeper blocks (CALM's state propagation): a deeper attention
  block computes only the K/V of the frozen residual at the token's plan width (no query, attention,
  output projection or FFN); a deeper Mamba block steps its conv/SSM state with the frozen residual.
  Mamba's step also computes its output projection, which is then discarded; it is counted.
- MatryoshkaKVCache (nanochat/matryoshka_kv.py): every position has slots for all KV heads. A position's own width's heads are
  written when it is processed (at that width). The heads it lacks (computed at full width from its
  normalised block input) are written with them when widening is on (expand_threshold > 0, as in auto):
  then any later token may widen and read them, and a step that would have to fill heads first cannot run
  as a static segment. Otherwise they are computed the first time a wider query needs them, from the input
  stored for positions written with fewer than all KV heads (none in mode think), and kept.

FLOPs are counted per token for what ran (hybrid_gpt.flops_breakdown's convention): the parts of each
block that ran at the width they ran at, lacked K/V heads (written with the own ones or filled lazily), gate
checks, the predictor, one readout.
The full model's count is forward_flops_per_token at the same context length.

Speed: the control state (widths, active rows, FLOPs) lives on the host, so a step reads nothing back from
the GPU except the gates' decisions. Steps run as static-shape segments, captured as CUDA graphs on CUDA
(Engine's `decode` argument; batch-1 decode is otherwise bound by kernel-launch overhead), which later
prompts of the same batch size and length replay (Workspace); graphs captured under autocast read weight
copies in its dtype. generate() queues each next step before reading the token back.
"""
import logging
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from nanochat.common import log_once
from nanochat.gpt import GPT
from nanochat.layers import norm, sample_next_token
from nanochat.matryoshka import MODE_WIDTHS, mode_plan, expand_plan, check_plan
from nanochat.matryoshka_kv import MatryoshkaKVCache, row_index, to_device
from nanochat.cuda_graphs import Workspace
from nanochat.engine_static import StaticDecode, add_flops

MODES = tuple(MODE_WIDTHS) + ("auto",)
DECODE_PATHS = ("auto", "eager", "static", "graph", "compiled")
logger = logging.getLogger(__name__)


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


def prompt_full_flops(model, T):
    """The full model's forward FLOPs on a T-token prompt with logits at its last position only. Per-token FLOPs
    are affine in the context (attention scores), so the sum over contexts 1..T is closed-form (a Python loop
    over T took seconds at 32K tokens)."""
    c = model.config
    f0 = model.forward_flops_per_token(0)
    return T * f0 + (model.forward_flops_per_token(1) - f0) * T * (T + 1) // 2 - (T - 1) * 2 * c.n_embd * c.vocab_size


class Engine(StaticDecode):
    """
    decode: how step() runs a token.
      "eager"  the per-block step below: any plan, per-row plans, gates, MoE, lazy KV-head fills.
      "static" the same function with static shapes (static_segment), in segments of blocks that end at the
               gates: attention over a power-of-two bucket of key slots with a length mask, position and cache
               writes indexed by a device tensor. Needs one plan for every row (and one row when gates are on),
               for graphs MoE blocks with a capacity (drop_tokens), and, for an active token, every KV head its
               queries need already stored (a segment that needs a lazy fill runs eager). Runs anywhere; tests compare it with "eager".
      "graph"  "static" with each segment captured once per (bucket, widths, state, gate) as a CUDA graph and
               replayed: a launch per segment instead of one per op (batch-1 decode is bound by launch
               overhead). Gates still read their decision back, once per gate.
      "compiled" "graph" on CUDA ("static" elsewhere) with each segment's code compiled by torch.compile first
               (compile_backend), so its elementwise ops fuse into fewer kernels. Compiles once per segment kind
               (minutes for a large model; past COMPILE_LIMIT kinds a new one runs uncompiled).
      "auto"   "graph" on CUDA, "eager" elsewhere.
    What cannot run static runs eager; the reason is logged once, and last_path says what the last step ran.
    """

    def __init__(self, model, decode="auto", compile_backend="inductor"):
        if decode not in DECODE_PATHS:
            raise ValueError(f"decode must be one of {DECODE_PATHS}, got {decode!r}")
        self.model = model
        self.dense = isinstance(model, GPT)
        self._costs = {}
        self.decode = decode
        # what a static segment runs: static_segment itself, or compiled (compile_backend: tests use aot_eager)
        self._static_fn = self.static_segment
        if decode == "compiled":
            compiled = torch.compile(self.static_segment, dynamic=False, backend=compile_backend)

            def static_fn(*args):  # one compile per segment kind: more kinds than dynamo's default limit of 8
                with torch._dynamo.config.patch(recompile_limit=self.COMPILE_LIMIT):
                    return compiled(*args)
            self._static_fn = static_fn
            log_once(logger, f"Engine decode: static segments compiled by torch.compile ({compile_backend})")
        self.last_path = None  # the path step() took last ("eager", "static" or "graph")
        self._workspace = None  # the last Workspace, kept where decode steps may be CUDA graphs
        self._linears = [m for m in model.modules() if isinstance(m, nn.Linear)]

    # ---- plans and thresholds -----------------------------------------------------------------
    def resolve(self, plan, exit_threshold, expand_threshold):
        """plan: a mode name, a plan (list, one width per block) or a (B, n_layer) tensor. Thresholds None
        -> auto: 0.95 / 0.5, anything else: off (1.0 / 0.0)."""
        if self.dense:
            if not (plan is None or (isinstance(plan, str) and plan == "think")) or exit_threshold not in (None, 1.0) or expand_threshold not in (None, 0.0):
                raise ValueError("a dense GPT checkpoint has no width levels or exit gates: only mode 'think' "
                                 "(full width) without exit/expand thresholds runs on it")
            return None, 1.0, 0.0
        if isinstance(plan, str) and plan not in MODES:
            raise ValueError(f"unknown mode {plan!r}; choose from {MODES}")
        auto = isinstance(plan, str) and plan == "auto"
        exit_threshold = (0.95 if auto else 1.0) if exit_threshold is None else float(exit_threshold)
        expand_threshold = (0.5 if auto else 0.0) if expand_threshold is None else float(expand_threshold)
        if not 0.0 <= expand_threshold <= exit_threshold <= 1.0:
            raise ValueError(f"need 0 <= expand_threshold ({expand_threshold}) <= exit_threshold ({exit_threshold}) <= 1")
        gating = exit_threshold < 1.0 or expand_threshold > 0.0
        if (auto or gating) and not hasattr(self.model, "controllers"):
            raise ValueError("this model has no controllers (HybridConfig.adaptive=False): mode 'auto' and exit/expand "
                             "thresholds need the trained width predictor and gates")
        return plan, exit_threshold, expand_threshold

    def base_plan(self, plan, B):
        """(B, n_layer) long widths on the CPU (the engine's control flow runs on the host)."""
        c = self.model.config
        if plan is None or isinstance(plan, str):
            plan = mode_plan(plan or "think", c.width_levels, c.n_layer)
        if torch.is_tensor(plan):
            if tuple(plan.shape) != (B, c.n_layer):
                raise ValueError(f"a plan tensor must be (B, n_layer) = {(B, c.n_layer)}, got {tuple(plan.shape)}")
            plan = plan.to("cpu", torch.long)
            check_plan(plan.unique().tolist(), c.n_embd, c.head_dim)
            return plan.clone()
        plan = expand_plan(plan, c.n_layer, c.n_embd)
        check_plan(plan, c.n_embd, c.head_dim)
        return torch.tensor(plan, dtype=torch.long).expand(B, -1).clone()

    # ---- FLOPs --------------------------------------------------------------------------------
    def costs(self, j, w):
        """Per-token FLOPs of block j's parts at width w (context-free; scores are per context position)."""
        if w not in self._costs:
            self._costs[w] = self.model.flops_breakdown(0, w)
        row, c = self._costs[w][j], self.model.config
        out = {"ffn": row.get("mlp", 0) + row.get("moe", 0), "mamba": sum(row.get(k, 0) for k in ("mamba_proj", "mamba_conv", "mamba_scan"))}
        if "attn_proj" in row:
            h, hkv = self.model.transformer.h[j].attn.heads_at(w)
            out["kv"] = 2 * w * 2 * hkv * c.head_dim
            out["kv_lacked"] = 2 * c.n_embd * 2 * (c.n_kv_head - hkv) * c.head_dim  # the other heads, at full width
            out["qo"] = row["attn_proj"] - out["kv"]
            out["score"] = 4 * h * c.head_dim  # per position attended
        return out

    # ---- the blocks ---------------------------------------------------------------------------
    # Control state lives on the host: widths (one int per row), active (one bool per row), flops (one float
    # per row). Rows are grouped by width in Python; a group of every row indexes device tensors with a slice.
    # So a token reads nothing back from the device except the gate's decisions (modes with exits/widening)
    # and, when some positions lack KV heads a query needs, the cache's head counts.
    def _groups(self, w_rows, active=None):
        """[(w, rows, idx)] in increasing w: the rows (among the active ones) that run at width w, and their
        device index (row_index)."""
        by = {}
        for b, w in enumerate(w_rows):
            if active is None or active[b]:
                by.setdefault(w, []).append(b)
        dev = self.model.get_device()
        return [(w, rows, row_index(rows, len(w_rows), dev)) for w, rows in sorted(by.items())]

    def _kv_cost(self, st, j, w):
        c = self.costs(j, w)
        return c["kv"] + (c["kv_lacked"] if st.all_heads else 0)

    @staticmethod
    def _project_kv(st, attn, xn, w, cos_sin):
        """K, V (R, heads, T, hd) to store for xn (R, T, n_embd) at width w: its own heads, and with st.all_heads
        the heads it lacks too (attn.lacked_kv), so that a wider query never waits for a fill."""
        k, v = attn.project_kv(xn, w, cos_sin)
        if st.all_heads and k.size(1) < attn.n_kv_head:
            kl, vl = attn.lacked_kv(xn, k.size(1), attn.n_kv_head, cos_sin)
            k, v = torch.cat([k, kl], 1), torch.cat([v, vl], 1)
        return k, v

    @staticmethod
    def _place(y, x, idx, w, out):
        """Put a group's output (R, T, w) into the block's update for x (B, T, D); a group of every row at full
        width is the update itself."""
        if y is None and isinstance(idx, slice) and w == x.size(-1):
            return out.to(x.dtype)
        if y is None:
            y = torch.zeros_like(x)
        y[idx, :, :w] = out.to(y.dtype)  # bf16 under autocast
        return y

    def _attend(self, st, j, attn, x, w_rows, active, flops):
        """Attention block j for x (B, T, D) at positions st.pos..; K/V for all rows, the rest for active rows.
        Returns the update (None when no row is active)."""
        model, pos, T = self.model, st.pos, x.size(1)
        cos_sin = model.rotary(pos, T)
        xn = norm(x)
        for w, rows, idx in self._groups(w_rows):
            xr = xn[idx]
            k, v = self._project_kv(st, attn, xr, w, cos_sin)  # (R, heads, T, hd)
            st.cache.store(j, rows, idx, pos, k, v, xr)
            add_flops(flops, rows, T * self._kv_cost(st, j, w))
        y = None
        ctx_sum = T * pos + T * (T + 1) // 2  # positions attended, summed over the T tokens
        for w, rows, idx in self._groups(w_rows, active):
            _, hkv = attn.heads_at(w)
            if not st.cache.covers(j, rows, hkv, pos + T):
                for b, f in zip(rows, st.cache.fill(j, rows, hkv, pos + T, attn, model.cos, model.sin).tolist()):
                    flops[b] += f
            k, v = st.cache.view(j, idx, hkv, pos + T)
            y = self._place(y, x, idx, w, attn.query_attend(xn[idx], w, cos_sin, k, v))
            cost = self.costs(j, w)
            add_flops(flops, rows, T * cost["qo"] + ctx_sum * cost["score"])
        return y

    def _ffn(self, j, block, x, w_rows, active, flops):
        xn = norm(x)
        y = None
        T = x.size(1)
        for w, rows, idx in self._groups(w_rows, active):
            xw = xn[idx, :, :w]
            y = self._place(y, x, idx, w, block.mlp(xw, w) if block.ffn_kind == "D" else block.moe(xw, width=w))
            add_flops(flops, rows, T * self.costs(j, w)["ffn"])
        return y

    def _block(self, st, j, x, w_rows, active, flops):
        """Block j on x (B, T, D): mixer, then FFN; exited rows only update the mixer's cache/state.
        w_rows: B widths, active: B bools, flops: B floats (added to), all host lists."""
        block = self.model.transformer.h[j]
        if block.mixer_kind == "A":
            y = self._attend(st, j, block.attn, x, w_rows, active, flops)
        else:
            xn = norm(x)
            conv_state, ssm_state = st.ssm[j]
            if x.size(1) == 1 and st.pos > 0:
                y, _, _ = block.mamba.step(xn, conv_state, ssm_state)
            else:
                y = self._mamba_prefill(block.mamba, xn, conv_state, ssm_state, st.pos)
            if not all(active):  # exited rows stepped the state; their residual stays frozen
                y = torch.where(to_device(torch.tensor(active), x.device)[:, None, None], y, torch.zeros_like(y))
            add_flops(flops, range(x.size(0)), x.size(1) * self.costs(j, self.model.config.n_embd)["mamba"])
        if y is not None:
            x = x + y
        if block.ffn_kind != "N":
            y = self._ffn(j, block, x, w_rows, active, flops)
            if y is not None:
                x = x + y
        return x

    @staticmethod
    def _mamba_prefill(mamba, xn, conv_state, ssm_state, pos):
        from nanochat.mamba_block import InferenceParams
        B, T, _ = xn.shape
        params = InferenceParams(max_seqlen=pos + T, max_batch_size=B, seqlen_offset=pos)
        params.key_value_memory_dict[mamba.layer_idx] = (conv_state, ssm_state)
        return mamba(xn, inference_params=params)  # writes the states after the T tokens in place

    # ---- prefill and one decode step ----------------------------------------------------------
    @torch.inference_mode()
    def prefill(self, prompts, plan="think", exit_threshold=None, expand_threshold=None, plan_epsilon=0.02, max_len=None):
        """prompts (B, T) long (one length). Returns (state, logits (B, V) of the last position, FLOPs (B,) that
        ran, the full model's FLOPs (B,)); the FLOPs are float64 on the CPU."""
        model, c = self.model, self.model.config
        plan, exit_threshold, expand_threshold = self.resolve(plan, exit_threshold, expand_threshold)
        B, T = prompts.shape
        dev = model.get_device()
        prompts = prompts.to(dev)
        auto = isinstance(plan, str) and plan == "auto"
        base = self.base_plan("think" if auto else plan, B)
        max_len = max_len or c.sequence_len
        if T > max_len:
            raise ValueError(f"prompt of {T} tokens exceeds max_len {max_len}")
        ws = self._take_workspace(B, max_len)
        ws.prefills += 1
        st = DecodeState(ws, base, base.clone(), exit_threshold, expand_threshold, all_heads=expand_threshold > 0.0,
                         prefill_id=ws.prefills)
        flops, active = [0.0] * B, [True] * B
        x = norm(model.transformer.wte(prompts))
        for j in range(c.n_layer):
            if auto and j == c.predictor_after:
                self._predict_plan(st, x, plan_epsilon, flops)
            x = self._block(st, j, x, st.prompt_widths[:, j].tolist(), active, flops)
        if auto and c.predictor_after == c.n_layer:
            self._predict_plan(st, x, plan_epsilon, flops)
        st.pos = T
        logits = model.readout(x[:, -1])  # (B, V)
        add_flops(flops, range(B), 2 * c.n_embd * c.vocab_size)  # one readout: only the last position's logits are used
        return (st, logits, torch.tensor(flops, dtype=torch.float64),
                torch.full((B,), float(prompt_full_flops(model, T)), dtype=torch.float64))

    def release(self):
        """Drop the kept Workspace (cache, Mamba states, CUDA graphs): the next prefill allocates new ones."""
        self._workspace = None

    def _take_workspace(self, B, max_len):
        """A Workspace for a new DecodeState: the kept one, reset, when its shapes match, else a new one (kept
        when decode steps may be static: see _wanted_path)."""
        model, c = self.model, self.model.config
        key = (B, max_len, model.lm_head.weight.dtype)
        ws = self._workspace
        if ws is not None and ws.key == key:
            ws.cache.reset()
            for conv_state, ssm_state in ws.ssm.values():
                conv_state.zero_()
                ssm_state.zero_()
            return ws
        ws = Workspace(key, MatryoshkaKVCache(model, B, max_len, dtype=key[2]),
                       {j: model.transformer.h[j].mamba.allocate_inference_cache(B, max_len)
                        for j in range(c.n_layer) if c.mixer_kind(j) == "M"})
        if self._wanted_path() != "eager":
            self._workspace = ws
        return ws

    def _predict_plan(self, st, x, epsilon, flops):
        """Auto mode: the predictor's plan from the prompt's residual x after predictor_after blocks."""
        c, ctrl = self.model.config, self.model.controllers
        delta = ctrl.predictor(ctrl.predictor.pool(x))
        st.plan = ctrl.predictor.plan(delta, epsilon, ctrl.matters).cpu()
        st.plan[:, :c.predictor_after] = c.n_embd  # the blocks the prompt already ran at full width
        st.prompt_widths[:, c.predictor_after:] = st.plan[:, c.predictor_after:]
        add_flops(flops, range(len(flops)), ctrl.predictor.flops())

    @torch.inference_mode()
    def step(self, st, tokens, plan=None):
        """
        One token per row, tokens (B,) long, at position st.pos. plan (B, n_layer) optional: replaces the
        rows' base plan from this token on (tests use it to widen mid-sequence). Returns (logits (B, V),
        exit_block (B,), widths (B, n_layer), widened (B,), flops (B,)); all but the logits on the CPU.
        Without exits or widening this reads nothing back from the device; with them, one read per gate.
        The blocks run in segments that end at the gates; a segment runs the static step (captured as a CUDA
        graph on CUDA) when it can, the eager per-block step otherwise (see the class docstring).
        """
        model, c = self.model, self.model.config
        B = tokens.size(0)
        if st.prefill_id != st.ws.prefills:
            raise RuntimeError("this decode state's cache was reused by a later prefill on the same Engine (on the "
                               "CUDA-graph path one state per Engine is live at a time): prefill again, or use "
                               "another Engine for concurrent sequences")
        if plan is not None:
            st.plan = self.base_plan(plan, B)
        n, D = c.n_layer, c.n_embd
        path, why = self._static_path(st, B)
        widths = st.plan.tolist()  # per row, one width per block; widening rewrites a row's tail
        exit_block, widened = [n - 1] * B, [False] * B
        active, flops = [True] * B, [0.0] * B
        gating = st.exit_threshold < 1.0 or st.expand_threshold > 0.0
        gates = {b: g for g, b in enumerate(model.controllers.gate_blocks)} if gating else {}
        gate = model.controllers.gate if gating else None
        if path != "eager":
            L = self._prepare_static(st, tokens)
        x, logits, ran = None, None, set()  # x: the residual when the eager step holds it (else in st.ws.static_x)
        j0 = 0
        for j1 in sorted(b for b in gates if b < n - 1) + [n - 1]:
            g = gates.get(j1)
            static = path != "eager" and self._segment_ok(st, j0, j1, widths[0], active[0], B)
            if static:
                if x is not None:
                    st.ws.static_x.copy_(x)
                    x = None
                out = self._segment(st, path, j0, j1, widths[0], active[0], g if active[0] else None, L)
                self._segment_flops(st, j0, j1, widths[0], active[0], flops)
                logits = out if j1 == n - 1 else None
                p = out if g is not None and active[0] else None
            else:
                if x is None:
                    x = st.ws.static_x.clone() if j0 > 0 and path != "eager" else norm(model.transformer.wte(tokens.to(model.get_device())[:, None]))
                for j in range(j0, j1 + 1):
                    x = self._block(st, j, x, [w[j] for w in widths], active, flops)
                p = None
            ran.add(path if static else "eager")
            if g is not None and any(active):
                rows = [b for b in range(B) if active[b]]
                if p is None:
                    p = gate.prob(x[row_index(rows, B, x.device), 0], g)  # (R,) calibrated
                leave, wide = torch.stack([p > st.exit_threshold, p < st.expand_threshold]).tolist()  # the one read
                for b, out_, wid in zip(rows, leave, wide):
                    flops[b] += gate.flops_per_check()
                    if out_:
                        exit_block[b], active[b] = j1, False
                    elif wid:
                        widths[b][j1 + 1:] = [D] * (n - j1 - 1)
                        widened[b] = True
            j0 = j1 + 1
        if logits is None:
            logits = model.readout(x[:, 0])
        self.last_path = "+".join(sorted(ran))
        if "eager" in ran:
            log_once(logger, f"Engine decode: eager per-block step ({why or 'a segment needs lazily filled KV heads'})")
        st.pos += 1
        add_flops(flops, range(B), 2 * D * c.vocab_size)
        return (logits, torch.tensor(exit_block, dtype=torch.long), torch.tensor(widths, dtype=torch.long),
                torch.tensor(widened), torch.tensor(flops, dtype=torch.float64))

    # ---- generation ---------------------------------------------------------------------------
    @torch.inference_mode()
    def generate(self, prompts, max_tokens, plan="think", exit_threshold=None, expand_threshold=None,
                 temperature=0.0, top_k=None, seed=42, plan_epsilon=0.02, stop_tokens=()):
        """
        prompts: B token lists of one length. Yields TokenStep per generated position (step 0 from the
        prompt), until max_tokens or every row has produced a stop token.
        """
        if not prompts or len({len(p) for p in prompts}) != 1 or not prompts[0]:
            raise ValueError("prompts must be a non-empty list of non-empty token lists of one length "
                             "(batch prompts of equal length; padding is not supported)")
        if max_tokens < 1:
            return
        model = self.model
        dev = model.get_device()
        ids = torch.tensor(prompts, dtype=torch.long, device=dev)
        B, T = ids.shape
        rng = torch.Generator(device=dev).manual_seed(seed) if temperature > 0 else None
        if self.dense:
            yield from self._generate_dense(ids, max_tokens, plan, exit_threshold, expand_threshold, temperature, top_k, rng, stop_tokens)
            return
        n = model.config.n_layer
        st, logits, flops, full = self.prefill(ids, plan, exit_threshold, expand_threshold, plan_epsilon, T + max_tokens)
        self.state = st
        done = torch.zeros(B, dtype=torch.bool)
        stop = torch.tensor(sorted(stop_tokens), dtype=torch.long)
        info = (torch.full((B,), n - 1, dtype=torch.long), st.prompt_widths.clone(), torch.zeros(B, dtype=torch.bool), flops, full, "prompt")
        cuda = dev.type == "cuda"
        host_tok = torch.empty(B, dtype=torch.long, pin_memory=cuda)
        for k in range(max_tokens):
            tok = sample_next_token(logits, rng, temperature, top_k)  # (B,) on the device
            # Pipelined: the token's copy to the host is queued, then the next step (which takes the token on the
            # device), and only then does the host wait, for the copy alone. A step without gates reads nothing
            # back, so the device runs it while the host hands this token out. After the last token one step
            # too many may run; its result is dropped.
            host_tok.copy_(tok, non_blocking=cuda)
            copied = torch.cuda.Event() if cuda else None
            if cuda:
                copied.record()
            nxt = None
            if k < max_tokens - 1:
                full_next = torch.full((B,), float(model.forward_flops_per_token(st.pos + 1)), dtype=torch.float64)
                nxt = self.step(st, tok)
            if cuda:
                copied.synchronize()
            yield TokenStep(host_tok.tolist(), logits.float(), *info)
            done |= torch.isin(host_tok, stop)
            if nxt is None or bool(done.all()):
                return
            logits, exit_block, widths, widened, flops = nxt
            info = (exit_block, widths, widened, flops, full_next, "decode")

    def _generate_dense(self, ids, max_tokens, plan, exit_threshold, expand_threshold, temperature, top_k, rng, stop_tokens):
        model = self.model
        self.resolve(plan, exit_threshold, expand_threshold)
        B, T = ids.shape
        n = model.config.n_layer
        cache = model.new_kv_cache(B, T + max_tokens, dtype=model.lm_head.weight.dtype)
        logits = model(ids, kv_cache=cache)[:, -1]
        D = model.config.n_embd
        full = float(prompt_full_flops(model, T))
        source, done = "prompt", torch.zeros(B, dtype=torch.bool)
        stop = torch.tensor(sorted(stop_tokens), dtype=torch.long)
        widths = torch.full((B, n), D, dtype=torch.long)
        for k in range(max_tokens):
            tok = sample_next_token(logits, rng, temperature, top_k)
            f = torch.full((B,), full, dtype=torch.float64)
            yield TokenStep(tok.tolist(), logits.float(), torch.full((B,), n - 1, dtype=torch.long), widths,
                            torch.zeros(B, dtype=torch.bool), f, f.clone(), source)
            done |= torch.isin(tok.cpu(), stop)
            if k == max_tokens - 1 or bool(done.all()):
                return
            full, source = float(model.forward_flops_per_token(cache.pos + 1)), "decode"
            logits = model(tok[:, None], kv_cache=cache)[:, -1]

    def generate_batch(self, prompts, max_tokens, stop_tokens=(), **kwargs):
        """generate() collected: a GenerationResult; each row's tokens end before its first stop token."""
        res = GenerationResult(prompts=[list(p) for p in prompts], tokens=[[] for _ in prompts])
        done = [False] * len(prompts)
        for s in self.generate(prompts, max_tokens, stop_tokens=stop_tokens, **kwargs):
            res.steps.append(s)
            for b, t in enumerate(s.tokens):
                if not done[b]:
                    if t in stop_tokens:
                        done[b] = True
                    else:
                        res.tokens[b].append(t)
        if not self.dense:
            res.prompt_widths, res.plan = self.state.prompt_widths.cpu(), self.state.plan.cpu()
        return res

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

Where the code is: a block's sublayers are composed once, in HybridBlock.decode (nanochat/hybrid_gpt.py), which
both decode paths call with a view of the caches (EagerCache below, engine_static.StaticCache); the engine groups
rows by width, asks the gates, keeps plans and host-side state, and counts FLOPs.

FLOPs are counted per token for what ran, from the one table (nanochat/flops.py, FlopTable.block_tokens): the
parts of each block that ran at the width they ran at, lacked K/V heads (written with the own ones or filled
lazily), gate checks, the predictor, one readout. The full model's count is FlopTable.forward at the same context.

Speed: the control state (widths, active rows, FLOPs) lives on the host, so a step reads nothing back from
the GPU except the gates' decisions. Steps run as static-shape segments, captured as CUDA graphs on CUDA
(Engine's `decode` argument; batch-1 decode is otherwise bound by kernel-launch overhead), which later
prompts of the same batch size and length replay (Workspace); graphs captured under autocast read weight
copies in its dtype. generate() queues each next step before reading the token back.
"""
import logging

import torch

from nanochat.common import log_once
from nanochat.flops import flop_table
from nanochat.gpt import GPT
from nanochat.layers import sample_next_token
from nanochat.matryoshka import MODES, mode_plan, expand_plan, check_plan
from nanochat.matryoshka_kv import MatryoshkaKVCache, row_index
from nanochat.cuda_graphs import Workspace
from nanochat.hybrid_modern import window_slots
from nanochat.engine_state import DecodeState, TokenStep, GenerationResult, EagerCache, width_groups, start_host_copy
from nanochat.engine_static import StaticDecode

DECODE_PATHS = ("auto", "eager", "static", "graph", "compiled", "tuned")
logger = logging.getLogger(__name__)


class Engine:
    """
    decode: how step() runs a token.
      "eager"  the per-block step: any plan, per-row plans, gates, MoE, lazy KV-head fills.
      "static" the same function with static shapes (engine_static.StaticDecode.segment), in segments of blocks that
               end at the gates: attention over a power-of-two bucket of key slots with a length mask, position and
               cache writes indexed by a device tensor. Needs one plan for every row (and one row when gates are
               on), for graphs MoE blocks with a capacity (drop_tokens), and, for an active token, every KV head its
               queries need already stored (a segment that needs a lazy fill runs eager). Runs anywhere; tests
               compare it with "eager".
      "graph"  "static" with each segment captured once per (bucket, widths, state, gate) as a CUDA graph and
               replayed: a launch per segment instead of one per op (batch-1 decode is bound by launch
               overhead). Gates still read their decision back, once per gate.
      "compiled" "graph" on CUDA ("static" elsewhere) with each segment's code compiled by torch.compile first
               (compile_backend), so its elementwise ops fuse into fewer kernels. Compiles once per segment kind
               (minutes for a large model; past StaticDecode.COMPILE_LIMIT kinds a new one runs uncompiled).
               Speculative rounds (speculate=k) compile their exit-draft and verify functions the same way.
      "tuned"  "compiled" with inductor's coordinate-descent tuning: on CUDA its matrix-vector products (batch-1
               projections, the single query's attention) become Triton reductions whose launch settings it
               tunes, instead of cuBLAS calls, and fuse with their neighbours; a longer compile. Other backends
               (tests: aot_eager) take no inductor options: there it is "compiled".
      "auto"   "graph" on CUDA, "eager" elsewhere.
    What cannot run static runs eager; the reason is logged once, and last_path says what the last step ran.
    """

    def __init__(self, model, decode="auto", compile_backend="inductor"):
        if decode not in DECODE_PATHS:
            raise ValueError(f"decode must be one of {DECODE_PATHS}, got {decode!r}")
        if getattr(model, "kind", None) == "modern":
            raise ValueError("the engine decodes HybridGPTs and the Oct-2025 GPT: run scripts.surgery on today's "
                             "nanochat checkpoint (kind 'modern') first; the hybrid it writes decodes here")
        self.model = model
        self.dense = isinstance(model, GPT)
        self.flops = flop_table(model)
        self.decode = decode
        self.static = StaticDecode(model, decode, compile_backend)
        self.last_path = None  # the path step() took last ("eager", "static" or "graph")
        self._workspaces = {}   # slot -> the last Workspace of that slot, kept where decode steps may be CUDA graphs
        self.state = None       # the DecodeState of the last generate()
        self.spec_stats = None  # what speculation did in the last generate(speculate=k) (speculative_rules.SpecStats)
        self.spec_sync = False  # speculative rounds wait for the device after the drafts (benches time them apart)
        self.spec_ahead = True  # an exit draft's next round queued before this one's read (static path; benches compare)
        self.spec_memory = {}   # (draft, k, batch) -> speculative_rules.SpecMemory: plain decoding since speculation measured
        #                         slower, what a retry waits for, plain generations' prices (speculative_loop.generate)

    # ---- plans and thresholds -----------------------------------------------------------------
    def resolve(self, plan, exit_threshold, expand_threshold):
        """plan: a mode name (matryoshka.MODES), a plan (list, one width per block) or a (B, n_layer) tensor.
        Thresholds None -> the mode's (auto: the checkpoint's calibrated operating point, else 0.95 / 0.5); for an
        explicit plan, off (1.0 / 0.0)."""
        if self.dense:
            if not (plan is None or (isinstance(plan, str) and plan == "think")) or exit_threshold not in (None, 1.0) or expand_threshold not in (None, 0.0):
                raise ValueError("a dense GPT checkpoint has no width levels or exit gates: only mode 'think' "
                                 "(full width) without exit/expand thresholds runs on it")
            return None, 1.0, 0.0
        if isinstance(plan, str) and plan not in MODES:
            raise ValueError(f"unknown mode {plan!r}; choose from {tuple(MODES)}")
        mode = MODES[plan] if isinstance(plan, str) else MODES["think"]
        # auto on a calibrated checkpoint: the operating point scripts.calibrate_gates chose replaces the mode's defaults
        model_op = None
        if mode.predicted and hasattr(self.model, "controllers"):
            model_op = self.model.controllers.operating_point()
        op = model_op or {"exit": mode.exit_threshold, "widen": mode.expand_threshold}
        exit_threshold = op["exit"] if exit_threshold is None else float(exit_threshold)
        expand_threshold = op["widen"] if expand_threshold is None else float(expand_threshold)
        if not 0.0 <= expand_threshold <= exit_threshold <= 1.0:
            raise ValueError(f"need 0 <= expand_threshold ({expand_threshold}) <= exit_threshold ({exit_threshold}) <= 1")
        gating = exit_threshold < 1.0 or expand_threshold > 0.0
        if (mode.predicted or gating) and not hasattr(self.model, "controllers"):
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

    # ---- the blocks ---------------------------------------------------------------------------
    # Control state lives on the host: widths (one int per row), active (one bool per row), flops (one float
    # per row). So a token reads nothing back from the device except the gate's decisions (modes with
    # exits/widening) and, when some positions lack KV heads a query needs, the cache's head counts.
    def _blocks(self, st, j0, j1, x, widths, active, flops, view=None):
        """Blocks j0..j1 on x (B, T, D) at positions st.pos.., eager: each block's own decode step (HybridBlock.decode)
        over the rows grouped by width; exited rows only update the mixers' caches and states. widths: per row, one
        width per block; active: B bools; flops: B floats, added to. All host lists. view: the cache view (default an
        EagerCache of x's T positions at st.pos)."""
        view, dev = view or EagerCache(self.model, st, x.size(1), flops), x.device
        for j in range(j0, j1 + 1):
            w_rows = [w[j] for w in widths]
            groups = width_groups(w_rows, None, dev)
            live = groups if all(active) else width_groups(w_rows, active, dev)
            x = self.model.transformer.h[j].decode(x, view.at(j), groups, live)
        return x

    def _count(self, st, j0, j1, T, widths, active, flops, pos=None):
        """Add blocks j0..j1's FLOPs for T tokens at pos (default st.pos) to each row's count, from the FLOP table."""
        pos = st.pos if pos is None else pos
        for b in range(len(flops)):
            flops[b] += sum(self.flops.block_tokens(j, widths[b][j], T, pos, active[b], st.all_heads)
                            for j in range(j0, j1 + 1))

    # ---- prefill and one decode step ----------------------------------------------------------
    @torch.inference_mode()
    def prefill(self, prompts, plan="think", exit_threshold=None, expand_threshold=None, plan_epsilon=None, max_len=None,
                slot="main"):
        """prompts (B, T) long (one length). Returns (state, logits (B, V) of the last position, FLOPs (B,) that
        ran, the full model's FLOPs (B,)); the FLOPs are float64 on the CPU. slot: which kept workspace the state
        takes; a speculative draft ("draft") decodes beside the verifier's state ("main"), each on caches (and CUDA
        graphs) of its own."""
        model, c = self.model, self.model.config
        plan, exit_threshold, expand_threshold = self.resolve(plan, exit_threshold, expand_threshold)
        B, T = prompts.shape
        prompts = prompts.to(model.get_device())
        predicted = isinstance(plan, str) and MODES[plan].predicted
        base = self.base_plan("think" if predicted else plan, B)
        max_len = max_len or c.sequence_len
        if T > max_len:
            raise ValueError(f"prompt of {T} tokens exceeds max_len {max_len}")
        ws = self._take_workspace(B, max_len, slot, prompt_len=T)
        ws.prefills += 1
        st = DecodeState(ws, base, base.clone(), exit_threshold, expand_threshold, all_heads=expand_threshold > 0.0,
                         prefill_id=ws.prefills)
        flops, active = [0.0] * B, [True] * B
        x = model.embed_decode(ws, prompts, first=True)
        # the predictor reads the residual after predictor_after blocks: run those, plan, then the rest
        cut = c.predictor_after if predicted else c.n_layer
        for j0, j1 in ((0, cut - 1), (cut, c.n_layer - 1)):
            if j0 <= j1:
                widths = st.prompt_widths.tolist()
                x = self._blocks(st, j0, j1, x, widths, active, flops)
                self._count(st, j0, j1, T, widths, active, flops)
            if predicted and j1 == cut - 1:
                self._predict_plan(st, x, plan_epsilon, flops)
        st.pos = T
        logits = model.readout(x[:, -1])  # (B, V)
        for b in range(B):
            flops[b] += self.flops.head  # one readout: only the last position's logits are used
        return (st, logits, torch.tensor(flops, dtype=torch.float64),
                torch.full((B,), float(self.flops.prefill(T)), dtype=torch.float64))

    def release(self):
        """Drop the kept Workspaces (caches, Mamba states, CUDA graphs): the next prefill allocates new ones."""
        self._workspaces.clear()

    def _take_workspace(self, B, max_len, slot="main", prompt_len=1):
        """A Workspace for a new DecodeState: the slot's kept one, reset, when its shapes match, else a new one
        (kept in the slot when decode steps may be static). Sliding-window blocks keep a ring of key slots, sized
        for the prompt (hybrid_modern.window_slots), which then is part of the shapes."""
        model, c = self.model, self.model.config
        slots = window_slots(c, max_len, prompt_len)
        key = (B, max_len, model.lm_head.weight.dtype) + ((tuple(sorted(slots.items())),) if slots else ())
        ws = self._workspaces.get(slot)
        if ws is not None and ws.key == key:
            ws.cache.reset()
            for conv_state, ssm_state in ws.ssm.values():
                conv_state.zero_()
                ssm_state.zero_()
            return ws
        ws = Workspace(key, MatryoshkaKVCache(model, B, max_len, dtype=key[2], slots=slots),
                       {j: model.transformer.h[j].mamba.allocate_inference_cache(B, max_len)
                        for j in range(c.n_layer) if c.mixer_kind(j) == "M"})
        if self.static.wanted_path() != "eager":
            self._workspaces[slot] = ws
        return ws

    def _predict_plan(self, st, x, epsilon, flops):
        """Auto mode: the predictor's plan from the prompt's residual x after predictor_after blocks."""
        c, ctrl = self.model.config, self.model.controllers
        delta = ctrl.predictor(ctrl.predictor.pool(x))
        st.plan = ctrl.predictor.plan(delta, epsilon, ctrl.matters).cpu()
        st.plan[:, :c.predictor_after] = c.n_embd  # the blocks the prompt already ran at full width
        st.prompt_widths[:, c.predictor_after:] = st.plan[:, c.predictor_after:]
        for b in range(len(flops)):
            flops[b] += self.flops.predictor

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
        path, why = self.static.path(st, B)
        widths = st.plan.tolist()  # per row, one width per block; widening rewrites a row's tail
        exit_block, widened = [n - 1] * B, [False] * B
        active, flops = [True] * B, [0.0] * B
        gating = st.exit_threshold < 1.0 or st.expand_threshold > 0.0
        gates = {b: g for g, b in enumerate(model.controllers.gate_blocks)} if gating else {}
        gate = model.controllers.gate if gating else None
        if path != "eager":
            L = self.static.prepare(st, tokens, widths)
        x, logits, ran = None, None, set()  # x: the residual when the eager step holds it (else in st.ws.static_x)
        j0 = 0
        for j1 in sorted(b for b in gates if b < n - 1) + [n - 1]:
            g = gates.get(j1)
            static = path != "eager" and self.static.segment_ok(st, j0, j1, widths[0], active[0], B)
            p = None
            if static:
                if x is not None:
                    st.ws.static_x.copy_(x)
                    x = None
                out = self.static.run(st, path, j0, j1, widths[0], active[0], g if active[0] else None, L)
                self.static.note_stores(st, j0, j1, widths[0], B)
                logits = out if j1 == n - 1 else None
                p = out if g is not None and active[0] else None
            else:
                if x is None:
                    x = st.ws.static_x.clone() if j0 > 0 and path != "eager" else model.embed_decode(st.ws, tokens.to(model.get_device())[:, None], first=False)
                x = self._blocks(st, j0, j1, x, widths, active, flops)
            self._count(st, j0, j1, 1, widths, active, flops)
            ran.add(path if static else "eager")
            if g is not None and any(active):
                rows = [b for b in range(B) if active[b]]
                if p is None:
                    p = gate.prob(x[row_index(rows, B, x.device), 0], g)  # (R,) calibrated
                leave, wide = torch.stack([p > st.exit_threshold, p < st.expand_threshold]).tolist()  # the one read
                for b, out_, wid in zip(rows, leave, wide):
                    flops[b] += self.flops.gate_check
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
        for b in range(B):
            flops[b] += self.flops.head
        return (logits, torch.tensor(exit_block, dtype=torch.long), torch.tensor(widths, dtype=torch.long),
                torch.tensor(widened), torch.tensor(flops, dtype=torch.float64))

    # ---- generation ---------------------------------------------------------------------------
    @torch.inference_mode()
    def generate(self, prompts, max_tokens, plan="think", exit_threshold=None, expand_threshold=None,
                 temperature=0.0, top_k=None, seed=42, plan_epsilon=None, stop_tokens=(), speculate=0, draft="plan:ghost",
                 fallback=True):
        """
        prompts: B token lists of one length. Yields TokenStep per generated position (step 0 from the
        prompt), until max_tokens or every row has produced a stop token.
        speculate=k > 0: self-speculative decoding (nanochat/speculative.py) with k drafted tokens per round from
        `draft` ("plan:<mode or widths>" or "exit:<block>"); the output is mode think's (plan must be think),
        self.spec_stats says what speculation did; fallback: plain decoding once speculation measures slower.
        """
        if not prompts or len({len(p) for p in prompts}) != 1 or not prompts[0]:
            raise ValueError("prompts must be a non-empty list of non-empty token lists of one length "
                             "(batch prompts of equal length; padding is not supported)")
        if max_tokens < 1:
            return
        if speculate:
            if any(getattr(block, "uses_side", False) for block in self.model.transformer.h):
                raise ValueError("speculative decoding does not carry today's nanochat features (hybrid_modern: smear, "
                                 "x0, value embeddings, backout) yet: decode this model with speculate=0")
            if plan not in (None, "think") or exit_threshold not in (None, 1.0) or expand_threshold not in (None, 0.0):
                raise ValueError("speculative decoding gives mode think's output: plan must be 'think', without "
                                 "exit/expand thresholds")
            from nanochat.speculative_loop import generate as speculative_generate
            yield from speculative_generate(self, prompts, max_tokens, speculate, draft, temperature, top_k, seed,
                                            stop_tokens, fallback)
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
            copied = start_host_copy(tok, host_tok)
            nxt = None
            if k < max_tokens - 1:
                full_next = torch.full((B,), float(self.flops.forward(st.pos + 1)), dtype=torch.float64)
                nxt = self.step(st, tok)
            if copied is not None:
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
        full = float(self.flops.prefill(T))
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
            full, source = float(self.flops.forward(cache.pos + 1)), "decode"
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
        if not self.dense and res.steps:  # max_tokens < 1 generates nothing and leaves no state
            res.prompt_widths, res.plan = self.state.prompt_widths.cpu(), self.state.plan.cpu()
        return res

"""
The engine's static-shape decode step: a token's blocks in segments that end at the exit gates, with shapes
fixed by (key bucket, widths, state, gate), so that a CUDA graph can capture each segment and replay it
(batch-1 decode is otherwise bound by kernel-launch overhead). The Engine (nanochat/engine.py) holds one
StaticDecode and asks it whether a segment can run static, and to run it. A segment calls each block's own
decode step (HybridBlock.decode) with a StaticCache, the device-indexed view of the caches; the eager step calls
the same block step with the host-indexed EagerCache, so the two paths compute one function.
tests/test_engine_static.py compares every segment kind with the eager step.
"""
import torch
import torch.nn as nn

from nanochat.common import log_once, get_logger
from nanochat import cuda_graphs
from nanochat.cuda_graphs import replay, weights_version

logger = get_logger(__name__)


class StaticCache:
    """
    Block j's view of a Workspace for the token in ws.static_in[0] at the position held on the device in
    ws.static_in[1], every row at once: K/V written at that position (index_copy), attention over key slots
    0..L-1 with the later slots masked out, Mamba states stepped in place. Reads nothing back from the device.
    """

    moe_per_position = False  # one position per call anyway

    def __init__(self, model, st, L):
        self.st, self.j = st, None
        tok, self.pos = st.ws.static_in
        self.cos_sin = (model.cos.index_select(1, self.pos), model.sin.index_select(1, self.pos))
        self.L = L
        self.keep = (torch.arange(L, device=self.pos.device) <= self.pos).view(1, 1, 1, L)

    def at(self, j):
        self.j = j
        return self

    def write_kv(self, attn, rows, idx, xn, w, ids=None):
        self.st.cache.store_at(self.j, self.pos, *attn.kv_to_store(xn, w, self.cos_sin, self.st.all_heads, ids), xn)

    def read_kv(self, attn, rows, idx, w):
        k, v = self.st.cache.view(self.j, idx, attn.heads_at(w)[1], self.L)
        return k, v, self.keep

    def step_mamba(self, mamba, xn):
        conv_state, ssm_state = self.st.ssm[self.j]
        return mamba.step(xn, conv_state, ssm_state)[0]


class StaticDecode:
    """The Engine's decode paths "static", "graph", "compiled" and "tuned" (see Engine's docstring)."""
    STATIC_MIN_KEYS = 256  # the smallest key bucket of the static step (tests lower it to cross buckets)
    COMPILE_LIMIT = 256    # decode="compiled" / "tuned": segment kinds compiled (shared by all Engines of a process) before
                           # dynamo runs new ones uncompiled

    def __init__(self, model, decode, compile_backend="inductor"):
        self.model, self.decode = model, decode
        self.linears = [m for m in model.modules() if isinstance(m, nn.Linear)]  # weights a graph captures
        # the host's per-step checks read these (indexing the ModuleList and its modules costs more than the checks)
        blocks = list(model.transformer.h)
        self.attn = {j: b.attn for j, b in enumerate(blocks) if hasattr(b, "attn")}
        self.moe = [b.moe for b in blocks if getattr(b, "ffn_kind", None) == "E"]  # a dense GPT's blocks have no kind
        # what a static segment runs: segment itself, or compiled (compile_backend: tests use aot_eager)
        self.compile_backend = compile_backend
        self.compiles = decode in ("compiled", "tuned")
        # decode="tuned": inductor's coordinate-descent tuning, which also turns batch-1 matrix-vector products into
        # tuned Triton reductions (torch._inductor.decomposition's mm and bmm), fused with their neighbours
        self.options = {"coordinate_descent_tuning": True} if decode == "tuned" and compile_backend == "inductor" else None
        self.fn = self.compiled(self.segment)
        if self.compiles:
            tuning = ", coordinate-descent tuning" if self.options else ""
            if decode == "tuned" and not self.options:
                tuning = f"; decode='tuned' without tuning: {compile_backend} takes no inductor options"
            log_once(logger, f"Engine decode: static segments compiled by torch.compile ({compile_backend}{tuning}); "
                             "Mamba steps inside them in PyTorch ops, which it fuses (not mamba-ssm's kernels unless a "
                             "mixer's path is 'kernel')")

    def compiled(self, fn):
        """fn as this decode path runs a static segment: under decode="compiled" or "tuned" through torch.compile
        (one compile per segment kind, more kinds than dynamo's default limit of 8 allowed), else fn itself."""
        if not self.compiles:
            return fn
        compiled = torch.compile(fn, dynamic=False, backend=self.compile_backend, options=self.options)

        def call(*args):
            with torch._dynamo.config.patch(recompile_limit=self.COMPILE_LIMIT):
                return compiled(*args)
        return call

    def wanted_path(self):
        """What `decode` asks for on this device, before any state's conditions: "graph", "static" or "eager"."""
        cuda = self.model.get_device().type == "cuda"
        if self.decode == "auto":
            return "graph" if cuda else "eager"
        if self.compiles:  # fn is compiled; captured as graphs where graphs exist
            return "graph" if cuda else "static"
        return self.decode

    def path(self, st, B):
        """(path, reason): "graph" or "static" when st's next token may run static segments, else ("eager", why)."""
        model = self.model
        want = self.wanted_path()
        if want == "eager":
            return "eager", "decode='auto' off CUDA" if self.decode == "auto" else "decode='eager'"
        if want == "graph" and model.get_device().type != "cuda" and not cuda_graphs.HOST_ONLY:
            raise ValueError("Engine(decode='graph') needs the model on CUDA")
        if B > 1 and (st.exit_threshold < 1.0 or st.expand_threshold > 0.0):
            return "eager", "gates on with more than one row (rows would take different paths)"
        if B > 1 and not bool((st.plan == st.plan[0]).all()):
            return "eager", "rows have different plans"
        if want == "graph" and any(not moe.drop_tokens for moe in self.moe):
            # a capacity fixes every shape of the expert dispatch; dropless, its batched fallback pads to the
            # largest expert load, which it reads back (a capture cannot)
            return "eager", "dropless MoE blocks"
        if st.pos + 1 > min(st.cache.max_len, model.rotary_seq_len):
            return "eager", "no room left"  # the eager step raises the error
        return want, None

    def segment_ok(self, st, j0, j1, widths, active, B):
        """Whether blocks j0..j1 can run static: an active token's queries need every KV head already stored."""
        if not active:
            return True  # an exited token only stores K/V and steps Mamba states
        rows, k = range(B), st.cache.k
        return all(st.cache.covers(j, rows, self.attn[j].heads_at(widths[j])[1], st.pos)
                   for j in range(j0, j1 + 1) if j in k)

    def prepare(self, st, tokens, widths):
        """The static inputs for this token (widths: st.plan as lists, a row's width per block); returns the key
        bucket L (a power of two > position, capped)."""
        model, pos = self.model, st.pos
        B, dev = tokens.size(0), model.get_device()
        if not st.all_heads:
            for j in st.cache.layers:  # a store with fewer KV heads keeps block inputs: allocate before any capture
                if j not in st.cache.xn and self.attn[j].heads_at(min(w[j] for w in widths))[1] < st.cache.n_kv_head:
                    st.cache.ensure_xn(j)
        ws = st.ws
        self.refresh(ws)
        if ws.static_in is None:
            ws.static_in = (torch.zeros(B, dtype=torch.long, device=dev), torch.zeros(1, dtype=torch.long, device=dev))
            ws.static_x = torch.zeros(B, 1, model.config.n_embd, device=dev, dtype=model.transformer.wte.weight.dtype)
        ws.static_in[0].copy_(tokens, non_blocking=True)
        ws.static_in[1].fill_(pos)
        return self.bucket(pos + 1, st.cache.max_len)

    def refresh(self, ws):
        """Drop the workspace's graphs when the weights changed since their capture (they read stale copies).
        Returns whether it dropped them."""
        if ws.graphs and ws.weights_version != weights_version(self.linears):
            ws.graphs.clear()
            ws.weight_copies.clear()
            return True
        return False

    def bucket(self, end, max_len):
        """The key bucket for attention over positions < end: a power of two >= end, at least STATIC_MIN_KEYS,
        at most max_len."""
        return min(max_len, max(self.STATIC_MIN_KEYS, 1 << (end - 1).bit_length()))

    def segment(self, st, j0, j1, widths, active, gate, L):
        """
        Blocks j0..j1 of the token in st.ws.static_in[0] at the position in st.ws.static_in[1], every row at plan
        `widths` (one width per block) and in one state: active (the whole block) or exited (K/V stores and
        Mamba state steps only, the residual frozen). The residual comes from the embedding (j0 = 0) or
        st.ws.static_x, and goes back to st.ws.static_x. Returns the logits (B, V) after the last block, the gate's
        probabilities (B,) when `gate` is given, else None. Device tensors only, with shapes fixed by the
        arguments: a CUDA graph can capture it. Host-side bookkeeping is the engine's (and note_stores').
        """
        model = self.model
        view = StaticCache(model, st, L)
        x = model.embed_decode(st.ws, st.ws.static_in[0][:, None], first=False) if j0 == 0 else st.ws.static_x  # (B, 1, D)
        rows = range(x.size(0))
        for j in range(j0, j1 + 1):
            group = [(widths[j], rows, slice(None))]
            x = model.transformer.h[j].decode(x, view.at(j), group, group if active else [])
        if j1 == model.config.n_layer - 1:
            return model.readout(x[:, 0])
        st.ws.static_x.copy_(x)
        return model.controllers.gate.prob(x[:, 0], gate) if gate is not None else None

    def run(self, st, path, j0, j1, widths, active, gate, L):
        """segment() on the static path, or replayed as a CUDA graph (captured on first use) on the graph path."""
        args = (st, j0, j1, widths, active, gate, L)
        if path == "static":
            return self.fn(*args)
        cast = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else None
        key = (j0, j1, L, tuple(widths[j0:j1 + 1]), active, gate, st.all_heads, cast)
        states = [t for pair in st.ssm.values() for t in pair] + [st.ws.static_x]  # what the warm-up steps
        return replay(st.ws, key, lambda: self.fn(*args), states, cast, self.linears)

    def note_stores(self, st, j0, j1, widths, B):
        """The cache's host-side summary of what a static segment stored (the eager store writes its own)."""
        cache, n_kv = st.cache, st.cache.n_kv_head
        for j in range(j0, j1 + 1):
            if j in cache.k:
                cache.note_static_store(j, st.pos, 1, n_kv if st.all_heads else self.attn[j].heads_at(widths[j])[1])

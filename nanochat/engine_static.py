"""
The engine's static-shape decode step: a token's blocks in segments that end at the exit gates, with shapes
fixed by (key bucket, widths, state, gate), so that a CUDA graph can capture each segment and replay it
(batch-1 decode is otherwise bound by kernel-launch overhead). Engine (nanochat/engine.py) inherits these
methods; they read its model, decode setting, weight list (_linears), compiled segment function (_static_fn)
and its per-block helpers (_project_kv, _place, costs, _kv_cost). tests/test_engine.py compares every segment
kind with the eager step.
"""
import torch

from nanochat.layers import norm
from nanochat.cuda_graphs import replay, weights_version


def add_flops(flops, rows, amount):
    for b in rows:
        flops[b] += amount


class StaticDecode:
    """Engine's decode paths "static", "graph" and "compiled" (see Engine's docstring)."""
    STATIC_MIN_KEYS = 256  # the smallest key bucket of the static step (tests lower it to cross buckets)
    COMPILE_LIMIT = 256    # decode="compiled": segment kinds compiled (shared by all Engines of a process) before
                           # dynamo runs new ones uncompiled

    def _wanted_path(self):
        """What `decode` asks for on this device, before any state's conditions: "graph", "static" or "eager"."""
        cuda = self.model.get_device().type == "cuda"
        if self.decode == "auto":
            return "graph" if cuda else "eager"
        if self.decode == "compiled":  # static_fn is compiled; captured as graphs where graphs exist
            return "graph" if cuda else "static"
        return self.decode

    def _static_path(self, st, B):
        """(path, reason): "graph" or "static" when st's next token may run static segments, else ("eager", why)."""
        model = self.model
        want = self._wanted_path()
        if want == "eager":
            return "eager", "decode='auto' off CUDA" if self.decode == "auto" else "decode='eager'"
        if want == "graph" and model.get_device().type != "cuda":
            raise ValueError("Engine(decode='graph') needs the model on CUDA")
        if B > 1 and (st.exit_threshold < 1.0 or st.expand_threshold > 0.0):
            return "eager", "gates on with more than one row (rows would take different paths)"
        if B > 1 and not bool((st.plan == st.plan[0]).all()):
            return "eager", "rows have different plans"
        if want == "graph" and any(block.ffn_kind == "E" and not block.moe.drop_tokens for block in model.transformer.h):
            # a capacity fixes every shape of the expert dispatch; dropless, its batched fallback pads to the
            # largest expert load, which it reads back (a capture cannot)
            return "eager", "dropless MoE blocks"
        if st.pos + 1 > min(st.cache.max_len, model.rotary_seq_len):
            return "eager", "no room left"  # the eager step raises the error
        return want, None

    def _segment_ok(self, st, j0, j1, widths, active, B):
        """Whether blocks j0..j1 can run static: an active token's queries need every KV head already stored."""
        if not active:
            return True  # an exited token only stores K/V and steps Mamba states
        h = self.model.transformer.h
        return all(st.cache.covers(j, range(B), h[j].attn.heads_at(widths[j])[1], st.pos)
                   for j in range(j0, j1 + 1) if j in st.cache.k)

    def _prepare_static(self, st, tokens):
        """The static inputs for this token; returns the key bucket L (a power of two > position, capped)."""
        model, pos = self.model, st.pos
        B, dev = tokens.size(0), model.get_device()
        for j in st.cache.layers:  # a store with fewer KV heads keeps block inputs: allocate before any capture
            if not st.all_heads and model.transformer.h[j].attn.heads_at(int(st.plan[:, j].min()))[1] < st.cache.n_kv_head:
                st.cache.ensure_xn(j)
        ws = st.ws
        if ws.graphs and ws.weights_version != weights_version(self._linears):  # weights changed since the captures:
            ws.graphs.clear()                                                     # capture again (new weight copies)
            ws.weight_copies.clear()
        if ws.static_in is None:
            ws.static_in = (torch.zeros(B, dtype=torch.long, device=dev), torch.zeros(1, dtype=torch.long, device=dev))
            ws.static_x = torch.zeros(B, 1, model.config.n_embd, device=dev, dtype=model.transformer.wte.weight.dtype)
        ws.static_in[0].copy_(tokens, non_blocking=True)
        ws.static_in[1].fill_(pos)
        return min(st.cache.max_len, max(self.STATIC_MIN_KEYS, 1 << pos.bit_length()))

    def static_segment(self, st, j0, j1, widths, active, gate, L):
        """
        Blocks j0..j1 of the token in st.ws.static_in[0] at the position in st.ws.static_in[1], every row at plan
        `widths` (one width per block) and in one state: active (the whole block) or exited (K/V stores and
        Mamba state steps only, the residual frozen). Attention covers key slots 0..L-1 (L > position, later
        slots masked out). The residual comes from the embedding (j0 = 0) or st.ws.static_x, and goes back to
        st.ws.static_x. Returns the logits (B, V) after the last block, the gate's probabilities (B,) when `gate`
        is given, else None. Reads and writes device tensors only, with shapes fixed by the arguments: a CUDA
        graph can capture it. Host-side bookkeeping is step()'s.
        """
        model, cache = self.model, st.cache
        tok, pos = st.ws.static_in
        cos_sin = (model.cos.index_select(1, pos), model.sin.index_select(1, pos))
        keep = (torch.arange(L, device=pos.device) <= pos).view(1, 1, 1, L)
        x = norm(model.transformer.wte(tok[:, None])) if j0 == 0 else st.ws.static_x  # (B, 1, D)
        for j in range(j0, j1 + 1):
            block, w = model.transformer.h[j], widths[j]
            xn = norm(x)
            if block.mixer_kind == "A":
                attn = block.attn
                cache.store_at(j, pos, *self._project_kv(st, attn, xn, w, cos_sin), xn)
                if active:
                    k, v = cache.view(j, slice(None), attn.heads_at(w)[1], L)
                    x = x + self._place(None, x, slice(None), w, attn.query_attend(xn, w, cos_sin, k, v, keep=keep))
            else:
                conv_state, ssm_state = st.ssm[j]
                y = block.mamba.step(xn, conv_state, ssm_state)[0]
                if active:
                    x = x + y
            if active and block.ffn_kind != "N":
                xw = norm(x)[:, :, :w]
                x = x + self._place(None, x, slice(None), w, block.mlp(xw, w) if block.ffn_kind == "D" else block.moe(xw, width=w))
        if j1 == model.config.n_layer - 1:
            return model.readout(x[:, 0])
        st.ws.static_x.copy_(x)
        return model.controllers.gate.prob(x[:, 0], gate) if gate is not None else None

    def _segment(self, st, path, j0, j1, widths, active, gate, L):
        args = (st, j0, j1, widths, active, gate, L)
        if path == "static":
            return self._static_fn(*args)
        cast = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else None
        key = (j0, j1, L, tuple(widths[j0:j1 + 1]), active, gate, st.all_heads, cast)
        states = [t for pair in st.ssm.values() for t in pair] + [st.ws.static_x]  # what the warm-up steps
        return replay(st.ws, key, lambda: self._static_fn(*args), states, cast, self._linears)

    def _segment_flops(self, st, j0, j1, widths, active, flops):
        """What the eager step counts for blocks j0..j1, in its order; and the cache's host-side summary."""
        model, D, pos = self.model, self.model.config.n_embd, st.pos
        rows = range(len(flops))
        for j in range(j0, j1 + 1):
            block, w = model.transformer.h[j], widths[j]
            if block.mixer_kind == "A":
                st.cache.note_store(j, rows, pos, 1, st.cache.n_kv_head if st.all_heads else block.attn.heads_at(w)[1])
                cost = self.costs(j, w)
                add_flops(flops, rows, self._kv_cost(st, j, w))
                if active:
                    add_flops(flops, rows, cost["qo"] + (pos + 1) * cost["score"])
            else:
                add_flops(flops, rows, self.costs(j, D)["mamba"])
            if active and block.ffn_kind != "N":
                add_flops(flops, rows, self.costs(j, w)["ffn"])

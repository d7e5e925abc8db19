"""
The one FLOP table: what a token costs in each block of a model, at each width and context length, for the
trainer's MFU (training), the engine's compute report (prefill and decode, including what an exited token and a
widened one still run), tiny_experiment and the benches. Nothing else derives FLOPs.

Convention: 2 FLOPs per multiply-accumulate of every weight matmul (the embedding lookup is free). Attention
scores plus the weighted sum of values: 4 * heads_used * head_dim per position attended. Mamba conv:
2 * channels * d_conv; selective scan: 6 * d_inner * d_state (state decay and input multiply-adds plus the C
readout, the recurrent view; Mamba-2's chunked algorithm is counted the same). MoE: the router plus top_k
experts' matmuls. Norms, softmax, rotary, activations and gating are not counted. Training = 3 x forward at the
mean causal context of a full sequence (sequence_len / 2).

The dense GPT is the table's special case: every block attention + dense MLP at full width. A sliding-window block
(today's nanochat) attends to min(context, window + 1) positions.
"""
from nanochat.matryoshka import heads_at, expand_plan, check_plan
from nanochat.modern_layers import layer_windows


class FlopTable:
    """Per-token FLOPs of one model (a HybridGPT or a GPT), from its config and its modules' shapes."""

    def __init__(self, model):
        c = model.config
        self.D, self.hd, self.V, self.n_layer = c.n_embd, c.n_embd // c.n_head, c.vocab_size, c.n_layer
        self.n_head, self.n_kv_head = c.n_head, c.n_kv_head
        self.sequence_len = c.sequence_len
        hybrid = hasattr(c, "layer_pattern")
        self.kinds = [c.mixer_kind(j) + c.ffn_kind(j) if hybrid else "AD" for j in range(c.n_layer)]
        self.mlp_hidden = c.mlp_hidden if hybrid else 4 * c.n_embd
        self.expert_dim = getattr(c, "expert_dim", 0)
        self.num_experts, self.moe_top_k = getattr(c, "num_experts", 0), getattr(c, "moe_top_k", 1)
        if hasattr(c, "window_pattern"):  # the dense ModernGPT
            windows = layer_windows(c.window_pattern, c.n_layer, c.sequence_len)
        else:
            windows = getattr(c, "windows", None) or [0] * c.n_layer
        self.windows = [w or None for w in windows]  # None: full context
        self.mamba = {}  # block -> (projection, conv, scan) FLOPs per token (Mamba runs at full width)
        for j, kind in enumerate(self.kinds):
            if kind[0] == "M":
                m = model.transformer.h[j].mamba
                proj = 2 * (m.in_proj.weight.numel() + m.out_proj.weight.numel())
                if hasattr(m, "x_proj"):  # Mamba-1's dt/B/C projections
                    proj += 2 * (m.x_proj.weight.numel() + m.dt_proj.weight.numel())
                self.mamba[j] = (proj, 2 * m.conv1d.weight.shape[0] * c.d_conv, 6 * c.expand * c.n_embd * c.d_state)
        adaptive = getattr(model, "controllers", None)
        self.gate_check = adaptive.gate.flops_per_check() if adaptive is not None else 0
        self.predictor = adaptive.predictor.flops() if adaptive is not None else 0
        self._parts = {}
        self._forward_terms = {}  # width -> forward()'s terms

    @property
    def head(self):
        """The readout (lm_head) of one position."""
        return 2 * self.D * self.V

    def parts(self, j, w):
        """Block j at width w, per token, context-free: kv (its own K/V heads), kv_lacked (the K/V heads it lacks,
        at full width), qo (queries and output projection), score (per position attended), mamba, ffn."""
        key = (j, w)
        if key not in self._parts:
            mixer, ffn = self.kinds[j]
            p = {"kv": 0, "kv_lacked": 0, "qo": 0, "score": 0, "mamba": 0, "ffn": 0}
            if mixer == "A":
                h, hkv = heads_at(w, self.hd, self.n_head, self.n_kv_head)
                p["kv"] = 2 * w * 2 * hkv * self.hd
                p["kv_lacked"] = 2 * self.D * 2 * (self.n_kv_head - hkv) * self.hd
                p["qo"] = 2 * w * h * self.hd + 2 * h * self.hd * w
                p["score"] = 4 * h * self.hd
            else:
                p["mamba"] = sum(self.mamba[j])
            if ffn == "D":
                p["ffn"] = 2 * 2 * w * (self.mlp_hidden * w // self.D)
            elif ffn == "E":
                p["ffn"] = 2 * w * self.num_experts + self.moe_top_k * 2 * 2 * w * (self.expert_dim * w // self.D)
            self._parts[key] = p
        return self._parts[key]

    def plan(self, width):
        plan = expand_plan(width, self.n_layer, self.D)
        check_plan(plan, self.D, self.hd)
        return plan

    # ---- the full forward of one token ---------------------------------------------------------
    def breakdown(self, context_len, width=None):
        """Forward FLOPs of one token attending over context_len positions, per block and component, for a plan
        (None = full width): a list of dicts, one per block, plus the head."""
        rows = []
        for j, w in enumerate(self.plan(width)):
            p = self.parts(j, w)
            row = {"block": j, "kind": self.kinds[j], "width": w}
            if self.kinds[j][0] == "A":
                row["attn_proj"] = p["kv"] + p["qo"]
                w = self.windows[j]
                row["attn_scores"] = p["score"] * (context_len if w is None else min(context_len, w + 1))
            else:
                row["mamba_proj"], row["mamba_conv"], row["mamba_scan"] = self.mamba[j]
            if self.kinds[j][1] in "DE":
                row["mlp" if self.kinds[j][1] == "D" else "moe"] = p["ffn"]
            row["total"] = sum(v for k, v in row.items() if k not in ("block", "kind", "width"))
            rows.append(row)
        rows.append({"block": "head", "kind": "head", "width": self.D, "head": self.head, "total": self.head})
        return rows

    def forward(self, context_len, width=None):
        """Forward FLOPs of one token attending over context_len positions (a plan: None = full width): breakdown's
        total. For a uniform width (None or an int) it is linear in the positions each attention block attends,
        kept per width as (the rest, the full-context blocks' score FLOPs, the windowed blocks' (score, window + 1))
        after its first call: the engine asks once per decoded token, and summing the rows took 52 us a call at 40
        blocks (0.4 us now; this project's CPU), host time that falls after a speculative round's one device read,
        while the GPU waits for the next round."""
        if width is not None and not isinstance(width, int):
            return sum(r["total"] for r in self.breakdown(context_len, width))
        terms = self._forward_terms.get(width)
        if terms is None:
            rest = sum(r["total"] for r in self.breakdown(0, width))  # no position attended at context 0
            full, windowed = 0, []
            for j, w in enumerate(self.plan(width)):
                if self.kinds[j][0] == "A":
                    score, window = self.parts(j, w)["score"], self.windows[j]
                    if window is None:
                        full += score
                    else:
                        windowed.append((score, window + 1))
            terms = self._forward_terms[width] = (rest, full, windowed)
        rest, full, windowed = terms
        return rest + full * context_len + sum(score * min(context_len, n) for score, n in windowed)

    def training(self, width=None):
        """Training FLOPs per token (3x forward) at the mean causal context of a full sequence, for MFU."""
        return 3 * self.forward(self.sequence_len / 2, width)

    def prefill(self, T):
        """The full model's forward over a T-token prompt with logits at its last position only. Per block, the
        attention FLOPs are the score cost times the positions attended, summed in closed form (attended)."""
        scores = sum(self.parts(j, self.D)["score"] * self.attended(j, 0, T) for j in range(self.n_layer))
        return T * self.forward(0) + scores - (T - 1) * self.head

    def attended(self, j, pos, T):
        """Positions that T queries at pos, pos+1, .. attend to in block j, summed: each sees its context (itself
        and every earlier position), at most window + 1 in a sliding-window block."""
        full = T * pos + T * (T + 1) // 2
        w = self.windows[j]
        if w is None or pos + T <= w + 1:
            return full
        n = max(0, min(T, w + 1 - pos))  # the first n queries' contexts fit in the window
        return n * pos + n * (n + 1) // 2 + (T - n) * (w + 1)

    # ---- what the engine ran -------------------------------------------------------------------
    def block_tokens(self, j, w, T, pos, active, all_heads):
        """T tokens at positions pos.. through block j at width w, as the engine runs them: every token writes
        its K/V (its own heads; with all_heads the lacked ones too, at full width) or steps the Mamba state; an
        active token also runs queries, scores over its context and the FFN (an exited one does not)."""
        p = self.parts(j, w)
        flops = T * (p["kv"] + (p["kv_lacked"] if all_heads else 0) + p["mamba"])
        if active:
            flops += T * (p["qo"] + p["ffn"]) + self.attended(j, pos, T) * p["score"]
        return flops


def flop_table(model):
    """The model's FlopTable, made once and kept on the model (its shapes do not change after construction)."""
    table = model.__dict__.get("_flop_table")
    if table is None:
        table = FlopTable(model)
        model.__dict__["_flop_table"] = table
    return table

"""
HybridGPT: nanochat's GPT with Mamba blocks interleaved, Matryoshka widths per block, and exit
readouts after blocks.

Block j = mixer (attention 'A' or Mamba 'M', from `layer_pattern` tiled over n_layer) followed by an
FFN (dense ReLU^2 MLP 'D', MoE 'E' or none 'N', from `ffn_pattern`), each a pre-norm sublayer that
adds to the residual exactly once:
    x = x + mixer(norm(x));  x = x + ffn(norm(x))
State-dict names extend nanochat's: transformer.h.{j}.attn.* | .mamba.*, .mlp.* | .moe.*, so a
nanochat GPT's weights drop into the attention blocks unchanged.

Width plan (one width per block, see matryoshka.py): at width w an attention or FFN sublayer reads
norm(x)[..., :w] (the norm is over the full residual), uses the first w/head_dim query heads (and the
KV heads they need under GQA) or the first hidden*w/n_embd units, and writes x[..., :w]. Mamba mixers
run at full width whatever the plan says.

Per-token widths (width as a (B, T, n_layer) tensor: what the engine does when a token widens at
decode) define one more thing, the keys/values a query sees. At width w head h's key depends on w
(K = norm(x)[:w] @ c_k[h rows, :w]^T), so position s's K/V are: for the KV heads its own width w_s has,
computed at w_s; for the heads it lacks (needed only by a later, wider query), computed at full width
from its normalised block input (MatryoshkaAttention.lacked_kv). This is a function of position s alone, so
a cache can store it once: the engine writes lacked heads along with the own ones when tokens may widen, and
otherwise fills them lazily, the first time a wider query needs them. With one width everywhere it is exactly
the static-plan forward.
"""
import functools
import math
from dataclasses import dataclass, field, asdict

import torch
import torch.utils.checkpoint
import torch.nn as nn
import torch.nn.functional as F

from nanochat.layers import norm, rotary_inv_freq, rotary_cos_sin, linear_init_std, softcap
from nanochat.matryoshka import (default_width_levels, validate_levels, expand_plan, check_plan, MatryoshkaAttention,
                                 MatryoshkaMLP)
from nanochat.common import get_logger, log_once
from nanochat import decode_matvec, hybrid_modern
from nanochat.flops import flop_table

logger = get_logger(__name__)


def softcap_loss_top1(logits, targets):
    """lm_head outputs (N, V) -> top-1 (N,) of the soft-capped logits, with targets (N,) also the per-token loss
    first: (loss (N,), top1). The readout tail of HybridGPT.readout_loss_top1 (the reference for its compiled copy)."""
    lg = softcap(logits)
    top1 = lg.argmax(-1)
    if targets is None:
        return top1
    return F.cross_entropy(lg, targets, ignore_index=-1, reduction="none"), top1


@functools.cache
def compiled_softcap_loss_top1():
    """softcap_loss_top1 through torch.compile, made on first use (one graph per chunk shape: the full chunk and
    the last, shorter one), so the soft-cap, log-softmax and argmax read the logits in a fused pass or two."""
    return torch.compile(softcap_loss_top1, dynamic=False)


@dataclass
class HybridConfig:
    sequence_len: int = 1024
    vocab_size: int = 50304
    n_layer: int = 12            # total blocks (attention + Mamba)
    n_head: int = 6
    n_kv_head: int = 6
    n_embd: int = 768
    layer_pattern: str = "AM"    # tiled over n_layer: A attention, M Mamba
    ffn_pattern: str = "D"       # tiled over n_layer: D dense MLP, E MoE, N none
    mlp_hidden: int = 0          # 0 -> 4 * n_embd
    # rotary: head dims whose frequency tables make up this model's (grows under head widening)
    rotary_dims: list = field(default_factory=list)
    attn_scale: float = 0.0      # softmax scale; 0 -> 1/sqrt(head_dim)
    # Mamba mixer (nanochat.mamba_block)
    mamba_version: int = 1
    d_state: int = 16
    d_conv: int = 4
    expand: int = 2
    mamba_headdim: int = 64      # Mamba-2 only
    mamba_ngroups: int = 1       # Mamba-2 only
    # MoE FFN (nanochat.moe)
    num_experts: int = 8
    expert_dim: int = 0          # 0 -> mlp_hidden
    moe_top_k: int = 1
    capacity_factor: float = 1.25
    min_capacity: int = 4
    moe_drop_tokens: bool = True     # False: dropless (no capacity limit)
    moe_straight_gate: bool = False  # gate value 1/top_k in the forward (upcycled experts = the dense MLP)
    # Matryoshka and exits
    width_levels: list = field(default_factory=list)  # empty -> matryoshka.default_width_levels
    exit_stride: int = 1         # a readout after every exit_stride-th block (and always the last)
    adaptive: bool = True        # build the confidence gates and width predictor (confidence_probe.py)
    gate_hidden: int = 64        # ConfidenceGate MLP width
    predictor_hidden: int = 64   # LayerDimPredictor MLP width
    predictor_after: int = 1     # the predictor reads the prompt after this many blocks (run at full width)
    calib_bins: int = 32         # most steps of a gate's isotonic calibration map
    # provenance of growth: residual widths this model was grown from, oldest first
    grown_from: list = field(default_factory=list)
    # today's nanochat (nanochat/hybrid_modern.py); all off by default
    rotary_base: float = 10000.0
    rotary_fp32: bool = False    # rotary tables in fp32 (else rounded to bf16, as the Oct-2025 nanochat)
    smear: bool = False
    block_scalars: bool = False
    backout_block: int = -1
    ve_blocks: list = field(default_factory=list)
    windows: list = field(default_factory=list)

    def __post_init__(self):
        if self.n_embd % self.n_head != 0:
            raise ValueError(f"n_embd={self.n_embd} must be a multiple of n_head={self.n_head}")
        if self.n_head % self.n_kv_head != 0:
            raise ValueError(f"n_head={self.n_head} must be a multiple of n_kv_head={self.n_kv_head}")
        for name, pat, allowed in (("layer_pattern", self.layer_pattern, "AM"), ("ffn_pattern", self.ffn_pattern, "DEN")):
            if not pat or set(pat) - set(allowed):
                raise ValueError(f"{name}={pat!r} may only use the letters {allowed}")
        if self.mamba_version not in (1, 2):
            raise ValueError(f"mamba_version must be 1 or 2, got {self.mamba_version}")
        if self.mlp_hidden == 0:
            self.mlp_hidden = 4 * self.n_embd
        if self.expert_dim == 0:
            self.expert_dim = self.mlp_hidden
        if not self.rotary_dims:
            self.rotary_dims = [self.head_dim]
        if sorted(self.rotary_dims) != list(self.rotary_dims) or self.rotary_dims[-1] != self.head_dim:
            raise ValueError(f"rotary_dims {self.rotary_dims} must be non-decreasing and end at head_dim {self.head_dim}")
        if not self.width_levels:
            self.width_levels = default_width_levels(self.n_embd, self.head_dim)
        validate_levels(self.width_levels, self.n_embd, self.head_dim)
        if self.exit_stride < 1:
            raise ValueError("exit_stride must be >= 1")
        if not 1 <= self.predictor_after <= self.n_layer:
            raise ValueError(f"predictor_after={self.predictor_after} must be in [1, n_layer={self.n_layer}]")
        hybrid_modern.validate(self)

    @property
    def head_dim(self):
        return self.n_embd // self.n_head

    @property
    def softmax_scale(self):
        return self.attn_scale or 1.0 / math.sqrt(self.head_dim)

    def mixer_kind(self, j):
        return self.layer_pattern[j % len(self.layer_pattern)]

    def ffn_kind(self, j):
        return self.ffn_pattern[j % len(self.ffn_pattern)]

    def exit_blocks(self):
        """Block indices followed by an exit readout (the last block always is)."""
        ids = [j for j in range(self.n_layer) if (j + 1) % self.exit_stride == 0]
        if not ids or ids[-1] != self.n_layer - 1:
            ids.append(self.n_layer - 1)
        return ids

    def mamba_kwargs(self):
        kw = dict(d_model=self.n_embd, d_state=self.d_state, d_conv=self.d_conv, expand=self.expand)
        if self.mamba_version == 2:
            kw.update(headdim=self.mamba_headdim, ngroups=self.mamba_ngroups)
        return kw

    def to_dict(self):
        return asdict(self)

    @classmethod
    def from_dict(cls, d):
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"hybrid model_config has unknown fields {sorted(unknown)}")
        return cls(**d)


def rotary_inv_freq_grown(rotary_dims, device=None, base=10000.0):
    """
    Frequencies for a head that was widened d0 -> d1 -> ...: the first d0/2 pairs keep d0's
    frequencies, the pairs added at each widening take the new head_dim's frequencies at their
    indices. With one entry this is the plain nanochat table.
    """
    parts, done = [], 0
    for d in rotary_dims:
        full = rotary_inv_freq(d, base=base, device=device)
        parts.append(full[done:d // 2])
        done = d // 2
    return torch.cat(parts)


def make_mamba(config, layer_idx):
    from nanochat.mamba_block import Mamba
    from nanochat.mamba2_block import Mamba2
    cls = Mamba if config.mamba_version == 1 else Mamba2
    return cls(layer_idx=layer_idx, **config.mamba_kwargs())


def make_moe(config):
    from nanochat.moe import MoE
    return MoE(config.n_embd, config.num_experts, config.expert_dim, top_k=config.moe_top_k,
               capacity_factor=config.capacity_factor, min_capacity=config.min_capacity,
               drop_tokens=config.moe_drop_tokens, straight_gate=config.moe_straight_gate)


def place_update(y, x, idx, w, out):
    """Put a row group's sublayer output out (R, T, w) into y, the block's update (B, T, D) for x (None: nothing
    placed yet). A group of every row is the update itself, zero-padded to D where narrower."""
    if y is None and isinstance(idx, slice):  # every row (row_index's slice): padded in one op, not zeros + copy
        return out.to(x.dtype) if w == x.size(-1) else F.pad(out.to(x.dtype), (0, x.size(-1) - w))
    if y is None:
        y = torch.zeros_like(x)
    y[idx, :, :w] = out.to(y.dtype)  # bf16 under autocast
    return y


class HybridBlock(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.layer_idx = layer_idx
        self.mixer_kind = config.mixer_kind(layer_idx)
        self.ffn_kind = config.ffn_kind(layer_idx)
        self.n_embd = config.n_embd
        self.uses_side = hybrid_modern.uses_side(config)
        hybrid_modern.add_block_params(self, config, layer_idx)
        if self.mixer_kind == "A":
            self.attn = MatryoshkaAttention(config, layer_idx)
        else:
            self.mamba = make_mamba(config, layer_idx)
        if self.ffn_kind == "D":
            self.mlp = MatryoshkaMLP(config)
        elif self.ffn_kind == "E":
            self.moe = make_moe(config)

    def mix(self, x, w, cos_sin, cache=None, mask=None, side=None):
        """The mixer's contribution to the residual, padded to full width: (B, T, n_embd).
        w: an int, or a (B, T) long tensor of per-token widths (no cache then). side: hybrid_modern.Side."""
        xn = norm(x)
        per_token = torch.is_tensor(w)
        if per_token and cache is not None:
            raise ValueError("per-token widths run without a cache here; decode with nanochat.engine.Engine")
        ids = side.ids if side is not None else None
        if self.mixer_kind == "A" and (self.window and cache is not None):
            raise ValueError("a windowed attention block decodes through nanochat.engine.Engine")
        keep = hybrid_modern.forward_keep(self, x.size(1), x.device) if self.mixer_kind == "A" else None
        if self.mixer_kind == "A" and per_token:
            y = self.attn.forward_per_token(xn, w, cos_sin, ids, keep)
        elif self.mixer_kind == "A":
            kv = cache.kv if cache is not None else None
            y = self.attn(xn, w, cos_sin, kv, ids, keep)
        else:
            params = cache.ssm if cache is not None else None
            y = self.mamba(xn, inference_params=params, mask=mask)
        return F.pad(y, (0, self.n_embd - y.size(-1)))

    def ffn(self, x, w, mask=None):
        if self.ffn_kind == "N":
            return None
        if torch.is_tensor(w):
            return self.ffn_per_token(x, w, mask)
        xn = norm(x)[..., :w]
        y = self.mlp(xn, w) if self.ffn_kind == "D" else self.moe(xn, mask=mask, width=w)
        return F.pad(y, (0, self.n_embd - w))

    def ffn_per_token(self, x, widths, mask=None):
        """widths (B, T): each token through the FFN at its own width; the MoE routes only the tokens of
        one width per call (mask), so its capacity counts those tokens."""
        xn = norm(x)
        y = torch.zeros_like(x)
        levels = widths.unique().tolist()
        if self.ffn_kind == "E":  # the MoE says which levels to call (expert parallel: the same on every rank)
            levels = self.moe.levels_for_call(levels)
        for w in sorted(levels):
            sel = widths == w  # (B, T)
            if self.ffn_kind == "D":
                yw = self.mlp(xn[..., :w], w)
            else:
                yw = self.moe(xn[..., :w], mask=sel if mask is None else sel & mask, width=w)
            y = torch.where(sel.unsqueeze(-1), F.pad(yw, (0, self.n_embd - w)), y)
        return y

    def decode(self, x, cache, groups, live):
        """
        The block on new positions with caches: the engine's prefill and decode step, eager or static (this
        module's docstring gives the function; HybridGPT.forward with per-token widths and exits is its reference).
        x (B, T, D): the residual at the cache's next positions. groups: [(w, rows, idx)], every row under the
        width it runs at, idx indexing those rows on the device; live: the groups whose residual still changes.
        An exited row only feeds the mixer's cache: its K/V written, or its Mamba state stepped. cache: this
        block's view of the caches (engine.EagerCache or engine_static.StaticCache): write_kv, read_kv,
        step_mamba, cos_sin and moe_per_position (route each position in its own MoE call, as a decode step of one token
        does, so that a speculative verify pass meets the same expert capacities). Returns the new residual.
        """
        side = cache.st.side if self.uses_side else None
        if side is not None:  # the block's input: resid/x0 scalars for live rows (exited rows keep x, feed the mixer)
            xs = hybrid_modern.block_input(self, x, side)
            x, xn = hybrid_modern.for_live(live, xs, x), norm(xs)
        else:
            xn = norm(x)
        if self.mixer_kind == "A":
            for w, rows, idx in groups:  # every row's K/V before any query reads them
                kw = {"ids": side.ids[idx]} if self.attn.value_embed is not None else {}
                cache.write_kv(self.attn, rows, idx, xn[idx], w, **kw)
            y = None
            for w, rows, idx in live:
                k, v, keep = cache.read_kv(self.attn, rows, idx, w)
                keep = hybrid_modern.decode_keep(self, cache, x.size(1), k.size(2), keep)
                y = place_update(y, x, idx, w, self.attn.query_attend(xn[idx], w, cache.cos_sin, k, v, keep=keep))
        else:
            y = cache.step_mamba(self.mamba, xn)  # every row steps its state; exited rows' output is dropped
            n_live = sum(len(rows) for _, rows, _ in live)
            if n_live == 0:
                y = None
            elif n_live < x.size(0):
                keep = torch.zeros(x.size(0), 1, 1, dtype=torch.bool, device=x.device)
                for _, _, idx in live:
                    keep[idx] = True
                y = torch.where(keep, y, torch.zeros_like(y))
        if y is not None:
            x = x + y
        if self.ffn_kind != "N" and live:
            xn, y = norm(x), None
            for w, rows, idx in live:
                xw = xn[idx, :, :w]
                if self.ffn_kind == "D":
                    out = self.mlp(xw, w)
                elif cache.moe_per_position:  # one call per position: each gets the capacity of a one-token step
                    out = torch.cat([self.moe(xw[:, t:t + 1], width=w) for t in range(xw.size(1))], 1)
                else:
                    out = self.moe(xw, width=w)
                y = place_update(y, x, idx, w, out)
            x = x + y
        if side is not None and (self.keeps_mid or self.backout_from >= 0):
            x = hybrid_modern.for_live(live, hybrid_modern.block_output(self, x, side), x)
        return x

    def forward(self, x, w, cos_sin, cache=None, mask=None, side=None):
        if side is not None:
            x = hybrid_modern.block_input(self, x, side)
        x = x + self.mix(x, w, cos_sin, cache, mask, side)
        y = self.ffn(x, w, mask)
        x = x if y is None else x + y
        return x if side is None else hybrid_modern.block_output(self, x, side)


@dataclass
class HybridOutput:
    """What a forward with return_exits=True gives the trainer and the gates."""
    logits: torch.Tensor = None          # (B, T, V) fp32, final readout
    loss: torch.Tensor = None            # mean final loss (if targets)
    exit_blocks: list = None             # block index of each readout
    exit_hidden: list = None             # residual (B, T, D) after each exit block
    exit_losses: torch.Tensor = None     # (n_exits, B, T) per-token loss of each readout (if targets)
    exit_agree: torch.Tensor = None      # (n_exits, B, T) readout top-1 == final top-1
    aux_loss: torch.Tensor = None        # sum of the MoE blocks' router losses (0 without MoE)
    plan: list = None                    # the static width plan this forward ran (None: per-token widths)


class HybridGPT(nn.Module):
    kind = "hybrid"

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict({
            "wte": nn.Embedding(config.vocab_size, config.n_embd),
            "h": nn.ModuleList([HybridBlock(config, j) for j in range(config.n_layer)]),
        })
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        hybrid_modern.add_model_params(self, config)
        if config.adaptive:
            from nanochat.confidence_probe import AdaptiveControllers
            self.controllers = AdaptiveControllers(config)
        self.rotary_seq_len = config.sequence_len * 10
        half = config.head_dim // 2
        self.register_buffer("cos", torch.empty(1, self.rotary_seq_len, 1, half), persistent=False)
        self.register_buffer("sin", torch.empty(1, self.rotary_seq_len, 1, half), persistent=False)
        if self.lm_head.weight.device.type != "meta":
            self.init_buffers()

    # ---- setup --------------------------------------------------------------------------------
    def init_buffers(self):
        device = self.lm_head.weight.device
        inv_freq = rotary_inv_freq_grown(self.config.rotary_dims, device=device, base=self.config.rotary_base)
        dtype = torch.float32 if self.config.rotary_fp32 else torch.bfloat16
        self.cos, self.sin = rotary_cos_sin(self.rotary_seq_len, inv_freq, dtype=dtype)

    @torch.no_grad()
    def init_weights(self):
        """
        Fresh init in one place: nanochat's rule for attention/MLP, mamba-ssm's own init for the
        mixers (a freshly built mixer's weights), then every projection that writes the residual
        (attention/MLP c_proj, Mamba out_proj, expert w_out) and the head start at zero.
        """
        device = self.lm_head.weight.device
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=linear_init_std(*module.weight.shape))
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, std=1.0)
        for j, block in enumerate(self.transformer.h):
            if block.mixer_kind == "A":
                nn.init.zeros_(block.attn.c_proj.weight)
            else:
                fresh = make_mamba(self.config, j).to(device)
                block.mamba.load_state_dict(fresh.state_dict())
                nn.init.zeros_(block.mamba.out_proj.weight)
            if block.ffn_kind == "D":
                nn.init.zeros_(block.mlp.c_proj.weight)
            elif block.ffn_kind == "E":
                block.moe.init_weights()
                nn.init.zeros_(block.moe.w_out)
        nn.init.zeros_(self.lm_head.weight)
        if self.config.adaptive:
            self.controllers.init_weights()
        hybrid_modern.init_params(self)
        self.init_buffers()

    def get_device(self):
        return self.lm_head.weight.device

    def param_kind(self, name, p):
        if name.startswith("controllers."):
            return "controller"  # small heads, AdamW at the trainer's controller lr
        if name.endswith("value_embed.weight"):
            return "embedding"
        if name.startswith("smear_gate."):
            return "scalar"
        return None

    def num_params(self):
        return sum(p.numel() for p in self.parameters())

    # ---- forward ------------------------------------------------------------------------------
    def rotary(self, T0, T):
        if T0 + T > self.rotary_seq_len:
            raise ValueError(f"sequence of {T0 + T} tokens exceeds the rotary table ({self.rotary_seq_len})")
        return self.cos[:, T0:T0 + T], self.sin[:, T0:T0 + T]

    READOUT_CHUNK_TOKENS = 4096
    READOUT_COMPILE = True  # CUDA: the exit readouts' soft-cap, loss and top-1 through torch.compile (one fused pass)
    # recompute each readout chunk's logits in backward (False: keep what its backward needs, about a (chunk, V) bf16
    # tensor per chunk and exit until the backward: B*T*V*2 bytes per exit, 512 MiB per exit at 4,096 tokens and 65k)
    READOUT_CHECKPOINT = True

    def readout_loss_top1(self, h, targets=None):
        """
        Per-token loss (B, T) (None without targets) and top-1 (B, T) of the readout of h, in chunks of
        READOUT_CHUNK_TOKENS tokens whose logits are recomputed in backward (activation checkpointing,
        READOUT_CHECKPOINT): an exit readout never keeps a (B, T, V) tensor alive, which at a 65k vocabulary and
        dozens of exits would not fit in memory. With READOUT_CHECKPOINT off the chunks keep their logits for the
        backward instead (one lm_head forward less per chunk; the same numbers). On CUDA (READOUT_COMPILE, unless
        the caller is itself being compiled) the part after lm_head runs compiled: eager, each chunk writes fp32
        (chunk, V) tensors for the soft-cap, the log-softmax and their backwards, 13% of a d20 phase-2 step on the H100.
        """
        B, T, D = h.shape
        flat_h = h.reshape(B * T, D)
        flat_t = None if targets is None else targets.reshape(B * T)
        fused = self.READOUT_COMPILE and h.is_cuda and not torch.compiler.is_compiling()
        after_head = compiled_softcap_loss_top1() if fused else softcap_loss_top1
        log_once(logger, f"exit readouts: soft-cap, loss and top-1 {'compiled' if fused else 'eager'}")

        def chunk_fn(hc, tc):
            return after_head(self.lm_head(norm(hc).to(self.lm_head.weight.dtype)), tc)

        losses, tops = [], []
        for i in range(0, B * T, self.READOUT_CHUNK_TOKENS):
            hc = flat_h[i:i + self.READOUT_CHUNK_TOKENS]
            tc = None if flat_t is None else flat_t[i:i + self.READOUT_CHUNK_TOKENS]
            if tc is None:
                with torch.no_grad():
                    tops.append(chunk_fn(hc, None))
                continue
            if hc.requires_grad and self.READOUT_CHECKPOINT:
                loss_c, top_c = torch.utils.checkpoint.checkpoint(chunk_fn, hc, tc, use_reentrant=False)
            else:
                loss_c, top_c = chunk_fn(hc, tc)
            losses.append(loss_c)
            tops.append(top_c)
        top1 = torch.cat(tops).view(B, T)
        return (torch.cat(losses).view(B, T) if losses else None), top1

    def readout(self, x):
        """Shared final norm + lm_head + soft-cap: (B, T, D) -> fp32 logits (B, T, V)."""
        logits = decode_matvec.head(norm(x).to(self.lm_head.weight.dtype), self.lm_head.weight)  # = self.lm_head
        return softcap(logits)

    def forward(self, idx, targets=None, width=None, return_exits=False, exit_after=None, mask=None,
                loss_reduction="mean", exits=None):
        """
        idx (B, T) -> logits (B, T, V) fp32, or the loss if targets are given.
        width: None (full), an int for every block, a plan (one width per block), or a long tensor of
            per-row plans (B, n_layer) or per-token widths (B, T, n_layer) (see the module docstring).
        exit_after (B, T) long, optional: block index after which each token's residual stops
            changing (early exit). Deeper blocks still compute from the frozen residual, so their
            K/V and SSM states see the exited hidden state, exactly what the engine does at decode.
        mask (B, T) bool, optional: True for real tokens; passed to Mamba and MoE (padding).
        return_exits: give a HybridOutput with the exit readouts' hidden states, per-token losses
            and top-1 agreement with the final readout (all differentiable where they can be).
        exits: with return_exits, the exit blocks to read out (a subset of config.exit_blocks(); the last block is
            always read); None: every one.
        """
        c = self.config
        B, T = idx.shape
        if torch.is_tensor(width):
            widths = self.per_token_widths(width, B, T)  # (B, T, n_layer)
            plan = [widths[..., j] for j in range(c.n_layer)]  # (B, T) each
        else:
            widths = None
            plan = expand_plan(width, c.n_layer, c.n_embd)
            check_plan(plan, c.n_embd, c.head_dim)
        cos_sin = self.rotary(0, T)
        x, side, _ = hybrid_modern.embed(self, idx)
        exit_ids = set(c.exit_blocks()) if return_exits else set()
        if return_exits and exits is not None:
            if not set(exits) <= exit_ids:
                raise ValueError(f"exits {sorted(set(exits) - exit_ids)} are not exit blocks ({sorted(exit_ids)})")
            exit_ids = set(exits) | {c.n_layer - 1}
        exit_hidden = []
        for j, block in enumerate(self.transformer.h):
            x_new = block(x, plan[j], cos_sin, mask=mask, side=side)
            if exit_after is not None:
                x_new = torch.where((exit_after < j).unsqueeze(-1), x, x_new)
            x = x_new
            if j in exit_ids:
                exit_hidden.append(x)
        logits = self.readout(x)
        loss = final_tok = None
        if targets is not None and return_exits:
            # per token once: the last exit's losses are these, and the loss reduces them (one (B*T, V)
            # log-softmax kept for the backward instead of two)
            final_tok = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1,
                                        reduction="none")
            if loss_reduction == "none":
                loss = final_tok
            elif loss_reduction == "sum":
                loss = final_tok.sum()
            elif loss_reduction == "mean":
                loss = final_tok.sum() / (targets != -1).sum()
            else:
                raise ValueError(f"loss_reduction must be 'mean', 'sum' or 'none', got {loss_reduction!r}")
        elif targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1,
                                   reduction=loss_reduction)
        if not return_exits:
            return logits if targets is None else loss
        out = HybridOutput(logits=logits, loss=loss, exit_blocks=sorted(exit_ids), exit_hidden=exit_hidden,
                           aux_loss=self.moe_aux_loss(), plan=None if widths is not None else plan)
        final_top1 = logits.argmax(-1)
        losses, agree = [], []
        for j, h in zip(out.exit_blocks, exit_hidden):
            if j == c.n_layer - 1:  # the last readout is the final one: reuse its logits
                losses.append(None if targets is None else final_tok.view(B, T))
                agree.append(torch.ones_like(final_top1, dtype=torch.bool))
                continue
            lg_loss, top1 = self.readout_loss_top1(h, targets)
            losses.append(lg_loss)
            agree.append(top1 == final_top1)
        out.exit_agree = torch.stack(agree)
        if targets is not None:
            out.exit_losses = torch.stack(losses)
        return out

    def per_token_widths(self, width, B, T):
        """A (B, n_layer) or (B, T, n_layer) width tensor -> checked (B, T, n_layer) long."""
        c = self.config
        if width.dim() == 2:
            width = width[:, None, :].expand(B, T, c.n_layer)
        if tuple(width.shape) != (B, T, c.n_layer) or width.dtype != torch.long:
            raise ValueError(f"a width tensor must be long (B, n_layer) or (B, T, n_layer) = {(B, T, c.n_layer)}, "
                             f"got {width.dtype} {tuple(width.shape)}")
        check_plan(width.unique().tolist(), c.n_embd, c.head_dim)
        return width.to(self.get_device())

    @torch.no_grad()
    def prefix_hidden(self, idx, n_blocks, mask=None):
        """The residual (B, T, D) after the first n_blocks blocks at full width, no grad (the predictor's input)."""
        cos_sin = self.rotary(0, idx.size(1))
        x, side, _ = hybrid_modern.embed(self, idx)
        for block in self.transformer.h[:n_blocks]:
            x = block(x, self.config.n_embd, cos_sin, mask=mask, side=side)
        return x

    def embed_decode(self, ws, ids, first):
        """The engine's embedding of ids (B, T) into the residual (hybrid_modern.decode_embed: smear and x0 state)."""
        return hybrid_modern.decode_embed(self, ws, ids, first)

    def moe_aux_loss(self):
        """Sum over MoE blocks of their router loss (balancing + z-loss, with the MoE's coefficients)."""
        terms = [b.moe.router_loss for b in self.transformer.h
                 if b.ffn_kind == "E" and getattr(b.moe, "aux_loss", None) is not None]
        return torch.stack(terms).sum() if terms else torch.zeros((), device=self.get_device())

    # ---- FLOPs (nanochat/flops.py holds the one table and its convention) -----------------------
    def flops_breakdown(self, context_len, width=None):
        return flop_table(self).breakdown(context_len, width)

    def forward_flops_per_token(self, context_len, width=None):
        return flop_table(self).forward(context_len, width)

    def estimate_flops(self, width=None):
        return flop_table(self).training(width)

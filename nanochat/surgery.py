"""
Surgery: turn a nanochat GPT into a HybridGPT (create) and make a HybridGPT wider (grow), without
changing what the model computes. Works on state_dicts tensor by tensor, so a source loaded with
torch.load(mmap=True) is never copied into a second full model; scripts/surgery.py is the CLI.

Create. Every source weight is kept (renamed transformer.h.{i} -> transformer.h.{j}); Mamba blocks
are inserted (layer_pattern "AM": one after each attention block). A new Mamba mixer is built by its
constructor (mamba-ssm's init) and its out_proj is zeroed; its FFN gets nanochat's init with c_proj
(or the experts' w_out) zeroed. So every new block adds exactly 0 to the residual.

Grow D -> D2. New residual channels are appended (zero in every token's residual). Exactness:
  - parameter-free RMSNorm over D2 channels of [x, 0] gives sqrt(D2/D) * [norm(x), 0]. The embedding
    norm makes the residual itself s * [x, 0] (s = sqrt(D2/D)), so every weight that WRITES the
    residual (attn c_proj, mlp c_proj, Mamba out_proj, expert w_out) is scaled by s and every weight
    that READS a normalised residual (c_q, c_k, c_v, c_fc, Mamba in_proj, router, expert w_in,
    lm_head) by 1/s. Then the residual is exactly s * [x, 0] everywhere, mean(x^2) over D2 channels
    equals the old mean over D (so even the eps inside rms_norm sees the same number), relu^2 sees
    the same pre-activations, and lm_head sees the same normalised input. wte is not scaled (it is
    bf16 in nanochat and the norm after it is scale-free): the only residual effect is the eps of that
    first norm, ~1e-7 relative.
  - attention, head_growth="add": head_dim kept, heads appended (GQA group size kept: new query heads
    use new KV heads). c_q/c_k get 1/s too, so QK-norm sees identical inputs (eps included).
  - attention, head_growth="widen": every head grows d -> d2; per head the layout is
    [a (d/2) | a' (e/2) | b (d/2) | b' (e/2)], e = d2 - d, so half-split rotary pairs stay paired and
    config.rotary_dims keeps the old frequencies. New q/k dims must stay 0 on old inputs (the QK norm
    would see them), so those rows are 0 on old residual channels. Old q/k rows are scaled by
    sqrt(d2/d) (the QK-norm mean over d2 dims is then the old one) and attn_scale is multiplied by
    d/d2, so q.k * scale is unchanged.
  - Mamba-1: d_inner and dt_rank grow. Channels are independent in the scan except through x_proj
    (dt, B, C read every channel) and out_proj: x_proj rows of the OLD dt/B/C outputs are 0 on new
    channels, dt_proj rows of old channels are 0 on new dt-rank inputs, out_proj columns of new
    channels are 0.
  - Mamba-2: heads are appended; ngroups grows by D2/D so the gated RMSNorm group size
    (d_ssm/ngroups) is unchanged and new heads live in NEW groups with their own B/C: old groups'
    RMS never sees a new channel (needs ngroups*D2/D to be an integer).
  - MLP hidden and expert_dim keep their ratio to the width; new units are appended.
New weights: matrices get a low-rank product A @ B (A, B ~ N(0, lora_std), rank lora_rank) wherever
they read new channels or produce new internal channels, and 0 where they write the residual or feed
an old channel; per-channel SSM parameters (conv, dt bias, A_log, D, norm weight) of new channels take
the constructor's init. Nothing stays dead: writers get gradient at step 1 (the readers of new
channels are nonzero), readers at step 2 (new residual channels are then nonzero).
meta["surgery"]["grow"]["old_index"] says where the old entries sit: new_entry_mask() turns it into
a bool mask per parameter (for a per-channel learning rate).
"""
import itertools
import math
import zlib
from dataclasses import dataclass, fields

import torch

from nanochat.gpt import GPT, GPTConfig, check_nanochat_state_dict
from nanochat.gpt_modern import ModernGPT
from nanochat import surgery_modern
from nanochat.layers import linear_init_std
from nanochat.hybrid_gpt import HybridGPT, HybridConfig, make_mamba, make_moe
from nanochat.moe import MoE
from nanochat.checkpoint_manager import load_state_dict_strict, check_state_dict

MAMBA_FFN_LETTER = {"dense": "D", "none": "N", "moe": "E"}


def _gen(seed, name):
    """A generator seeded by (seed, name), so each new tensor is reproducible whatever the order."""
    return torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))


def _seeded(seed, name, fn):
    """Run a constructor under a forked global RNG seeded by (seed, name); the caller's RNG is untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
        return fn()


def params_by_kind(state):
    """Parameter counts of a GPT/HybridGPT state_dict by kind."""
    kinds = {"embedding": 0, "attention": 0, "mamba": 0, "mlp": 0, "moe": 0, "head": 0, "controllers": 0, "scalars": 0}
    for name, t in state.items():
        if name.startswith(("transformer.wte.", "value_embeds.")):
            kind = "embedding"
        elif name.startswith(("smear_", "resid_lambdas", "x0_lambdas", "backout_lambda")) or \
                name.rsplit(".", 1)[-1] in surgery_modern.BLOCK_SCALARS:
            kind = "scalars"  # today's nanochat (surgery_modern)
        elif name.startswith("lm_head."):
            kind = "head"
        elif name.startswith("controllers."):
            kind = "controllers"
        else:
            found = [k for k, frag in (("attention", ".attn."), ("mamba", ".mamba."), ("mlp", ".mlp."), ("moe", ".moe."))
                     if frag in name]
            if len(found) != 1:
                raise ValueError(f"cannot tell the kind of parameter {name!r}")
            kind = found[0]
        kinds[kind] += t.numel()
    kinds["total"] = sum(kinds.values())
    return kinds


def gpt_config_from_meta(meta, state):
    """GPTConfig of a nanochat checkpoint; refuses newer nanochat layouts with a clear message."""
    cfg = dict(meta["model_config"])
    check_nanochat_state_dict(state, cfg)
    known = {f.name for f in fields(GPTConfig)}
    return GPTConfig(**{k: v for k, v in cfg.items() if k in known})


# -----------------------------------------------------------------------------
# Create: nanochat GPT -> HybridGPT at the same width

def hybrid_n_layer(n_attn, layer_pattern):
    """Blocks needed to hold n_attn attention blocks in the tiled pattern, plus the Mamba blocks that
    follow the last one before the pattern asks for another attention block."""
    if not layer_pattern or set(layer_pattern) - set("AM") or "A" not in layer_pattern or "M" not in layer_pattern:
        raise ValueError(f"layer pattern {layer_pattern!r} must use only A and M and contain both")
    j = seen = 0
    while seen < n_attn:
        seen += layer_pattern[j % len(layer_pattern)] == "A"
        j += 1
    while layer_pattern[j % len(layer_pattern)] == "M":
        j += 1
    return j


def create_hybrid(src_state, src_config, layer_pattern="AM", mamba_ffn="dense", upcycle_moe=False, seed=0,
                  extra_state=None, **hybrid_kwargs):
    """
    (state, HybridConfig, info) from a nanochat GPT state_dict and its GPTConfig.
    Source tensors are reused as they are (no copy). hybrid_kwargs are HybridConfig fields
    (mamba_version, d_state, d_conv, expand, mamba_headdim, mamba_ngroups, num_experts, expert_dim,
    moe_top_k, capacity_factor, min_capacity, width_levels, exit_stride, adaptive).
    mamba_ffn: FFN of the new Mamba blocks, "dense" | "none" | "moe" (fresh, w_out = 0).
    upcycle_moe: the source MLPs become MoEs whose experts are copies (MoE.from_dense, straight-through
    gate, no dropping): the same function only if HybridConfig carries those two MoE options.
    extra_state: hybrid tensors made elsewhere (create_hybrid_from_modern), added before the strict check.
    info: new_param_prefixes (Mamba blocks and FFNs surgery created, and upcycled routers),
    blocks_added, attention_blocks (source block i -> hybrid block).
    """
    if mamba_ffn not in MAMBA_FFN_LETTER:
        raise ValueError(f"mamba_ffn={mamba_ffn!r}: use one of {sorted(MAMBA_FFN_LETTER)}")
    L, D = src_config.n_layer, src_config.n_embd
    N = hybrid_n_layer(L, layer_pattern)
    ffn_pattern = "".join(("E" if upcycle_moe else "D") if c == "A" else MAMBA_FFN_LETTER[mamba_ffn] for c in layer_pattern)
    if upcycle_moe:
        # the plain Switch gate would output p * MLP(x): only a straight gate without drops is the dense MLP
        hybrid_kwargs.update(moe_straight_gate=True, moe_drop_tokens=False)
    config = HybridConfig(sequence_len=src_config.sequence_len, vocab_size=src_config.vocab_size, n_layer=N,
                          n_head=src_config.n_head, n_kv_head=src_config.n_kv_head, n_embd=D,
                          layer_pattern=layer_pattern, ffn_pattern=ffn_pattern, mlp_hidden=4 * D, **hybrid_kwargs)
    if upcycle_moe and config.expert_dim != config.mlp_hidden:
        raise ValueError(f"upcycling copies the MLP into every expert: expert_dim must be {config.mlp_hidden}, got {config.expert_dim}")

    used = {"transformer.wte.weight", "lm_head.weight"}
    state = {k: src_state[k] for k in used}
    new_prefixes, added, attn_map = [], [], {}
    i = 0
    for j in range(N):
        p = f"transformer.h.{j}."
        if config.mixer_kind(j) == "A":
            src = f"transformer.h.{i}."
            attn_map[i] = j
            for w in ("c_q", "c_k", "c_v", "c_proj"):
                state[f"{p}attn.{w}.weight"] = src_state[f"{src}attn.{w}.weight"]
            c_fc, c_proj = src_state[f"{src}mlp.c_fc.weight"], src_state[f"{src}mlp.c_proj.weight"]
            used |= {f"{src}attn.{w}.weight" for w in ("c_q", "c_k", "c_v", "c_proj")}
            used |= {f"{src}mlp.c_fc.weight", f"{src}mlp.c_proj.weight"}
            if config.ffn_kind(j) == "D":
                state[f"{p}mlp.c_fc.weight"], state[f"{p}mlp.c_proj.weight"] = c_fc, c_proj
            else:
                moe = _seeded(seed, p + "moe", lambda: MoE.from_dense(
                    c_fc.float(), c_proj.float(), config.num_experts, top_k=config.moe_top_k, straight_gate=True,
                    drop_tokens=False, capacity_factor=config.capacity_factor, min_capacity=config.min_capacity))
                state.update({f"{p}moe.{k}": v for k, v in moe.state_dict().items()})
                new_prefixes.append(f"{p}moe.router.")
            i += 1
            continue
        added.append(j)
        mamba = _seeded(seed, p + "mamba", lambda: make_mamba(config, j))  # mamba-ssm's init
        with torch.no_grad():
            mamba.out_proj.weight.zero_()  # adds nothing to the residual
        state.update({f"{p}mamba.{k}": v.detach() for k, v in mamba.state_dict().items()})
        new_prefixes.append(f"{p}mamba.")
        kind = config.ffn_kind(j)
        if kind == "D":
            H = config.mlp_hidden
            state[f"{p}mlp.c_fc.weight"] = torch.randn(H, D, generator=_gen(seed, p + "mlp.c_fc")) * linear_init_std(H, D)
            state[f"{p}mlp.c_proj.weight"] = torch.zeros(D, H)
            new_prefixes.append(f"{p}mlp.")
        elif kind == "E":
            moe = _seeded(seed, p + "moe", lambda: make_moe(config))  # MoE.init_weights: w_out = 0
            state.update({f"{p}moe.{k}": v.detach() for k, v in moe.state_dict().items()})
            new_prefixes.append(f"{p}moe.")
    unused = sorted(set(src_state) - used)
    if unused:
        raise ValueError(f"source has tensors surgery does not know how to carry over: {unused[:10]}")
    state.update(fresh_controllers(config, seed))
    state.update(extra_state or {})
    check_strict(config, state)
    info = {"new_param_prefixes": new_prefixes, "blocks_added": added, "attention_blocks": attn_map,
            "controller_prefixes": ["controllers."] if config.adaptive else []}
    return state, config, info


def create_hybrid_from_modern(src_state, src_config, layer_pattern="AM", seed=0, **kwargs):
    """create_hybrid for today's nanochat (a ModernGPT state_dict and its ModernConfig): its features move onto the
    hybrid's blocks with the function kept (nanochat/surgery_modern.py). kwargs: create_hybrid's."""
    N = hybrid_n_layer(src_config.n_layer, layer_pattern)
    attn_map = surgery_modern.attention_map(layer_pattern, N, src_config.n_layer)
    fixed = surgery_modern.modern_hybrid_kwargs(src_config, N, attn_map)
    clash = sorted(set(fixed) & set(kwargs))
    if clash:
        raise ValueError(f"{clash} come from the source's architecture and cannot be set")
    plain, extra = surgery_modern.split_modern_state(src_state, src_config, N, attn_map)
    return create_hybrid(plain, src_config, layer_pattern, seed=seed, extra_state=extra, **kwargs, **fixed)


def fresh_controllers(config, seed=0):
    """The adaptive controllers' state, initialised by the model's own init (empty when not adaptive)."""
    if not config.adaptive:
        return {}
    with torch.device("meta"):
        model = HybridGPT(config)
    ctrl = model.controllers
    ctrl.to_empty(device="cpu")
    _seeded(seed, "controllers", ctrl.init_weights)
    return {f"controllers.{k}": v.detach() for k, v in ctrl.state_dict().items()}


def check_strict(config, state):
    """Every key of HybridGPT(config) present with its shape, nothing else (built on meta: free)."""
    with torch.device("meta"):
        model = HybridGPT(config)
    check_state_dict(model, state)


# -----------------------------------------------------------------------------
# Grow: index layouts

@dataclass
class Dim:
    """One dimension of a grown tensor: its new size and where the old entries go, as runs
    (new_start, length) in old order (old_start is the running sum of the lengths)."""
    size: int
    runs: list

    @classmethod
    def prefix(cls, size, old):
        return cls(size, [(0, old)])

    def old_mask(self):
        m = torch.zeros(self.size, dtype=torch.bool)
        for start, n in self.runs:
            m[start:start + n] = True
        return m


def _run_slices(dims):
    """(new slices, old slices) for every combination of runs across the dims."""
    per_dim = []
    for d in dims:
        pairs, o = [], 0
        for start, n in d.runs:
            pairs.append((slice(start, start + n), slice(o, o + n)))
            o += n
        per_dim.append(pairs)
    for combo in itertools.product(*per_dim):
        yield tuple(c[0] for c in combo), tuple(c[1] for c in combo)


def new_entry_mask(shape, old_index):
    """Bool mask (True = entry added by growth) of a tensor of `shape` from meta's old_index entry
    (one list of [new_start, length] runs per dim)."""
    mask = torch.ones(shape, dtype=torch.bool)
    for new_sl, _ in _run_slices([Dim(n, [tuple(r) for r in runs]) for n, runs in zip(shape, old_index)]):
        mask[new_sl] = False
    return mask


def _lowrank(shape, rank, std, gen):
    """A @ B with A (..., m, r), B (..., r, n) ~ N(0, std): small, rank-limited, nonzero."""
    *batch, m, n = shape
    A = torch.randn(*batch, m, rank, generator=gen) * std
    B = torch.randn(*batch, rank, n, generator=gen) * std
    return A @ B


class _Grower:
    """Builds grown tensors one at a time and records where the old entries went."""

    def __init__(self, rank, std, seed):
        if rank < 1 or std <= 0:
            raise ValueError(f"lora rank must be >= 1 and lora std > 0, got {rank}, {std}")
        self.rank, self.std, self.seed = rank, std, seed
        self.old_index = {}

    def __call__(self, name, old, dims, fill, scale=1.0, zero=(), fresh=None, dtype=torch.float32):
        """
        old: the source tensor; dims: one Dim per dimension; fill of the entries that are not old:
        "lowrank" (readers), "zero" (writers) or "fresh" (per-channel parameters from `fresh`).
        scale multiplies the old entries. zero: blocks forced to 0, each a tuple per dim of
        "old" / "new" / None (all).
        """
        shape = tuple(d.size for d in dims)
        if tuple(old.shape) != tuple(sum(n for _, n in d.runs) for d in dims):
            raise ValueError(f"{name}: source shape {tuple(old.shape)} does not match the growth layout")
        if fill == "lowrank":
            out = _lowrank(shape, self.rank, self.std, _gen(self.seed, name))
        elif fill == "zero":
            out = torch.zeros(shape)
        else:
            if tuple(fresh.shape) != shape:
                raise ValueError(f"{name}: fresh tensor {tuple(fresh.shape)} vs grown shape {shape}")
            out = fresh.detach().float().clone()
        for new_sl, old_sl in _run_slices(dims):
            out[new_sl] = old[old_sl].float() * scale
        for block in zero:
            mask = torch.ones(shape, dtype=torch.bool)
            for k, (sel, d) in enumerate(zip(block, dims)):
                if sel is not None:
                    m = d.old_mask() if sel == "old" else ~d.old_mask()
                    mask &= m.view([-1 if i == k else 1 for i in range(len(dims))])
            out[mask] = 0.0
        if shape != tuple(old.shape):
            self.old_index[name] = [[list(r) for r in d.runs] for d in dims]
        return out.to(dtype)


def _head_dims(n_heads, d, d2, mode):
    """Rows of n_heads heads growing d -> d2: 'add' keeps heads contiguous, 'widen' splits each old
    head into its two rotary halves, placed at the start of the new head's halves."""
    if mode == "add":
        return [(0, n_heads * d)]
    return [r for h in range(n_heads) for r in ((h * d2, d // 2), (h * d2 + d2 // 2, d // 2))]


def grow(state, config, new_dim, head_growth="add", lora_rank=16, lora_std=0.01, seed=0, width_levels=None):
    """
    (state, HybridConfig, info): a HybridGPT state_dict grown from config.n_embd to new_dim with the
    same function (see the module docstring). The input state is not modified (it may be mmap'd).
    info: from, to, head_growth, residual_scale, old_index {param: runs per dim}, controllers_grown.
    """
    D, D2 = config.n_embd, int(new_dim)
    if D2 <= D:
        raise ValueError(f"--new-dim={D2} must be larger than the source width {D} (surgery only grows)")
    if head_growth not in ("add", "widen"):
        raise ValueError(f"head_growth={head_growth!r}: use 'add' or 'widen'")
    hd, Hq, Hkv = config.head_dim, config.n_head, config.n_kv_head
    group = Hq // Hkv
    cfg = config.to_dict()
    if head_growth == "add":
        if D2 % hd:
            raise ValueError(f"--new-dim={D2} must be a multiple of head_dim={hd} to add heads (or use --head-growth=widen)")
        Hq2 = D2 // hd
        if Hq2 % group:
            raise ValueError(f"{Hq2} query heads cannot keep the GQA group size {group}: pick --new-dim a multiple of {hd * group}")
        hd2, Hkv2 = hd, Hq2 // group
        cfg.update(n_head=Hq2, n_kv_head=Hkv2)
    else:
        if D2 % Hq or (D2 // Hq) % 2:
            raise ValueError(f"--new-dim={D2} must be a multiple of 2*n_head={2 * Hq} to widen every head (half-split rotary)")
        hd2, Hq2, Hkv2 = D2 // Hq, Hq, Hkv
        cfg.update(rotary_dims=list(config.rotary_dims) + [hd2], attn_scale=config.softmax_scale * hd / hd2)
    for name, n in (("mlp_hidden", config.mlp_hidden), ("expert_dim", config.expert_dim)):
        if n * D2 % D:
            raise ValueError(f"{name}={n} cannot keep its ratio to the width at {D2} (not an integer)")
        cfg[name] = n * D2 // D
    uses_mamba2 = config.mamba_version == 2 and "M" in config.layer_pattern
    if uses_mamba2:
        if config.mamba_ngroups * D2 % D:
            raise ValueError(f"Mamba-2 growth puts new heads in new groups so the gated RMSNorm groups keep their size: "
                             f"mamba_ngroups*new_dim/old_dim = {config.mamba_ngroups}*{D2}/{D} must be an integer "
                             "(build the hybrid with a --mamba-ngroups that makes it one)")
        cfg["mamba_ngroups"] = config.mamba_ngroups * D2 // D
        if config.expand * D2 % config.mamba_headdim:
            raise ValueError(f"Mamba-2 d_ssm = {config.expand}*{D2} must be a multiple of mamba_headdim={config.mamba_headdim}")
    cfg.update(n_embd=D2, width_levels=list(width_levels or []), grown_from=list(config.grown_from) + [D])
    new_config = HybridConfig.from_dict(cfg)

    s = math.sqrt(D2 / D)  # residual scale: writers * s, readers of norm(residual) / s
    g = _Grower(lora_rank, lora_std, seed)
    res = Dim.prefix(D2, D)
    out = {}
    wte = state["transformer.wte.weight"]
    out["transformer.wte.weight"] = g("transformer.wte.weight", wte, [Dim.prefix(wte.shape[0], wte.shape[0]), res],
                                      "zero", dtype=wte.dtype)
    head = state["lm_head.weight"]
    out["lm_head.weight"] = g("lm_head.weight", head, [Dim.prefix(head.shape[0], head.shape[0]), res], "lowrank", 1 / s)
    done = {"transformer.wte.weight", "lm_head.weight", "smear_gate.weight", "smear_lambda"} & set(state)
    kv_rows = Dim(Hkv2 * hd2, _head_dims(Hkv, hd, hd2, head_growth))
    out.update(surgery_modern.grow_extras(g, state, config, new_config, s, kv_rows, Dim.prefix))
    for j in range(config.n_layer):
        p = f"transformer.h.{j}."
        names = [k for k in state if k.startswith(p)]
        done |= set(names)
        if config.mixer_kind(j) == "A":
            t = math.sqrt(hd2 / hd)  # widen: old q/k rows * t keep the QK-norm mean square (t = 1 for add)
            q = Dim(Hq2 * hd2, _head_dims(Hq, hd, hd2, head_growth))
            kv = kv_rows
            qk_zero = [("new", "old")] if head_growth == "widen" else []  # new head dims stay 0 on old inputs
            out[p + "attn.c_q.weight"] = g(p + "attn.c_q.weight", state[p + "attn.c_q.weight"], [q, res], "lowrank", t / s, qk_zero)
            out[p + "attn.c_k.weight"] = g(p + "attn.c_k.weight", state[p + "attn.c_k.weight"], [kv, res], "lowrank", t / s, qk_zero)
            out[p + "attn.c_v.weight"] = g(p + "attn.c_v.weight", state[p + "attn.c_v.weight"], [kv, res], "lowrank", 1 / s)
            out[p + "attn.c_proj.weight"] = g(p + "attn.c_proj.weight", state[p + "attn.c_proj.weight"], [res, q], "zero", s)
        else:
            out.update(_grow_mamba(g, state, p + "mamba.", config, new_config, j, res, s))
        kind = config.ffn_kind(j)
        if kind == "D":
            hid = Dim.prefix(new_config.mlp_hidden, config.mlp_hidden)
            out[p + "mlp.c_fc.weight"] = g(p + "mlp.c_fc.weight", state[p + "mlp.c_fc.weight"], [hid, res], "lowrank", 1 / s)
            out[p + "mlp.c_proj.weight"] = g(p + "mlp.c_proj.weight", state[p + "mlp.c_proj.weight"], [res, hid], "zero", s)
        elif kind == "E":
            E = config.num_experts
            ex, eh = Dim.prefix(E, E), Dim.prefix(new_config.expert_dim, config.expert_dim)
            out[p + "moe.router.weight"] = g(p + "moe.router.weight", state[p + "moe.router.weight"], [ex, res], "lowrank", 1 / s)
            out[p + "moe.w_in"] = g(p + "moe.w_in", state[p + "moe.w_in"], [ex, eh, res], "lowrank", 1 / s)
            out[p + "moe.w_out"] = g(p + "moe.w_out", state[p + "moe.w_out"], [ex, res, eh], "zero", s)
        unknown = sorted(set(names) - set(out))
        if unknown:
            raise ValueError(f"grow does not know how to grow {unknown}")
    ctrl = [k for k in state if k.startswith("controllers.")]
    done |= set(ctrl)
    if ctrl:  # grown like the rest (their function kept), calibration cleared; phase 3 trains them from there
        from nanochat.confidence_probe import grow_controllers
        out.update(grow_controllers(state, config, new_config, s))
    else:
        out.update(fresh_controllers(new_config, seed))
    unknown = sorted(set(state) - done)
    if unknown:
        raise ValueError(f"grow does not know how to grow {unknown[:10]}")
    check_strict(new_config, out)
    info = {"from": D, "to": D2, "head_growth": head_growth, "head_dim": [hd, hd2], "n_head": [Hq, Hq2],
            "n_kv_head": [Hkv, Hkv2], "residual_scale": s, "lora_rank": lora_rank, "lora_std": lora_std, "seed": seed,
            "controllers_grown": bool(ctrl), "old_index": g.old_index}
    return out, new_config, info


def _grow_mamba(g, state, p, config, new_config, j, res, s):
    """Grow one Mamba / Mamba-2 mixer's tensors (prefix p = 'transformer.h.{j}.mamba.')."""
    fresh = _seeded(g.seed, p + "grow", lambda: make_mamba(new_config, j)).state_dict()  # mamba-ssm init for new channels
    old = {k[len(p):]: v for k, v in state.items() if k.startswith(p)}
    if set(old) != set(fresh):
        raise ValueError(f"{p}: source keys {sorted(old)} differ from the mixer's {sorted(fresh)}")
    out = {}

    def put(key, dims, fill, scale=1.0, zero=()):
        out[p + key] = g(p + key, old[key], dims, fill, scale, zero, fresh=fresh[key])

    def same(t):
        return [Dim.prefix(n, n) for n in t.shape]

    if config.mamba_version == 1:
        di, di2 = old["D"].shape[0], fresh["D"].shape[0]
        R, R2 = old["dt_proj.weight"].shape[1], fresh["dt_proj.weight"].shape[1]
        N = old["A_log"].shape[1]
        ch, rank = Dim.prefix(di2, di), Dim.prefix(R2, R)
        put("in_proj.weight", [Dim(2 * di2, [(0, di), (di2, di)]), res], "lowrank", 1 / s)  # rows [x | z]
        put("conv1d.weight", [ch] + same(old["conv1d.weight"])[1:], "fresh")
        put("conv1d.bias", [ch], "fresh")
        # rows [dt (R) | B (N) | C (N)]: the old outputs must not read new channels
        put("x_proj.weight", [Dim(R2 + 2 * N, [(0, R), (R2, 2 * N)]), ch], "lowrank", zero=[("old", "new")])
        put("dt_proj.weight", [ch, rank], "lowrank", zero=[("old", "new")])  # old channels ignore new dt ranks
        put("dt_proj.bias", [ch], "fresh")
        put("A_log", [ch, Dim.prefix(N, N)], "fresh")
        put("D", [ch], "fresh")
        put("out_proj.weight", [res, ch], "zero", s)
    else:
        ds, ds2 = old["norm.weight"].shape[0], fresh["norm.weight"].shape[0]
        H, H2 = old["A_log"].shape[0], fresh["A_log"].shape[0]
        GN, GN2 = config.mamba_ngroups * config.d_state, new_config.mamba_ngroups * config.d_state
        if old["in_proj.weight"].shape[0] != 2 * ds + 2 * GN + H:
            raise ValueError(f"{p}in_proj: unexpected packing (d_ssm < d_inner is not supported by surgery)")
        # in_proj rows [z | x | B | C | dt]; new heads and their new groups are appended inside each part
        rows = Dim(2 * ds2 + 2 * GN2 + H2, [(0, ds), (ds2, ds), (2 * ds2, GN), (2 * ds2 + GN2, GN), (2 * ds2 + 2 * GN2, H)])
        put("in_proj.weight", [rows, res], "lowrank", 1 / s)
        conv = Dim(ds2 + 2 * GN2, [(0, ds), (ds2, GN), (ds2 + GN2, GN)])  # conv over [x | B | C]
        put("conv1d.weight", [conv] + same(old["conv1d.weight"])[1:], "fresh")
        put("conv1d.bias", [conv], "fresh")
        for key in ("dt_bias", "A_log", "D"):
            put(key, [Dim.prefix(H2, H)], "fresh")
        put("norm.weight", [Dim.prefix(ds2, ds)], "fresh")
        put("out_proj.weight", [res, Dim.prefix(ds2, ds)], "zero", s)
    return out


# -----------------------------------------------------------------------------
# Checking the function: build models that alias the state tensors (no second copy)

def model_from_state(kind, config, state, cast_cache=None):
    """A GPT or HybridGPT whose parameters ARE the state's tensors (assign=True), eval mode.
    bf16/fp16 tensors (nanochat's wte) are cast to fp32 copies; pass the same dict as cast_cache to two
    calls whose states share tensors (create) so each is cast once."""
    cls = {"gpt": GPT, "hybrid": HybridGPT, "modern": ModernGPT}[kind]
    with torch.device("meta"):
        model = cls(config)
    cache = {} if cast_cache is None else cast_cache
    st = {}
    for k, v in state.items():
        if v.dtype in (torch.bfloat16, torch.float16):
            if id(v) not in cache:
                cache[id(v)] = (v, v.float())  # keep v alive so its id is not reused
            v = cache[id(v)][1]
        st[k] = v
    load_state_dict_strict(model, st, assign=True)
    model.init_buffers()
    left = [n for n, t in itertools.chain(model.named_parameters(), model.named_buffers()) if t.is_meta]
    if left:
        raise RuntimeError(f"tensors still on the meta device after loading: {left[:5]}")
    return model.eval()


def probe_tokens(vocab_size, n_tokens, seed=0, batch=2):
    return torch.randint(0, vocab_size, (batch, n_tokens), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def max_abs_logit_diff(src_model, dst_model, idx):
    """max |logits_src - logits_dst| over the probe batch, both fp32 at full width."""
    a = src_model(idx)
    b = dst_model(idx)
    return (a - b).abs().max().item()


def grown_masks(model, meta):
    """For phase 3 (scripts.fractal_train): {parameter name: bool mask, True on the entries the last growth added},
    from where surgery.grow put the old entries (meta["surgery"]["grow"]["old_index"], per parameter the runs per
    dim). Parameters it does not list (the controllers, grown by confidence_probe.grow_controllers) are not masked."""
    old_index = ((meta.get("surgery") or {}).get("grow") or {}).get("old_index")
    if old_index is None:
        raise ValueError("phase 3: the checkpoint's meta has no surgery.grow.old_index, so the grown entries are "
                         "unknown; grow it with scripts.surgery --expand-from, or pass --new-channel-lr-mult=1")
    params = dict(model.named_parameters())
    unknown = sorted(set(old_index) - set(params))
    if unknown:
        raise ValueError(f"surgery.grow.old_index names parameters the model does not have: {unknown[:5]}")
    return {n: new_entry_mask(tuple(params[n].shape), runs).to(params[n].device) for n, runs in old_index.items()}

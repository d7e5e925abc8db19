"""
Surgery and growth for today's nanochat (nanochat/gpt_modern.py, the features in nanochat/hybrid_modern.py).

Create. surgery.create_hybrid carries the shared tensors (embedding, attention, MLP, head) and inserts the Mamba
blocks; this module adds what today's nanochat has on top, keeping the function:
- the padded vocabulary rows are dropped (wte, lm_head, value embeddings): no token id reaches them and the
  logits were cropped past vocab_size, so the cropped model computes the same logits;
- source layer i's resid/x0 lambdas, value embedding and gate, and window go to its attention block
  attn_map[i]; an inserted Mamba block gets resid_lambda 1 and x0_lambda 0, so it sees the residual as it is;
- smear: the same gate and lambda on the hybrid's embedding; x0 is the smeared embedding as before;
- backout: the residual after attn_map[n_layer // 2] is kept and the last hybrid block subtracts backout_lambda
  times it (the Mamba blocks between add 0, so it is the same residual);
- q/k's 1.2 gain becomes attn_scale = 1.44 / sqrt(head_dim); rotary theta 100 000, fp32 tables.

Grow (the rule of surgery.grow: the residual becomes s * [x, 0], s = sqrt(D2 / D), and norm(residual) s * [norm, 0]):
value-embedding gates and the smear gate read normalised channels, so they are scaled by 1/s (their inputs by s);
a value-embedding table gains the columns of the new KV heads (or head dims) in c_v's row layout, low-rank small
(they feed only c_proj's new, zero columns); the scalars are unchanged (every term they weigh scales by s).
"""
import math

import torch

from nanochat.modern_layers import QK_GAIN, ROTARY_BASE, has_value_embeds, layer_windows

BLOCK_SCALARS = ("resid_lambda", "x0_lambda", "backout_lambda")


def attention_map(layer_pattern, n_blocks, n_layer):
    """{source layer: hybrid block}: the i-th attention block of the tiled pattern holds source layer i."""
    attn = [j for j in range(n_blocks) if layer_pattern[j % len(layer_pattern)] == "A"]
    return dict(enumerate(attn[:n_layer]))


def modern_hybrid_kwargs(src_config, n_blocks, attn_map):
    """The HybridConfig fields that carry today's nanochat features onto the hybrid's blocks."""
    L = src_config.n_layer
    windows = [0] * n_blocks
    for i, w in enumerate(layer_windows(src_config.window_pattern, L, src_config.sequence_len)):
        windows[attn_map[i]] = w
    return dict(rotary_base=ROTARY_BASE, rotary_fp32=True, attn_scale=QK_GAIN ** 2 / math.sqrt(src_config.head_dim),
                smear=True, block_scalars=True, backout_block=attn_map[L // 2],
                ve_blocks=[attn_map[i] for i in range(L) if has_value_embeds(i, L)], windows=windows)


def split_modern_state(src_state, src_config, n_blocks, attn_map):
    """(plain, extra): a ModernGPT state_dict as the Oct-2025 GPT's tensors (vocabulary padding dropped), which
    surgery.create_hybrid carries over, and the hybrid's tensors of today's features, by their hybrid names."""
    V, L = src_config.vocab_size, src_config.n_layer
    plain = {"transformer.wte.weight": src_state["transformer.wte.weight"][:V], "lm_head.weight": src_state["lm_head.weight"][:V]}
    extra, used = {}, {"transformer.wte.weight", "lm_head.weight", "resid_lambdas", "x0_lambdas", "smear_gate.weight",
                       "smear_lambda", "backout_lambda"}
    for i in range(L):
        src, dst = f"transformer.h.{i}.", f"transformer.h.{attn_map[i]}."
        for name in ("attn.c_q", "attn.c_k", "attn.c_v", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"):
            plain[f"{src}{name}.weight"] = src_state[f"{src}{name}.weight"]
        if has_value_embeds(i, L):
            extra[f"{dst}attn.value_embed.weight"] = src_state[f"value_embeds.{i}.weight"][:V]
            extra[f"{dst}attn.ve_gate.weight"] = src_state[f"{src}attn.ve_gate.weight"]
            used |= {f"value_embeds.{i}.weight", f"{src}attn.ve_gate.weight"}
    scalars = {j: (torch.ones(()), torch.zeros(())) for j in range(n_blocks)}  # inserted blocks: the residual as it is
    for i, j in attn_map.items():
        scalars[j] = (src_state["resid_lambdas"][i].float(), src_state["x0_lambdas"][i].float())
    for j, (r, a) in scalars.items():
        extra[f"transformer.h.{j}.resid_lambda"], extra[f"transformer.h.{j}.x0_lambda"] = r.clone(), a.clone()
    extra[f"transformer.h.{n_blocks - 1}.backout_lambda"] = src_state["backout_lambda"].float().reshape(())
    extra["smear_gate.weight"], extra["smear_lambda"] = src_state["smear_gate.weight"], src_state["smear_lambda"]
    unused = sorted(set(src_state) - used - set(plain))
    if unused:
        raise ValueError(f"source has tensors surgery does not know how to carry over: {unused[:10]}")
    return plain, extra


def grow_extras(g, state, config, new_config, s, kv_rows, prefix):
    """Grown tensors of the modern parameters: g is surgery.grow's _Grower, kv_rows the Dim of the KV rows (c_v's
    layout), prefix(n, old) surgery.Dim.prefix."""
    out = {}
    if config.smear:
        out["smear_gate.weight"] = g("smear_gate.weight", state["smear_gate.weight"],
                                     [prefix(n, n) for n in state["smear_gate.weight"].shape], "zero", 1 / s)
        out["smear_lambda"] = state["smear_lambda"].clone()
    for j in range(config.n_layer):
        p = f"transformer.h.{j}."
        for name in BLOCK_SCALARS:
            if p + name in state:
                out[p + name] = state[p + name].clone()
        if j in config.ve_blocks:
            gate, table = state[p + "attn.ve_gate.weight"], state[p + "attn.value_embed.weight"]
            hkv, hkv2 = config.n_kv_head, new_config.n_kv_head
            out[p + "attn.ve_gate.weight"] = g(p + "attn.ve_gate.weight", gate, [prefix(hkv2, hkv),
                                               prefix(gate.shape[1], gate.shape[1])], "lowrank", 1 / s)
            out[p + "attn.value_embed.weight"] = g(p + "attn.value_embed.weight", table,
                                                   [prefix(table.shape[0], table.shape[0]), kv_rows], "lowrank",
                                                   dtype=table.dtype)
    return out


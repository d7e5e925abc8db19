"""
The pieces of today's nanochat architecture that the dense ModernGPT (nanochat/gpt_modern.py) and the hybrid
(nanochat/hybrid_modern.py, matryoshka.py) share: its constants, which layers carry value embeddings, the window
of each layer and its mask, token smearing, the value-embedding gate, and the Linear that casts fp32 master
weights to the activation dtype.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

ROTARY_BASE = 100000.0
QK_GAIN = 1.2                # q and k are multiplied by this after the QK norm
VE_GATE_CHANNELS = 12        # the value-embedding gate reads this many leading channels of the block input
VE_GATE_RANGE = 3.0          # the gate is VE_GATE_RANGE * sigmoid(.), in (0, 3)
SMEAR_CHANNELS = 24          # the smear gate reads this many leading channels of the embedding
VOCAB_MULTIPLE = 64          # the vocabulary is padded to a multiple of this
WINDOW_TILE = 128            # a short window is a quarter of the context rounded up to this


def has_value_embeds(layer, n_layer):
    """Whether layer `layer` of n_layer mixes a value embedding into v: alternating, the last layer included."""
    return layer % 2 == (n_layer - 1) % 2


def layer_windows(window_pattern, n_layer, sequence_len):
    """Per layer, how many keys before the query it sees (nanochat's left window)."""
    short = -(-sequence_len // 4 // WINDOW_TILE) * WINDOW_TILE
    sizes = {"L": sequence_len, "S": short}
    pattern = window_pattern.upper()
    windows = [sizes[pattern[i % len(pattern)]] for i in range(n_layer)]
    windows[-1] = sequence_len
    return windows


def window_keep(q_pos, n_keys, window):
    """Bool (Tq, Tk): query at position q_pos[t] may see key s when s <= q_pos[t] and q_pos[t] - s <= window.
    q_pos: (Tq,) long positions of the queries (keys sit at positions 0..n_keys-1)."""
    s = torch.arange(n_keys, device=q_pos.device)
    d = q_pos[:, None] - s[None, :]
    return (d >= 0) & (d <= window)


def smear(e, gate, lam, prev=None):
    """
    Token smearing of normalised embeddings e (B, T, D): position t gets lam * sigmoid(gate(e_t[:24])) * e_{t-1}
    added. prev (B, 1, D): the embedding before e[:, 0] (a decode step); None: e[:, 0] has no predecessor.
    """
    if prev is None:
        if e.size(1) == 1:
            return e
        g = lam.to(e.dtype) * torch.sigmoid(gate(e[:, 1:, :SMEAR_CHANNELS]))  # (B, T-1, 1)
        return torch.cat([e[:, :1], e[:, 1:] + g * e[:, :-1]], dim=1)
    g = lam.to(e.dtype) * torch.sigmoid(gate(e[..., :SMEAR_CHANNELS]))  # (B, T, 1)
    return e + g * torch.cat([prev.to(e.dtype), e[:, :-1]], dim=1)


def value_gate(ve_gate, x):
    """(B, T, H_kv) the per-KV-head weight of the value embedding, from x's leading VE_GATE_CHANNELS channels."""
    return VE_GATE_RANGE * torch.sigmoid(ve_gate(x[..., :VE_GATE_CHANNELS]))


class CastLinear(nn.Linear):
    """nn.Linear whose (fp32 master) weight is cast to the input's dtype in the forward: matmuls run in the
    activation dtype (bf16 from a bf16 embedding) while the optimizer updates fp32 weights."""

    def forward(self, x):
        return F.linear(x, self.weight.to(dtype=x.dtype))



"""
Today's nanochat features in a HybridGPT (nanochat/gpt_modern.py describes them in the dense model), each a
HybridConfig field that is off by default, so older hybrid checkpoints load unchanged:
- smear (bool): the embedding's token smearing, model parameters smear_gate and smear_lambda
- block_scalars (bool): every block j first forms x_in = resid_lambda * x + x0_lambda * x0 (x0 = the smeared
  embedding), parameters transformer.h.{j}.resid_lambda / x0_lambda (a Mamba block inserted by surgery: 1 and 0)
- backout_block (int, -1 off): the last block ends by subtracting its backout_lambda times the residual after
  block backout_block. An exited token's residual is frozen before that, so its logits are its exit readout.
- ve_blocks (list): attention blocks whose v gets 3 * sigmoid(ve_gate(x_n[..., :12])) * value_embed(token), one
  gate per KV head (transformer.h.{j}.attn.ve_gate / value_embed; sliced with the KV heads at a narrower width)
- windows (list, one per block, 0 = full): query i sees keys j with i - window <= j <= i
- rotary_base, rotary_fp32: nanochat's theta 100 000 and full-precision tables
q/k's 1.2 gain after the QK norm is the softmax scale: attn_scale = 1.44 / sqrt(head_dim).

The per-position inputs these need besides the residual (token ids, x0, the residual kept for backout) travel in a
Side. In HybridGPT.forward it is made from the tokens; in the engine it lives on the Workspace (ws.side), holding
for decode steps fixed tensors that a CUDA graph reads and writes in place, and the smear's previous embedding.
"""
from dataclasses import dataclass

import torch
import torch.nn as nn

from nanochat.layers import norm
from nanochat.modern_layers import smear, window_keep, VE_GATE_CHANNELS, SMEAR_CHANNELS


@dataclass
class Side:
    ids: torch.Tensor            # (B, T) the tokens at these positions (value embeddings)
    x0: torch.Tensor = None      # (B, T, D) the smeared embedding (block scalars)
    x_mid: torch.Tensor = None   # (B, T, D) the residual after backout_block
    prev: torch.Tensor = None    # (B, 1, D) decode: the normalised embedding of the position before these

    def keep_mid(self, x):
        """Keep x as the backout residual: in place into a decode step's fixed tensor, else by reference."""
        if self.x_mid is not None and self.x_mid.shape == x.shape and not torch.is_grad_enabled():
            self.x_mid.copy_(x)
        else:
            self.x_mid = x


def uses_side(config):
    return bool(config.smear or config.block_scalars or config.backout_block >= 0 or config.ve_blocks)


def validate(config):
    """Check the modern fields of a HybridConfig (called from its __post_init__)."""
    n = config.n_layer
    if config.windows and len(config.windows) != n:
        raise ValueError(f"windows has {len(config.windows)} entries for {n} blocks (one per block, 0 = full)")
    bad = [j for j in config.ve_blocks if not 0 <= j < n or config.mixer_kind(j) != "A"]
    bad += [j for j, w in enumerate(config.windows) if w and config.mixer_kind(j) != "A"]
    if bad:
        raise ValueError(f"blocks {sorted(set(bad))}: value embeddings and windows belong to attention blocks")
    if config.ve_blocks and min(config.width_levels) < VE_GATE_CHANNELS:
        raise ValueError(f"the value-embedding gate reads {VE_GATE_CHANNELS} channels: width levels must be >= that")
    if config.smear and config.n_embd < SMEAR_CHANNELS:
        raise ValueError(f"smear reads {SMEAR_CHANNELS} channels: n_embd must be >= that")
    if not -1 <= config.backout_block < n:
        raise ValueError(f"backout_block={config.backout_block} must be -1 (off) or a block index < {n}")


def add_model_params(model, config):
    if config.smear:
        model.smear_gate = nn.Linear(SMEAR_CHANNELS, 1, bias=False)
        model.smear_lambda = nn.Parameter(torch.zeros(1))


def add_block_params(block, config, j):
    if config.block_scalars:
        block.resid_lambda = nn.Parameter(torch.ones(()))
        block.x0_lambda = nn.Parameter(torch.zeros(()))
    block.window = config.windows[j] if config.windows else 0
    block.backout_from = config.backout_block if config.backout_block >= 0 and j == config.n_layer - 1 else -1
    block.keeps_mid = config.backout_block == j
    if block.backout_from >= 0:
        block.backout_lambda = nn.Parameter(torch.zeros(()))


@torch.no_grad()
def init_params(model):
    """Fresh init of the modern parameters (nanochat's values): neutral scalars, backout 0.2, smear and
    value-embedding gates slightly open, value embeddings like c_v."""
    for block in model.transformer.h:
        if hasattr(block, "resid_lambda"):
            block.resid_lambda.fill_(1.0)
            block.x0_lambda.fill_(0.0)
        if hasattr(block, "backout_lambda"):
            block.backout_lambda.fill_(0.2)
        attn = getattr(block, "attn", None)
        if attn is not None and attn.value_embed is not None:
            bound = (3.0 / model.config.n_embd) ** 0.5
            nn.init.uniform_(attn.value_embed.weight, -bound, bound)
            nn.init.uniform_(attn.ve_gate.weight, 0.0, 0.02)
    if model.config.smear:
        model.smear_lambda.zero_()
        nn.init.uniform_(model.smear_gate.weight, 0.0, 0.02)


def embed(model, idx, prev=None):
    """(x, side, e_last): the residual entering block 0 for tokens idx (B, T), the Side of these positions (None
    for a model without the features) and the last position's normalised embedding (the next smear's prev)."""
    e = norm(model.transformer.wte(idx))
    if not uses_side(model.config):
        return e, None, None
    x = smear(e, model.smear_gate, model.smear_lambda, prev) if model.config.smear else e
    return x, Side(ids=idx, x0=x if model.config.block_scalars else None), e[:, -1:]


def block_input(block, x, side):
    """resid_lambda * x + x0_lambda * x0 (the block's input), or x for a block without scalars."""
    if not hasattr(block, "resid_lambda"):
        return x
    return block.resid_lambda.to(x.dtype) * x + block.x0_lambda.to(x.dtype) * side.x0


def block_output(block, x, side):
    """After the block's sublayers: keep the backout residual, or subtract it (the last block)."""
    if block.keeps_mid:
        side.keep_mid(x)
    if block.backout_from >= 0:
        x = x - block.backout_lambda.to(x.dtype) * side.x_mid
    return x


def for_live(live, new, old):
    """new (B, T, D) in the rows of the live groups (HybridBlock.decode's), old in the others: an exited row's
    residual stays as it was."""
    if sum(len(rows) for _, rows, _ in live) == old.size(0):
        return new
    keep = torch.zeros(old.size(0), 1, 1, dtype=torch.bool, device=old.device)
    for _, _, idx in live:
        keep[idx] = True
    return torch.where(keep, new, old)


def forward_keep(block, T, device):
    """The window mask (1, 1, T, T) of a forward over T positions, or None (full causal)."""
    if not block.window or block.window >= T - 1:
        return None
    return window_keep(torch.arange(T, device=device), T, block.window)[None, None]


def decode_keep(block, cache, T, n_keys, keep):
    """
    The mask of a windowed block's T queries at the view's positions (cache.pos: an int, or a (1,) device tensor
    on the static path) over the view's n_keys key slots; it replaces the view's keep (which says only which
    slots were written). Slot s of a ring of S slots (S = max_len: no ring) holds the newest position p <= last
    written with p % S == s, i.e. last - ((last - s) mod S); negative means not written yet.
    """
    if not block.window:
        return keep
    S = cache.st.cache.slots[cache.j]
    start = torch.as_tensor(cache.pos, device=cache.cos_sin[0].device).reshape(-1)[:1]
    q = start + torch.arange(T, device=start.device)  # (T,) query positions
    last = start + T - 1
    held = last - (last - torch.arange(n_keys, device=start.device)) % S  # (n_keys,) the position in each slot
    d = q[:, None] - held[None, :]
    return ((held >= 0)[None, :] & (d >= 0) & (d <= block.window))[None, None]


def window_slots(config, max_len, prompt_len):
    """{block: key slots} of the sliding-window blocks whose ring is smaller than max_len: max(prompt_len,
    window + 1). The prefill (from position 0) writes the prompt's keys without wrapping, and a step at p needs
    the keys p - window .. p."""
    slots = {}
    for j, w in enumerate(getattr(config, "windows", None) or []):
        if w and max(prompt_len, w + 1) < max_len:
            slots[j] = max(prompt_len, w + 1)
    return slots


# ---- the engine's side state ----------------------------------------------------------------------

def decode_embed(model, ws, ids, first):
    """
    The residual entering block 0 for the engine: ids (B, T) at the cache's next positions, first = a prefill
    (no previous token). Sets ws.side for the blocks. A decode step (T = 1) writes into fixed tensors allocated
    once per workspace, so a CUDA graph captured on them replays on later steps and prefills.
    """
    if not uses_side(model.config):
        return norm(model.transformer.wte(ids))
    B, T = ids.shape
    step = ws.side_step
    if step is None or step.ids.size(0) != B:
        D, dev, dt = model.config.n_embd, model.get_device(), model.transformer.wte.weight.dtype
        step = ws.side_step = Side(ids=torch.zeros(B, 1, dtype=torch.long, device=dev),
                                   x0=torch.zeros(B, 1, D, device=dev, dtype=dt),
                                   x_mid=torch.zeros(B, 1, D, device=dev, dtype=dt),
                                   prev=torch.zeros(B, 1, D, device=dev, dtype=dt))
    x, side, e_last = embed(model, ids, None if first else step.prev)
    if T == 1 and not first:
        step.ids.copy_(ids)
        if side.x0 is not None:
            step.x0.copy_(side.x0)
        ws.side = step
    else:
        ws.side = side
    step.prev.copy_(e_last)
    return x

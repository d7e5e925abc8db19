"""
Matryoshka widths: the nested sub-models a HybridGPT can run.

A *width level* is a residual width w (a multiple of head_dim) at which an attention or FFN block
can run: it reads the first w channels of its normalised input, uses the first w/head_dim query
heads (and the KV heads those need under GQA) or the first hidden*w/n_embd MLP/expert units, and
writes only the first w channels of the residual. Mamba mixers always run at full width.

A *width plan* is one width per block. These helpers build, check and sample plans; the slicing
itself lives in hybrid_gpt.py.
"""
import math
import random

# compute modes: a fixed width for every block ("think" = full); "auto" uses the predictor + gates
MODE_WIDTHS = {"ghost": 128, "whisper": 512, "normal": 1024, "think": None}


def default_width_levels(n_embd, head_dim, smallest=128):
    """
    Doubling widths from the first multiple of head_dim that is >= min(smallest, n_embd), plus the full
    width. With head_dim 128 and n_embd 2048: [128, 256, 512, 1024, 2048].
    """
    start = head_dim * math.ceil(min(smallest, n_embd) / head_dim)
    levels = []
    w = start
    while w < n_embd:
        levels.append(w)
        w *= 2
    levels.append(n_embd)
    return levels


def validate_levels(levels, n_embd, head_dim):
    if not levels:
        raise ValueError("width_levels is empty")
    if sorted(set(levels)) != list(levels):
        raise ValueError(f"width_levels must be strictly increasing: {levels}")
    bad = [w for w in levels if w % head_dim != 0 or w <= 0 or w > n_embd]
    if bad:
        raise ValueError(f"width levels {bad} are impossible: each must be a positive multiple of head_dim={head_dim} and <= n_embd={n_embd}")
    if levels[-1] != n_embd:
        raise ValueError(f"the last width level must be the full width {n_embd}, got {levels[-1]}")


def expand_plan(width, n_blocks, n_embd):
    """None -> full everywhere; int -> the same width everywhere; sequence -> checked length."""
    if width is None:
        return [n_embd] * n_blocks
    if isinstance(width, int):
        return [width] * n_blocks
    plan = [int(w) for w in width]
    if len(plan) != n_blocks:
        raise ValueError(f"width plan has {len(plan)} entries but the model has {n_blocks} blocks")
    return plan


def check_plan(plan, n_embd, head_dim):
    for i, w in enumerate(plan):
        if w <= 0 or w > n_embd or w % head_dim != 0:
            raise ValueError(f"block {i}: width {w} is impossible (must be a multiple of head_dim={head_dim} in (0, {n_embd}])")


def snap_to_level(width, levels):
    """The largest level <= width (the smallest level if width is below all of them)."""
    if width is None:
        return levels[-1]
    below = [w for w in levels if w <= width]
    return below[-1] if below else levels[0]


def mode_plan(mode, levels, n_blocks):
    """A fixed plan for a named compute mode, snapped to the model's levels."""
    if mode not in MODE_WIDTHS:
        raise ValueError(f"unknown mode {mode!r}; choose from {sorted(MODE_WIDTHS)} or 'auto'")
    return [snap_to_level(MODE_WIDTHS[mode], levels)] * n_blocks


def sample_plans(levels, n_blocks, rng, n_random=1, per_block=True):
    """
    MatFormer's sandwich rule: the full plan, the smallest plan, and n_random random plans
    (each block its own random level if per_block, else one random level for all).
    """
    plans = [[levels[-1]] * n_blocks]
    if len(levels) > 1:
        plans.append([levels[0]] * n_blocks)
    for _ in range(n_random):
        if per_block:
            plans.append([rng.choice(levels) for _ in range(n_blocks)])
        else:
            plans.append([rng.choice(levels)] * n_blocks)
    return plans


def plan_rng(seed):
    return random.Random(seed)

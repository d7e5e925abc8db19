"""
The CUDA-graph side of nanochat.engine's static decode step: the Workspace a decode runs on (its tensors and the
graphs captured on them), capture-or-replay of one segment, and the weight copies a capture under autocast
reads. engine_static.StaticDecode.segment decides what a segment computes; this module only captures it once
per key and replays it.
"""
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field

import torch

from nanochat.matryoshka_kv import MatryoshkaKVCache

# scripts.bench host only: replay() runs a segment once for a new key and hands out that output ever after (no
# capture, nothing computed), and the engine takes its graph path on any device, so that a decode's time is the host's
HOST_ONLY = False


@dataclass
class Workspace:
    """
    The tensors a decode reads and writes, and the CUDA graphs captured on them. A graph replays on the tensors
    it was captured with, so where decode steps may be graphs the Engine keeps its last workspace and the next
    prefill of the same batch size and max_len reuses it (reset), graphs and all: a new prompt does not
    capture again. One DecodeState at a time uses it; a superseded state's step() stops with an error.
    """
    key: tuple                # (B, max_len, cache dtype)
    cache: MatryoshkaKVCache
    ssm: dict                 # Mamba block index -> (conv_state, ssm_state), updated in place
    graphs: dict = field(default_factory=dict)  # segment key (blocks, bucket, widths, state, gate, ...) -> (CUDAGraph, output)
    weight_copies: dict = field(default_factory=dict)  # autocast dtype -> {nn.Linear: its weight in that dtype}
    weights_version: int = None                 # weights_version() when the graphs were captured
    static_in: tuple = None                     # (token ids (B,), position (1,)) the static step reads
    static_x: torch.Tensor = None               # (B, 1, D) the residual between static segments
    graph_pool: tuple = None                    # the CUDA graphs' shared memory pool
    spec_buffers: dict = field(default_factory=dict)  # (B, T) -> the speculative verify pass's inputs and state buffers
    side: object = None                         # hybrid_modern.Side the blocks read (models with its features)
    side_step: object = None                    # its fixed tensors for decode steps (hybrid_modern.decode_embed)
    # prefills that took it; a DecodeState holds the count at its own prefill. A count, not a reference to the
    # state: a reference cycle would free an old workspace's tensors whenever the garbage collector runs, which
    # may be in the middle of a later CUDA graph capture (and invalidate it)
    prefills: int = 0


def weights_version(linears):
    """Changes when any of these nn.Linear weights is written in place (an optimizer step, load_state_dict). Read
    from each module's parameter dict, as cast_weights swaps them: 8x less host time than through nn.Module's
    attribute lookup (245 linears of a 40-block model, this project's CPU), and the engine checks it before every
    replayed step."""
    return sum(m._parameters["weight"]._version for m in linears)


@contextmanager
def cast_weights(copies):
    """
    For a capture: nn.Linear weights replaced by their copies in autocast's dtype ({module: copy}, made once per
    workspace). Every op that reads these weights is one autocast runs in that dtype (linear, matmul), so it
    would cast them to exactly these values; a graph captured on the copies reads them instead of casting every
    weight on every replay (with fp32 weights at d20 on an H100 the casts were a third of a decode step). Costs
    the copies' memory (half the fp32 weights' for bf16).
    """
    saved = {m: m._parameters["weight"] for m in copies}
    try:
        for m, w in copies.items():
            m._parameters["weight"] = w
        yield
    finally:
        for m, w in saved.items():
            m._parameters["weight"] = w


def replay(ws, key, fn, states, cast, linears):
    """
    Run the segment fn() (device tensors only, shapes fixed by `key`) as ws.graphs[key], capturing it first if
    new: a warm-up on a side stream (kernel choice, Triton builds, torch.compile), `states` (the tensors fn
    steps in place: Mamba states, the residual) restored, then the capture. cast: autocast's dtype or None;
    under autocast the capture runs with autocast's cache off and reads copies of `linears`' weights in that
    dtype (cast_weights). Returns a copy of fn's output (the next replay overwrites it), or None.
    With HOST_ONLY (scripts.bench host): fn() runs once for a new key, and its output is handed out ever after.
    """
    if key not in ws.graphs:
        if not ws.graphs:
            ws.weights_version = weights_version(linears)
        ws.graphs[key] = (None, fn()) if HOST_ONLY else capture(ws, fn, states, cast, linears)
    graph, out = ws.graphs[key]
    if graph is not None:
        graph.replay()
    return None if out is None else out.clone()


def capture(ws, fn, states, cast, linears):
    """(CUDAGraph, output) of fn captured on ws's memory pool after a warm-up on a side stream (replay())."""
    ac = torch.autocast("cuda", dtype=cast, cache_enabled=False) if cast else nullcontext()
    if cast and cast not in ws.weight_copies:  # made here, on the current stream, before the side stream's warm-up
        ws.weight_copies[cast] = {m: m.weight.detach().to(cast) for m in linears if m.weight.dtype != cast}
    weights = (lambda: cast_weights(ws.weight_copies[cast])) if cast else nullcontext
    saved = [t.clone() for t in states]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), ac, weights():
        fn()
    torch.cuda.current_stream().wait_stream(side)
    for t, t0 in zip(states, saved):
        t.copy_(t0)  # the warm-up stepped them; its cache writes repeat at the same places
    if ws.graph_pool is None:  # one memory pool for all of the workspace's graphs: they replay one at a time
        ws.graph_pool = torch.cuda.graph_pool_handle()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=ws.graph_pool), ac, weights():
        out = fn()
    return graph, out

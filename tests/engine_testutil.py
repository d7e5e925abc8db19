"""The tiny models and checks the engine tests share (tests/test_engine.py, tests/test_engine_static.py, the decode
kernels' interpreter and path tests)."""
import importlib.util
import os
import subprocess
import sys

import torch

from nanochat.hybrid_gpt import HybridGPT, HybridConfig

from testutil import fill_zero_matrices

HAS_MAMBA = importlib.util.find_spec("nanochat.mamba_block") is not None
HAS_MOE = importlib.util.find_spec("nanochat.moe") is not None
V = 96
ATOL = 1e-4


def tiny_config(**kw):
    base = dict(sequence_len=32, vocab_size=V, n_layer=4, n_head=4, n_kv_head=2, n_embd=64, layer_pattern="A",
                ffn_pattern="D", d_state=8, d_conv=4, expand=2, mamba_headdim=16, num_experts=4, expert_dim=64,
                capacity_factor=4.0, width_levels=[16, 32, 48, 64], gate_hidden=16, predictor_hidden=16)
    base.update(kw)
    return HybridConfig(**base)


def build(seed=0, **kw):
    """A tiny model whose residual writers are non-zero and whose gates give varied decisions
    (random gate weights, each gate's bias centring its logits on random text)."""
    torch.manual_seed(seed)
    model = HybridGPT(tiny_config(**kw))
    model.init_weights()
    g = torch.Generator().manual_seed(seed)
    fill_zero_matrices(model, 0.3, g)
    with torch.no_grad():
        gate = model.controllers.gate
        for p, std in ((gate.fc.weight, 0.15), (gate.gate_embed, 0.3), (gate.out.weight, 1.0)):
            p.copy_(torch.randn(p.shape, generator=g) * std)
        model.eval()
        out = model(torch.randint(0, model.config.vocab_size, (4, 16), generator=g), return_exits=True)
        for i in range(gate.n_gates):
            gate.out_bias[i] -= gate.logits(out.exit_hidden[i], i).median()
    return model


def check_against_forward(model, res, atol=ATOL):
    """Every step's logits equal the per-token-width forward given the same decisions."""
    dev = model.get_device()
    idx, widths, exit_after = (t.to(dev) for t in res.reference_inputs())
    with torch.no_grad():
        ref = model(idx, width=widths, exit_after=exit_after)
    Tp = len(res.prompts[0])
    for k, s in enumerate(res.steps):
        torch.testing.assert_close(s.logits, ref[:, Tp - 1 + k], rtol=0, atol=atol)


def decode_steps(eng, prompt, n, **kw):
    st, logits, _, _ = eng.prefill(prompt, max_len=16, **kw)
    out = [logits]
    for _ in range(n):
        out.append(eng.step(st, out[-1].argmax(-1))[0])
    return st, out


def kernel_path_comparer(module, entry):
    """For the decode kernels' interpreter tests (tests/test_decode_attention.py, tests/test_decode_matvec.py):
    (compare, out). compare(model, **generate_kwargs) runs Engine(model, decode="static").generate_batch once with
    module.PATH 'torch' and once with 'triton', and appends [kwargs, same tokens, max logit difference, calls of
    module.<entry> (the kernel's entry, counted) in the 'triton' run] to out."""
    from nanochat.engine import Engine
    calls, fn = [0], getattr(module, entry)

    def counted(*a, **kw):
        calls[0] += 1
        return fn(*a, **kw)

    setattr(module, entry, counted)
    out = []

    def compare(model, **kw):
        res = {}
        for path in ("torch", "triton"):
            module.PATH, n0 = path, calls[0]
            res[path] = Engine(model, decode="static").generate_batch(**kw)
        a, b = res["torch"], res["triton"]
        diff = max((x.logits - y.logits).abs().max().item() for x, y in zip(a.steps, b.steps))
        out.append([str(kw), a.tokens == b.tokens, diff, calls[0] - n0])

    return compare, out


def check_path_from_env(module, var, bad):
    """A decode kernel module (nanochat.<module>) imported with var=triton reports PATH 'triton'; with var=bad the
    import stops with the one-line error naming the variable and the choices."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = f"from nanochat import {module} as m; print(m.PATH)"
    for value, ok in (("triton", True), (bad, False)):
        r = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, **{var: value}),
                           capture_output=True, text=True, cwd=root)
        if ok:
            assert r.returncode == 0 and r.stdout.strip() == value, r.stderr[-500:]
        else:
            assert r.returncode != 0 and f"{var}={bad!r}: use one of torch, triton" in r.stderr

"""
The custom-op plumbing of nanochat/mamba_ops.py on CPU: the kernels are replaced by the PyTorch scans (the
same calling conventions and output shapes), so what is checked here is ours: the op schemas, the fake
implementations (torch.library.opcheck), the autograd formulas, the Mamba-1 composition against the mixer's
PyTorch path, and that torch.compile traces it all into one graph (fullgraph=True). The real kernels are
checked the same way on a GPU in tests/test_gpu_kernels.py. Also the layout the PyTorch path's conv over several
decode positions hands the matrix products (test_conv_steps_give_rows_the_projection_reads).
"""
import math
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
import torch.nn.functional as F

from nanochat import mamba_block as mb, mamba_ops
from nanochat.mamba_block import Mamba
from nanochat.mamba2_block import Mamba2
from nanochat.mamba_scan import selective_scan, ssd_chunk_scan


def _conv_ref(x, weight, bias, silu):
    W = weight.shape[1]
    out = F.conv1d(F.pad(x, (W - 1, 0)), weight[:, None, :], bias, groups=weight.shape[0])
    return F.silu(out) if silu else out


def _grads(fn, inputs, dout):
    """Gradients of fn by autograd. A custom op's implementation runs with autograd dispatch excluded for
    its thread, so the stand-in backwards compute in a fresh thread, where autograd records as usual."""
    def work():
        xs = [t.detach().requires_grad_(t.is_floating_point()) if t is not None else None for t in inputs]
        with torch.enable_grad():
            out = fn(*xs)
            diff = [t for t in xs if t is not None and t.requires_grad]
            got = iter(torch.autograd.grad(out, diff, dout, allow_unused=True))
        return [next(got) if t is not None and t.requires_grad else None for t in xs]
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(work).result()


class StandIns:
    """PyTorch versions of the kernel entry points, with the kernels' signatures and output shapes."""
    loaded = True

    def load(self):
        return self

    @staticmethod
    def conv_fwd(x, weight, bias, seq_idx, initial_states, final_states_out, silu):
        assert seq_idx is None and initial_states is None and final_states_out is None
        return _conv_ref(x, weight, bias, silu)

    @staticmethod
    def conv_bwd(x, weight, bias, dout, seq_idx, initial_states, dfinal_states, dx, return_dinitial, silu):
        dx, dw, db = _grads(lambda a, b, c: _conv_ref(a, b, c, silu), [x, weight, bias], dout)
        return dx, dw, db, None

    @staticmethod
    def _scan(u, delta, A, B, C, D, z, delta_bias):
        return selective_scan(u, delta, A, B[:, 0], C[:, 0], D, z, delta_bias, delta_softplus=True)

    @classmethod
    def scan_fwd(cls, u, delta, A, B, C, D, z, delta_bias, softplus):
        assert softplus
        x = torch.zeros(u.shape[0], u.shape[1], math.ceil(u.shape[2] / 2048), 2 * A.shape[1])
        return cls._scan(u, delta, A, B, C, D, None, delta_bias), x, cls._scan(u, delta, A, B, C, D, z, delta_bias)

    @classmethod
    def scan_bwd(cls, u, delta, A, B, C, D, z, delta_bias, dout, x, out, dz, softplus, recompute):
        du, dd, dA, dB, dC, dD, dz, dbias = _grads(cls._scan, [u, delta, A, B, C, D, z, delta_bias], dout)
        return du, dd, dA, dB, dC, dD, dbias, dz

    @staticmethod
    def ssd_fwd(x, dt, A, B, C, chunk_size, D=None, seq_idx=None):
        return (ssd_chunk_scan(x, dt, A, B, C, chunk_size, D=D, seq_idx=seq_idx),)

    @staticmethod
    def ssd_bwd(dout, x, dt, A, B, C, out, chunk_size, D=None, seq_idx=None):
        fn = lambda x, dt, A, B, C, D: ssd_chunk_scan(x, dt, A, B, C, chunk_size, D=D, seq_idx=seq_idx)  # noqa: E731
        return (*_grads(fn, [x, dt, A, B, C, D], dout), None, None, None)


@pytest.fixture
def stand_ins(monkeypatch):
    monkeypatch.setattr(mamba_ops, "KERNELS", StandIns())


def _scan_inputs(batch=2, dim=6, L=9, N=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    A = -torch.rand(dim, N, generator=g) - 0.5
    return [r(batch, dim, L), r(batch, dim, L) * 0.5, A, r(batch, 1, N, L), r(batch, 1, N, L), r(dim), r(batch, dim, L),
            r(dim) * 0.1]


def test_opcheck_every_op(stand_ins):
    """Schemas, fake implementations against the real ones, and the autograd registrations."""
    x, w, b = torch.randn(2, 5, 7), torch.randn(5, 4), torch.randn(5)
    torch.library.opcheck(mamba_ops.conv1d_fwd, (x.requires_grad_(), w.requires_grad_(), b.requires_grad_(), None, True))
    torch.library.opcheck(mamba_ops.conv1d_bwd, (x.detach(), w.detach(), b.detach(), None, torch.randn(2, 5, 7), True))
    scan = [t.requires_grad_() for t in _scan_inputs()]
    torch.library.opcheck(mamba_ops.selective_scan_fwd, tuple(scan))
    out, xs, _ = mamba_ops.selective_scan_fwd(*[t.detach() for t in scan])
    torch.library.opcheck(mamba_ops.selective_scan_bwd, (*[t.detach() for t in scan], torch.randn(2, 6, 9), xs, out))
    ssd = [torch.randn(2, 10, 4, 3), torch.rand(2, 10, 4), -torch.rand(4) - 0.5, torch.randn(2, 10, 2, 5),
           torch.randn(2, 10, 2, 5), torch.randn(4)]
    torch.library.opcheck(mamba_ops.ssd_fwd, (*[t.requires_grad_() for t in ssd], None, 4))
    y = mamba_ops.ssd_fwd(*[t.detach() for t in ssd], None, 4)
    torch.library.opcheck(mamba_ops.ssd_bwd, (torch.randn_like(y), *[t.detach() for t in ssd], y, None, 4))


def _mixer_layout(batch, dim, L, seed=0):
    """Two (batch, dim, L) halves of xz as the mixer makes it, W @ h^T viewed as (B, 2D, L): strides (L, B*L, 1)."""
    xz = torch.randn(2 * dim, batch, L, generator=torch.Generator().manual_seed(seed)).transpose(0, 1)
    return xz.chunk(2, dim=1)


def test_outputs_keep_the_mixer_layout_of_their_inputs(stand_ins):
    """The mixer's x, z and delta are transposed views. An op's output shaped like one of its inputs has that
    input's layout (what the kernels allocate), in the real op and in its fake (opcheck), so compiled training
    makes no copy of a (B, D, L) tensor around the ops. The helper is the identity on that layout."""
    x, z = _mixer_layout(2, 6, 9)
    assert not x.is_contiguous() and x.stride() == (9, 18, 1)
    w, b = torch.randn(6, 4), torch.randn(6)
    assert mamba_ops.conv1d_fwd(x, w, b, None, True).stride() == x.stride()
    assert mamba_ops.conv1d_bwd(x, w, b, None, z, True)[0].stride() == x.stride()
    torch.library.opcheck(mamba_ops.conv1d_fwd, (x.clone().requires_grad_(), w.requires_grad_(), b.requires_grad_(), None, True))
    _, _, A, B, C, D, _, delta_bias = _scan_inputs()
    delta = _mixer_layout(2, 6, 9, seed=1)[0] * 0.5
    args = (x, delta, A, B, C, D, z, delta_bias)
    out, xs, out_z = mamba_ops.selective_scan_fwd(*args)
    assert out.stride() == delta.stride() and out_z.stride() == z.stride()
    grads = mamba_ops.selective_scan_bwd(*args, torch.randn(2, 6, 9), xs, out)
    for g, t in zip(grads, (x, delta, A, B, C, D, delta_bias, z)):
        assert g.shape == t.shape and g.stride() == t.stride()
    torch.library.opcheck(mamba_ops.selective_scan_fwd, tuple(t.clone().requires_grad_() for t in args))
    torch.library.opcheck(mamba_ops.selective_scan_bwd, (*args, torch.randn(2, 6, 9), xs, out))
    t = torch.empty_like(x)
    assert mamba_ops._in_layout_of(t, x) is t
    assert mamba_ops._in_layout_of(x.contiguous(), x).stride() == x.stride()


def test_scan_op_gradients_are_the_kernels(stand_ins):
    """The op's backward returns the kernel backward's gradients in the inputs' order."""
    inputs = _scan_inputs()
    dout = torch.randn(2, 6, 9)
    want = _grads(StandIns._scan, inputs, dout)
    got = _grads(mamba_ops.selective_scan, inputs, dout)
    for name, g, w in zip("u delta A B C D z delta_bias".split(), got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=0, msg=name)


def test_mamba1_kernel_path_through_the_ops_equals_the_pytorch_path_and_compiles_to_one_graph(stand_ins, monkeypatch):
    """The Mamba-1 kernel path as a compiled call runs it (conv and scan as ops, no cache) is the mixer's function:
    outputs and every parameter gradient against the PyTorch path (fp32, 1e-5), eager and under
    torch.compile(fullgraph=True). The ops path is forced (here is no CUDA), and causal-conv1d's own function
    must not be called."""
    def not_this(*args, **kwargs):
        raise AssertionError("the ops path called causal_conv1d_fn")
    monkeypatch.setattr(mb, "causal_conv1d_fn", not_this)
    monkeypatch.setattr(mb.MambaMixer, "_kernel_ops", staticmethod(lambda conv_state: conv_state is None))
    torch.manual_seed(0)
    mixer = Mamba(16, d_state=4, d_conv=4, expand=2)
    mixer.path = "torch"
    h = torch.randn(2, 11, 16)

    def run(fn):
        mixer.zero_grad()
        hh = h.clone().requires_grad_()
        out = fn(hh)
        out.square().sum().backward()
        return [out.detach(), hh.grad] + [p.grad.clone() for p in mixer.parameters()]

    want = run(mixer)
    names = ["out", "dh"] + [n for n, _ in mixer.named_parameters()]

    def kernel_path(x):
        return mixer._mix_kernels(x, None, None, None)

    for how, fn in (("eager", kernel_path),
                    ("compiled", torch.compile(kernel_path, fullgraph=True, backend="aot_eager"))):
        for name, g, w in zip(names, run(fn), want):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5, msg=f"{how}: {name}")


def test_conv_and_ssd_ops_compile_to_one_graph(stand_ins):
    """The Mamba-2 pieces (conv over xBC, then SSD) traced with fullgraph=True equal eager, outputs and grads."""
    torch.manual_seed(0)
    xBC, w, b = torch.randn(2, 12, 8), torch.randn(8, 4), torch.randn(8)
    dt, A, D = torch.rand(2, 12, 2), -torch.rand(2) - 0.5, torch.randn(2)

    def f(xBC, w, b, dt, A, D):
        u = mamba_ops.causal_conv1d(xBC.transpose(1, 2), w, b).transpose(1, 2)  # (B, L, 8)
        x, B, C = u.split([4, 2, 2], dim=-1)
        return mamba_ops.ssd_scan(x.unflatten(-1, (2, 2)), dt, A, B[:, :, None], C[:, :, None], D, chunk_size=5)

    inputs = [xBC, w, b, dt, A, D]
    dout = torch.randn(2, 12, 2, 2)
    want = _grads(f, inputs, dout)
    got = _grads(torch.compile(f, fullgraph=True, backend="aot_eager"), inputs, dout)
    for g, wnt in zip(got, want):
        torch.testing.assert_close(g, wnt, rtol=1e-6, atol=1e-6)
    x, B, C = _conv_ref(xBC.transpose(1, 2), w, b, True).transpose(1, 2).split([4, 2, 2], dim=-1)
    ref = ssd_chunk_scan(x.unflatten(-1, (2, 2)), dt, A, B[:, :, None], C[:, :, None], 5, D=D)
    torch.testing.assert_close(f(*inputs), ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("make", [lambda: Mamba(32, d_state=4, dtype=torch.float64),
                                  lambda: Mamba2(32, d_state=8, headdim=8, chunk_size=4, dtype=torch.float64)],
                         ids=["Mamba", "Mamba2"])
def test_conv_steps_give_rows_the_projection_reads(make):
    """_conv_steps (the PyTorch path of a verify pass's T positions): its output (B, T, C) is contiguous, because
    Mamba-1's x_proj reads it as T rows (a stride-T operand, the likely cause of an unaligned cuBLAS kernel, 87 us a
    call in a d20 verify pass on the H100); each position equals one _conv_step (1e-6), each window the state after
    it."""
    torch.manual_seed(0)
    m = make()
    C = m.conv1d.weight.size(0)
    x, conv_state = torch.randn(2, 5, C, dtype=torch.float64), torch.randn(2, C, m.d_conv, dtype=torch.float64)
    out, windows = m._conv_steps(x, conv_state)
    assert out.shape == (2, 5, C) and out.is_contiguous() and windows.shape == (2, C, 5, m.d_conv)
    for t in range(5):
        ref = m._conv_step(x[:, t], conv_state, use_kernels=False)
        torch.testing.assert_close(out[:, t], ref, rtol=1e-6, atol=1e-6)
        assert torch.equal(windows[:, :, t], conv_state)

"""
One Mamba-1 decode position between its projections (Mamba._recur's PyTorch path: the depthwise conv and the shift
of its state, x_proj, dt_proj, the softplus, the selective state update, D and the SiLU gate) as two Triton kernels,
beside that path, their reference. Opt-in (PATH below); not yet timed on a GPU.

Why: session 33's profile of tuned think at d20 (docs/benchmarks.md) gives this part of every Mamba-1 block five
kernels under inductor (the conv 1.2 us, x_proj 2.8, dt_proj 2.5, the state update 4.5, the conv state's shift
2.3: 13.3 us a block, 0.27 ms of a 1.95 ms step over twenty blocks), each at the latency floor of a kernel, for
about 1.1 MB of weights and states. Two kernels should take about half of that.

Kernel 1, a program per (row, BLOCK_D channels): the channels' conv windows shifted by the new input, written back
in place (the program owns those windows whole), the conv and its SiLU, and the channels' share of x_proj, written
as partial sums. Kernel 2, the same grid: x_proj's partial sums added (each program adds all of them: dt's
low-rank input, B and C are R + 2N numbers), its channels' dt through dt_proj, the softplus, the state update in
place, the readout with C, D and the gate.

Numerics: the reference's. Products and sums in fp32; the values the reference rounds to the activations' dtype are
rounded there (the conv's output, x_proj's and dt_proj's); the states are read and written in their own dtype. Only
the order of the additions differs (x_proj and dt_proj in the kernel's order, not cuBLAS's or inductor's):
tests/test_decode_mamba.py compares the two in Triton's interpreter on the CPU and compiles both kernels for sm_90.

PATH: "torch" (the default: _recur's PyTorch ops, fused by inductor in compiled steps) or "triton" (the kernels on
CUDA where Triton imports, for calls usable() accepts: bf16 or fp32 weights and activations of one dtype, no
autocast that would change it, no gradient). Set by the environment variable ADAMBA_DECODE_MAMBA (read on import)
or set_path() (bench decode's --mamba-step-path), before an Engine compiles or captures a step.
"""
import torch

from nanochat.common import autocast_keeps, get_logger, kernel_path_from_env, load_triton, log_once, set_kernel_path

logger = get_logger(__name__)

PATHS = ("torch", "triton")
PATH = kernel_path_from_env("ADAMBA_DECODE_MAMBA", PATHS)
BLOCK_D = 64      # channels a program takes (both kernels)
MAX_CONV = 8      # the widest conv window the kernels take (mamba-ssm's d_conv is 4)
ON_CPU = False    # tests only: take CPU tensors too (Triton's interpreter, TRITON_INTERPRET=1, runs the kernels there)
_kernels = None
_op = None


def build():
    """The two Triton kernels and the torch.library op around them; None where Triton does not import."""
    global _kernels, _op
    if _op is not None or not load_triton():
        return _op
    triton, _ = load_triton()
    from nanochat.decode_mamba_kernels import conv_kernel, state_kernel
    _kernels = (conv_kernel, state_kernel)

    @torch.library.triton_op("adamba::mamba1_decode_step", mutates_args=("conv_state", "ssm_state"))
    def mamba1_decode_step(xz: torch.Tensor, conv_state: torch.Tensor, ssm_state: torch.Tensor,
                           conv_weight: torch.Tensor, conv_bias: torch.Tensor, has_bias: bool,
                           x_proj_weight: torch.Tensor, dt_proj_weight: torch.Tensor, dt_proj_bias: torch.Tensor,
                           A_log: torch.Tensor, D: torch.Tensor, block: int) -> torch.Tensor:
        B, Dn = xz.size(0), xz.size(1) // 2
        W, R2, R, N = conv_weight.size(1), x_proj_weight.size(0), dt_proj_weight.size(1), A_log.size(1)
        NB = triton.cdiv(Dn, block)
        RP = triton.next_power_of_2(R2)
        xc = torch.empty(B, Dn, device=xz.device, dtype=xz.dtype)
        part = torch.empty(B, NB, RP, device=xz.device, dtype=torch.float32)
        y = torch.empty(B, Dn, device=xz.device, dtype=xz.dtype)
        act_bf16, st_bf16 = xz.dtype == torch.bfloat16, conv_state.dtype == torch.bfloat16
        torch.library.wrap_triton(conv_kernel)[(B, NB)](
            xz, conv_state, conv_weight, conv_bias, x_proj_weight, xc, part, xz.stride(0), *conv_state.stride(),
            Dn, R2, HAS_BIAS=has_bias, W=W, WP=triton.next_power_of_2(W), BLOCK=block, RP=RP, ACT_BF16=act_bf16,
            ST_BF16=st_bf16, num_warps=4)
        torch.library.wrap_triton(state_kernel)[(B, NB)](
            xz, xc, part, dt_proj_weight, dt_proj_bias, A_log, D, ssm_state, y, xz.stride(0), *ssm_state.stride(),
            Dn, R, N, NB, BLOCK=block, RP=RP, RRP=triton.next_power_of_2(R), NP=triton.next_power_of_2(N),
            NBP=triton.next_power_of_2(NB), ACT_BF16=act_bf16, ST_BF16=ssm_state.dtype == torch.bfloat16, num_warps=4)
        return y

    _op = mamba1_decode_step
    return _op


def usable(mixer, xz, conv_state, ssm_state):
    """Whether Mamba._recur runs the kernels: PATH 'triton', the op built (set_path, or on import with
    ADAMBA_DECODE_MAMBA=triton where CUDA is available), a CUDA tensor, no gradient wanted (no backward), xz (B,
    2 d_inner) and the conv, x_proj and dt_proj weights in one dtype (bf16 or fp32) that autocast (if on) keeps,
    states in bf16 or fp32, contiguous weights, a conv window of at most MAX_CONV. Reads module globals: torch.compile traces it."""
    if PATH != "triton" or _op is None or not (xz.is_cuda or ON_CPU) or xz.dim() != 2:
        return False
    weights = (mixer.conv1d.weight, mixer.x_proj.weight, mixer.dt_proj.weight)
    if torch.is_grad_enabled() and (xz.requires_grad or any(p.requires_grad for p in mixer.parameters())):
        return False
    if xz.dtype not in (torch.bfloat16, torch.float32) or any(w.dtype != xz.dtype for w in weights):
        return False
    if any(s.dtype not in (torch.bfloat16, torch.float32) for s in (conv_state, ssm_state)):
        return False
    if not autocast_keeps(xz):
        return False
    return (all(w.is_contiguous() for w in weights) and mixer.A_log.is_contiguous() and mixer.x_proj.bias is None
            and mixer.d_conv <= MAX_CONV and xz.stride(1) == 1)


def step(mixer, xz, conv_state, ssm_state, block=None):
    """Mamba._recur's function for one position through the kernels (usable() says when): xz (B, 2 d_inner) of
    in_proj -> y (B, d_inner) for out_proj; conv_state (B, d_inner, d_conv) and ssm_state (B, d_inner, d_state)
    updated in place. block: channels a program takes (a power of two; default BLOCK_D)."""
    block = block or BLOCK_D
    if block < 16 or block & (block - 1):
        raise ValueError(f"block {block}: a power of two of at least 16")
    Dn = mixer.d_inner
    if xz.shape[1] != 2 * Dn or conv_state.shape != (xz.size(0), Dn, mixer.d_conv) or \
            ssm_state.shape != (xz.size(0), Dn, mixer.d_state):
        raise ValueError(f"decode_mamba.step: xz {tuple(xz.shape)}, conv_state {tuple(conv_state.shape)} and "
                         f"ssm_state {tuple(ssm_state.shape)} do not fit a mixer of d_inner {Dn}")
    cw = mixer.conv1d.weight.squeeze(1)
    has_bias = mixer.conv1d.bias is not None
    with torch.autocast(device_type=xz.device.type, enabled=False):
        return _op(xz, conv_state, ssm_state, cw, mixer.conv1d.bias if has_bias else cw, has_bias,
                   mixer.x_proj.weight, mixer.dt_proj.weight, mixer.dt_proj.bias, mixer.A_log, mixer.D, block)


def set_path(path):
    """PATH = path, validated; 'triton' builds the op, and stops with one line on a CUDA machine where Triton does
    not import (bench decode --mamba-step-path). Call it before an Engine compiles or captures a step."""
    global PATH
    PATH = set_kernel_path("decode mamba", path, PATHS, build)


if PATH == "triton" and torch.cuda.is_available() and build() is None:  # ADAMBA_DECODE_MAMBA=triton
    log_once(logger, "ADAMBA_DECODE_MAMBA=triton, but Triton does not import: Mamba-1 decode steps run PyTorch's ops",
             level=30)

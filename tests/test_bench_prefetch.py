"""scripts/bench_prefetch.py (an experiment on CUDA, sm_90): its flags, its groups of the d20 step's matrices, and
its prefetch kernels compiled for an H100 without a GPU."""
import pytest

from scripts import bench


def test_prefetch_groups_and_bad_input():
    """bench prefetch (an experiment on CUDA): its flags validate with one line, on a CPU it stops with one line, and its
    groups are the d20 hybrid's mixers and MLPs in the model's order, then the readout: the matrices bench matvec
    counts but the controllers' (think does not run them)."""
    from scripts.bench_matvec import weight_shapes
    from scripts.bench_prefetch import weight_groups
    for argv, msg in ((["--ahead", "-1"], "--ahead -1: each >= 0"), (["--small", "x"], "comma-separated integers"),
                      (["--how", "bulk,all"], "from bulk, line"), (["--stream", ""], "from main, side"),
                      ([], "run it on a GPU")):
        with pytest.raises(SystemExit, match=msg):
            bench.main(["--device", "cpu", "prefetch", *argv])
    args = bench.get_args(["prefetch"])
    groups = weight_groups(args)
    assert len(groups) == 2 * 40 + 1 and groups[-1] == ("lm_head", [(65536, 1280)]), groups[-1]
    assert [n.rsplit(".", 1)[-1] for n, _ in groups[:4]] == ["attn", "mlp", "mamba", "mlp"], groups[:4]
    counted = {}
    for _, shapes in groups:
        for s in shapes:
            counted[s] = counted.get(s, 0) + 1
    matvec = weight_shapes(args)
    assert matvec.pop((64, 1280)) == 2 and counted == matvec  # bench matvec also times the gate's and predictor's


def test_prefetch_kernels_compile_for_sm90():
    """The prefetch instructions are sm_90 PTX the interpreter cannot run: Triton compiles both kernels to a cubin
    for an H100 (no GPU needed), and the PTX holds the instruction each issues."""
    pytest.importorskip("triton")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from scripts.bench_prefetch import build_prefetch
    for how, (kernel, sub, lanes, warps) in build_prefetch().items():
        sig = {"Table": "*i64", "Sink": "*i32", "SUB": "constexpr", "LANES": "constexpr"}
        src = ASTSource(kernel, signature=sig, constexprs={"SUB": sub, "LANES": lanes})
        compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})
        ptx = compiled.asm["ptx"]
        assert compiled.asm["cubin"] and ("cp.async.bulk.prefetch.L2.global" in ptx) == (how == "bulk"), how
        assert ("prefetch.global.L2::evict_last" in ptx) == (how == "line"), how

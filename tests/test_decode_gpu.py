"""runs/decode_gpu.sh --dry-run: every stage's commands, checked against scripts.bench's own argument parser and the
test files they name, so the GPU runbook keeps up with the flags; bad stages and settings stop with one line."""
import os
import shlex
import subprocess

from scripts import bench

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def dry(stage, **env):
    r = subprocess.run(["bash", "runs/decode_gpu.sh", stage, "--dry-run"], cwd=ROOT, capture_output=True, text=True,
                       env=dict(os.environ, **env), timeout=60)
    cmds = [shlex.split(line[2:]) for line in r.stdout.splitlines() if line.startswith("+ ")]
    return r, cmds


def strip_env(cmd):
    env = {}
    if cmd[0] == "env":
        cmd = cmd[1:]
        while "=" in cmd[0]:
            k, v = cmd.pop(0).split("=", 1)
            env[k] = v
    return env, cmd


def test_every_stage_parses():
    seen = {}
    for stage, env in (("check", {}), ("compiled", {}), ("matvec", {}), ("think", {}), ("speculate", {}),
                       ("speculate", {"ATTN": "triton", "MATVEC": "triton"}), ("head", {}), ("mamba", {}), ("prefetch", {}),
                       ("tiny", {"CKPT": "/ckpt", "DATA": "/data"})):
        r, cmds = dry(stage, **env)
        assert r.returncode == 0 and cmds, (stage, r.stderr)
        for cmd in cmds:
            var, cmd = strip_env(cmd)
            assert cmd[:2] == ["python", "-m"], cmd
            if cmd[2] == "pytest":
                assert var == ({} if stage in ("compiled", "mamba") else
                               {"ADAMBA_DECODE_ATTENTION": "triton", "ADAMBA_DECODE_MATVEC": "triton"})
                files = [a for a in cmd if a.startswith("tests/")]
                assert files and all(os.path.exists(os.path.join(ROOT, f)) for f in files)
                seen.setdefault(stage, []).append(cmd[cmd.index("-k") + 1])
                continue
            assert cmd[2] == "scripts.bench"
            args = bench.get_args(cmd[3:])
            seen.setdefault(stage, []).append((args, var))
    think = [(a.attention_path, a.matvec_path) for a, _ in seen["think"]]
    assert think == [("reduce", "torch"), ("torch", "torch"), ("triton", "torch")]
    assert all(a.engine_decode == "tuned" and a.profile for a, _ in seen["think"])
    spec = [(a, v) for a, v in seen["speculate"] if a.cmd == "decode"]
    assert [(a.attention_path, a.matvec_path) for a, _ in spec] == [("reduce", "torch"), ("triton", "triton")]
    assert all(a.speculate == 4 for a, _ in spec)
    host = [a for a, _ in seen["speculate"] if a.cmd == "host"]  # after each: the d20 hybrid's host time
    assert len(host) == 2 and all(a.checkpoint is None and a.depth == 20 and a.n_embd == 1280 and a.draft == "exit:10"
                                  for a in host)
    # the compiled stage: the CUDA speculation test's compiled cases, exit drafts first; the names match test ids
    case = "test_graph_speculation_equals_eager_on_cuda and compiled and"
    assert seen["compiled"] == [f"{case} exit", f"{case} plan"]
    head = seen["head"]  # the readout through cuBLAS against inductor's fused one, then speculation with it
    assert [(a.head_path, a.speculate) for a, _ in head] == [("cublas", 0), ("torch", 0), ("cublas", 4)]
    assert all(a.engine_decode == "tuned" and a.contexts == "1024" for a, _ in head) and head[0][0].profile
    (mv, _), = seen["matvec"]
    assert mv.cmd == "matvec" and mv.sweep
    assert seen["mamba"][0] == "cuda"  # its CUDA tests, then tuned think with the kernels and without, profiled
    assert [a.mamba_step_path for a, _ in seen["mamba"][1:]] == ["triton", "torch"]
    assert all(a.engine_decode == "tuned" and a.profile and a.mamba == 1 for a, _ in seen["mamba"][1:])
    (pf, _), = seen["prefetch"]
    assert pf.cmd == "prefetch" and pf.depth == 20
    (tiny, var), (host, _) = seen["tiny"]  # then the same drafts' host time, the graphs taken out
    assert tiny.cmd == "adaptive" and tiny.checkpoint == "/ckpt" and tiny.draft == "exit:5;ghost"
    assert var == {"ADAMBA_DECODE_ATTENTION": "reduce", "ADAMBA_DECODE_MATVEC": "torch"}
    assert host.cmd == "host" and host.checkpoint == "/ckpt" and host.draft == "exit:5;plan:ghost" and host.speculate == 3


def test_bad_input_stops_with_one_line():
    for stage, env, msg in (("bogus", {}, "usage: bash runs/decode_gpu.sh"), ("think", {"ATTN": "flash"}, "ATTN=flash"),
                            ("speculate", {"MATVEC": "cublas"}, "MATVEC=cublas"),
                            ("tiny", {"CKPT": "", "DATA": "/d"}, "set CKPT")):
        r, cmds = dry(stage, **env)
        assert r.returncode != 0 and not cmds and msg in r.stderr, (stage, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1

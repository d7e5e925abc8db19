"""
CPU smoke of every scripts.bench subcommand at tiny sizes, so the script keeps working in CI: the last
stdout line is the JSON the function returns, every row has a number or a reason, and the numbers the
bench derives (FLOPs per step, cache bytes) agree with independent computations.
"""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from scripts import bench, bench_train, bench_decode, bench_adaptive
from testutil import write_hybrid_checkpoint, torchrun2

CPU = ["--device", "cpu", "--warmup", "1", "--iters", "1", "--compile-backend", "eager"]


def run(capsys, argv, pre=()):
    res = bench.main(CPU + list(pre) + argv)
    lines = capsys.readouterr().out.strip().splitlines()
    last = json.loads(lines[-1])  # machine-readable line last
    assert last["bench"] == argv[0] and last["env"]["torch"] == torch.__version__ and last["env"]["date"]
    assert json.loads(json.dumps(res, default=str)) == last
    return res, "\n".join(lines)


def test_mamba(capsys):
    res, out = run(capsys, ["mamba", "--batch", "2", "--seqlens", "16,32", "--d-model", "32", "--versions", "2", "--decode-batches", "1",
                            "--decode-iters", "2"])
    rows = res["rows"]
    assert len(rows) == 2 * 5  # lengths x (mamba-ssm, ours kernel eager and compiled, torch eager and compiled)
    for r in rows:
        assert ("ms" in r and r["ms"] > 0 and r["tok_per_s"] > 0) or r["error"].startswith("unavailable")
        if r["impl"].startswith("ours torch"):
            assert r["ms"] > 0
    assert [r["batch"] for r in rows] == [2] * 5 + [1] * 5  # longer lengths keep batch * length
    assert len(res["targets"]) == 2 * 2
    from nanochat.mamba_block import KERNEL_IMPORT_ERROR
    if KERNEL_IMPORT_ERROR is not None:  # nothing to compare against: the targets say so instead of passing
        assert all(t["pass"] is None for t in res["targets"])
        assert "n/a (not measured)" in out
    assert {r["impl"] for r in res["decode"] if "us" in r} >= {"ours torch"}


def test_moe(capsys):
    res, out = run(capsys, ["moe", "--tokens", "64", "--d-model", "16", "--expert-dim", "32", "--experts", "4", "--cuda-graph"],
                   pre=["--profile"])
    assert res["cuda_graph"] is False  # CUDA only: on a CPU the flag changes nothing
    # --profile: the compared pair, profiled once every row is timed (so after the table's rows in the log)
    assert set(res["profiles"]) == {"MoE grouped_mm", "dense ReLU^2 FFN"}
    assert out.index("profile: MoE grouped_mm") > out.index("experts only (equal groups)")
    by = {r["impl"]: r for r in res["rows"]}
    assert all(r["ms"] > 0 for r in by.values())
    for name in ("MoE grouped_mm", "MoE bmm (padded)"):
        assert by[name]["max_diff_vs_loop"] <= 1e-5  # fp32 on CPU: the dispatches compute the loop's function
    assert sum(res["tokens_per_expert"]) + res["dropped"] == 64  # top-1: every token kept once or dropped
    ratio = by["MoE per-expert loop"]["ms"] / by["MoE grouped_mm"]["ms"]
    assert res["targets"][0]["value"] == pytest.approx(ratio) and res["targets"][0]["pass"] == (ratio >= 3.0)
    # the floor row: expert GEMMs alone on equal groups, and what the router and dispatch add on top
    floor = by["experts only (equal groups)"]
    assert res["experts_over_dense"] == pytest.approx(floor["ms"] / by["dense ReLU^2 FFN"]["ms"])
    assert res["dispatch_ms"] == pytest.approx(by["MoE grouped_mm"]["ms"] - floor["ms"])
    # the same GEMMs on the router's group sizes, and what the 1.3x target leaves routing + dispatch beside them
    routed, dense, b = by["experts only (routed groups)"], by["dense ReLU^2 FFN"], res["routing_budget"]
    assert b["routing_budget_ms"] == pytest.approx(1.3 * dense["ms"] - routed["ms"])
    assert b["routing_ms"] == pytest.approx(by["MoE grouped_mm"]["ms"] - routed["ms"])
    assert b["permutation_mb"] == pytest.approx(8 * 64 * 16 * 4 / 1e6)  # 4 passes, read + write, fp32 rows
    assert "experts on the routed groups / dense" in out


@pytest.mark.slow  # torchrun, 2 processes
def test_moe_ep_under_torchrun():
    """moe-ep on 2 gloo ranks: both placements timed, the shard holds half the experts, rank 0 prints the JSON."""
    lines = torchrun2("scripts.bench", *CPU, "moe-ep", "--tokens", "128", "--d-model", "16", "--expert-dim", "32",
                      "--experts", "4").strip().splitlines()
    res = json.loads(lines[-1])
    assert res["bench"] == "moe-ep" and res["world_size"] == 2 and sum(line.startswith("{") for line in lines) == 1
    rep, ep = res["rows"]
    assert (rep["experts_per_rank"], ep["experts_per_rank"]) == (4, 2) and ep["expert_gib"] == rep["expert_gib"] / 2
    assert rep["ms"] > 0 and ep["ms"] > 0 and res["ep_over_replicated"] == pytest.approx(ep["ms"] / rep["ms"])
    fail = subprocess.run([sys.executable, "-m", "scripts.bench", *CPU, "moe-ep"], cwd=Path(__file__).resolve().parents[1],
                          capture_output=True, text=True, timeout=120)
    assert fail.returncode != 0 and "start it with torchrun" in fail.stderr


def test_moe_fp32_weights_under_autocast(capsys):
    """--weights fp32: fractal_train's precision (fp32 weights and inputs, bf16 autocast), here on a CPU."""
    res, out = run(capsys, ["moe", "--tokens", "64", "--d-model", "16", "--expert-dim", "32", "--experts", "4",
                            "--weights", "fp32", "--capacity-factor", "0.75"])
    assert res["dropped"] >= 64 - 4 * 12  # capacity 12 per expert: the routed-groups row runs on the kept rows only
    assert res["precision"] == "fp32 weights and inputs under bf16 autocast" and res["precision"] in out
    by = {r["impl"]: r for r in res["rows"]}
    assert all(r["ms"] > 0 for r in by.values())
    # bf16 matmuls: the dispatches agree with the loop (which squares in fp32 under autocast, where the MoE squares
    # its bf16 GEMM output) to bf16 rounding of outputs of size ~0.3, and not exactly, which they would in fp32
    for name in ("MoE grouped_mm", "MoE bmm (padded)"):
        assert 0 < by[name]["max_diff_vs_loop"] <= 2e-2


def test_bench_moe_compile(capsys):
    """moe --compile on a CPU (fp32, dynamo's eager backend to stay fast)."""
    res, out = run(capsys, ["moe", "--tokens", "64", "--d-model", "16", "--expert-dim", "32",
                            "--experts", "4", "--compile"])
    assert res["compile"] is True and res["compile_backend"] == "eager"
    assert "torch.compile (eager, fullgraph" in out
    by = {r["impl"]: r for r in res["rows"]}
    # fp32 grouped_mm cannot be compiled (its meta function wants bf16): the row says so instead of a number
    for name in ("MoE grouped_mm", "experts only (equal groups)", "experts only (routed groups)"):
        assert by[name]["error"].startswith("unavailable") and "bf16" in by[name]["error"]
    assert res["experts_over_dense"] is None and res["dispatch_ms"] is None and res["routing_budget"] is None
    for name in ("MoE bmm (padded)", "MoE per-expert loop", "dense ReLU^2 FFN"):
        assert by[name]["ms"] > 0
    assert by["MoE bmm (padded)"]["max_diff_vs_loop"] <= 1e-5
    assert sum(res["tokens_per_expert"]) + res["dropped"] == 64

def test_train(capsys):
    res, _ = run(capsys, ["train", "--depth", "2", "--seq-len", "16", "--batch", "2", "--vocab-size", "128",
                          "--models", "dense,hybrid", "--phases", "1,2", "--exit-strides", "1", "--compile", "none",
                          "--recipes", "sandwich"])
    rows = {(r["model"], r["phase"].replace(" sandwich", "")): r for r in res["rows"]}
    assert set(rows) == {("dense", "all"), ("hybrid", "1"), ("hybrid", "2")}
    for r in rows.values():
        assert r["ms"] > 0 and r["tok_per_s"] == pytest.approx(2 * 16 / r["ms"] * 1e3) and r["batch"] == 2
        assert r.get("mfu") is None  # no peak FLOP/s for a CPU
    # FLOPs per token from the models themselves: the dense GPT's estimate, the sum over the sandwich's plans
    from nanochat.gpt import GPT
    from nanochat.hybrid_gpt import HybridGPT
    (_, _, dcfg), (_, _, hcfg) = bench_train.train_models(bench.get_args(["train", "--depth", "2", "--seq-len", "16",
                                                                          "--vocab-size", "128", "--models", "dense,hybrid"]))
    with torch.device("meta"):
        dense, hyb = GPT(dcfg), HybridGPT(hcfg)
    assert rows[("dense", "all")]["flops_per_tok_G"] * 1e9 == pytest.approx(dense.estimate_flops())
    assert rows[("hybrid", "2")]["plans"] == "128+128"  # full and one random level (width 128 has one level)
    plans = [[128] * hcfg.n_layer] * 2
    assert rows[("hybrid", "2")]["flops_per_tok_G"] * 1e9 == pytest.approx(sum(hyb.estimate_flops(p) for p in plans))
    # phase 1 freezes attention blocks, embeddings and head: fewer trainable parameters, fewer executed FLOPs
    p1 = rows[("hybrid", "1")]
    assert p1["trainable_M"] < p1["params_M"] and p1["exec_flops_per_tok_G"] < p1["flops_per_tok_G"]
    # phase 2 reads out at every block: the executed count adds those readouts
    assert rows[("hybrid", "2")]["exec_flops_per_tok_G"] > rows[("hybrid", "2")]["flops_per_tok_G"]
    # kept readout chunks (--readout-checkpoint off) execute one readout forward less per exit: 2 x d x V x (exits - 1)
    kept, _ = run(capsys, ["train", "--depth", "2", "--seq-len", "16", "--batch", "2", "--vocab-size", "128",
                           "--models", "hybrid", "--phases", "2", "--exit-strides", "1", "--compile", "none",
                           "--recipes", "sandwich", "--readout-checkpoint", "off"])
    saved = (rows[("hybrid", "2")]["exec_flops_per_tok_G"] - kept["rows"][0]["exec_flops_per_tok_G"]) * 1e9
    assert saved == pytest.approx(2 * hcfg.n_embd * hcfg.vocab_size * (len(hcfg.exit_blocks()) - 1))
    # counted as model FLOPs (no recomputation) the sandwich's readouts (its full-width pass's) are 3x that
    for r in (rows[("hybrid", "2")], kept["rows"][0]):
        assert r["readout_flops_per_tok_G"] * 1e9 == pytest.approx(3 * saved)
    assert HybridGPT.READOUT_CHECKPOINT is False
    HybridGPT.READOUT_CHECKPOINT = True  # the class default, for the tests after this one


def test_train_grown_hybrid_is_the_speedruns_phase_3_model(capsys):
    """--models hybrid-grown: the surgery hybrid grown 1.5x wide by nanochat.surgery.grow (what phase 3 trains), with
    the grown width's level among its plans; an unknown model name stops with one line."""
    res, out = run(capsys, ["train", "--depth", "2", "--seq-len", "16", "--batch", "2", "--vocab-size", "128",
                            "--models", "hybrid,hybrid-grown", "--phases", "2", "--exit-strides", "1", "--compile",
                            "none", "--recipes", "cycle"])
    rows = {r["model"]: r for r in res["rows"]}
    # width 128 x 1.5 rounded to the head dim (128 here): 256
    assert rows["hybrid-grown"]["params_M"] > 1.5 * rows["hybrid"]["params_M"] and "hybrid-grown 256" in out
    assert rows["hybrid-grown"]["plans"].startswith("256+")  # full width first, then one narrow plan
    (_, _, hcfg), (_, _, gcfg) = bench_train.train_models(bench.get_args(
        ["train", "--depth", "2", "--vocab-size", "128", "--models", "hybrid,hybrid-grown"]))
    assert gcfg.n_embd == 256 and gcfg.grown_from == [128] and gcfg.n_layer == hcfg.n_layer
    with pytest.raises(ValueError, match="--models: 'grown' not among dense, hybrid, hybrid-eq, hybrid-grown"):
        bench.main(CPU + ["train", "--depth", "2", "--models", "grown"])


def test_train_layers_keeps_the_shapes_with_fewer_blocks(capsys):
    """--layers N: every hybrid (the grown one too) with N blocks of its own widths; the dense model is untouched;
    0 blocks stops with one line. The row carries the update's own time (clip + optimizers, timed apart)."""
    base = ["train", "--depth", "2", "--vocab-size", "128", "--models", "dense,hybrid,hybrid-eq,hybrid-grown"]
    full = {n: c for n, _, c in bench_train.train_models(bench.get_args(base))}
    cut = {n: c for n, _, c in bench_train.train_models(bench.get_args(base + ["--layers", "3"]))}
    assert full["hybrid"].n_layer == 4 and full["hybrid-eq"].n_layer == 2
    assert cut["dense"] == full["dense"]
    for name in ("hybrid", "hybrid-eq", "hybrid-grown"):
        assert cut[name].n_layer == 3 and cut[name].n_embd == full[name].n_embd
    assert cut["hybrid-grown"].n_embd == 256 and cut["hybrid-grown"].grown_from == [128]
    with pytest.raises(ValueError, match="--layers 0: give a positive number of blocks"):
        bench.main(CPU + base + ["--layers", "0"])
    res, out = run(capsys, ["train", "--depth", "2", "--seq-len", "16", "--batch", "2", "--vocab-size", "128",
                            "--models", "hybrid", "--layers", "2", "--phases", "1", "--compile", "none"])
    (r,) = res["rows"]
    assert r["update_ms"] > 0 and "every hybrid 2 blocks" in out and "update ms" in out
    assert r["warmup_s"] >= r["first_s"] > 0


def test_train_fake_world_runs_one_fsdp_rank(capsys, monkeypatch):
    """--fake-world N: the model is sharded as fractal_train --parallel=fsdp shards it over N ranks (this process
    holds 1/N of every block's rows) and the step runs with fractal_train's FSDP settings over torch's fake process
    group, which is torn down after; flags that need it or CUDA stop with one line."""
    import torch.distributed as dist
    from nanochat import train_utils
    shares = []

    def spy(model, *a, **kw):
        out = train_utils.apply_fsdp(model, *a, **kw)
        blocks = [p for n, p in model.named_parameters() if n.startswith("transformer.h.")]
        shares.append((sum(p.to_local().numel() for p in blocks) / sum(p.numel() for p in blocks),
                       kw["reshard_after_forward"], len(out)))
        return out
    monkeypatch.setattr(bench_train, "apply_fsdp", spy)
    res, out = run(capsys, ["train", "--depth", "2", "--seq-len", "16", "--batch", "2", "--vocab-size", "128",
                            "--models", "dense,hybrid", "--phases", "1,2", "--exit-strides", "1", "--recipes", "cycle",
                            "--grad-accum", "2", "--compile", "none", "--fake-world", "4", "--fsdp-keep-params"])
    assert [(r["model"], r["phase"]) for r in res["rows"]] == [("dense", "all"), ("hybrid", "1"), ("hybrid", "2 cycle")]
    assert all(r["ms"] > 0 and r["update_ms"] > 0 for r in res["rows"]), res["rows"]
    assert len(shares) == 3 and all(abs(s - 0.25) < 0.02 and keep is False for s, keep, _ in shares), shares
    assert shares[2][2] > 0  # phase 2's controllers stay replicated
    assert "one rank of a 4-rank FSDP2 run" in out and not dist.is_initialized()
    base = ["train", "--depth", "2", "--vocab-size", "128", "--models", "dense", "--compile", "none"]
    for extra, msg in [(["--fsdp-bf16"], "give --fake-world N too"), (["--fake-world", "1"], "N >= 2"),
                       (["--fake-world", "2", "--fsdp-bf16"], "runs on CUDA only")]:
        with pytest.raises(ValueError, match=msg):
            bench.main(CPU + base + extra)


def test_train_grad_accum_counts_every_micro_batch(capsys):
    res, out = run(capsys, ["train", "--depth", "2", "--seq-len", "16", "--batch", "2", "--vocab-size", "128",
                            "--models", "dense", "--grad-accum", "3", "--compile", "none"])
    (r,) = res["rows"]
    assert r["grad_accum"] == 3 and r["tok_per_s"] == pytest.approx(3 * 2 * 16 / r["ms"] * 1e3)
    assert "accum" in out


@pytest.mark.slow
def test_decode(capsys):
    res, _ = run(capsys, ["decode", "--depth", "4", "--seq-len", "16", "--vocab-size", "128", "--contexts", "24",
                          "--decode-tokens", "2", "--prefill-reps", "1", "--modes", "think,ghost,whisper,auto"])
    rows = res["rows"]
    assert {(r["model"], r["mode"]) for r in rows} == {("dense", "-"), ("hybrid", "think"), ("hybrid", "ghost"),
                                                       ("hybrid", "whisper"), ("hybrid", "auto"), ("hybrid-eq", "think")}
    for r in rows:
        assert "error" not in r, r
        assert r["prefill_ms"] > 0 and r["decode_ms"] > 0 and "generate_ms" in r
        # the formula equals the bytes of the tensors the engine (or GPT.new_kv_cache) allocated
        assert r["cache_counted_MiB"] == pytest.approx(r["cache_analytic_MiB"], rel=1e-12)
    by = {(r["model"], r["mode"], r["context"]): r for r in rows}
    assert by[("hybrid", "ghost", 24)]["compute_frac"] < by[("hybrid", "think", 24)]["compute_frac"]
    # width 256, two heads: ghost (128) stores one KV head of two, so the engine keeps the normalised input of
    # each of the 4 attention blocks: 4 x 34 positions x 256 x fp32 on top of think; whisper snaps to the
    # full width (the only level above 128), so it stores every head and keeps none
    think = by[("hybrid", "think", 24)]["cache_counted_MiB"]
    assert (by[("hybrid", "ghost", 24)]["cache_counted_MiB"] - think) * 2**20 == 4 * 34 * 256 * 4
    assert by[("hybrid", "whisper", 24)]["cache_counted_MiB"] == think
    assert by[("hybrid", "auto", 24)]["cache_counted_MiB"] == think  # auto writes every KV head: no stored inputs
    # same attention blocks as the dense model (pattern AM): its K/V alone already equals the dense cache
    assert by[("hybrid", "think", 24)]["cache_counted_MiB"] > by[("dense", "-", 24)]["cache_counted_MiB"]
    assert [t["pass"] for t in res["targets"]][0] is False


def test_decode_speculate(capsys, monkeypatch):
    """--speculate K: think, k = 1..K and the fallback row per context, with the modelled tok/s from the measured
    draft-step and verify times; the targets' arithmetic."""
    from scripts.bench_speculate import expected_tokens_per_round
    res, out = run(capsys, ["decode", "--depth", "2", "--seq-len", "16", "--vocab-size", "128", "--contexts", "24",
                            "--decode-tokens", "6", "--prefill-reps", "1", "--modes", "think", "--speculate", "2",
                            "--draft", "exit:0"])
    spec = res["speculative"]
    assert [(r["what"], r["k"]) for r in spec] == [("think", 0), ("speculate exit:0", 1), ("speculate exit:0", 2),
                                                   ("speculate exit:0, fallback", 2)]
    think = spec[0]
    assert think["GB_per_step"] > 0 and think["mbu"] is None  # no peak bandwidth on a CPU
    for r in spec[1:3]:
        assert 0 <= r["acceptance"] <= 1 and r["draft_ms"] > 0 and r["verify_ms"] > 0 and r["between_ms"] > 0
        assert r["vs_think"] == pytest.approx(r["tok_per_s"] / think["tok_per_s"])
        round_ms = r["k"] * r["draft_ms"] + r["verify_ms"]
        assert r["tok_s_at_0.7"] == pytest.approx(expected_tokens_per_round(0.7, r["k"]) / round_ms * 1e3)
    assert expected_tokens_per_round(0.5, 1) == 1.5 and expected_tokens_per_round(0.9, 2) == pytest.approx(2.71)
    names = [t["target"] for t in res["targets"]]
    assert any(n.startswith("speculative / think tok/s at context 24") for n in names)
    assert any(n.startswith("speculative with fallback") for n in names)
    assert "self-speculative decoding vs think" in out
    # the static path (as on a GPU, without graphs): rounds queued ahead, and a row at k = K without, the same rounds
    res, _ = run(capsys, ["decode", "--depth", "2", "--seq-len", "16", "--vocab-size", "128", "--contexts", "24",
                          "--decode-tokens", "12", "--prefill-reps", "1", "--modes", "think", "--speculate", "2",
                          "--speculate-from", "2", "--draft", "exit:0", "--engine-decode", "static"])
    rows = {r["what"]: r for r in res["speculative"]}
    assert list(rows) == ["think", "speculate exit:0", "speculate exit:0, none queued ahead",
                          "speculate exit:0, fallback"]
    slow = rows["speculate exit:0, none queued ahead"]
    assert slow["k"] == 2 and slow["acceptance"] == rows["speculate exit:0"]["acceptance"] and slow["between_ms"] > 0
    assert not any("queued ahead" in t["target"] for t in res["targets"])
    # --speculate-from: only k = K0..K (and the fallback at K); out of range stops before any model is built.
    # --profile: also a round's kernels (ops on a CPU) at k = K, and --attention-path reaches decode_attention
    from nanochat import decode_attention
    monkeypatch.setattr(decode_attention, "PATH", decode_attention.PATH)  # restored after the test
    res, out = run(capsys, ["decode", "--depth", "2", "--seq-len", "16", "--vocab-size", "128",
                            "--contexts", "24", "--decode-tokens", "6", "--prefill-reps", "1", "--modes", "think",
                            "--speculate", "2", "--speculate-from", "2", "--draft", "exit:0", "--attention-path", "torch"],
                   pre=["--profile"])
    assert [(r["what"], r["k"]) for r in res["speculative"]] == [("think", 0), ("speculate exit:0", 2),
                                                                 ("speculate exit:0, fallback", 2)]
    prof = res["speculative"][1]["profile"]
    # a round's CPU ops, largest first (which kinds make the top 16 varies: each is a difference of two profiles,
    # and aten::mm, the prefill's largest, was left out about one run in ten)
    assert prof[-1]["name"].startswith("(total of all") and all(r["name"].startswith("aten::") for r in prof[:3])
    assert [r["ms_per_call"] for r in prof[:-1]] == sorted((r["ms_per_call"] for r in prof[:-1]), reverse=True)
    assert "one round" in out and "attention PyTorch" in out and decode_attention.PATH == "torch"
    with pytest.raises(ValueError, match="--speculate-from 3: use 1 .. --speculate"):
        bench.main(CPU + ["decode", "--depth", "2", "--speculate", "2", "--speculate-from", "3"])
    # each row is printed once measured: a failure in the fallback's run (a timeout, say) keeps think's and k's rows
    from scripts import bench_speculate
    real = bench_speculate.timed_generate

    def fails_with_fallback(*a, **kw):
        if kw.get("fallback"):
            raise RuntimeError("stopped")
        return real(*a, **kw)
    monkeypatch.setattr(bench_speculate, "timed_generate", fails_with_fallback)
    with pytest.raises(RuntimeError, match="stopped"):
        bench.main(CPU + ["decode", "--depth", "2", "--seq-len", "16", "--vocab-size", "128", "--contexts", "24",
                          "--decode-tokens", "6", "--prefill-reps", "1", "--modes", "think", "--speculate", "1",
                          "--draft", "exit:0"])
    from scripts.bench_common import printed_rows
    spec = [r for r in printed_rows(capsys.readouterr().out) if "what" in r]
    assert [(r["what"], r["k"]) for r in spec] == [("think", 0), ("speculate exit:0", 1)]
    assert all(r["warmup_s"] > 0 for r in spec)


def test_decode_models_and_mixer_path(capsys, monkeypatch):
    """--models picks the benchmarked models (no dense row: no cache-ratio targets); --mixer-path sets every Mamba
    mixer's path (seen by the step: path='kernel' cannot run on a CPU and the row says so)."""
    from nanochat.mamba_block import Mamba
    seen = []
    step = Mamba.step
    monkeypatch.setattr(Mamba, "step", lambda self, *a: seen.append(self.path) or step(self, *a))
    args = ["decode", "--depth", "2", "--seq-len", "16", "--vocab-size", "128", "--contexts", "24",
            "--decode-tokens", "2", "--prefill-reps", "1", "--modes", "think", "--models", "hybrid"]
    res, out = run(capsys, args + ["--mixer-path", "torch"])
    assert [(r["model"], r["mode"]) for r in res["rows"]] == [("hybrid", "think")] and "error" not in res["rows"][0]
    assert res["targets"] == [] and seen and set(seen) == {"torch"} and "(torch path)" in out
    res, _ = run(capsys, args + ["--mixer-path", "kernel"])
    assert "path='kernel'" in res["rows"][0]["error"]
    from nanochat import decode_attention  # --attention-path reduce: set, and named in the table's header
    monkeypatch.setattr(decode_attention, "PATH", decode_attention.PATH)  # restored after the test
    res, out = run(capsys, args + ["--attention-path", "reduce"])
    assert "error" not in res["rows"][0] and decode_attention.PATH == "reduce"
    assert "attention PyTorch, broadcast sums when compiled" in out
    from nanochat import decode_matvec  # --head-path cublas reaches decode_matvec and the table's title
    monkeypatch.setattr(decode_matvec, "HEAD_PATH", decode_matvec.HEAD_PATH)
    res, out = run(capsys, args + ["--head-path", "cublas"])
    assert "error" not in res["rows"][0] and decode_matvec.HEAD_PATH == "cublas"
    assert ", head through cuBLAS when compiled" in out
    from nanochat import decode_mamba  # --mamba-step-path triton reaches decode_mamba (the CPU keeps PyTorch's ops)
    monkeypatch.setattr(decode_mamba, "PATH", decode_mamba.PATH)
    res, out = run(capsys, args + ["--mamba-step-path", "triton"])
    assert "error" not in res["rows"][0] and decode_mamba.PATH == "triton" and "decode_mamba kernels" not in out
    for bad, msg in ((["--models", "hybrid,gpt"], "--models: 'gpt' not among"),
                     (["--models", "dense", "--speculate", "1"], "--speculate times the 'hybrid' model")):
        with pytest.raises(ValueError, match=msg):
            bench.main(CPU + ["decode", "--depth", "2"] + bad)


def test_decode_profile_on_the_static_path(capsys):
    """--profile with a static decode path: think's step is profiled on the row's own decode state, before
    Engine.generate's prefill takes that state's cache (profiling after it stopped the row with an error)."""
    res, out = run(capsys, ["decode", "--depth", "2", "--seq-len", "16", "--vocab-size", "128", "--contexts", "24",
                            "--decode-tokens", "2", "--prefill-reps", "1", "--modes", "think", "--models", "hybrid",
                            "--engine-decode", "static"], pre=["--profile", "--profile-top", "3"])
    (r,) = res["rows"]
    assert "error" not in r, r
    assert r["path"] == "static" and r["profile"][-1]["count_per_call"] > 0
    assert "profile: hybrid think decode step, context 24" in out
    # --profile-top 3: three kinds and the total row, whose count covers more kinds than those listed
    assert len(r["profile"]) == 4 and r["profile"][-1]["name"].startswith("(total of all")
    assert r["profile"][-1]["count_per_call"] > sum(p["count_per_call"] for p in r["profile"][:3])
    with pytest.raises(SystemExit):
        bench.get_args(["--profile-top", "0", "decode"])
    assert "--profile-top 0: list at least one kernel kind" in capsys.readouterr().err


def test_decode_memory_only(capsys):
    """--memory-only builds no model: the formula rows and their targets, for sizes a CPU cannot run."""
    res, _ = run(capsys, ["decode", "--depth", "32", "--contexts", "1024,32768", "--modes", "think,ghost", "--memory-only"])
    by = {(r["model"], r["mode"], r["context"]): r for r in res["rows"]}
    assert all("prefill_ms" not in r and "error" not in r for r in res["rows"])
    L = 32768 + 16 + 8
    # dense d32: 32 layers x (K, V) x 16 heads x 128 dims x fp32, per position
    assert by[("dense", "-", 32768)]["cache_analytic_MiB"] == pytest.approx(32 * 2 * 16 * 128 * 4 * L / 2**20)
    # surgery's hybrid keeps all 32 attention blocks: its K/V alone already equals the dense cache
    think, ghost = by[("hybrid", "think", 32768)], by[("hybrid", "ghost", 32768)]
    assert think["kv_ssm_analytic_MiB"] > by[("dense", "-", 32768)]["cache_analytic_MiB"]
    # think: K/V + Mamba states + 32 blocks of int16 head counts; ghost adds 32 blocks of (L, 2048) fp32 inputs
    assert (think["cache_analytic_MiB"] - think["kv_ssm_analytic_MiB"]) * 2**20 == pytest.approx(32 * L * 2)
    assert (ghost["cache_analytic_MiB"] - think["cache_analytic_MiB"]) * 2**20 == pytest.approx(32 * L * 2048 * 4)
    assert all(t["pass"] is False for t in res["targets"])


def test_cache_formula_narrow_condition():
    """A narrower width adds stored inputs only where it stores fewer KV heads than the model has."""
    from nanochat.hybrid_gpt import HybridConfig
    # 4 query heads sharing 2 KV heads of 64 dims: width 192 runs 3 query heads but still both KV heads
    cfg = HybridConfig(sequence_len=16, vocab_size=64, n_layer=2, n_head=4, n_kv_head=2, n_embd=256,
                       layer_pattern="AM", width_levels=[64, 192, 256])
    assert not bench_decode.stores_narrow_kv(cfg, "think")
    assert bench_decode.stores_narrow_kv(cfg, "ghost")  # 128 snaps to 64: one query head, one KV head
    assert not bench_decode.stores_narrow_kv(cfg, "whisper")  # 512 snaps to 256
    assert not bench_decode.stores_narrow_kv(cfg, "auto")  # widening on: every head written
    cfg.width_levels = [192, 256]  # ghost snaps to the smallest level, 192: narrower queries, every KV head
    assert not bench_decode.stores_narrow_kv(cfg, "ghost")
    wide, narrow = (bench_decode.cache_bytes_analytic(cfg, 3, 10, 2, n) for n in (False, True))
    assert wide["xn"] == 0 and narrow["xn"] == 1 * 3 * 10 * 256 * 2 and wide["heads"] == narrow["heads"] == 3 * 10 * 2


def test_adaptive_scores_the_decode_steps_on_heldout_rows(capsys, tiny_data, tmp_path):
    """Think's teacher-forced decode loss equals the full forward's loss on the same held-out tokens (so the
    steps are aligned with their targets); with every gate saying 'exit', auto stops at the first gate."""
    from nanochat.dataset import get_data_dir
    from nanochat.tokenizer import Tokenizer
    model = write_hybrid_checkpoint(tmp_path / "ckpt", tiny_data).eval()
    P, K, R = 8, 5, 2
    args = ["adaptive", "--checkpoint", str(tmp_path / "ckpt"), "--data-dir", str(tiny_data["data_dir"]),
            "--rows", str(R), "--prompt-len", str(P), "--decode-tokens", str(K), "--modes", "ghost,auto,think"]
    res, out = run(capsys, args + ["--exit-threshold", "0", "--expand-threshold", "0"])
    by = {r["mode"]: r for r in res["rows"]}
    assert [r["mode"] for r in res["rows"]] == ["think", "ghost", "auto"]  # the reference first
    rows = bench_adaptive.heldout_rows(Tokenizer.from_directory(tiny_data["tokenizer_dir"]),
                                       get_data_dir(str(tiny_data["data_dir"])), (0, 2), R, P + K + 1, "cpu")
    with torch.no_grad():
        logits = model(rows[:, :-1])[:, P:P + K]  # the predictions of tokens P+1 .. P+K
    ref = torch.nn.functional.cross_entropy(logits.reshape(R * K, -1), rows[:, P + 1:].reshape(-1)).item()
    assert by["think"]["loss"] == pytest.approx(ref, rel=1e-5)
    assert by["think"]["steps"] == R * K and by["think"]["exit_rate"] == 0 and by["think"]["blocks_frac"] == 1
    assert by["think"]["compute_frac"] == pytest.approx(1.0, rel=1e-9)
    assert by["ghost"]["compute_frac"] < 1 and by["ghost"]["loss"] != by["think"]["loss"]
    first_gate = min(model.controllers.gate_blocks)
    assert by["auto"]["exit_rate"] == 1 and by["auto"]["blocks_frac"] == (first_gate + 1) / 4
    assert 0 <= by["auto"]["agree_think"] <= 1 and "agree_think" not in by["think"]
    speed, loss = res["targets"]
    assert speed["value"] == pytest.approx(by["auto"]["tok_per_s"] / by["think"]["tok_per_s"])
    assert loss["value"] == pytest.approx(by["auto"]["loss"] / by["think"]["loss"])
    assert "teacher-forced" in out
    with pytest.raises(SystemExit, match="sequence_len"):
        bench.main(CPU + args[:-2] + ["--prompt-len", "30"])


def test_adaptive_rows_are_tokens_on_shards_with_loss_spans(tiny_data, tmp_path):
    """Shards with loss spans (the tiny pipeline's) give -1 targets outside the spans; the held-out rows must be the
    packed tokens themselves, as on shards without spans."""
    import pyarrow.parquet as pq
    from nanochat.dataset import list_parquet_files, write_synthetic_shard
    from nanochat.tokenizer import Tokenizer
    tok = Tokenizer.from_directory(tiny_data["tokenizer_dir"])
    plain, spanned = tmp_path / "plain", tmp_path / "spanned"
    for d in (plain, spanned):
        d.mkdir()
    for path in list_parquet_files(str(tiny_data["data_dir"])):
        texts = pq.read_table(path).column("text").to_pylist()
        name = path.rsplit("/", 1)[-1]
        write_synthetic_shard(str(plain / name), texts, 32)
        write_synthetic_shard(str(spanned / name), texts, 32, loss_spans=[[0, min(3, len(t))] for t in texts])
    bos = tok.get_bos_token_id()
    all_texts = [t for path in list_parquet_files(str(tiny_data["data_dir"])) for t in pq.read_table(path).column("text").to_pylist()]
    for d in (plain, spanned):
        rows = bench_adaptive.heldout_rows(tok, str(d), (0, 2), 3, 14, "cpu")
        assert rows.shape == (3, 14) and rows.dtype == torch.long and rows.min() >= 0
        for row in rows.tolist():  # each piece between BOS tokens is a stretch of one document's text
            pieces, cur = [], []
            for t in row:
                if t == bos:
                    pieces.append(cur)
                    cur = []
                else:
                    cur.append(t)
            for piece in pieces + [cur]:
                assert not piece or any(tok.decode(piece) in text for text in all_texts)


def test_adaptive_speculate_on_a_checkpoint(capsys, tiny_data, tmp_path):
    """bench adaptive --speculate K: greedy generation from held-out prompts, think against each draft and k, with
    the tokens checked equal to think's."""
    write_hybrid_checkpoint(tmp_path / "ckpt", tiny_data)
    res, out = run(capsys, ["adaptive", "--checkpoint", str(tmp_path / "ckpt"), "--data-dir", str(tiny_data["data_dir"]),
                            "--rows", "2", "--prompt-len", "6", "--decode-tokens", "5", "--modes", "think",
                            "--speculate", "2", "--draft", "ghost;exit:0"])
    spec = res["speculative"]
    assert [(r["what"], r["k"]) for r in spec] == [("think", 0), ("speculate ghost", 1), ("speculate ghost", 2),
                                                   ("speculate ghost, fallback", 2), ("speculate exit:0", 1),
                                                   ("speculate exit:0", 2), ("speculate exit:0, fallback", 2)]
    from scripts.bench_common import printed_rows, progress_record
    assert [r for r in printed_rows(out) if "same_tokens" in r] == [  # each setting printed once measured
        json.loads(json.dumps(progress_record(r), default=str)) for r in spec[1:]]
    assert all(r["same_tokens"] for r in spec[1:]) and all(0 <= r["acceptance"] <= 1 for r in spec[1:])
    # each setting against its own paired think runs; the think row is all of them together
    assert all(r["vs_think"] == pytest.approx(r["tok_per_s"] / r["think_tok_per_s"]) for r in spec[1:])
    assert 1 / spec[0]["tok_per_s"] == pytest.approx(sum(1 / r["think_tok_per_s"] for r in spec[1:]) / 6)
    assert sum(t["target"].endswith("/ think tokens/s") for t in res["targets"]) == 6
    assert "self-speculative decoding on" in out


def test_train_adaptive_recipe_runs_fractal_trains_step(capsys, monkeypatch):
    """--recipes: phase 2 as fractal_train runs it (every level, menu plans on odd steps, controllers) beside the
    sandwich; its FLOPs are the mean of a uniform and a menu step's plans, and its time the mean over the same whole
    periods of steps, after a warm-up of at least one period."""
    import statistics
    timed = []

    def spy(fn, device, warmup, iters, stat=statistics.median):
        timed.append((warmup, iters, stat))
        return measure(fn, device, warmup, iters, stat)
    measure = bench_train.measure
    monkeypatch.setattr(bench_train, "measure", spy)
    res, out = run(capsys, ["train", "--depth", "4", "--seq-len", "16", "--batch", "2", "--vocab-size", "128",
                            "--models", "hybrid", "--phases", "2", "--exit-strides", "1", "--compile", "none",
                            "--recipes", "sandwich,adaptive,cycle"])
    rows = {r["phase"]: r for r in res["rows"]}
    steps = [t for t in timed if t[2] is not statistics.median or t[1] != 3]  # the update's own timing: (1, 3, median)
    (sw, si, sstat), (aw, ai, astat), (cw, ci, cstat) = steps
    assert (sw, si, sstat) == (1, 1, statistics.median)  # CPU's --warmup 1 --iters 1
    assert (aw, ai, astat) == (2, 2, statistics.mean) and rows["2 adaptive"]["timed_steps"] == 2  # period 2
    assert cw == ci == rows["2 cycle"]["timed_steps"] and cstat is statistics.mean
    assert set(rows) == {"2 sandwich", "2 adaptive", "2 cycle"} and "2 adaptive" in out
    from nanochat.hybrid_gpt import HybridGPT
    from scripts.bench_train import recipe_step_plans
    (_, _, cfg), = bench_train.train_models(bench.get_args(["train", "--depth", "4", "--seq-len", "16", "--vocab-size",
                                                            "128", "--models", "hybrid"]))
    with torch.device("meta"):
        model = HybridGPT(cfg)
    want = sum(sum(model.estimate_flops(p) for p in recipe_step_plans(cfg, s)) for s in (0, 1)) / 2
    assert rows["2 adaptive"]["flops_per_tok_G"] * 1e9 == pytest.approx(want)
    assert len(cfg.width_levels) == 2 and recipe_step_plans(cfg, 0) != recipe_step_plans(cfg, 1)  # uniform, then menu
    assert len(recipe_step_plans(cfg, 0)) == len(cfg.width_levels) and rows["2 adaptive"]["ms"] > 0
    # the adaptive step reads out every plan's exits: more executed FLOPs over the convention than the sandwich's one
    extra = {k: r["exec_flops_per_tok_G"] - r["flops_per_tok_G"] for k, r in rows.items()}
    assert extra["2 adaptive"] == pytest.approx(2 * extra["2 sandwich"])
    # cycle: full + one narrow plan a step, its FLOPs the mean over the cycle of uniform and menu plans
    from nanochat.adaptive_train import cycle_plans
    cycle = cycle_plans(cfg)
    assert [recipe_step_plans(cfg, s, "cycle")[1] for s in range(len(cycle))] == cycle
    want = sum(model.estimate_flops(recipe_step_plans(cfg, 0, "cycle")[0]) + model.estimate_flops(p) for p in cycle) / len(cycle)
    assert rows["2 cycle"]["flops_per_tok_G"] * 1e9 == pytest.approx(want)
    # --exit-readouts 1: each pass reads one of the exits before the last (every block but the last one here), in turn
    # (fractal_train's rotation)
    read = []
    forward = HybridGPT.forward
    monkeypatch.setattr(HybridGPT, "forward", lambda self, *a, **kw: read.append(kw.get("exits")) or forward(self, *a, **kw))
    one, _ = run(capsys, ["train", "--depth", "4", "--seq-len", "16", "--batch", "2", "--vocab-size", "128", "--models",
                          "hybrid", "--phases", "2", "--exit-strides", "1", "--compile", "none", "--recipes", "cycle",
                          "--exit-readouts", "1"])
    early = cfg.n_layer - 1
    assert one["rows"][0]["readout_flops_per_tok_G"] == pytest.approx(rows["2 cycle"]["readout_flops_per_tok_G"] / early)
    sets = [e for e in read if e is not None]
    assert {tuple(e) for e in sets} == {(j,) for j in range(early)} and all(len(e) == 1 for e in sets)
    with pytest.raises(ValueError, match="--exit-readouts -1"):
        run(capsys, ["train", "--depth", "4", "--models", "hybrid", "--phases", "2", "--exit-readouts", "-1"])
    with pytest.raises(ValueError, match="--recipes: 'sandwitch' not among adaptive, cycle, sandwich"):
        run(capsys, ["train", "--depth", "4", "--seq-len", "16", "--batch", "2", "--vocab-size", "128", "--models",
                     "hybrid", "--phases", "2", "--compile", "none", "--recipes", "sandwitch"])


def test_muon_per_matrix_and_stacked(capsys):
    """bench muon: the Muon step over each model's matrices, one Newton-Schulz per matrix and stacked."""
    res, out = run(capsys, ["muon", "--depth", "2", "--vocab-size", "128", "--models", "dense,hybrid"],
                   pre=["--warmup", "1", "--iters", "1"])
    rows = {r["model"]: r for r in res["rows"]}
    assert set(rows) == {"dense", "hybrid"} and rows["hybrid"]["matrices"] > rows["dense"]["matrices"]
    assert all(r["per_matrix"] > 0 and r["stacked"] > 0 and r["speedup"] > 0 for r in rows.values())
    assert "Muon step" in out


def test_inductor_options_are_checked_and_last_for_the_command(capsys, monkeypatch):
    """--inductor-option KEY=VALUE: the key must be one of the installed inductor's options and the JSON value of
    its kind; the options hold while the command runs (its compiles see them) and are restored after."""
    import torch._inductor.config as inductor_config
    got = bench.inductor_options(["combo_kernels=true", "combo_kernel_max_num_nodes=3"])
    assert got == {"combo_kernels": True, "combo_kernel_max_num_nodes": 3}
    for bad, msg in ((["combo_kernels"], "give KEY=VALUE"), (["no_such_option=1"], "has no such option"),
                     (["combo_kernels=yes"], "not JSON"), (["combo_kernels=1"], "type bool"),
                     (["combo_kernel_max_num_nodes=true"], "type int")):
        with pytest.raises(ValueError, match=msg):
            bench.inductor_options(bad)
    seen = []
    monkeypatch.setitem(bench.COMMANDS, "decode", lambda args, device: seen.append(
        (inductor_config.combo_kernels, inductor_config.combo_kernel_max_num_nodes)))
    before = (inductor_config.combo_kernels, inductor_config.combo_kernel_max_num_nodes)
    bench.main(CPU + ["--inductor-option", "combo_kernels=true", "--inductor-option", "combo_kernel_max_num_nodes=3", "decode"])
    assert seen == [(True, 3)] and (inductor_config.combo_kernels, inductor_config.combo_kernel_max_num_nodes) == before
    assert "inductor options: combo_kernels=True, combo_kernel_max_num_nodes=3" in capsys.readouterr().out


def test_matvec_shapes_and_bad_input():
    """bench matvec times CUDA kernels: on a CPU it stops with one line (after checking --rows); its shapes are the
    d20 hybrid's weights a think step multiplies, counted, without the controllers' small matrices."""
    from scripts.bench_matvec import weight_shapes
    for argv, msg in ((["--rows", "0,5"], "--rows 0,5: each 1 to 16"), (["--rows", "a"], "comma-separated integers"),
                      ([], "run it on a GPU")):
        with pytest.raises(SystemExit, match=msg):
            bench.main(["--device", "cpu", "matvec", *argv])
    shapes = weight_shapes(bench.get_args(["matvec"]))
    assert shapes[(65536, 1280)] == 1 and shapes[(5120, 1280)] == 60 and shapes[(1280, 5120)] == 40, shapes
    assert all(n * k >= 2**16 for n, k in shapes)  # the gates and the width predictor: think does not run them


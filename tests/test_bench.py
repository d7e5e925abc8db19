"""
CPU smoke of every scripts.bench subcommand at tiny sizes, so the script keeps working in CI: the last
stdout line is the JSON the function returns, every row has a number or a reason, and the numbers the
bench derives (FLOPs per step, cache bytes) agree with independent computations.
"""
import json

import pytest
import torch

from scripts import bench

CPU = ["--device", "cpu", "--warmup", "1", "--iters", "1", "--compile-backend", "eager"]


def run(capsys, argv):
    res = bench.main(CPU + argv)
    lines = capsys.readouterr().out.strip().splitlines()
    last = json.loads(lines[-1])  # machine-readable line last
    assert last["bench"] == argv[0] and last["env"]["torch"] == torch.__version__ and last["env"]["date"]
    assert json.loads(json.dumps(res, default=str)) == last
    return res, "\n".join(lines)


def test_mamba(capsys):
    res, out = run(capsys, ["mamba", "--batch", "2", "--seqlens", "16,32", "--d-model", "32", "--versions", "2", "--decode-batches", "1",
                            "--decode-iters", "2"])
    rows = res["rows"]
    assert len(rows) == 2 * 4  # lengths x (mamba-ssm, ours kernel, torch eager, torch compiled)
    for r in rows:
        assert ("ms" in r and r["ms"] > 0 and r["tok_per_s"] > 0) or r["error"].startswith("unavailable")
        if r["impl"].startswith("ours torch"):
            assert r["ms"] > 0
    assert [r["batch"] for r in rows] == [2] * 4 + [1] * 4  # longer lengths keep batch * length
    assert len(res["targets"]) == 2 * 2
    from nanochat.mamba_block import KERNEL_IMPORT_ERROR
    if KERNEL_IMPORT_ERROR is not None:  # nothing to compare against: the targets say so instead of passing
        assert all(t["pass"] is None for t in res["targets"])
        assert "n/a (not measured)" in out
    assert {r["impl"] for r in res["decode"] if "us" in r} >= {"ours torch"}


def test_moe(capsys):
    res, _ = run(capsys, ["moe", "--tokens", "64", "--d-model", "16", "--expert-dim", "32", "--experts", "4"])
    by = {r["impl"]: r for r in res["rows"]}
    assert all(r["ms"] > 0 for r in by.values())
    for name in ("MoE grouped_mm", "MoE bmm (padded)"):
        assert by[name]["max_diff_vs_loop"] <= 1e-5  # fp32 on CPU: the dispatches compute the loop's function
    assert sum(res["tokens_per_expert"]) + res["dropped"] == 64  # top-1: every token kept once or dropped
    ratio = by["MoE per-expert loop"]["ms"] / by["MoE grouped_mm"]["ms"]
    assert res["targets"][0]["value"] == pytest.approx(ratio) and res["targets"][0]["pass"] == (ratio >= 3.0)


def test_train(capsys):
    res, _ = run(capsys, ["train", "--depth", "2", "--seq-len", "16", "--batch", "2", "--vocab-size", "128",
                          "--models", "dense,hybrid", "--phases", "1,2", "--exit-strides", "1", "--compile", "none"])
    rows = {(r["model"], r["phase"]): r for r in res["rows"]}
    assert set(rows) == {("dense", "all"), ("hybrid", "1"), ("hybrid", "2")}
    for r in rows.values():
        assert r["ms"] > 0 and r["tok_per_s"] == pytest.approx(2 * 16 / r["ms"] * 1e3) and r["batch"] == 2
        assert r.get("mfu") is None  # no peak FLOP/s for a CPU
    # FLOPs per token from the models themselves: the dense GPT's estimate, the sum over the sandwich's plans
    from nanochat.gpt import GPT
    from nanochat.hybrid_gpt import HybridGPT
    (_, _, dcfg), (_, _, hcfg) = bench.train_models(bench.get_args(["train", "--depth", "2", "--seq-len", "16",
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


def test_decode(capsys):
    res, _ = run(capsys, ["decode", "--depth", "4", "--seq-len", "16", "--vocab-size", "128", "--contexts", "24",
                          "--decode-tokens", "2", "--prefill-reps", "1", "--modes", "think,ghost"])
    rows = res["rows"]
    assert {(r["model"], r["mode"]) for r in rows} == {("dense", "-"), ("hybrid", "think"), ("hybrid", "ghost"),
                                                       ("hybrid-eq", "think")}
    for r in rows:
        assert "error" not in r, r
        assert r["prefill_ms"] > 0 and r["decode_ms"] > 0
        # the formula equals the bytes of the tensors the engine (or GPT.new_kv_cache) allocated
        assert r["cache_counted_MiB"] == pytest.approx(r["cache_analytic_MiB"], rel=1e-12)
    by = {(r["model"], r["mode"], r["context"]): r for r in rows}
    assert by[("hybrid", "ghost", 24)]["compute_frac"] < by[("hybrid", "think", 24)]["compute_frac"]
    # same attention blocks as the dense model (pattern AM): its K/V alone already equals the dense cache
    assert by[("hybrid", "think", 24)]["cache_counted_MiB"] > by[("dense", "-", 24)]["cache_counted_MiB"]
    assert [t["pass"] for t in res["targets"]][0] is False


def test_decode_memory_only(capsys):
    """--memory-only builds no model: the formula rows and their targets, for sizes a CPU cannot run."""
    res, _ = run(capsys, ["decode", "--depth", "32", "--contexts", "1024,32768", "--memory-only"])
    by = {(r["model"], r["context"]): r for r in res["rows"]}
    assert all("prefill_ms" not in r and "error" not in r for r in res["rows"])
    # dense d32: 32 layers x (K, V) x 16 heads x 128 dims x fp32, per position
    assert by[("dense", 32768)]["cache_analytic_MiB"] == pytest.approx(32 * 2 * 16 * 128 * 4 * (32768 + 16 + 8) / 2**20)
    # surgery's hybrid keeps all 32 attention blocks: its K/V alone already equals the dense cache
    assert by[("hybrid", 32768)]["kv_ssm_analytic_MiB"] > by[("dense", 32768)]["cache_analytic_MiB"]
    assert all(t["pass"] is False for t in res["targets"])

"""scripts/bench_host.py and the seam it uses (cuda_graphs.HOST_ONLY): the graph path with the graphs taken out runs
each segment once and hands out its output after, on any device; the bench's rows, flags and bad input."""
import json

import pytest
import torch

from nanochat import cuda_graphs
from nanochat.checkpoint_manager import CheckpointError, save_model
from nanochat.engine import Engine
from scripts import bench

from engine_testutil import HAS_MAMBA, HAS_MOE, build


def test_host_only_replays_run_each_segment_once():
    """Off by default; on, Engine(decode='graph') runs on the CPU, each segment key computes once (its first step)
    and later steps of that key hand out the same output, computing nothing: the Mamba states stay where that first
    run left them. Without it the CPU refuses the graph path with one line."""
    assert cuda_graphs.HOST_ONLY is False
    model = build(layer_pattern="AM" if HAS_MAMBA else "A")
    eng = Engine(model, decode="graph")
    st, _, _, _ = eng.prefill(torch.tensor([[1, 2, 3]]), max_len=16)
    with pytest.raises(ValueError, match="needs the model on CUDA"):
        eng.step(st, torch.tensor([4]))
    cuda_graphs.HOST_ONLY = True
    try:
        eng = Engine(model, decode="graph")
        st, logits, _, _ = eng.prefill(torch.tensor([[1, 2, 3]]), max_len=16)
        with torch.inference_mode():
            first = eng.step(st, torch.tensor([4]))[0]
            assert eng.last_path == "graph" and all(g is None for g, _ in st.ws.graphs.values())
            states = {j: [t.clone() for t in pair] for j, pair in st.ssm.items()}
            again = eng.step(st, torch.tensor([9]))[0]  # another token, the same key (bucket 256): nothing computed
        assert torch.equal(first, again) and again.data_ptr() != first.data_ptr()  # a copy, as a replay hands out
        assert len(st.ws.graphs) == 1 and st.pos == 5
        for j, pair in st.ssm.items():
            assert all(torch.equal(a, b) for a, b in zip(pair, states[j]))
    finally:
        cuda_graphs.HOST_ONLY = False


def test_bench_host_rows_and_bad_input(tmp_path, capsys):
    """bench host on a small hybrid checkpoint: think, then each draft at k = 1..2, with the host's ms a token
    (positive), rounds and ms a round for speculation (rounds x ms a round = the tokens after the first x ms a
    token), think's row the 1.0 of the ratio; HOST_ONLY is off again afterwards. Bad flags stop with one line."""
    model = build(layer_pattern="AM" if HAS_MAMBA else "A")
    save_model(str(tmp_path / "ckpt"), 5, model)
    argv = ["--device", "cpu", "host", "--checkpoint", str(tmp_path / "ckpt"), "--prompt-len", "4", "--tokens", "5",
            "--speculate", "2", "--draft", "exit:1;plan:ghost", "--reps", "1"]
    res = bench.main(argv)
    out = capsys.readouterr().out
    assert json.loads(out.strip().splitlines()[-1])["bench"] == "host" and cuda_graphs.HOST_ONLY is False
    rows = res["rows"]
    assert [(r["what"], r["k"]) for r in rows] == [("think", 0), ("speculate exit:1", 1), ("speculate exit:1", 2),
                                                   ("speculate plan:ghost", 1), ("speculate plan:ghost", 2)]
    assert rows[0]["vs_think"] == 1.0 and "rounds" not in rows[0]
    for r in rows:
        assert r["first_ms"] > 0 and r["ms_per_token"] > 0
        assert r["vs_think"] == pytest.approx(r["ms_per_token"] / rows[0]["ms_per_token"])
    for r in rows[1:]:
        assert 1 <= r["rounds"] <= 4 and r["ms_per_round"] == pytest.approx(r["ms_per_token"] * 4 / r["rounds"])
    assert "host ms a round" in out
    for extra, msg in ((["--tokens", "1"], "--tokens >= 2"), (["--prompt-len", "30"], "exceeds the checkpoint's"),
                       (["--reps", "0"], "--reps >= 1"), (["--draft", "exit:9"], "exit:N needs a block N")):
        with pytest.raises(SystemExit, match=msg):
            bench.main(argv + extra)
    with pytest.raises(CheckpointError, match="does not exist"):
        bench.main(["--device", "cpu", "host", "--checkpoint", str(tmp_path / "nope")])
    # without a checkpoint: bench decode's hybrid at --depth, narrowed (depth 2: 4 blocks, one head of 128)
    fresh = ["--device", "cpu", "host", "--depth", "2", "--tokens", "4", "--speculate", "1", "--draft", "exit:0",
             "--reps", "1"]
    res = bench.main(fresh)
    assert res["model"] == "a fresh d2 hybrid at n_embd 128" and [r["k"] for r in res["rows"]] == [0, 1]
    assert "4 blocks (AM/DD), n_embd 128" in capsys.readouterr().out  # surgery puts a Mamba block after each
    with pytest.raises(SystemExit, match="--n-embd 100: a positive multiple of 128"):
        bench.main(fresh + ["--n-embd", "100"])


@pytest.mark.skipif(not HAS_MOE, reason="needs the MoE")
def test_graph_path_rules_off_cuda_with_host_only():
    """The graph path's conditions hold on the CPU under HOST_ONLY as on CUDA: a dropless MoE decodes eager (its
    fallback reads the largest expert load back), one with a capacity takes the graph path."""
    cuda_graphs.HOST_ONLY = True
    try:
        for drop, path in ((False, "eager"), (True, "graph")):
            model = build(layer_pattern="A", ffn_pattern="ED", moe_drop_tokens=drop)
            eng = Engine(model, decode="graph")
            st, logits, _, _ = eng.prefill(torch.tensor([[3, 1, 4]]), max_len=16)
            with torch.inference_mode():
                eng.step(st, logits.argmax(-1))
            assert eng.last_path == path
            assert eng.static.path(st, 1) == (("eager", "dropless MoE blocks") if not drop else ("graph", None))
    finally:
        cuda_graphs.HOST_ONLY = False


def test_timed_generations_compute_no_segment(monkeypatch):
    """bench host's timed generations reuse the warm-up's workspace and segments: more reps run no more segments
    (a generation of another length would take another workspace and run its segments again)."""
    from nanochat.engine_static import StaticDecode
    from scripts.bench_host import measure
    calls = []
    segment = StaticDecode.segment
    monkeypatch.setattr(StaticDecode, "segment", lambda self, *a: calls.append(1) or segment(self, *a))
    model = build(layer_pattern="AM" if HAS_MAMBA else "A")
    counts = []
    cuda_graphs.HOST_ONLY = True
    try:
        for reps in (1, 3):
            calls.clear()
            eng = Engine(model, decode="graph")
            for kw in ({}, dict(speculate=2, draft="exit:1", fallback=False)):
                with torch.inference_mode():
                    first, after, rounds = measure(eng, [1, 2, 3, 4], 6, reps, kw, torch.device("cpu"))
                assert first > 0 and after > 0 and (rounds is None) == (not kw)
            counts.append(len(calls))
    finally:
        cuda_graphs.HOST_ONLY = False
    assert counts[0] == counts[1] > 0, counts

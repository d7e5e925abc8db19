"""scripts.calibrate_gates: fits the gates on one part of the val split, reports on the other, saves a new checkpoint."""
import os

import pytest
import torch

from nanochat.checkpoint_manager import load_model, CheckpointError
from nanochat.confidence_probe import gate_scores
from nanochat.dataset import get_data_dir
from nanochat.tokenizer import Tokenizer
from scripts import calibrate_gates
from testutil import write_hybrid_checkpoint


def snapshot(d):
    return {name: open(os.path.join(d, name), "rb").read() for name in sorted(os.listdir(d))}


@pytest.mark.slow
def test_calibrates_on_its_part_and_leaves_the_source_alone(tiny_data, tmp_path, capsys):
    src, out = tmp_path / "src", tmp_path / "out"
    write_hybrid_checkpoint(src, tiny_data, gate_std=1.0)
    before = snapshot(src)
    argv = [f"--checkpoint={src}", f"--out-dir={out}", f"--data-dir={tiny_data['data_dir']}", "--device=cpu",
            "--tokens=2048", "--batch=4", "--seq-len=32", "--min-count=8"]
    res = calibrate_gates.main(argv)
    printed = capsys.readouterr().out
    assert "exit policy with the calibrated gates on val part 0/2" in printed and "saved the calibrated" in printed
    assert snapshot(src) == before  # the source checkpoint is not touched
    model, meta = load_model(str(out))
    assert model.controllers.is_calibrated() and meta["calibration"]["from_checkpoint"] == str(src)
    assert not load_model(str(src))[0].controllers.is_calibrated()
    assert os.path.isfile(out / "tokenizer.pkl")
    # the fit data: val part 1/2 (row groups 1, 3, ...), 2048 tokens. Each isotonic step is valued at the
    # agreement rate of its tokens, so on those tokens the mean calibrated probability is the agreement rate.
    tok = Tokenizer.from_directory(tiny_data["tokenizer_dir"])
    fit = calibrate_gates.val_batches(tok, get_data_dir(str(tiny_data["data_dir"])), (1, 2), 4, 32, 2048, "cpu")
    probs, agree = gate_scores(model, fit, calibrated=True)
    raw, _ = gate_scores(model, fit, calibrated=False)
    assert probs.size(1) == res["calibration"]["n_tokens"] == 2048
    assert raw.std(dim=1).min() > 0.01  # varied scores: the maps are fitted on something
    for g in range(probs.size(0)):
        assert probs[g].mean().item() == pytest.approx(agree[g].float().mean().item(), abs=1e-5)
    # the other part (row groups 0, 2, ...) gives other tokens: the same statistic no longer holds exactly
    other = calibrate_gates.val_batches(tok, get_data_dir(str(tiny_data["data_dir"])), (0, 2), 4, 32, 2048, "cpu")
    assert not torch.equal(other[0][0], fit[0][0])
    # bench adaptive says when its rows are not held out from the calibration
    from scripts import bench
    res = bench.main(["--device", "cpu", "adaptive", "--checkpoint", str(out), "--data-dir", str(tiny_data["data_dir"]),
                      "--rows", "1", "--prompt-len", "4", "--decode-tokens", "2", "--modes", "think", "--val-part", "3/4"])
    assert res["calibrated"] and res["rows_overlap_calibration"]  # 3/4 = groups 3, 7: inside 1/2
    res = bench.main(["--device", "cpu", "adaptive", "--checkpoint", str(out), "--data-dir", str(tiny_data["data_dir"]),
                      "--rows", "1", "--prompt-len", "4", "--decode-tokens", "2", "--modes", "think"])
    assert not res["rows_overlap_calibration"]  # the default 0/2
    capsys.readouterr()
    # a second run into the same directory needs --overwrite
    with pytest.raises(ValueError, match="already holds checkpoints"):
        calibrate_gates.main(argv)
    calibrate_gates.main(argv + ["--overwrite"])


def test_bad_inputs_stop_before_writing(tiny_data, tmp_path):
    src = tmp_path / "src"
    write_hybrid_checkpoint(src, tiny_data)
    base = [f"--checkpoint={src}", f"--data-dir={tiny_data['data_dir']}", "--device=cpu", "--tokens=256", "--batch=2"]
    with pytest.raises(ValueError, match="is the source checkpoint"):
        calibrate_gates.main(base + [f"--out-dir={src}"])
    with pytest.raises(ValueError, match="shares row groups"):
        calibrate_gates.main(base + [f"--out-dir={tmp_path / 'a'}", "--val-part=0/2"])
    with pytest.raises(ValueError, match="shares row groups"):  # 0/2 = groups 0, 2, 4, ...; 2/4 = 2, 6, ...
        calibrate_gates.main(base + [f"--out-dir={tmp_path / 'a'}", "--val-part=2/4"])
    assert not calibrate_gates.parts_overlap((1, 2), (0, 4)) and calibrate_gates.parts_overlap((1, 2), (3, 4))
    with pytest.raises(ValueError, match="need 0 <= r < n"):
        calibrate_gates.main(base + [f"--out-dir={tmp_path / 'a'}", "--val-part=2/2"])
    with pytest.raises(ValueError, match="r/n"):
        calibrate_gates.main(base + [f"--out-dir={tmp_path / 'a'}", "--eval-part=half"])
    with pytest.raises(CheckpointError, match="does not exist"):
        calibrate_gates.main(base + [f"--out-dir={tmp_path / 'a'}", f"--checkpoint={tmp_path / 'nothing'}"])
    assert not (tmp_path / "a").exists()


def test_operating_point_guarantee_or_full_width(tiny_data, tmp_path, capsys):
    """The operating point: too few rows for alpha says so and keeps full width; a feasible request validates the
    conservative end of the grid, stores the guarantee in the meta, and scripts.generate --show-compute reports it
    (and warns on a checkpoint without one)."""
    from scripts import generate
    from nanochat.operating_point import NEVER
    src = tmp_path / "src"
    write_hybrid_checkpoint(src, tiny_data, gate_std=1.0)
    base = [f"--checkpoint={src}", f"--data-dir={tiny_data['data_dir']}", "--device=cpu", "--tokens=512", "--batch=4",
            "--seq-len=32", "--min-count=8", "--ltt-rows=12", "--prompt-len=8", "--decode-tokens=4"]
    calibrate_gates.main(base + [f"--out-dir={tmp_path / 'small'}"])  # alpha 0.01 needs 230 test rows
    printed = capsys.readouterr().out
    assert "too few calibration units" in printed and "keeping full width" in printed
    model, meta = load_model(str(tmp_path / "small"))
    g = meta["calibration"]["guarantee"]
    assert g["fallback_full_width"] and not g["feasible"] and g["operating_point"]["router"] == NEVER
    assert model.controllers.operating_point() == pytest.approx({"router": NEVER, "exit": 1.0, "widen": 0.0})
    calibrate_gates.main(base + [f"--out-dir={tmp_path / 'ok'}", "--risk=0.9", "--delta=0.5"])
    printed = capsys.readouterr().out
    assert "guarantee: with probability >= 0.5" in printed and "Operating point" in printed
    model, meta = load_model(str(tmp_path / "ok"))
    g = meta["calibration"]["guarantee"]
    assert not g["fallback_full_width"] and g["n_validated"] >= 1 and g["pvalue"] <= 0.5
    assert model.controllers.operating_point() == pytest.approx(g["operating_point"])
    gen = ["--prompt", "the cat", "--mode", "auto", "--max-tokens", "3", "--show-compute", "--device", "cpu"]
    generate.main(["--checkpoint", str(tmp_path / "ok")] + gen)
    out = capsys.readouterr().out
    assert "guarantee: with probability" in out and "operating point:" in out and "WARNING: no calibrated" not in out
    generate.main(["--checkpoint", str(src)] + gen)
    out = capsys.readouterr().out
    assert "WARNING: uncalibrated checkpoint" in out and "WARNING: no calibrated operating point" in out

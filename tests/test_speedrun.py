"""runs/speedrun.sh --dry-run: the d32 plan, built with the package's own surgery on meta-device tensors, prints
its stages and the total (a meta-device regression in model init once broke it)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_speedrun_dry_run_prints_the_plan(tmp_path):
    env = dict(os.environ, PYTHON=sys.executable, NANOCHAT_BASE_DIR=str(tmp_path), PYTHONPATH=str(ROOT))
    out = subprocess.run(["bash", "runs/speedrun.sh", "--dry-run"], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "training total:" in out.stdout and "--phase=3" in out.stdout
    # the training stages compile per block, the setting their MFU constants were measured with
    phases = [l for l in out.stdout.splitlines() if "scripts.fractal_train --phase=" in l or "scripts.chat_sft" in l]
    assert len(phases) == 4 and all("--compile=blocks" in l for l in phases)
    assert not (tmp_path / "speedrun").exists()  # a dry run writes nothing
    # the grown model's stages (phase 3, SFT) keep bf16-gathered weights and reduce every pass, priced at that setting's
    # measured MFU; GROWN_KEEP=0 runs FSDP2's defaults at theirs; another value stops with one line
    grown = [l for l in phases if "--phase=3" in l or "chat_sft" in l]
    assert all("--fsdp-keep-params --fsdp-bf16 --fsdp-reduce=pass" in l for l in grown)
    # phase 2 too (KEEP_PARAMS=1, the default), at 4 rows, with its exit readouts' logits kept; phase 1 runs FSDP2's defaults
    p2, = [l for l in phases if "--phase=2" in l]
    assert "--device-batch-size 4 --fsdp-keep-params --fsdp-bf16 --fsdp-reduce=pass --readout-checkpoint=off" in p2
    # phases 2, 3 and SFT read one of the exits before the last a pass (EXIT_READOUTS=1, the default); the grown
    # model's stages keep their readouts' logits too
    assert all("--exit-readouts 1" in l for l in phases if "--phase=1" not in l)
    assert all("--readout-checkpoint=off" in l for l in grown)
    assert not any("--fsdp-" in l for l in phases if "--phase=1" in l)
    keep0 = subprocess.run(["bash", "runs/speedrun.sh", "--dry-run"], cwd=ROOT, env=dict(env, KEEP_PARAMS="0"),
                           capture_output=True, text=True, timeout=300)
    p2_off, = [l for l in keep0.stdout.splitlines() if "scripts.fractal_train --phase=2" in l]
    assert "--device-batch-size 2" in p2_off and "--fsdp-" not in p2_off and "--readout-checkpoint" not in p2_off
    p2_mfu = {o: [l.split()[-3] for l in o.splitlines() if l.startswith("phase 2")] for o in (out.stdout, keep0.stdout)}
    assert p2_mfu[out.stdout] == ["0.333"] and p2_mfu[keep0.stdout] == ["0.165"]
    # every exit read each pass: the flags say so and the plan prices the measured all-exit rates
    every = subprocess.run(["bash", "runs/speedrun.sh", "--dry-run"], cwd=ROOT, env=dict(env, EXIT_READOUTS="0"),
                           capture_output=True, text=True, timeout=300)
    assert every.returncode == 0 and every.stdout.count("--exit-readouts 0") == 3
    rates = [l.split()[-3] for l in every.stdout.splitlines() if l.split()[:2] in (["phase", "2"], ["phase", "3"])]
    assert rates == ["0.276", "0.326"]
    off = subprocess.run(["bash", "runs/speedrun.sh", "--dry-run"], cwd=ROOT, env=dict(env, GROWN_KEEP="0"),
                         capture_output=True, text=True, timeout=300)
    assert off.returncode == 0 and not any("--fsdp-bf16" in l for l in off.stdout.splitlines() if "--phase=2" not in l)
    mfu = {o: [l.split()[-3] for l in o.splitlines() if l.startswith("phase 3")] for o in (out.stdout, off.stdout)}
    assert mfu[out.stdout] == ["0.369"] and mfu[off.stdout] == ["0.224"]
    bad = subprocess.run(["bash", "runs/speedrun.sh", "--dry-run"], cwd=ROOT, env=dict(env, GROWN_KEEP="yes"),
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "GROWN_KEEP=yes: use 0 or 1" in bad.stderr
    bad = subprocess.run(["bash", "runs/speedrun.sh", "--dry-run"], cwd=ROOT, env=dict(env, EXIT_READOUTS="-1"),
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "EXIT_READOUTS=-1: use 0" in bad.stderr


@pytest.mark.slow
def test_speedrun_dry_run_prices_the_plan_schedule(tmp_path):
    """PLAN_SCHEDULE=cycle passes --plan-schedule cycle to phases 2, 3 and SFT and prices its cheaper step; a bad
    value stops with one line."""
    env = dict(os.environ, PYTHON=sys.executable, NANOCHAT_BASE_DIR=str(tmp_path), PYTHONPATH=str(ROOT))

    def total(out):
        line, = [l for l in out.stdout.splitlines() if l.startswith("training total:")]
        return float(line.split()[2])
    runs = {}
    for schedule in ("every", "cycle"):
        runs[schedule] = subprocess.run(["bash", "runs/speedrun.sh", "--dry-run"], cwd=ROOT, capture_output=True,
                                        text=True, timeout=300, env=dict(env, PLAN_SCHEDULE=schedule))
        assert runs[schedule].returncode == 0, runs[schedule].stderr[-2000:]
        assert runs[schedule].stdout.count(f"--plan-schedule {schedule}") == 3
    assert total(runs["cycle"]) < total(runs["every"])

    def mfu(out, stage):
        line, = [l for l in out.stdout.splitlines() if l.startswith(stage)]
        return float(line.split()[-3])
    scaled = subprocess.run(["bash", "runs/speedrun.sh", "--dry-run"], cwd=ROOT, capture_output=True, text=True,
                            timeout=300, env=dict(env, MFU_P1="0.3", MFU_P2="0.2", SCHEDULE_MFU_RATIO="0.5"))
    assert mfu(scaled, "phase 1") == 0.3 and mfu(scaled, "phase 2") == 0.1  # the ratio prices phases 2, 3 and SFT only
    for value in ("0", "x", "-1"):
        bad = subprocess.run(["bash", "runs/speedrun.sh", "--dry-run"], cwd=ROOT, capture_output=True, text=True,
                             timeout=300, env=dict(env, SCHEDULE_MFU_RATIO=value))
        assert bad.returncode == 2 and f"SCHEDULE_MFU_RATIO={value}: use a positive number" in bad.stderr
    bad = subprocess.run(["bash", "runs/speedrun.sh", "--dry-run"], cwd=ROOT, capture_output=True, text=True,
                         timeout=300, env=dict(env, PLAN_SCHEDULE="all"))
    assert bad.returncode == 2 and "PLAN_SCHEDULE=all: use every or cycle" in bad.stderr

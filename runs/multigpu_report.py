"""
Tables for runs/multigpu.sh, read from the scripts.fractal_train logs it wrote:
    python runs/multigpu_report.py agree <dir>   # losses of 1 GPU vs 2-GPU DDP / FSDP2 / expert parallel, repeats, resumes
    python runs/multigpu_report.py scale <dir>   # throughput, MFU, peak memory and scaling efficiency per stage
Each prints a markdown table and writes <dir>/summary.json.
"""
import json
import os
import re
import sys

STEP = re.compile(r"^step (\d+)/\d+ \([\d.]+%\) \| loss (\d+\.\d+).*? \| dt (\d+)ms \| tok/s ([\d,]+) \| mfu ([\d.]+|n/a)", re.M)
UPDATE = re.compile(r"^step (\d+)/.*\| update (\d+)ms", re.M)


def parse_log(path):
    """{step: (loss, dt_ms, tok_s, mfu)}, {step: update_ms} (the optimizer part of dt, from clipping on), and
    the peak memory / trainable counts the run printed."""
    text = open(path).read()
    steps = {int(m[1]): (float(m[2]), int(m[3]), int(m[4].replace(",", "")), None if m[5] == "n/a" else float(m[5]))
             for m in STEP.finditer(text)}
    updates = {int(m[1]): int(m[2]) for m in UPDATE.finditer(text)}
    if not steps:
        raise SystemExit(f"{path}: no step lines (did the run fail? its tail:)\n{text[-2000:]}")
    peak = re.search(r"peak memory ([\d.]+) GiB", text)
    trainable = re.search(r"trainable ([\d,]+) \| frozen ([\d,]+)", text)
    return {"steps": steps, "update_ms": updates, "peak_gib": float(peak[1]) if peak else None,
            "trainable": int(trainable[1].replace(",", "")) if trainable else None,
            "frozen": int(trainable[2].replace(",", "")) if trainable else None}


def diffs(a, b):
    """|loss difference| on the steps both runs have."""
    common = sorted(set(a["steps"]) & set(b["steps"]))
    return [abs(a["steps"][s][0] - b["steps"][s][0]) for s in common], common


def agree(d):
    runs = {name: parse_log(os.path.join(d, f"{name}.log"))
            for name in ("one", "one_repeat", "ddp", "fsdp", "ep", "ddp_resumed_1gpu", "fsdp_resumed_1gpu", "ep_resumed_1gpu")
            if os.path.exists(os.path.join(d, f"{name}.log"))}
    rows = []
    for name, ref in (("one_repeat", "one"), ("ddp", "one"), ("fsdp", "one"), ("ep", "one"), ("ep", "ddp"),
                      ("ddp_resumed_1gpu", "ddp"), ("ddp_resumed_1gpu", "one"), ("fsdp_resumed_1gpu", "fsdp"),
                      ("fsdp_resumed_1gpu", "one"), ("ep_resumed_1gpu", "ep"), ("ep_resumed_1gpu", "one")):
        if name not in runs or ref not in runs:
            continue
        dd, common = diffs(runs[name], runs[ref])
        last = common[-1]
        rows.append({"run": name, "vs": ref, "steps": f"{common[0]}-{last}", "n": len(common),
                     "max_abs_dloss": max(dd), "mean_abs_dloss": sum(dd) / len(dd),
                     "final_loss": runs[name]["steps"][last][0], "ref_final_loss": runs[ref]["steps"][last][0]})
    noise = next((r for r in rows if r["run"] == "one_repeat"), None)
    # within noise: the mean |dloss| at most 3x the 1-GPU repeat's, or 1e-3 where the repeat is bitwise equal
    floor = max(3 * noise["mean_abs_dloss"], 1e-3) if noise else 1e-3
    print("| run | vs | steps | max \\|dloss\\| | mean \\|dloss\\| | final loss | ref final | within noise |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        r["within_noise"] = r["run"] == "one_repeat" or r["mean_abs_dloss"] <= floor
        print(f"| {r['run']} | {r['vs']} | {r['steps']} | {r['max_abs_dloss']:.2e} | {r['mean_abs_dloss']:.2e} | "
              f"{r['final_loss']:.4f} | {r['ref_final_loss']:.4f} | {'-' if r['run'] == 'one_repeat' else ('yes' if r['within_noise'] else 'NO')} |")
    print(f"noise criterion: mean |dloss| <= {floor:.2e} (3x the 1-GPU repeat's mean, at least 1e-3)")
    summary = {"mode": "agree", "rows": rows, "noise_threshold": floor,
               "first_loss": runs["one"]["steps"][min(runs["one"]["steps"])][0]}
    json.dump(summary, open(os.path.join(d, "summary.json"), "w"), indent=1)
    print(json.dumps(summary))


def scale(d):
    rows = []
    for f in sorted(os.listdir(d)):
        m = re.fullmatch(r"p(\d)_n(\d+)\.log", f)
        if not m:
            continue
        phase, n = int(m[1]), int(m[2])
        r = parse_log(os.path.join(d, f))
        timed = [s for s in sorted(r["steps"]) if s >= 2] or sorted(r["steps"])  # steps 0-1 include warmup
        dt = sum(r["steps"][s][1] for s in timed) / len(timed)
        tok = sum(r["steps"][s][2] for s in timed) / len(timed)
        mfus = [r["steps"][s][3] for s in timed if r["steps"][s][3] is not None]
        upd = [r["update_ms"][s] for s in timed if s in r["update_ms"]]
        rows.append({"phase": phase, "gpus": n, "timed_steps": len(timed), "dt_ms": dt, "update_ms": sum(upd) / len(upd) if upd else None, "tok_s": tok, "tok_s_per_gpu": tok / n,
                     "mfu": sum(mfus) / len(mfus) if mfus else None, "peak_gib_rank0": r["peak_gib"],
                     "trainable": r["trainable"], "params": (r["trainable"] or 0) + (r["frozen"] or 0)})
    rows.sort(key=lambda r: (r["phase"], r["gpus"]))
    print("| stage | GPUs | params | trains | ms/step | of which update | tok/s | tok/s per GPU | MFU % | peak GiB (rank 0) "
          "| scaling efficiency |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        base = next((b for b in rows if b["phase"] == r["phase"] and b["gpus"] == 1), None)
        r["efficiency"] = r["tok_s_per_gpu"] / base["tok_s_per_gpu"] if base else None
        eff = f"{100 * r['efficiency']:.1f}%" if r["efficiency"] is not None else "n/a"
        mfu = f"{r['mfu']:.1f}" if r["mfu"] is not None else "n/a"
        upd = f"{r['update_ms']:.0f}" if r["update_ms"] is not None else "n/a"
        print(f"| phase {r['phase']} | {r['gpus']} | {r['params'] / 1e9:.2f}B | {r['trainable'] / 1e9:.2f}B | {r['dt_ms']:.0f} | {upd} | "
              f"{r['tok_s']:,.0f} | {r['tok_s_per_gpu']:,.0f} | {mfu} | {r['peak_gib_rank0']} | {eff} |")
    summary = {"mode": "scale", "rows": rows}
    json.dump(summary, open(os.path.join(d, "summary.json"), "w"), indent=1)
    print(json.dumps(summary))


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] not in ("agree", "scale"):
        raise SystemExit(__doc__)
    (agree if sys.argv[1] == "agree" else scale)(sys.argv[2])

"""
What the experiment reports: the per-difficulty block of results.json, the targets (pass/fail, and the
measured reason when one is missed), the table on stdout and two plots (matplotlib, Agg backend).
"""
import math
import os

from tiny_experiment.tasks import DIFFICULTIES

TAU = 0.95  # the engine's default exit threshold in auto mode: the precision target is stated at it
EPS = 1e-9  # accuracy gaps are differences of fractions of 200 problems: "within 1 point" includes exactly 1 point
TARGETS = {
    "accuracy": "adaptive accuracy within 2 points of full width on every difficulty",
    "easy_compute_saved": ">= 30% compute saved on easy problems (adaptive)",
    "hard_vs_easy_compute": "hard problems get >= 1.3x the compute fraction of easy ones (adaptive)",
    "exit_precision": f">= 0.95 of exited tokens agree with the full model's top-1 at tau = {TAU}",
}


DEFINITIONS = {
    "full_accuracy": "exact match of the greedy completion, mode think (every block at full width, no exits)",
    "adaptive_accuracy": "the same in mode auto: the predictor's width plan, gates at the engine's defaults "
                         "(exit > 0.95, widen < 0.5, plan epsilon 0.02)",
    "mode_accuracy": "per named mode; at toy width the modes snap to levels as in mode_levels",
    "compute_fraction": "auto: engine-counted FLOPs / the full model's FLOPs on the same tokens (prompt + answer "
                        "up to its newline), summed over the problems",
    "mean_exit_layer": "auto: mean over decode tokens of the blocks run (n_layer = no exit)",
    "mean_width": "auto: mean width over the blocks each token ran, prompt and decode tokens",
    "predicted_mean_width": "auto: mean of the width predictor's plan over blocks and problems",
    "exit_rate": "auto: fraction of decode tokens that exited before the last block",
    "exit_precision": "auto: fraction of exited tokens equal to the full model's top-1 (teacher-forced full-width "
                      "forward of the sequence the auto run produced)",
}


def difficulty_block(ev):
    """The results.json 'difficulties' block from evaluate_model's output."""
    s = ev["settings"]
    out = {}
    for d in DIFFICULTIES:
        auto = s["auto"][d]
        out[d] = {
            "full_accuracy": s["think"][d]["accuracy"],
            "adaptive_accuracy": auto["accuracy"],
            "mode_accuracy": {m: s[m][d]["accuracy"] for m in ("ghost", "whisper", "normal", "think", "auto")},
            "level_accuracy": {k: s[k][d]["accuracy"] for k in ev["level_names"]},
            "level_compute_fraction": {k: s[k][d]["compute_fraction"] for k in ev["level_names"]},
            "mean_exit_layer": auto["mean_exit_layer"],
            "mean_width": auto["mean_width"],
            "compute_fraction": auto["compute_fraction"],
            "exit_rate": auto["exit_rate"],
            "exit_precision": auto["exit_precision"],
            "n_exited": auto["n_exited"],
            "widen_rate": auto["widen_rate"],
            "predicted_mean_width": auto["predicted_mean_width"],
            "plan_by_block": auto["plan_by_block"],
        }
        if "dense" in s:
            out[d]["dense_gpt_accuracy"] = s["dense"][d]["accuracy"]
    return out


def check_targets(results):
    """{name: {"pass", "value", "threshold", "target", "reason"}}; reason says what was measured when missed."""
    D = results["difficulties"]
    t = {}
    gaps = {d: D[d]["full_accuracy"] - D[d]["adaptive_accuracy"] for d in DIFFICULTIES}
    worst = max(gaps, key=gaps.get)
    ok = all(g <= 0.02 + EPS for g in gaps.values())
    t["accuracy"] = {"pass": ok, "value": gaps, "threshold": 0.02,
                     "reason": None if ok else (
                         f"{worst}: full {D[worst]['full_accuracy']:.3f} vs adaptive {D[worst]['adaptive_accuracy']:.3f} "
                         f"(predicted mean width {D[worst]['predicted_mean_width']:.0f}, exit rate {D[worst]['exit_rate']:.2f}, "
                         f"exit precision {D[worst]['exit_precision']:.3f})")}
    saved = 1 - D["easy"]["compute_fraction"]
    ok = saved >= 0.30
    t["easy_compute_saved"] = {"pass": ok, "value": saved, "threshold": 0.30,
                               "reason": None if ok else (
                                   f"easy compute fraction {D['easy']['compute_fraction']:.3f}: predicted mean width "
                                   f"{D['easy']['predicted_mean_width']:.0f}, exit rate {D['easy']['exit_rate']:.2f}, "
                                   f"mean exit layer {D['easy']['mean_exit_layer']:.2f}")}
    ratio = D["hard"]["compute_fraction"] / D["easy"]["compute_fraction"]
    ok = ratio >= 1.3
    t["hard_vs_easy_compute"] = {"pass": ok, "value": ratio, "threshold": 1.3,
                                 "reason": None if ok else (
                                     f"compute fraction hard {D['hard']['compute_fraction']:.3f} vs easy "
                                     f"{D['easy']['compute_fraction']:.3f}; predicted mean width hard "
                                     f"{D['hard']['predicted_mean_width']:.0f} vs easy {D['easy']['predicted_mean_width']:.0f}")}
    n_exit = sum(D[d]["n_exited"] for d in DIFFICULTIES)
    agree = sum(D[d]["exit_precision"] * D[d]["n_exited"] for d in DIFFICULTIES if D[d]["n_exited"])
    prec = agree / n_exit if n_exit else float("nan")
    ok = n_exit > 0 and prec >= 0.95
    t["exit_precision"] = {"pass": ok, "value": prec, "threshold": 0.95, "n_exited": n_exit,
                           "reason": None if ok else ("no decode token exited at tau = 0.95" if n_exit == 0 else
                                                      f"{n_exit} exited tokens, {prec:.3f} agree with the full model")}
    for k in t:
        t[k]["target"] = TARGETS[k]
    return t


def issue28_targets(results):
    """The targets of issue #28, per difficulty where they are per difficulty: auto within 1 point of full width, full
    width within 1 point of the dense GPT, easy at <= 0.50 of the compute, hard >= 1.3x easy's compute, and the
    guarantee's alpha not exceeded on the test split."""
    D, g = results["difficulties"], results["guarantee"]
    out = {}
    for name, a, b in (("auto_vs_full", "adaptive_accuracy", "full_accuracy"),
                       ("full_vs_dense", "full_accuracy", "dense_gpt_accuracy")):
        gaps = {d: D[d][a] - D[d][b] for d in DIFFICULTIES if b in D[d]}
        out[name] = {"pass": bool(gaps) and all(v >= -0.01 - EPS for v in gaps.values()),
                     "detail": ", ".join(f"{d} {v:+.3f}" for d, v in gaps.items())}
    easy, hard = D["easy"]["compute_fraction"], D["hard"]["compute_fraction"]
    out["easy_compute"] = {"pass": easy <= 0.5, "detail": f"easy auto compute {easy:.3f} (<= 0.50)"}
    out["hard_vs_easy"] = {"pass": hard >= 1.3 * easy, "detail": f"hard / easy {hard / easy:.3f} (>= 1.3)"}
    out["guarantee_on_test"] = {"pass": all(g["holds_on_test"].values()),
                                "detail": ", ".join(f"{d} {v:.4f}" for d, v in g["test_disagreement"].items())
                                + f" (alpha {g['alpha']}{', full-width fallback' if g['fallback_full_width'] else ''})"}
    return out


def issue30_targets(results):
    """The chat stage's targets of issue #30 (seed 0 is the one the issue names): chat think >= the base pipeline's full
    width - 2 points on every difficulty; chat auto within 1 point of chat think; with an RL block, chat_rl with a compute
    cost lowers auto's compute at <= 1 point of accuracy."""
    D, C = results["difficulties"], results["chat"]["difficulties"]
    out = {}
    gaps = {d: C[d]["think"]["accuracy"] - D[d]["full_accuracy"] for d in DIFFICULTIES}
    out["chat_think_vs_base"] = {"pass": all(v >= -0.02 - EPS for v in gaps.values()),
                                 "detail": ", ".join(f"{d} {v:+.3f}" for d, v in gaps.items()) + " (>= -0.02)"}
    if "auto" in C[DIFFICULTIES[0]]:
        gaps = {d: C[d]["auto"]["accuracy"] - C[d]["think"]["accuracy"] for d in DIFFICULTIES}
        out["chat_auto_vs_think"] = {"pass": all(v >= -0.01 - EPS for v in gaps.values()),
                                     "detail": ", ".join(f"{d} {v:+.3f}" for d, v in gaps.items()) + " (>= -0.01)"}
    rl = results["chat"].get("rl")
    if rl:
        before, after = results["chat"]["modes"]["auto"], rl["modes"]["auto"]
        out["chat_rl_compute"] = {
            "pass": after["compute_fraction"] < before["compute_fraction"] and after["accuracy"] >= before["accuracy"] - 0.01 - EPS,
            "detail": f"auto compute {before['compute_fraction']:.3f} -> {after['compute_fraction']:.3f}, accuracy "
                      f"{before['accuracy']:.3f} -> {after['accuracy']:.3f} (lambda {rl['compute_cost']})"}
    return out


def fmt(x, p=3):
    return "  n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{p}f}"


def print_table(results):
    D = results["difficulties"]
    cols = ["full_accuracy", "adaptive_accuracy", "compute_fraction", "mean_exit_layer", "mean_width",
            "predicted_mean_width", "exit_rate", "exit_precision"]
    short = ["full acc", "adapt acc", "compute", "exit layer", "mean width", "pred width", "exit rate", "exit prec"]
    print("\n" + f"{'':<8}" + "".join(f"{h:>12}" for h in short))
    for d in DIFFICULTIES:
        print(f"{d:<8}" + "".join(f"{fmt(D[d][c], 1 if 'width' in c else 3):>12}" for c in cols))
    modes = list(D["easy"]["mode_accuracy"]) + list(D["easy"]["level_accuracy"])
    print("\naccuracy by compute setting (mode -> width level: " +
          ", ".join(f"{m} {w}" for m, w in results["mode_levels"].items()) + ")")
    print(f"{'':<8}" + "".join(f"{m:>9}" for m in modes) + (f"{'dense GPT':>11}" if "dense_gpt_accuracy" in D["easy"] else ""))
    for d in DIFFICULTIES:
        accs = {**D[d]["mode_accuracy"], **D[d]["level_accuracy"]}
        print(f"{d:<8}" + "".join(f"{accs[m]:>9.3f}" for m in modes) +
              (f"{D[d]['dense_gpt_accuracy']:>11.3f}" if "dense_gpt_accuracy" in D[d] else ""))
    print("\ntargets")
    for k, v in results["targets"].items():
        val = v["value"]
        shown = ", ".join(f"{d} {g:+.3f}" for d, g in val.items()) if isinstance(val, dict) else fmt(val)
        print(f"  [{'PASS' if v['pass'] else 'FAIL'}] {v['target']}: {shown}" + ("" if v["pass"] else f"  -- {v['reason']}"))


def wilson_interval(p, n, z=1.96):
    """The 95% Wilson score interval (lo, hi) of a proportion p measured on n trials (right at 0 and 1 too)."""
    denom = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, center - half), min(1.0, center + half)


MIXER_NAMES = {"A": "attention", "M": "Mamba"}
FFN_NAMES = {"D": "MLP", "E": "MoE"}


def make_plots(results, out_dir):
    """
    compute_vs_accuracy.png: per difficulty, accuracy against compute for every fixed width (the named modes
    are the width they run at), mode auto and the dense GPT before surgery, with 95% intervals over the test
    problems; width_by_block.png: the width the predictor plans for each block in mode auto. Returns their paths.
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    D = results["difficulties"]
    n = results["data"]["eval_problems_per_difficulty"]
    modes_at = {}  # width level -> the named modes that run at it
    for mode, level in results["mode_levels"].items():
        modes_at.setdefault(f"w{level}", []).append(mode)
    paths = {}

    def with_interval(ax, x, acc, **kw):
        lo, hi = wilson_interval(acc, n)
        ax.errorbar([x], [acc], yerr=[[acc - lo], [hi - acc]], capsize=3, linestyle="none", **kw)

    fig, axes = plt.subplots(1, len(DIFFICULTIES), figsize=(4.6 * len(DIFFICULTIES), 4.5), sharey=True)
    for ax, d in zip(axes, DIFFICULTIES):
        levels = sorted(D[d]["level_accuracy"], key=lambda k: D[d]["level_compute_fraction"][k])
        for i, k in enumerate(levels):  # separate points: a width is not a point between its neighbours
            x, acc = D[d]["level_compute_fraction"][k], D[d]["level_accuracy"][k]
            with_interval(ax, x, acc, marker="o", color="gray", label="fixed width" if i == 0 else None)
            label = k + (f"\n{', '.join(modes_at[k])}" if k in modes_at else "")  # the named modes that run at it
            # labels alternate above and below the points, so neighbours at close compute do not overprint; right of
            # the middle they go above and to the left of their point, inside the panel
            right = x > 0.6
            above = right or i % 2 == 0
            ax.annotate(label, (x, acc), textcoords="offset points", xytext=(-4 if right else 4, 6 if above else -6),
                        ha="right" if right else "left", va="bottom" if above else "top", fontsize=7)
        with_interval(ax, D[d]["compute_fraction"], D[d]["adaptive_accuracy"], marker="*", markersize=12, color="red",
                      label="auto (predictor plan + exit gates)")
        if "dense_gpt_accuracy" in D[d]:
            ax.axhline(D[d]["dense_gpt_accuracy"], color="tab:blue", linestyle="--", linewidth=1,
                       label="dense GPT before surgery (accuracy only)")
        ax.set_title(f"{d} ({n} test problems)")
        ax.set_xlabel("compute: FLOPs / full-width FLOPs")
        ax.set_xlim(0, 1.15)
        ax.set_ylim(-0.05, 1.2)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("exact-match accuracy")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8, frameon=False)  # under the panels
    fig.suptitle("Held-out accuracy against compute: each fixed width (under it, the named modes that run at it), "
                 "mode auto, the dense GPT; bars: 95% Wilson intervals", fontsize=10)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    paths["compute_vs_accuracy"] = os.path.join(out_dir, "compute_vs_accuracy.png")
    fig.savefig(paths["compute_vs_accuracy"], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(8, 4.2))
    kinds = results["layer_kinds"]  # per block: mixer letter + FFN letter, e.g. "MD"
    width = 0.8 / len(DIFFICULTIES)
    for i, d in enumerate(DIFFICULTIES):
        ax.bar([j + (i - 1) * width for j in range(len(kinds))], D[d]["plan_by_block"], width=width, label=d)
    ax.set_xticks(range(len(kinds)))
    ax.set_xticklabels([f"{j}\n{MIXER_NAMES.get(k[0], k[0])}\n{FFN_NAMES.get(k[1], k[1])}" for j, k in enumerate(kinds)],
                       fontsize=8)
    ax.set_xlabel("block: index, mixer, feed-forward")
    levels = results["model"]["width_levels"]
    ax.set_yticks(levels)  # the widths a plan can take
    ax.set_ylabel("planned width (mean over problems)")
    ax.set_title("Width the predictor plans for each block in mode auto, by difficulty", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    paths["width_by_block"] = os.path.join(out_dir, "width_by_block.png")
    fig.savefig(paths["width_by_block"], dpi=110)
    plt.close(fig)
    return paths

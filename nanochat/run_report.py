"""
The per-run report: each stage of a run (training, calibration, evaluation, RL) records its metrics as one JSON
file, and `render` turns the directory into one markdown page.

    <report_dir>/<NN>_<stage>.json     one per stage: NN is the order in which stages first recorded; a stage
                                       run again overwrites its own file (and keeps its NN)
    <report_dir>/report.md             written by write() / python -m scripts.report

The directory is `<base_dir>/report` unless $ADAMBA_REPORT_DIR or an explicit report_dir says otherwise.
A stage file holds the stage's own data plus two keys record() adds:
    "stage":       the stage's name
    "provenance":  {"date": UTC ISO time, "commit": short hash or "unknown", "dirty": bool or None,
                    "device": "NVIDIA H100 80GB HBM3 x8" / "cpu: <model> (N cores)", "command": the command line}
Per-mode metrics have one shape, wherever they sit in the data:
    {"modes": {mode: {"accuracy": ..., "compute_fraction": ..., <metric>: ...}}}
    {"tasks": {task: {mode: {<metric>: ...}}}}
render() draws a table of metric x mode for each, lists every other scalar as `key: value`, and closes with a
summary table (one row per stage and task, each mode's headline metric and compute fraction). The same renderers
write the model card's tables (scripts/export.py).
"""
import os
import re
import sys
import json
import math
import shlex
import platform
import subprocess
from datetime import datetime, timezone

from nanochat.common import get_base_dir, expand_path, is_rank0, UserError
from nanochat.checkpoint_manager import atomic_json_save, atomic_bytes_save
from nanochat.matryoshka import MODES

REPORT_DIR_ENV = "ADAMBA_REPORT_DIR"
REPORT_FILENAME = "report.md"
STAGE_FILE = re.compile(r"(\d{2,})_([A-Za-z0-9][A-Za-z0-9_.-]*)\.json")
STAGE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
RESERVED_KEYS = ("stage", "provenance")
PROVENANCE_KEYS = ("date", "commit", "dirty", "git", "device", "command")
PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def resolve_report_dir(path=None):
    """An explicit path, else $ADAMBA_REPORT_DIR, else <base_dir>/report (absolute; not created here)."""
    return expand_path(path or os.environ.get(REPORT_DIR_ENV) or os.path.join(get_base_dir(), "report"))


# -----------------------------------------------------------------------------
# Provenance

def _git(*args):
    return subprocess.run(["git", *args], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=10)


def git_commit():
    """(short hash, dirty) of the checkout this code runs from; ("unknown", None) outside one (an installed copy,
    no git). The checkout must be this project's own: a copy installed inside some other repository's tree (a venv
    in a checkout) would otherwise report that repository's commit."""
    try:
        top = _git("rev-parse", "--show-toplevel")
        if top.returncode != 0 or os.path.realpath(top.stdout.strip()) != os.path.realpath(PROJECT_ROOT):
            return "unknown", None
        head = _git("rev-parse", "--short", "HEAD")
        status = _git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):  # git not installed, or hung
        return "unknown", None
    if head.returncode != 0 or status.returncode != 0:  # a repository without commits yet
        return "unknown", None
    return head.stdout.strip(), bool(status.stdout.strip())


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:  # not Linux
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def device_description():
    """'<GPU name> xN' where CUDA sees GPUs (names joined when they differ), else 'cpu: <model> (N cores)'."""
    import torch
    if torch.cuda.is_available() and torch.cuda.device_count() > 0:
        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        return ", ".join(f"{name} x{names.count(name)}" for name in dict.fromkeys(names))
    return f"cpu: {cpu_model()} ({os.cpu_count()} cores)"


def command_line():
    """The command as typed: `python -m <module> args` for a module run, else argv as it is."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    if spec is not None and spec.name:
        return shlex.join(["python", "-m", spec.name.removesuffix(".__main__"), *sys.argv[1:]])
    return shlex.join(sys.argv)


def provenance():
    commit, dirty = git_commit()
    return {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "commit": commit, "dirty": dirty,
            "device": device_description(), "command": command_line()}


# -----------------------------------------------------------------------------
# Recording

def json_safe(x):
    """NaN and infinities become None (strict JSON has no NaN), tuples lists; the rest as it is."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    return x


def stage_files(directory):
    """[(NN, stage, path)] of the stage files in `directory`, in report order."""
    found = []
    for name in os.listdir(directory):
        m = STAGE_FILE.fullmatch(name)
        if m:
            found.append((int(m.group(1)), m.group(2), os.path.join(directory, name)))
    return sorted(found)


def record(stage, data, report_dir=None):
    """
    Write <report_dir>/<NN>_<stage>.json (atomically) with `data`, "stage" and "provenance"; returns its path.
    A stage recorded before keeps its file and number; a new one gets the next number. Only rank 0 writes (the
    other ranks of a torchrun run get None), so every rank may call it.
    """
    if not STAGE_NAME.fullmatch(stage):
        raise ValueError(f"stage name {stage!r}: use letters, digits, '_', '-' or '.' (it becomes a file name)")
    clash = [k for k in RESERVED_KEYS if k in data]
    if clash:
        raise ValueError(f"stage {stage!r}: the keys {clash} are the report's own (record adds them); rename them")
    if not is_rank0():
        return None
    directory = resolve_report_dir(report_dir)
    os.makedirs(directory, exist_ok=True)
    files = stage_files(directory)
    mine = [path for _, name, path in files if name == stage]
    path = mine[0] if mine else os.path.join(directory, f"{max((n for n, _, _ in files), default=0) + 1:02d}_{stage}.json")
    atomic_json_save(json_safe({"stage": stage, "provenance": provenance(), **data}), path)
    return path


def load_json(path, what="file"):
    """A JSON object from `path`; a missing, unreadable or non-object file is a UserError naming it."""
    try:
        with open(path) as f:
            obj = json.load(f)
    except json.JSONDecodeError as e:
        raise UserError(f"{what} {path} is not valid JSON ({e}): fix or delete it") from e
    except OSError as e:
        raise UserError(f"cannot read {what} {path}: {e.strerror or e}") from e
    if not isinstance(obj, dict):
        raise UserError(f"{what} {path} holds a JSON {type(obj).__name__}, not an object of metrics")
    return obj


def load_stages(directory):
    """[(NN, stage, data)] of a report directory; a missing directory, no stage file or a corrupt one is an error
    naming it."""
    if not os.path.isdir(directory):
        raise UserError(f"report directory {directory} does not exist: no stage has recorded into it "
                        f"(set --report-dir or ${REPORT_DIR_ENV} to the run's report directory)")
    files = stage_files(directory)
    if not files:
        raise UserError(f"report directory {directory} has no stage files (<NN>_<stage>.json): nothing to report")
    stages = []
    for n, name, path in files:
        data = load_json(path, "stage file")
        if not isinstance(data.get("provenance"), dict):
            raise UserError(f"stage file {path} has no provenance: it was not written by nanochat.run_report.record")
        stages.append((n, name, data))
    return stages


def reset(report_dir=None):
    """Delete the stage files and report.md of the report directory; returns the paths removed."""
    directory = resolve_report_dir(report_dir)
    if not os.path.isdir(directory):
        return []
    paths = [p for _, _, p in stage_files(directory)]
    if os.path.exists(os.path.join(directory, REPORT_FILENAME)):
        paths.append(os.path.join(directory, REPORT_FILENAME))
    for p in paths:
        os.remove(p)
    return paths


# -----------------------------------------------------------------------------
# Rendering (shared with the model card of scripts/export.py)

def is_scalar(v):
    return v is None or isinstance(v, (bool, int, float, str))


def fmt(v, max_chars=None):
    """A value as a table cell or list item: floats to 4 significant digits, None as n/a, `|` escaped."""
    if v is None:
        return "n/a"
    if isinstance(v, float):
        text = f"{v:.4g}"
        return text if any(c in text for c in ".en") else text + ".0"  # 1.0 reads as a float, not a count
    if isinstance(v, list):
        return "[" + ", ".join(fmt(x) for x in v) + "]" if len(v) <= 8 and all(is_scalar(x) for x in v) else f"[{len(v)} items]"
    text = " ".join(str(v).split()).replace("|", "\\|")
    return text if max_chars is None or len(text) <= max_chars else text[:max_chars] + "…"


def _per_mode(block):
    """{mode: {metric: value}} with at least one scalar metric per mode, else None."""
    if not isinstance(block, dict) or not block:
        return None
    if all(isinstance(m, dict) and any(is_scalar(v) for v in m.values()) for m in block.values()):
        return block
    return None


def _per_task(block):
    if not isinstance(block, dict) or not block:
        return None
    return block if all(_per_mode(t) for t in block.values()) else None


def mode_blocks(data, path=()):
    """[(path, "modes" | "tasks", block)] of every per-mode shape anywhere in `data` (provenance left out)."""
    found = []
    if not isinstance(data, dict):
        return found
    for key, value in data.items():
        if key == "provenance":
            continue
        if key == "modes" and _per_mode(value):
            found.append((path, "modes", value))
        elif key == "tasks" and _per_task(value):
            found.append((path, "tasks", value))
        elif isinstance(value, dict):
            found.extend(mode_blocks(value, path + (key,)))
    return found


def ordered_modes(names):
    """The compute modes in MODES order (cheapest first), then any others in the order given."""
    names = list(dict.fromkeys(names))
    return [m for m in MODES if m in names] + [m for m in names if m not in MODES]


def _metrics(per_mode):
    """Metric names with a scalar value in some mode, accuracy first, compute_fraction second, then as found."""
    names = list(dict.fromkeys(k for m in per_mode.values() for k, v in m.items() if is_scalar(v)))
    front = [k for k in ("accuracy", "compute_fraction") if k in names]
    return front + [k for k in names if k not in front]


def _row(cells):
    return "| " + " | ".join(cells) + " |"


def mode_table(per_mode):
    """Markdown lines: one row per metric, one column per mode."""
    modes = ordered_modes(per_mode)
    lines = [_row(["metric", *modes]), _row(["---"] * (len(modes) + 1))]
    for metric in _metrics(per_mode):
        lines.append(_row([metric, *(fmt(per_mode[m].get(metric)) for m in modes)]))
    return lines


def task_table(per_task):
    """Markdown lines: one row per task and metric, one column per mode."""
    modes = ordered_modes(m for t in per_task.values() for m in t)
    lines = [_row(["task", "metric", *modes]), _row(["---"] * (len(modes) + 2))]
    for task, per_mode in per_task.items():
        for metric in _metrics(per_mode):
            lines.append(_row([fmt(task), metric, *(fmt(per_mode.get(m, {}).get(metric)) for m in modes)]))
    return lines


def scalar_items(data, path=()):
    """[(dotted key, value)] of the values outside the per-mode shapes and provenance (lists as one item)."""
    items = []
    for key, value in data.items():
        if key == "provenance" or (key == "modes" and _per_mode(value)) or (key == "tasks" and _per_task(value)):
            continue
        if isinstance(value, dict):
            items.extend(scalar_items(value, path + (str(key),)))
        else:
            items.append((".".join(path + (str(key),)), value))
    return items


def metrics_markdown(data, skip=(), limit=None, source=None):
    """Markdown lines for one JSON of metrics: a table per per-mode shape (titled by where it sits), then the other
    values as `- key: value` (keys in `skip` left out; past `limit` items one line says how many more are in
    `source`)."""
    lines = []
    for path, kind, block in mode_blocks(data):
        title = ("per mode" if kind == "modes" else "per task and mode") + (f" ({'.'.join(path)})" if path else "")
        lines += [f"**{title}**", "", *(mode_table(block) if kind == "modes" else task_table(block)), ""]
    items = [(k, v) for k, v in scalar_items(data) if k not in skip]
    shown = items if limit is None else items[:limit]
    lines += [f"- {k}: {fmt(v, max_chars=300)}" for k, v in shown]
    if len(items) > len(shown):
        lines.append(f"- … and {len(items) - len(shown)} more values in {source or 'the JSON file'}")
    return lines


def provenance_of(data):
    """Provenance of a JSON of metrics: its "provenance" object, else the top-level date / commit / git / device
    keys (what bench and eval JSONs carry); {} when it has none."""
    prov = data.get("provenance")
    if isinstance(prov, dict):
        return prov
    return {k: data[k] for k in PROVENANCE_KEYS if k in data and is_scalar(data[k])}


def commit_text(prov):
    commit = prov.get("commit", prov.get("git"))
    if commit is None:
        return None
    return f"{commit} (uncommitted changes)" if prov.get("dirty") else str(commit)


def provenance_line(prov):
    """'date · commit X · device' from what is present; '' when nothing is."""
    parts = [str(prov["date"])] if prov.get("date") else []
    if commit_text(prov):
        parts.append(f"commit {commit_text(prov)}")
    if prov.get("device"):
        parts.append(str(prov["device"]))
    return " · ".join(parts)


def _headline(per_mode):
    names = [k for k in _metrics(per_mode) if k != "compute_fraction"]
    return names[0] if names else None


def summary_table(stages):
    """One row per stage (and task) with per-mode data: its headline metric (accuracy if present) per mode, with the
    compute fraction in parentheses where recorded."""
    rows = []
    for n, name, data in stages:
        for path, kind, block in mode_blocks(data):
            where = ".".join(path)
            groups = [(where, block)] if kind == "modes" else [(".".join(path + (t,)), b) for t, b in block.items()]
            rows += [(f"{n:02d} {name}", label, per_mode) for label, per_mode in groups]
    if not rows:
        return ["No stage recorded per-mode metrics."]
    modes = ordered_modes(m for _, _, per_mode in rows for m in per_mode)
    lines = ["Cells: the headline metric (compute fraction) per mode.", "",
             _row(["stage", "part", "metric", *modes]), _row(["---"] * (len(modes) + 3))]
    for stage, label, per_mode in rows:
        metric = _headline(per_mode)
        cells = []
        for m in modes:
            vals = per_mode.get(m, {})
            cell = fmt(vals.get(metric)) if metric else "n/a"
            if is_scalar(vals.get("compute_fraction")) and vals.get("compute_fraction") is not None:
                cell += f" ({fmt(vals['compute_fraction'])})"
            cells.append(cell)
        lines.append(_row([stage, label or "-", metric or "-", *cells]))
    return lines


def render(report_dir=None):
    """The report of a directory as markdown: header (dates, commits, devices), a section per stage in order, and
    the summary table."""
    directory = resolve_report_dir(report_dir)
    stages = load_stages(directory)
    provs = [data["provenance"] for _, _, data in stages]
    dates = sorted(str(p["date"]) for p in provs if p.get("date"))
    commits = list(dict.fromkeys(commit_text(p) or "unknown" for p in provs))
    devices = list(dict.fromkeys(str(p.get("device", "unknown")) for p in provs))
    lines = ["# Run report", "",
             f"- dates (UTC): {' to '.join(dict.fromkeys([dates[0], dates[-1]]))}" if dates else "- dates: not recorded",
             f"- commit{'s' if len(commits) > 1 else ''}: {', '.join(commits)}",
             f"- device{'s' if len(devices) > 1 else ''}: {', '.join(devices)}",
             f"- stages: {len(stages)} (from {directory})", ""]
    for n, name, data in stages:
        prov = data["provenance"]
        lines += [f"## {n:02d} {name}", "", provenance_line(prov), ""]
        if prov.get("command"):
            lines += [f"`{prov['command']}`", ""]
        lines += metrics_markdown({k: v for k, v in data.items() if k != "stage"})
        lines.append("")
    lines += ["## Summary", "", *summary_table(stages), ""]
    return "\n".join(lines)


def write(report_dir=None):
    """Render the report into <report_dir>/report.md (atomically); returns its path."""
    directory = resolve_report_dir(report_dir)
    text = render(directory)
    path = os.path.join(directory, REPORT_FILENAME)
    atomic_bytes_save(text, path)
    return path

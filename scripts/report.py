"""
The per-run report (nanochat/run_report.py): every stage's metrics per compute mode, with device, date and commit.

    python -m scripts.report                       # render <base_dir>/report (or $ADAMBA_REPORT_DIR) into report.md
    python -m scripts.report --report-dir DIR
    python -m scripts.report --reset               # delete the stage files and report.md (a new run starts clean)

Prints the path of report.md (or, with --reset, each file removed).
"""
import argparse

from nanochat.common import add_runtime_args, run_script
from nanochat import run_report


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m scripts.report", description="Render the per-run report into report.md")
    p.add_argument("--report-dir", type=str, default=None,
                   help=f"the run's report directory (default ${run_report.REPORT_DIR_ENV}, else <base_dir>/report)")
    p.add_argument("--reset", action="store_true", help="delete the directory's stage files and report.md, render nothing")
    add_runtime_args(p, threads=False)  # --debug, --require-kernels (read by run_script)
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    directory = run_report.resolve_report_dir(args.report_dir)
    if args.reset:
        removed = run_report.reset(directory)
        for path in removed:
            print(f"removed {path}")
        print(f"{directory}: {len(removed)} file(s) removed")
        return removed
    path = run_report.write(directory)
    print(path)
    return path


if __name__ == "__main__":
    run_script(main)

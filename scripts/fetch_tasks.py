"""
Download the chat tasks' data into <base_dir>/task_data, so that SFT, eval and RL can run offline.

    python -m scripts.fetch_tasks                  # nanochat's SFT mixture and the chat eval tasks
    python -m scripts.fetch_tasks MMLU GSM8K       # these tasks, every split get_task accepts for them
    python -m scripts.fetch_tasks --all            # every task that has data to fetch

One line per file: task | file | size | downloaded (with the time) or cached. A download interrupted part way
resumes on the next run (huggingface_hub keeps the partial file); what is complete is never fetched again.
"""
import os
import time
import argparse

from nanochat.common import add_runtime_args, run_script, UserError
from tasks import TASKS, CHAT_EVAL_TASKS, SFT_TASKS, task_splits, task_data_files
from tasks.hub import task_data_dir


def fetchable_tasks():
    """The registered tasks with something to download (Conversations reads a local file)."""
    return [name for name in TASKS if any(task_data_files(name, split) for split in task_splits(name))]


def main(argv=None):
    parser = argparse.ArgumentParser(description="Download the chat tasks' data (hub parquet exports, word list, "
                                                 "identity conversations) into <base_dir>/task_data")
    parser.add_argument("names", nargs="*", help="task names (default: the SFT mixture and the chat eval tasks)")
    parser.add_argument("--all", action="store_true", help="every task that has data to fetch")
    add_runtime_args(parser, threads=False)  # --debug, --require-kernels (read by run_script)
    args = parser.parse_args(argv)
    fetchable = fetchable_tasks()
    if args.all and args.names:
        raise UserError("give task names or --all, not both")
    names = fetchable if args.all else args.names or list(dict.fromkeys(SFT_TASKS + CHAT_EVAL_TASKS))
    unknown = [name for name in names if name not in fetchable]
    if unknown:
        raise UserError(f"nothing to fetch for {', '.join(unknown)}; tasks with data: {', '.join(fetchable)}")

    from huggingface_hub.utils import disable_progress_bars
    disable_progress_bars()  # this script's own line per file says what happened
    print(f"task data: {task_data_dir()} | tasks: {', '.join(names)}")
    t0, seen, paths = time.time(), set(), []
    for name in names:
        for split in task_splits(name):
            for resource in task_data_files(name, split):
                if resource.key in seen:  # the word list serves both spelling tasks and both splits
                    continue
                seen.add(resource.key)
                found = resource.ensure(name, report=print)
                paths += found if isinstance(found, list) else [found]
    total_mb = sum(os.path.getsize(p) for p in paths) / 1e6
    print(f"{len(paths)} files, {total_mb:.1f} MB, in {time.time() - t0:.1f}s")


if __name__ == "__main__":
    run_script(main)

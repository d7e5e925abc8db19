"""
Task data on disk: the Hugging Face hub's parquet exports and a few plain-URL files, cached under
<base_dir>/task_data and fetched once (python -m scripts.fetch_tasks, or on first use with network access).

Layout:
    <base_dir>/task_data/<owner>--<name>/parquet_files.json      the export's file listing (kept for offline runs)
    <base_dir>/task_data/<owner>--<name>/<config>/<split>/NNNN.parquet
    <base_dir>/task_data/<filename>                                a plain-URL file (word list, identity jsonl)

Every dataset on the hub has an automatic parquet export on the revision "refs/convert/parquet" with the files
<config>/<split>/NNNN.parquet. The listing comes from HfApi.list_repo_files; files come from hf_hub_download
(which resumes a partial download). A plain-URL file is written to a .part file and renamed when complete.
Nothing here falls back: data that is not cached and cannot be downloaded (no network, or HF_HUB_OFFLINE=1)
stops with one line naming the command that fetches it.
"""
import os
import json
import time
import importlib
import urllib.request

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from nanochat.common import get_base_dir, print0, UserError
from nanochat.checkpoint_manager import atomic_bytes_save
from tasks.common import Task, check_split

PARQUET_REVISION = "refs/convert/parquet"
LISTING_FILENAME = "parquet_files.json"
OFFLINE_ENV = "HF_HUB_OFFLINE"
FETCH_COMMAND = "python -m scripts.fetch_tasks"


def task_data_dir():
    return os.path.join(get_base_dir(), "task_data")


def is_offline():
    """HF_HUB_OFFLINE read now (huggingface_hub reads it once, at import), with the hub's meaning of true."""
    return os.environ.get(OFFLINE_ENV, "").strip().upper() in ("1", "ON", "YES", "TRUE")


def network_errors():
    """What a failed download raises: OSError (urllib, requests, and the hub's own HTTP and offline errors) and
    the HTTPError of whichever httpx package this huggingface_hub version is built on."""
    errors = [OSError]
    for module in ("httpx", "httpx2"):
        try:
            errors.append(importlib.import_module(module).HTTPError)
        except (ImportError, AttributeError):
            pass
    return tuple(errors)


def _not_cached(task_name, what, where, reason):
    return UserError(f"{task_name} needs {what}, which is not in {where}, and {reason}: run "
                     f"`{FETCH_COMMAND} {task_name}` where the network is reachable (then runs work offline)")


def _one_line(exc):
    return f"{type(exc).__name__}: {' '.join(str(exc).split())}"[:300]


def _file_line(task_name, label, path, status):
    size = os.path.getsize(path) / 1e6 if os.path.exists(path) else 0.0
    return f"{task_name} | {label} | {size:.1f} MB | {status}"


class HubSplit:
    """One config/split of a hub dataset's parquet export."""

    def __init__(self, repo_id, config, split):
        self.repo_id, self.config, self.split = repo_id, config, split

    @property
    def key(self):
        return ("hub", self.repo_id, self.config, self.split)

    @property
    def local_dir(self):
        return os.path.join(task_data_dir(), self.repo_id.replace("/", "--"))

    @property
    def listing_path(self):
        return os.path.join(self.local_dir, LISTING_FILENAME)

    def describe(self):
        return f"{self.repo_id} {self.config}/{self.split}"

    def _split_files(self, listing):
        prefix = f"{self.config}/{self.split}/"
        files = sorted(f for f in listing if f.startswith(prefix) and f.endswith(".parquet"))
        if files:
            return files
        if any(f.startswith(f"{self.config}/partial-{self.split}/") for f in listing):
            raise UserError(f"the hub's parquet export of {self.describe()} is partial (the split is over the "
                            f"converter's size limit), so it cannot be used as the whole split")
        splits = sorted({"/".join(f.split("/")[:2]) for f in listing if f.endswith(".parquet")})
        raise UserError(f"{self.repo_id}'s parquet export has no {self.config}/{self.split}; it has: {', '.join(splits)}")

    def _cached_names(self):
        """This split's files per the cached listing, or None when there is no listing or a file is missing."""
        if not os.path.exists(self.listing_path):
            return None
        with open(self.listing_path, encoding="utf-8") as f:
            names = self._split_files(json.load(f)["files"])
        return names if all(os.path.exists(os.path.join(self.local_dir, n)) for n in names) else None

    def ensure(self, task_name, report=None):
        """The split's parquet paths, downloading what is missing; nothing touches the network when all is cached.
        `report(line)` hears about every file (cached ones too); without it only downloads are printed (rank 0)."""
        names = self._cached_names()
        what = f"the hub's parquet export of {self.describe()}"
        if names is None and is_offline():
            raise _not_cached(task_name, what, self.local_dir, f"{OFFLINE_ENV}=1")
        paths = []
        try:
            if names is None:  # list afresh: a listing from an earlier fetch may predate a re-conversion
                from huggingface_hub import HfApi
                listing = HfApi().list_repo_files(self.repo_id, repo_type="dataset", revision=PARQUET_REVISION)
                os.makedirs(self.local_dir, exist_ok=True)
                atomic_bytes_save(json.dumps({"repo_id": self.repo_id, "revision": PARQUET_REVISION,
                                              "files": sorted(listing)}, indent=1), self.listing_path)
                names = self._split_files(listing)
            for name in names:
                path, label, t0 = os.path.join(self.local_dir, name), f"{self.repo_id} {name}", time.time()
                if os.path.exists(path):
                    if report:
                        report(_file_line(task_name, label, path, "cached"))
                else:
                    from huggingface_hub import hf_hub_download
                    path = hf_hub_download(self.repo_id, name, repo_type="dataset", revision=PARQUET_REVISION,
                                           local_dir=self.local_dir)
                    (report or print0)(_file_line(task_name, label, path, f"downloaded in {time.time() - t0:.1f}s"))
                paths.append(path)
        except network_errors() as e:
            raise _not_cached(task_name, what, self.local_dir, f"the download failed ({_one_line(e)})") from e
        return paths

    def load(self, task_name):
        """The whole split as one pyarrow Table (downloaded first if needed)."""
        return pa.concat_tables([pq.read_table(p) for p in self.ensure(task_name)])


class UrlFile:
    """A file fetched from a plain URL into <base_dir>/task_data/<filename>."""

    def __init__(self, url, filename):
        self.url, self.filename = url, filename

    @property
    def key(self):
        return ("url", self.url)

    @property
    def path(self):
        return os.path.join(task_data_dir(), self.filename)

    def describe(self):
        return self.url

    def ensure(self, task_name, report=None):
        if os.path.exists(self.path):
            if report:
                report(_file_line(task_name, self.filename, self.path, "cached"))
            return self.path
        if is_offline():
            raise _not_cached(task_name, self.url, self.path, f"{OFFLINE_ENV}=1")
        t0 = time.time()
        try:
            with urllib.request.urlopen(self.url, timeout=60) as response:
                data = response.read()
        except network_errors() as e:
            raise _not_cached(task_name, self.url, self.path, f"the download failed ({_one_line(e)})") from e
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        atomic_bytes_save(data, self.path)
        (report or print0)(_file_line(task_name, self.filename, self.path, f"downloaded in {time.time() - t0:.1f}s"))
        return self.path


class HubRows:
    """Rows of a pyarrow Table as dicts, in the order of a seeded permutation (np.random.default_rng(seed), the
    shuffle `datasets.Dataset.shuffle(seed)` does, which nanochat applies with seed 42 to every hub dataset)."""

    def __init__(self, table, seed=42):
        self.table = table
        self.order = np.random.default_rng(seed).permutation(table.num_rows)

    def __len__(self):
        return self.table.num_rows

    def physical_index(self, index):
        return int(self.order[index])

    def __getitem__(self, index):
        return self.table.slice(self.physical_index(index), 1).to_pylist()[0]


class HubTask(Task):
    """A task over one split of a hub dataset (one of SUBSETS, the export's configs; the first by default), its
    rows in nanochat's seeded order. Subclasses give repo_id, SUBSETS, SPLITS and get_example."""
    repo_id = None
    SUBSETS = ()
    SPLITS = ()

    def __init__(self, split, subset=None, **view):
        super().__init__(**view)
        self.subset = subset or self.SUBSETS[0]
        if self.subset not in self.SUBSETS:
            raise UserError(f"{self.name} has no subset {self.subset!r}; its subsets: {', '.join(self.SUBSETS)}")
        check_split(self.name, split, self.SPLITS)
        self.split = split
        self.rows = HubRows(self.data_files(split, self.subset)[0].load(self.name))

    @classmethod
    def data_files(cls, split, subset=None):
        """What this task needs on disk for `split` (scripts.fetch_tasks downloads it)."""
        return [HubSplit(cls.repo_id, subset or cls.SUBSETS[0], split)]

    def num_examples(self):
        return len(self.rows)

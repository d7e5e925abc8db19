"""
The pretraining text: a directory of parquet shards (shard_00000.parquet, ...) with a
`text` column, default <base_dir>/base_data.

- The last shard (in sorted file-name order) is the "val" split, all others "train",
  as in nanochat. With fewer than two shards there is no honest split, so that is an error.
- Row groups are the unit of reading and of sharding across ranks: the split's row groups
  are numbered in order over its shards, and rank r reads numbers r, r+world, r+2*world, ...
  (nanochat strides within each file instead; striding over the whole split keeps ranks
  balanced when a shard has fewer row groups than there are ranks).
- Download: `python -m nanochat.dataset --download N` fetches the first N shards of a hub
  dataset repo (nanochat's FineWeb-Edu reshuffle by default) through huggingface_hub.
- Synthetic: `python -m nanochat.dataset --synthetic` writes a small, deterministic,
  English-like corpus marked as synthetic, for quick starts, tests and smoke runs only.
"""
import os
import random
import argparse

import pyarrow as pa
import pyarrow.parquet as pq

from nanochat.common import get_base_dir, expand_path, add_runtime_args, run_script

DEFAULT_REPO = "karpathy/fineweb-edu-100b-shuffle"  # nanochat's pretraining data: shard_00000 .. shard_01822
DEFAULT_NUM_SHARDS_IN_REPO = 1823
SYNTHETIC_KEY = b"adamba_synthetic"  # parquet schema metadata key on every synthetic shard


LOSS_SPANS = "loss_spans"  # optional column: where in each text the loss counts (write_synthetic_shard)


def shard_filename(index):
    return f"shard_{index:05d}.parquet"


def get_data_dir(data_dir=None):
    return expand_path(data_dir) if data_dir else os.path.join(get_base_dir(), "base_data")


def _how_to_get_data(data_dir):
    return (f"Get data with `python -m nanochat.dataset --download N --data-dir {data_dir}` "
            f"(N shards of {DEFAULT_REPO}, ~100MB each; the last one becomes the val split), "
            f"or point --data-dir at a folder of .parquet files with a `text` column, "
            f"or for a smoke test write a small synthetic corpus with "
            f"`python -m nanochat.dataset --synthetic --data-dir {data_dir}`.")


def list_parquet_files(data_dir=None):
    """Sorted full paths of the .parquet files in data_dir; an error if there are none."""
    data_dir = get_data_dir(data_dir)
    if not os.path.isdir(data_dir):
        raise FileNotFoundError(f"data directory {data_dir} does not exist. " + _how_to_get_data(data_dir))
    names = sorted(f for f in os.listdir(data_dir) if f.endswith(".parquet"))
    if not names:
        raise FileNotFoundError(f"data directory {data_dir} has no .parquet files. " + _how_to_get_data(data_dir))
    return [os.path.join(data_dir, name) for name in names]


def split_parquet_files(split, data_dir=None):
    """The shards of one split: the last file is val, the rest train."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    paths = list_parquet_files(data_dir)
    if len(paths) < 2:
        raise ValueError(f"{get_data_dir(data_dir)} has {len(paths)} parquet file; the last file is the val split and "
                         f"the rest train, so at least 2 are needed for val and train not to overlap. "
                         + _how_to_get_data(get_data_dir(data_dir)))
    return paths[:-1] if split == "train" else paths[-1:]


def row_group_index(paths):
    """[(shard_idx, row_group_idx), ...] over the given shards, in reading order."""
    index = []
    for shard_idx, path in enumerate(paths):
        num_row_groups = pq.ParquetFile(path).metadata.num_row_groups
        index.extend((shard_idx, rg) for rg in range(num_row_groups))
    return index


def read_row_group(path, row_group, with_loss_spans=False):
    """The `text` column of one row group as a list of str; with_loss_spans: (texts, spans), spans the
    `loss_spans` column (per document [start, end, start, end, ...] character offsets of the text the loss
    counts on, as write_synthetic_shard writes them) or None when the shard has no such column (every token
    counts: pretraining text)."""
    pf = pq.ParquetFile(path)
    if "text" not in pf.schema_arrow.names:
        raise ValueError(f"{path} has no `text` column (columns: {pf.schema_arrow.names}); "
                         f"pretraining shards need one string per document in `text`")
    if not with_loss_spans:
        return pf.read_row_group(row_group, columns=["text"]).column("text").to_pylist()
    has_spans = LOSS_SPANS in pf.schema_arrow.names
    table = pf.read_row_group(row_group, columns=["text", LOSS_SPANS] if has_spans else ["text"])
    return table.column("text").to_pylist(), table.column(LOSS_SPANS).to_pylist() if has_spans else None


def parquets_iter_batched(split, data_dir=None, start=0, step=1):
    """
    Yields the texts of one row group at a time (list of str) from one split, one pass.
    start/step select row groups over the whole split, e.g. start=rank, step=world_size.
    """
    paths = split_parquet_files(split, data_dir)
    for shard_idx, rg in row_group_index(paths)[start::step]:
        yield read_row_group(paths[shard_idx], rg)


def is_synthetic(path):
    """True when the shard was written by write_synthetic_shards."""
    metadata = pq.read_schema(path).metadata or {}
    return metadata.get(SYNTHETIC_KEY) == b"true"


# -----------------------------------------------------------------------------
# Download from a hub dataset repo

def download_shards(num_shards, data_dir=None, repo_id=DEFAULT_REPO, revision=None):
    """
    Fetch shard_00000.parquet .. shard_{num_shards-1}.parquet from a hub dataset repo into
    data_dir. Shards already present are kept; an interrupted download resumes from
    huggingface_hub's partial file (under data_dir/.cache) on the next call.
    Returns the list of local paths.
    """
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError
    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    if repo_id == DEFAULT_REPO and num_shards > DEFAULT_NUM_SHARDS_IN_REPO:
        raise ValueError(f"{DEFAULT_REPO} has {DEFAULT_NUM_SHARDS_IN_REPO} shards, asked for {num_shards}")
    data_dir = get_data_dir(data_dir)
    os.makedirs(data_dir, exist_ok=True)
    paths = []
    for index in range(num_shards):
        filename = shard_filename(index)
        path = os.path.join(data_dir, filename)
        if os.path.isfile(path):
            print(f"{filename}: already in {data_dir}")
            paths.append(path)
            continue
        print(f"{filename}: downloading from {repo_id} ...", flush=True)
        try:
            got = hf_hub_download(repo_id, filename, repo_type="dataset", revision=revision, local_dir=data_dir)
        except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as e:
            raise RuntimeError(
                f"could not download {filename} from the hub dataset repo {repo_id} into {data_dir}: "
                f"{type(e).__name__}: {e}\n"
                f"Check the network (and that HF_HUB_OFFLINE is not set) and the repo id (--repo), then rerun: "
                f"finished shards are kept and a partial one resumes. Without network, copy the shards by hand into "
                f"{data_dir} as shard_00000.parquet, shard_00001.parquet, ... (any .parquet files with a `text` "
                f"column work; the last one in sorted order is the val split)."
            ) from e
        paths.append(got)
    return paths


# -----------------------------------------------------------------------------
# Synthetic corpus: English-like sentences from a tiny grammar, for tests and smoke runs

_NOUNS = ["river", "teacher", "garden", "machine", "city", "student", "forest", "engine", "library", "planet",
          "farmer", "window", "signal", "market", "bridge", "storm", "doctor", "island", "lamp", "mountain"]
_ADJECTIVES = ["quiet", "bright", "old", "small", "heavy", "green", "careful", "distant", "warm", "simple"]
_VERBS = [("watch", "watches"), ("build", "builds"), ("carry", "carries"), ("follow", "follows"), ("repair", "repairs"),
          ("measure", "measures"), ("visit", "visits"), ("paint", "paints"), ("count", "counts"), ("find", "finds")]
_ADVERBS = ["slowly", "often", "carefully", "again", "today", "later", "quickly", "rarely"]
_PLACES = ["near the bridge", "in the morning", "after the rain", "by the sea", "under the old tree", "at noon"]
_UNITS = ["meters", "apples", "years", "kilograms", "books", "minutes", "stones"]


def _noun_phrase(rng):
    words = [rng.choice(_ADJECTIVES)] if rng.random() < 0.5 else []
    words.append(rng.choice(_NOUNS))
    article = rng.choice(["the", "a", "every", "one"])
    if article == "a" and words[0][0] in "aeiou":
        article = "an"
    return " ".join([article] + words)


def _sentence(rng):
    kind = rng.random()
    if kind < 0.55:
        s = f"{_noun_phrase(rng)} {rng.choice(_VERBS)[1]} {_noun_phrase(rng)}"
        if rng.random() < 0.4:
            s += f" {rng.choice(_ADVERBS)}"
        if rng.random() < 0.3:
            s += f" {rng.choice(_PLACES)}"
        s += "."
    elif kind < 0.8:
        a, b = rng.randint(1, 999), rng.randint(1, 99)
        s = f"{_noun_phrase(rng)} counts {a} {rng.choice(_UNITS)}, and then {b} more, so the total is {a + b}."
    else:
        s = f"does {_noun_phrase(rng)} {rng.choice(_VERBS)[0]} {_noun_phrase(rng)}? yes, {rng.randint(2, 60)} times."
    return s[0].upper() + s[1:]


def synthetic_document(rng):
    """One synthetic document: half are one paragraph, a tenth are 10-20 paragraphs (to exercise cropping)."""
    kind = rng.random()
    num_paragraphs = 1 if kind < 0.5 else rng.randint(2, 4) if kind < 0.9 else rng.randint(10, 20)
    paragraphs = [" ".join(_sentence(rng) for _ in range(rng.randint(1, 5))) for _ in range(num_paragraphs)]
    return "\n\n".join(paragraphs)


def write_synthetic_shards(data_dir, docs_per_shard=512, num_shards=4, seed=0, row_group_size=64):
    """
    Write num_shards synthetic shards into data_dir; the same seed gives the same bytes of text.
    Each shard is marked as synthetic in its parquet metadata (see is_synthetic). Refuses to
    mix with real data: existing non-synthetic .parquet files in data_dir are an error;
    existing synthetic ones are replaced. Returns the list of paths.
    """
    data_dir = expand_path(data_dir)
    os.makedirs(data_dir, exist_ok=True)
    existing = [os.path.join(data_dir, f) for f in sorted(os.listdir(data_dir)) if f.endswith(".parquet")]
    real = [p for p in existing if not is_synthetic(p)]
    if real:
        raise FileExistsError(f"{data_dir} already holds {len(real)} non-synthetic parquet file(s) (e.g. {real[0]}); "
                              f"write synthetic shards into another --data-dir")
    for path in existing:
        os.remove(path)
    rng = random.Random(seed)
    paths = []
    for index in range(num_shards):
        path = os.path.join(data_dir, shard_filename(index))
        write_synthetic_shard(path, [synthetic_document(rng) for _ in range(docs_per_shard)], row_group_size)
        paths.append(path)
    return paths


def write_synthetic_shard(path, texts, row_group_size, loss_spans=None):
    """One parquet shard of `texts`, marked synthetic in its metadata (what is_synthetic reads), written atomically.
    loss_spans: per text, the character spans [start, end) the loss counts on, flat [s0, e0, s1, e1, ...] (e.g. a
    task's answers; the loader sets the other targets to -1); None: the loss counts on every token."""
    columns = {"text": texts}
    if loss_spans is not None:
        if len(loss_spans) != len(texts):
            raise ValueError(f"{len(loss_spans)} loss_spans for {len(texts)} texts")
        for text, spans in zip(texts, loss_spans):
            if len(spans) % 2 or list(spans) != sorted(spans) or (spans and (spans[0] < 0 or spans[-1] > len(text))):
                raise ValueError(f"loss spans {spans} are not sorted [start, end) pairs inside a text of {len(text)} chars")
        columns[LOSS_SPANS] = pa.array([list(map(int, s)) for s in loss_spans], type=pa.list_(pa.int64()))
    table = pa.table(columns).replace_schema_metadata({SYNTHETIC_KEY: b"true"})
    pq.write_table(table, path + ".tmp", row_group_size=row_group_size)
    os.replace(path + ".tmp", path)


def main(argv=None):
    parser = argparse.ArgumentParser(description="Get pretraining shards: download from the hub, or write a synthetic corpus")
    parser.add_argument("--download", type=int, default=None, metavar="N", help="download the first N shards")
    parser.add_argument("--repo", type=str, default=DEFAULT_REPO, help="hub dataset repo to download from")
    parser.add_argument("--revision", type=str, default=None, help="branch, tag or commit of --repo")
    parser.add_argument("--synthetic", action="store_true", help="write a small synthetic corpus instead (smoke tests only)")
    parser.add_argument("--num-shards", type=int, default=4, help="--synthetic: number of shards (the last is val)")
    parser.add_argument("--docs-per-shard", type=int, default=512, help="--synthetic: documents per shard")
    parser.add_argument("--seed", type=int, default=0, help="--synthetic: seed")
    parser.add_argument("--data-dir", type=str, default=None, help="default: <base_dir>/base_data")
    add_runtime_args(parser)  # --debug, --threads, --require-kernels (read by run_script)
    args = parser.parse_args(argv)
    if (args.download is None) == (not args.synthetic):
        parser.error("give exactly one of --download N or --synthetic")
    data_dir = get_data_dir(args.data_dir)
    try:
        if args.synthetic:
            paths = write_synthetic_shards(data_dir, args.docs_per_shard, args.num_shards, args.seed)
            print(f"Wrote {len(paths)} SYNTHETIC shards to {data_dir} (for smoke tests; not real text)")
        else:
            paths = download_shards(args.download, data_dir, args.repo, args.revision)
            print(f"Done: {len(paths)} shards in {data_dir}")
    except (RuntimeError, ValueError, FileExistsError) as e:
        raise SystemExit(f"error: {e}")


if __name__ == "__main__":
    run_script(main)

"""
Train the BPE tokenizer on the train split of the parquet shards and save it.

    python -m scripts.tok_train                          # 65536 ids, up to 2B chars
    python -m scripts.tok_train --vocab-size=4096 --data-dir=/tmp/synthetic --out-dir=/tmp/tok

Writes <out-dir>/tokenizer.pkl (nanochat's format) and <out-dir>/token_bytes.pt.
"""
import os
import time
import logging
import argparse

import torch

from nanochat.common import get_base_dir, add_runtime_args, run_script, setup_logging
from nanochat.dataset import parquets_iter_batched, split_parquet_files, is_synthetic, get_data_dir
from nanochat.tokenizer import Tokenizer, save_token_bytes


def main(argv=None):
    parser = argparse.ArgumentParser(description="Train a GPT-4-style BPE tokenizer (rustbpe) on the parquet shards")
    parser.add_argument("--vocab-size", type=int, default=65536, help="total ids, special tokens included (2^16 as nanochat)")
    parser.add_argument("--max-chars", type=int, default=2_000_000_000, help="stop after this many characters of text")
    parser.add_argument("--doc-cap", type=int, default=10_000, help="crop each document to this many characters")
    parser.add_argument("--data-dir", type=str, default=None, help="folder of parquet shards (default <base_dir>/base_data)")
    parser.add_argument("--out-dir", "--tokenizer-dir", dest="out_dir", type=str, default=None,
                        help="where to save (default <base_dir>/tokenizer)")
    add_runtime_args(parser)  # --debug, --threads, --require-kernels (read by run_script)
    args = parser.parse_args(argv)
    data_dir = get_data_dir(args.data_dir)
    out_dir = args.out_dir or os.path.join(get_base_dir(), "tokenizer")
    print(f"vocab_size: {args.vocab_size:,} | max_chars: {args.max_chars:,} | doc_cap: {args.doc_cap:,}")
    print(f"data_dir: {data_dir} | out_dir: {out_dir}")

    # -------------------------------------------------------------------------
    # Text: the train split, documents cropped to --doc-cap, --max-chars in all
    train_paths = split_parquet_files("train", data_dir)  # fails here, with what to do, if there is no data
    if any(is_synthetic(p) for p in train_paths):
        print("NOTE: training on the SYNTHETIC corpus (smoke test only; the tokenizer will not suit real text)")
    stats = {"docs": 0, "chars": 0}

    def text_iterator():
        for texts in parquets_iter_batched("train", data_dir):
            for text in texts:
                text = text[:args.doc_cap]
                stats["docs"] += 1
                stats["chars"] += len(text)
                yield text
                if stats["chars"] >= args.max_chars:
                    return

    # -------------------------------------------------------------------------
    # Train and save
    t0 = time.time()
    if args.vocab_size >= 4096:  # rustbpe's progress lines (INFO, one per percent) only where training takes a while
        setup_logging()
        logging.getLogger("rustbpe").setLevel(logging.INFO)
    tokenizer = Tokenizer.train_from_iterator(text_iterator(), args.vocab_size)
    train_time = time.time() - t0
    tokenizer_path = tokenizer.save(out_dir)
    token_bytes_path = save_token_bytes(tokenizer, out_dir)
    print(f"Trained on {stats['docs']:,} documents, {stats['chars']:,} characters in {train_time:.1f}s")
    print(f"Saved {tokenizer_path} and {token_bytes_path}")

    # -------------------------------------------------------------------------
    # Checks and a short report: round trip, bytes per token on some val text
    sample = "Hello world! Numbers: 123, 4567.\nContractions: I'm, you're.\tSymbols: @#$%^&*()\nUnicode: naïve 你好 🌍"
    ids = tokenizer.encode(sample)
    if tokenizer.decode(ids) != sample:
        raise RuntimeError("the trained tokenizer does not round-trip text: encode then decode changed it")
    token_bytes = torch.load(token_bytes_path)
    if int(token_bytes[ids].sum()) != len(sample.encode("utf-8")):
        raise RuntimeError("token_bytes.pt does not add up to the text's byte length")
    val_texts = next(parquets_iter_batched("val", data_dir))
    val_ids = tokenizer.encode(val_texts)
    val_bytes = sum(len(t.encode("utf-8")) for t in val_texts)
    val_tokens = sum(len(x) for x in val_ids)
    counted = token_bytes[token_bytes > 0].float()
    print(f"vocab size: {tokenizer.get_vocab_size():,} ({len(tokenizer.get_special_tokens())} special, "
          f"bos id {tokenizer.get_bos_token_id()})")
    print(f"bytes per token on a val row group: {val_bytes / val_tokens:.3f} ({val_tokens:,} tokens)")
    print(f"token length in bytes: min {int(counted.min())} max {int(counted.max())} mean {counted.mean():.2f}")
    return out_dir


if __name__ == "__main__":
    run_script(main)

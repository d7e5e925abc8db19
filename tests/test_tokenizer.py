"""Tokenizer: rustbpe training, tiktoken encoding, nanochat's tokenizer.pkl / token_bytes.pt formats, tok_train."""
import os
import pickle

import pytest
import tiktoken
import torch

from nanochat.dataset import write_synthetic_shards, parquets_iter_batched
from nanochat.tokenizer import (Tokenizer, SPECIAL_TOKENS, SPLIT_PATTERN, compute_token_bytes, save_token_bytes,
                                get_tokenizer, get_token_bytes)

VOCAB = 400
SAMPLES = [
    "Hello world! The river counts 123 stones, and then 4567 more.",
    "Contractions: I'm, you're, it's, we'll, they've.\n\n\tIndented line.",
    "Unicode: naïve café, 你好世界, emoji 🌍🚀, and a lone combining mark e\u0301.",
    "special-looking text <|bos|> and <|user_start|> stays ordinary text",
    "",
]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("data")
    write_synthetic_shards(data_dir, docs_per_shard=96, num_shards=2, seed=3, row_group_size=32)
    return [t for texts in parquets_iter_batched("train", data_dir) for t in texts]


@pytest.fixture(scope="module")
def tok(corpus):
    return Tokenizer.train_from_iterator(iter(corpus), VOCAB)


def test_round_trip(tok, corpus):
    assert tok.get_vocab_size() == VOCAB
    for text in SAMPLES + corpus[:20]:
        assert tok.decode(tok.encode(text)) == text
    # BPE compresses the text it was trained on: fewer tokens than bytes
    text = corpus[0]
    assert len(tok.encode(text)) < 0.6 * len(text.encode("utf-8"))
    # encoding uses nanochat's split pattern
    assert tok.enc._pat_str == SPLIT_PATTERN


def test_special_tokens_follow_bpe_ranks(tok):
    num_ranks = VOCAB - len(SPECIAL_TOKENS)
    for i, name in enumerate(SPECIAL_TOKENS):
        assert tok.encode_special(name) == num_ranks + i
    assert tok.get_bos_token_id() == num_ranks
    assert tok.get_special_tokens() == set(SPECIAL_TOKENS)
    assert tok.id_to_token(num_ranks + 3) == "<|assistant_start|>"
    # every ordinary id is below the specials
    assert max(tok.encode(SAMPLES[3])) < num_ranks


def test_encode_prepend_append_and_batch(tok):
    bos = tok.get_bos_token_id()
    end = tok.encode_special("<|assistant_end|>")
    plain = tok.encode(SAMPLES[0])
    assert tok.encode(SAMPLES[0], prepend=bos) == [bos] + plain
    assert tok.encode(SAMPLES[0], prepend="<|bos|>", append="<|assistant_end|>") == [bos] + plain + [end]
    batch = tok.encode(SAMPLES, prepend=bos, num_threads=2)
    assert batch == [[bos] + tok.encode(s) for s in SAMPLES]
    assert tok(SAMPLES[1]) == tok.encode(SAMPLES[1])
    with pytest.raises(TypeError, match="str or a list of str"):
        tok.encode(123)
    with pytest.raises(ValueError):
        tok.encode_special("<|not_a_token|>")
    with pytest.raises(ValueError, match="not a special token"):
        tok.encode_special("the")  # an ordinary token is not a special one


def test_save_load_round_trip(tok, tmp_path):
    path = tok.save(tmp_path)
    assert os.path.basename(path) == "tokenizer.pkl"
    # the file is a bare pickled tiktoken.Encoding, exactly what nanochat writes and reads
    with open(path, "rb") as f:
        enc = pickle.load(f)
    assert isinstance(enc, tiktoken.Encoding)
    loaded = Tokenizer.from_directory(tmp_path)
    assert loaded.get_vocab_size() == tok.get_vocab_size()
    assert loaded.get_bos_token_id() == tok.get_bos_token_id()
    for text in SAMPLES:
        assert loaded.encode(text) == tok.encode(text)
    assert loaded.encode(SAMPLES, prepend="<|bos|>") == tok.encode(SAMPLES, prepend="<|bos|>")


def test_nanochat_style_pickle_loads(tok, tmp_path):
    # a tokenizer.pkl as nanochat writes it: pickle.dump(enc) of an Encoding named "rustbpe"
    enc = tiktoken.Encoding(name="rustbpe", pat_str=SPLIT_PATTERN, mergeable_ranks=tok.enc._mergeable_ranks,
                            special_tokens=tok.enc._special_tokens)
    with open(tmp_path / "tokenizer.pkl", "wb") as f:
        pickle.dump(enc, f)
    loaded = Tokenizer.from_directory(tmp_path)
    assert loaded.encode(SAMPLES[2]) == tok.encode(SAMPLES[2])


def test_not_a_nanochat_encoding(tmp_path):
    enc = tiktoken.Encoding(name="bytes", pat_str=SPLIT_PATTERN,
                            mergeable_ranks={bytes([i]): i for i in range(256)}, special_tokens={"<|eot|>": 256})
    with pytest.raises(ValueError, match="<\\|bos\\|>"):
        Tokenizer(enc)


def test_vocab_bounds(corpus):
    with pytest.raises(ValueError, match="vocab_size"):
        Tokenizer.train_from_iterator(iter(corpus), 256)
    # asking for more merges than the text supports fails instead of returning a smaller vocab
    with pytest.raises(ValueError, match="lower the vocab size"):
        Tokenizer.train_from_iterator(iter(corpus[:3]), 5000)


def test_token_bytes(tok, tmp_path):
    token_bytes = compute_token_bytes(tok)
    assert token_bytes.shape == (VOCAB,) and token_bytes.dtype == torch.int32
    assert torch.all(token_bytes[:256] == 1)  # the raw byte tokens
    for name in SPECIAL_TOKENS:
        assert token_bytes[tok.encode_special(name)] == 0
    for i in (256, 300, VOCAB - len(SPECIAL_TOKENS) - 1):
        assert token_bytes[i] == len(tok.enc.decode_single_token_bytes(i)) >= 2
    # bytes add up over any encoding, multi-byte characters split across tokens included
    for text in SAMPLES:
        ids = tok.encode(text)
        assert int(token_bytes[ids].sum()) == len(text.encode("utf-8"))
    assert int(token_bytes[tok.encode(SAMPLES[0], prepend="<|bos|>")].sum()) == len(SAMPLES[0].encode("utf-8"))
    save_token_bytes(tok, tmp_path)
    assert torch.equal(get_token_bytes(tmp_path), token_bytes)


def test_missing_tokenizer_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="python -m scripts.tok_train"):
        get_tokenizer()
    with pytest.raises(FileNotFoundError, match="python -m scripts.tok_train"):
        get_token_bytes()


def test_tok_train_end_to_end(tmp_path, monkeypatch, capsys):
    from scripts.tok_train import main
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    # no data yet: a clear error naming the fix, not a silent fallback
    with pytest.raises(FileNotFoundError, match="nanochat.dataset --download"):
        main(["--vocab-size", "300"])
    write_synthetic_shards(tmp_path / "base_data", docs_per_shard=64, num_shards=3, seed=1, row_group_size=32)
    out_dir = main(["--vocab-size", "320", "--max-chars", "200000", "--doc-cap", "2000"])
    assert out_dir == os.path.join(str(tmp_path), "tokenizer")
    report = capsys.readouterr().out
    assert "SYNTHETIC" in report and "bytes per token" in report
    tok = get_tokenizer()  # default location <base_dir>/tokenizer
    assert tok.get_vocab_size() == 320
    assert torch.equal(get_token_bytes(), compute_token_bytes(tok))
    text = "The quiet river counts 42 stones."
    assert tok.decode(tok.encode(text)) == text
    # --data-dir and --out-dir elsewhere
    other = tmp_path / "elsewhere"
    write_synthetic_shards(other / "data", docs_per_shard=32, num_shards=2, seed=2, row_group_size=32)
    main(["--vocab-size", "300", "--data-dir", str(other / "data"), "--out-dir", str(other / "tok")])
    assert Tokenizer.from_directory(other / "tok").get_vocab_size() == 300
    main(["--vocab-size", "301", "--data-dir", str(other / "data"), "--tokenizer-dir", str(other / "tok2")])
    assert Tokenizer.from_directory(other / "tok2").get_vocab_size() == 301


# ---- chat rendering ------------------------------------------------------------------------------------------
def test_render_conversation_masks_what_the_assistant_writes(tok):
    conv = {"messages": [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "2+3?"},
        {"role": "assistant", "content": [{"type": "text", "text": "calc "}, {"type": "python", "text": "2+3"},
                                          {"type": "python_output", "text": "5"}, {"type": "text", "text": " =5"}]},
        {"role": "user", "content": "thanks"},
        {"role": "assistant", "content": "ok"},
    ]}
    ids, mask = tok.render_conversation(conv)
    sp = tok.encode_special
    expect = ([tok.get_bos_token_id(), sp("<|user_start|>")] + tok.encode("be brief\n\n2+3?") + [sp("<|user_end|>"),
              sp("<|assistant_start|>")] + tok.encode("calc ") + [sp("<|python_start|>")] + tok.encode("2+3") +
              [sp("<|python_end|>"), sp("<|output_start|>")] + tok.encode("5") + [sp("<|output_end|>")] +
              tok.encode(" =5") + [sp("<|assistant_end|>"), sp("<|user_start|>")] + tok.encode("thanks") +
              [sp("<|user_end|>"), sp("<|assistant_start|>")] + tok.encode("ok") + [sp("<|assistant_end|>")])
    assert ids == expect
    # the assistant's own tokens are exactly: its text, the tool call with its delimiters, <|assistant_end|>
    written = [t for t, m in zip(ids, mask) if m]
    assert written == (tok.encode("calc ") + [sp("<|python_start|>")] + tok.encode("2+3") + [sp("<|python_end|>")] +
                       tok.encode(" =5") + [sp("<|assistant_end|>")] + tok.encode("ok") + [sp("<|assistant_end|>")])
    ids2, mask2 = tok.render_conversation(conv, max_tokens=7)
    assert ids2 == ids[:7] and mask2 == mask[:7]


def test_render_for_completion_and_bad_conversations(tok):
    conv = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    ids, _ = tok.render_conversation(conv)
    prompt = tok.render_for_completion(conv)
    assert prompt == ids[:len(prompt)] and prompt[-1] == tok.encode_special("<|assistant_start|>")
    assert ids[len(prompt):] == tok.encode("yo") + [tok.encode_special("<|assistant_end|>")]
    with pytest.raises(ValueError, match="alternate"):
        tok.render_conversation({"messages": [{"role": "assistant", "content": "x"}]})
    with pytest.raises(ValueError, match="part type"):
        tok.render_conversation({"messages": [{"role": "user", "content": "q"},
                                              {"role": "assistant", "content": [{"type": "image", "text": "x"}]}]})
    with pytest.raises(ValueError, match="non-empty"):
        tok.render_conversation({"messages": []})
    with pytest.raises(ValueError, match="end with the assistant"):
        tok.render_for_completion({"messages": [{"role": "user", "content": "q"}]})

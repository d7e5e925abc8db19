"""
GPT-4-style byte-level BPE tokenizer: trained with rustbpe, encoded with tiktoken.

The on-disk format is nanochat's: `tokenizer.pkl` is a pickled `tiktoken.Encoding`
whose ids are [0, num_merges + 256) for the BPE ranks followed by the special tokens,
so a tokenizer.pkl written by nanochat loads here unchanged and vice versa.
`token_bytes.pt` is a 1-D int32 tensor: for each token id, how many bytes of text it
stands for (0 for special tokens). Bits-per-byte divides the summed loss by these.
"""
import os
import pickle

import torch
import tiktoken

from nanochat.common import get_base_dir, expand_path

# The special tokens, in id order after the BPE ranks. These names and their order are
# part of the checkpoint contract: nanochat's models were trained with exactly these ids.
SPECIAL_TOKENS = [
    "<|bos|>",  # starts every document; the only special token used in pretraining
    "<|user_start|>",  # the rest render chat conversations (SFT / chat)
    "<|user_end|>",
    "<|assistant_start|>",
    "<|assistant_end|>",
    "<|python_start|>",  # the assistant calls the python tool
    "<|python_end|>",
    "<|output_start|>",  # the tool's output is fed back
    "<|output_end|>",
]

# nanochat's pre-tokenisation regex: GPT-4's (cl100k) pattern except that digits are
# grouped at most two at a time (\p{N}{1,2}), so that a small vocab spends fewer ids on numbers.
# It must stay byte-identical to nanochat's for its tokenizer.pkl to mean the same thing.
SPLIT_PATTERN = r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""

from nanochat.common import TOKENIZER_FILENAME, TOKEN_BYTES_FILENAME  # noqa: E402 (the names live with the other shared constants)


class Tokenizer:
    """
    A tiktoken.Encoding plus the conventions nanochat puts on top of it (BOS id, special
    tokens by name). Behaves like nanochat's RustBPETokenizer.
    """

    def __init__(self, enc, bos_token="<|bos|>"):
        if not isinstance(enc, tiktoken.Encoding):
            raise TypeError(f"expected a tiktoken.Encoding, got {type(enc).__name__}")
        self.enc = enc
        self._special_ids = {}  # name -> id, filled on first use
        if bos_token not in enc.special_tokens_set:
            raise ValueError(f"this encoding has no {bos_token!r} special token "
                             f"(it has {sorted(enc.special_tokens_set)}); it is not a nanochat tokenizer")
        self.bos_token_id = self.encode_special(bos_token)

    @classmethod
    def train_from_iterator(cls, text_iterator, vocab_size):
        """Learn BPE merges from an iterator of strings; vocab_size counts the special tokens too."""
        num_ranks = vocab_size - len(SPECIAL_TOKENS)
        if num_ranks < 256:
            raise ValueError(f"vocab_size={vocab_size} leaves {num_ranks} ids for BPE, fewer than the 256 byte "
                             f"tokens; use vocab_size >= {256 + len(SPECIAL_TOKENS)}")
        import rustbpe  # the trainer only: loading and encoding need tiktoken alone
        bpe = rustbpe.Tokenizer()
        bpe.train_from_iterator(text_iterator, num_ranks, pattern=SPLIT_PATTERN)
        # rustbpe stops early when the corpus runs out of pairs to merge; a smaller vocab than
        # asked for would silently disagree with the model's embedding size, so stop here.
        ranks = {bytes(token): rank for token, rank in bpe.get_mergeable_ranks()}
        if len(ranks) != num_ranks:
            raise ValueError(f"the training text only supports {len(ranks) - 256} merges but vocab_size={vocab_size} "
                             f"needs {num_ranks - 256}: train on more text or lower the vocab size "
                             f"(at most {len(ranks) + len(SPECIAL_TOKENS)} for this text)")
        # special tokens go right after the BPE ranks, in SPECIAL_TOKENS order
        special = {name: len(ranks) + i for i, name in enumerate(SPECIAL_TOKENS)}
        enc = tiktoken.Encoding(name="rustbpe", pat_str=bpe.get_pattern(), mergeable_ranks=ranks,
                                special_tokens=special)
        return cls(enc)

    @classmethod
    def from_directory(cls, tokenizer_dir):
        path = os.path.join(expand_path(tokenizer_dir), TOKENIZER_FILENAME)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no tokenizer at {path}: train one with `python -m scripts.tok_train` "
                                    f"(or copy nanochat's tokenizer.pkl there)")
        # NOTE: pickle can run code; only load tokenizer files you trust
        with open(path, "rb") as f:
            enc = pickle.load(f)
        return cls(enc)

    def save(self, tokenizer_dir):
        tokenizer_dir = expand_path(tokenizer_dir)
        os.makedirs(tokenizer_dir, exist_ok=True)
        path = os.path.join(tokenizer_dir, TOKENIZER_FILENAME)
        tmp = path + ".tmp"
        with open(tmp, "wb") as f:
            pickle.dump(self.enc, f)  # the bare Encoding, exactly what nanochat pickles
        os.replace(tmp, path)
        return path

    def get_vocab_size(self):
        return self.enc.n_vocab

    def get_bos_token_id(self):
        return self.bos_token_id

    def get_special_tokens(self):
        return set(self.enc.special_tokens_set)

    def encode_special(self, name):
        if name not in self._special_ids:
            if name not in self.enc.special_tokens_set:
                raise ValueError(f"{name!r} is not a special token; they are {sorted(self.enc.special_tokens_set)}")
            self._special_ids[name] = self.enc.encode_single_token(name)
        return self._special_ids[name]

    def id_to_token(self, token_id):
        return self.enc.decode([token_id])

    def _special_id(self, token):
        return token if isinstance(token, int) else self.encode_special(token)

    def encode(self, text, prepend=None, append=None, num_threads=8):
        """
        text: a str -> list[int], or a list of str -> list[list[int]] (encoded in parallel).
        Special-token names inside the text are encoded as ordinary text, never as specials.
        prepend/append: a special token's name or id to put around each encoded text.
        """
        head = [] if prepend is None else [self._special_id(prepend)]
        tail = [] if append is None else [self._special_id(append)]
        if isinstance(text, str):
            return head + self.enc.encode_ordinary(text) + tail
        if isinstance(text, list):
            return [head + ids + tail for ids in self.enc.encode_ordinary_batch(text, num_threads=num_threads)]
        raise TypeError(f"encode takes a str or a list of str, got {type(text).__name__}")

    def __call__(self, *args, **kwargs):
        return self.encode(*args, **kwargs)

    def decode(self, ids):
        return self.enc.decode(ids)

    # ---- chat: conversations rendered with the special tokens (nanochat's layout) ----------------------------
    def render_conversation(self, conversation, max_tokens=2048):
        """
        (ids, mask) of a conversation {"messages": [...]}: <|bos|>, then per turn <|user_start|> text <|user_end|> or
        <|assistant_start|> parts <|assistant_end|>. mask is 1 on the tokens the assistant writes (its text, its
        python tool calls with their delimiters, <|assistant_end|>) and 0 elsewhere (the prompt, <|assistant_start|>,
        tool outputs, which the tool writes). A leading system message is folded into the first user message, as
        nanochat does. Turns must alternate user, assistant, user, ...; both lists are cut to max_tokens.
        """
        messages = _chat_messages(conversation)
        ids, mask = [], []

        def add(tokens, m):
            tokens = [tokens] if isinstance(tokens, int) else tokens
            ids.extend(tokens)
            mask.extend([m] * len(tokens))

        sp = self.encode_special
        add(self.get_bos_token_id(), 0)
        for message in messages:
            content = message["content"]
            if message["role"] == "user":
                add(sp("<|user_start|>"), 0)
                add(self.encode(content), 0)
                add(sp("<|user_end|>"), 0)
                continue
            add(sp("<|assistant_start|>"), 0)
            for part in ([{"type": "text", "text": content}] if isinstance(content, str) else content):
                kind, text = part.get("type"), part.get("text")
                if not isinstance(text, str):
                    raise ValueError(f"an assistant part needs a str 'text', got {part!r}")
                if kind == "text":
                    add(self.encode(text), 1)
                elif kind == "python":
                    add(sp("<|python_start|>"), 1)
                    add(self.encode(text), 1)
                    add(sp("<|python_end|>"), 1)
                elif kind == "python_output":
                    add(sp("<|output_start|>"), 0)
                    add(self.encode(text), 0)
                    add(sp("<|output_end|>"), 0)
                else:
                    raise ValueError(f"unknown assistant part type {kind!r} (text, python, python_output)")
            add(sp("<|assistant_end|>"), 1)
        return ids[:max_tokens], mask[:max_tokens]

    def render_for_completion(self, conversation):
        """The prompt ids for the assistant's next turn: the conversation without its last (assistant) message,
        ending with <|assistant_start|>."""
        messages = _chat_messages(conversation)
        if messages[-1]["role"] != "assistant":
            raise ValueError("render_for_completion: the conversation must end with the assistant message to leave out")
        ids, _ = self.render_conversation({"messages": messages[:-1]}, max_tokens=None)
        return ids + [self.encode_special("<|assistant_start|>")]


def _chat_messages(conversation):
    """The conversation's messages, a system message folded into the first user message; checks roles alternate."""
    messages = conversation.get("messages") if isinstance(conversation, dict) else None
    if not isinstance(messages, list) or not messages:
        raise ValueError("a conversation is a dict with a non-empty 'messages' list")
    if messages[0].get("role") == "system":
        if len(messages) < 2 or messages[1].get("role") != "user":
            raise ValueError("a system message must be followed by a user message")
        first = dict(messages[1], content=messages[0]["content"] + "\n\n" + messages[1]["content"])
        messages = [first] + messages[2:]
    for i, message in enumerate(messages):
        want = "user" if i % 2 == 0 else "assistant"
        if message.get("role") != want:
            raise ValueError(f"message {i} has role {message.get('role')!r}; turns alternate user, assistant, ... "
                             f"(one optional system message first)")
        if want == "user" and not isinstance(message.get("content"), str):
            raise ValueError(f"message {i}: a user message's content is a str")
    return messages


# -----------------------------------------------------------------------------
# token_bytes.pt: bytes per token id, for bits-per-byte

def compute_token_bytes(tokenizer):
    """
    (V,) int32: the number of bytes each token id stands for, 0 for special tokens.
    Counts the token's raw bytes. nanochat counts len(decode([id]).encode()), which agrees
    except for tokens that are a partial UTF-8 sequence (counted there as the 3-byte
    replacement character); raw bytes make sum(token_bytes[ids]) == len(text.encode()).
    """
    enc = tokenizer.enc
    special_ids = {enc.encode_single_token(name) for name in enc.special_tokens_set}
    counts = [0 if i in special_ids else len(enc.decode_single_token_bytes(i)) for i in range(enc.n_vocab)]
    return torch.tensor(counts, dtype=torch.int32)


def save_token_bytes(tokenizer, tokenizer_dir):
    token_bytes = compute_token_bytes(tokenizer)
    tokenizer_dir = expand_path(tokenizer_dir)
    os.makedirs(tokenizer_dir, exist_ok=True)
    path = os.path.join(tokenizer_dir, TOKEN_BYTES_FILENAME)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        torch.save(token_bytes, f)
    os.replace(tmp, path)
    return path


def default_tokenizer_dir():
    return os.path.join(get_base_dir(), "tokenizer")


def get_tokenizer(tokenizer_dir=None):
    """The tokenizer in tokenizer_dir, default <base_dir>/tokenizer."""
    return Tokenizer.from_directory(tokenizer_dir or default_tokenizer_dir())


def get_token_bytes(tokenizer_dir=None, device="cpu"):
    """(V,) int32 tensor from token_bytes.pt on `device`."""
    path = os.path.join(expand_path(tokenizer_dir or default_tokenizer_dir()), TOKEN_BYTES_FILENAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no token_bytes at {path}: it is written by `python -m scripts.tok_train` "
                                f"(or call nanochat.tokenizer.save_token_bytes(tokenizer, dir))")
    with open(path, "rb") as f:
        token_bytes = torch.load(f, map_location=device)
    if not (isinstance(token_bytes, torch.Tensor) and token_bytes.ndim == 1):
        raise ValueError(f"{path} should hold a 1-D tensor of bytes per token id, got {type(token_bytes).__name__}")
    return token_bytes

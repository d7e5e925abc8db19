"""
Conversation data, and one scorer for local files:
- SmolTalk: general chat. Hub: HuggingFaceTB/smol-smoltalk, config "default", splits train (460K) and test
  (24K). A row: {"messages": [{"content": str, "role": str}, ...], "source": str}; an optional system message
  first, then user and assistant alternating.
- Conversations: a local jsonl file, one conversation a line, either {"messages": [...]} or the bare list of
  messages (nanochat's CustomJSON layout). Every line is checked when the file is read; the first bad one stops
  with its file and line number.
- ExactAnswers: a local jsonl file as Conversations reads it, scored: the generated assistant turn (whitespace
  stripped) must equal the conversation's last assistant message. `scripts.chat_eval --data` evaluates such files.
- Identity: nanochat's synthetic conversations about who the assistant is, a jsonl file in the bare-list layout
  fetched from nanochat's public URL.
"""
import json
import os

from nanochat.common import UserError, expand_path
from tasks.common import Task, check_split, conversation_problem
from tasks.hub import HubTask, UrlFile

IDENTITY_URL = "https://karpathy-public.s3.us-west-2.amazonaws.com/identity_conversations.jsonl"
IDENTITY_FILE = UrlFile(IDENTITY_URL, "identity_conversations.jsonl")


class SmolTalk(HubTask):
    name = "SmolTalk"
    repo_id = "HuggingFaceTB/smol-smoltalk"
    SUBSETS = ("default",)
    SPLITS = ("train", "test")

    def __init__(self, split="train", subset="default", **view):
        super().__init__(split, subset, **view)

    def get_example(self, index):
        row = self.rows[index]
        conversation = {"messages": [{"role": m["role"], "content": m["content"]} for m in row["messages"]]}
        problem = conversation_problem(conversation)
        if problem:
            raise ValueError(f"SmolTalk {self.split} row {self.rows.physical_index(index)}: {problem}")
        return conversation


def read_conversations(path):
    """Every conversation of a jsonl file, each checked; a bad line raises UserError naming path:line."""
    if not os.path.isfile(path):
        raise UserError(f"conversations file {path} does not exist")
    conversations = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno})") from e
            conversation = {"messages": record} if isinstance(record, list) else record
            problem = conversation_problem(conversation)
            if problem:
                raise UserError(f"{path}:{lineno}: {problem}")
            conversations.append({"messages": conversation["messages"]})
    if not conversations:
        raise UserError(f"{path} holds no conversations")
    return conversations


class Conversations(Task):
    """A local jsonl file of conversations, used whole whichever split it is named as (train or test)."""
    name = "Conversations"
    SPLITS = ("train", "test")

    def __init__(self, path=None, split="train", **view):
        check_split(self.name, split, self.SPLITS)
        if path is None:
            raise UserError(f"{self.name} needs path=<a jsonl file of conversations>")
        super().__init__(**view)
        self.split = split
        self.path = expand_path(path)
        self.conversations = read_conversations(self.path)

    @classmethod
    def data_files(cls, split, subset=None):
        return []  # a local file: nothing to fetch

    def num_examples(self):
        return len(self.conversations)

    def get_example(self, index):
        return self.conversations[index]


class ExactAnswers(Conversations):
    """Conversations ending in the assistant's reference answer; chat_eval generates the last assistant turn and
    scores exact equality with the reference (both stripped of surrounding whitespace). The task is named after the
    file (its name without .jsonl)."""
    eval_type = "generative"
    SPLITS = ("train", "test")

    def __init__(self, path=None, split="test", **view):
        super().__init__(path, split, **view)
        self.name = os.path.basename(self.path).removesuffix(".jsonl")
        for i, conv in enumerate(self.conversations):
            last = conv["messages"][-1]
            if last["role"] != "assistant" or not isinstance(last["content"], str):
                raise UserError(f"{self.path}: conversation {i + 1} must end with an assistant message whose content "
                                f"is the reference answer (a string)")

    def evaluate(self, conversation, completion):
        return int(completion.strip() == conversation["messages"][-1]["content"].strip())

    def reward(self, conversation, completion):
        return float(self.evaluate(conversation, completion))


class Identity(Conversations):
    name = "Identity"
    SPLITS = ("train",)

    def __init__(self, split="train", **view):
        check_split(self.name, split, self.SPLITS)
        super().__init__(IDENTITY_FILE.ensure(self.name), split="train", **view)

    @classmethod
    def data_files(cls, split, subset=None):
        return [IDENTITY_FILE]

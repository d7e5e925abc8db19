"""
What every chat task shares: the Task view (slicing, length, indexing, scoring), TaskMixture (several tasks
interleaved by one seeded shuffle), the multiple-choice prompt, and the checks a conversation must pass.

A conversation is nanochat's dict: {"messages": [{"role": "user"|"assistant"|"system", "content": ...}, ...]}.
A user (or system) content is a str; an assistant content is a str or a list of parts
{"type": "text"|"python"|"python_output", "text": str}. Categorical tasks add "letters" (the answer options);
their last assistant message is the correct letter.
"""
import numpy as np

from nanochat.common import UserError

ROLES = ("system", "user", "assistant")
PART_TYPES = ("text", "python", "python_output")


class Task:
    """
    A sequence of conversations with an optional scorer. Subclasses give `name`, `eval_type` (how chat_eval
    scores it: "categorical" or "generative"; None for training data only), `num_examples()` and
    `get_example(physical_index)`; a scored task also gives `evaluate`. start/stop/step select a view of the
    underlying examples as range(start, stop, step) would (stop None: the end).
    """
    name = "task"
    eval_type = None

    def __init__(self, start=0, stop=None, step=1):
        if start < 0:
            raise ValueError(f"{self.name}: start must be >= 0, got {start}")
        if stop is not None and stop < start:
            raise ValueError(f"{self.name}: stop ({stop}) must be >= start ({start})")
        if step < 1:
            raise ValueError(f"{self.name}: step must be >= 1, got {step}")
        self.start, self.stop, self.step = start, stop, step

    def num_examples(self):
        raise NotImplementedError

    def get_example(self, index):
        raise NotImplementedError

    def __len__(self):
        # a stop past the end means the end (a validation view "at most N" of a smaller dataset)
        stop = self.num_examples() if self.stop is None else min(self.stop, self.num_examples())
        return max(0, -(-(stop - self.start) // self.step))  # ceil((stop - start) / step)

    def __getitem__(self, index):
        if not isinstance(index, (int, np.integer)):
            raise TypeError(f"{self.name}: index must be an int, got {type(index).__name__}")
        if not 0 <= index < len(self):
            raise IndexError(f"{self.name}: index {index} out of range for {len(self)} examples")
        return self.get_example(self.start + int(index) * self.step)

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def evaluate(self, conversation, completion):
        """1 if `completion` (the assistant's text, or the chosen letter of a categorical task) is correct, else 0."""
        raise NotImplementedError(f"{self.name} is training data only: it has no scorer")

    def reward(self, conversation, completion):
        """The RL reward of a completion: its correctness as a float unless a task says otherwise."""
        return float(self.evaluate(conversation, completion))


class TaskMixture(Task):
    """
    The examples of several tasks in one order fixed by `seed`, so that every stretch of training sees a mix.
    A task passed twice contributes its examples twice (how a small dataset is oversampled).
    """
    name = "mixture"

    def __init__(self, tasks, seed=42, **view):
        super().__init__(**view)
        if not tasks:
            raise ValueError("TaskMixture needs at least one task")
        self.tasks = list(tasks)
        self.seed = seed
        lengths = [len(task) for task in self.tasks]
        task_ids = np.repeat(np.arange(len(self.tasks), dtype=np.int32), lengths)
        local_ids = np.concatenate([np.arange(n, dtype=np.int64) for n in lengths])
        order = np.random.default_rng(seed).permutation(len(task_ids))
        self._task_ids, self._local_ids = task_ids[order], local_ids[order]

    def num_examples(self):
        return len(self._task_ids)

    def get_example(self, index):
        return self.tasks[int(self._task_ids[index])][int(self._local_ids[index])]

    def source_of(self, index):
        """The task that example `index` of this view comes from (logging, per-task counts)."""
        return self.tasks[int(self._task_ids[self.start + index * self.step])]


def check_split(task_name, split, splits):
    if split not in splits:
        raise UserError(f"{task_name} has no split {split!r}; its splits: {', '.join(splits)}")


def render_mc(question, letters, choices):
    """
    A multiple-choice question as one user message, in nanochat's layout so that checkpoints tuned by nanochat
    read it as they were taught: each choice is followed by `=` and its letter with no space between, because
    the assistant answers with the bare letter and " A" and "A" are different tokens.
    """
    lines = [f"Multiple Choice question: {question}"]
    lines += [f"- {choice}={letter}" for letter, choice in zip(letters, choices)]
    return "\n".join(lines) + "\n\nRespond only with the letter of the correct answer."


def score_letter(conversation, completion):
    """A categorical task's scorer: 1 if the chosen letter is the answer (the last assistant message)."""
    return int(completion.strip() == conversation["messages"][-1]["content"])


def conversation_problem(conversation):
    """None if `conversation` is well formed (see the module docstring), else what is wrong with it, in a phrase.
    Roles: an optional system message, then user and assistant alternating from user, at least one of each."""
    if not isinstance(conversation, dict) or not isinstance(conversation.get("messages"), list):
        return 'expected {"messages": [...]}'
    messages = conversation["messages"]
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or set(message) != {"role", "content"}:
            return f"message {i} must be an object with exactly the keys 'role' and 'content'"
        if message["role"] not in ROLES:
            return f"message {i} has role {message['role']!r}; roles are {', '.join(ROLES)}"
    turns = messages[1:] if messages and messages[0]["role"] == "system" else messages
    if messages and messages[0]["role"] == "system" and not isinstance(messages[0]["content"], str):
        return "message 0 (system) content must be a string"
    if len(turns) < 2:
        return "a conversation needs at least one user and one assistant message"
    offset = len(messages) - len(turns)
    for i, message in enumerate(turns):
        expected = "user" if i % 2 == 0 else "assistant"
        if message["role"] != expected:
            return f"message {i + offset} has role {message['role']!r} where {expected!r} was expected"
        content = message["content"]
        if expected == "user" and not isinstance(content, str):
            return f"message {i + offset} (user) content must be a string"
        if expected == "assistant":
            problem = _assistant_content_problem(content)
            if problem:
                return f"message {i + offset} (assistant) {problem}"
    return None


def _assistant_content_problem(content):
    if isinstance(content, str):
        return None
    if not isinstance(content, list) or not content:
        return "content must be a string or a non-empty list of parts"
    for j, part in enumerate(content):
        if not isinstance(part, dict) or part.get("type") not in PART_TYPES or not isinstance(part.get("text"), str):
            return f"part {j} must be {{'type': one of {', '.join(PART_TYPES)}, 'text': a string}}"
    return None

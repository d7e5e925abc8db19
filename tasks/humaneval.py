"""
HumanEval: 164 Python functions to complete from a signature and docstring, each checked by unit tests.
Hub: openai/openai_humaneval, config "openai_humaneval", split test. A row: {"task_id": str, "prompt": str,
"canonical_solution": str, "test": str, "entry_point": str}; `test` defines check(candidate).

The scorer runs prompt + the completion's code + test + check(entry_point) in tasks.execution's sandbox. The
prompt goes first so that a completion may be either the whole function (it redefines the prompt's stub) or
only its body (it continues the prompt).
"""
import re

from tasks.execution import run_program
from tasks.hub import HubTask

CODE_BLOCK = re.compile(r"```[ \t]*(?:python|py)?[ \t]*\n(.*?)```", re.DOTALL)
TIMEOUT_S = 5.0
MEMORY_MB = 512


def extract_code(completion):
    """The first fenced code block of a completion if it has one, else the completion (blank lines around it
    dropped, the first line's indentation kept: a body-only completion is indented)."""
    match = CODE_BLOCK.search(completion)
    code = match.group(1) if match else completion
    return code.strip("\n").rstrip()


def humaneval_program(prompt, completion, test, entry_point):
    return f"{prompt}\n{extract_code(completion)}\n\n\n{test}\n\ncheck({entry_point})\n"


class HumanEval(HubTask):
    name = "HumanEval"
    eval_type = "generative"
    repo_id = "openai/openai_humaneval"
    SUBSETS = ("openai_humaneval",)
    SPLITS = ("test",)

    def __init__(self, split="test", subset="openai_humaneval", **view):
        super().__init__(split, subset, **view)

    def get_example(self, index):
        row = self.rows[index]
        return {
            "messages": [
                {"role": "user", "content": row["prompt"]},
                {"role": "assistant", "content": f"{row['prompt']}\n{row['canonical_solution']}"},
            ],
            "task_id": row["task_id"],
            "entry_point": row["entry_point"],
            "test": row["test"],
        }

    def evaluate(self, conversation, completion):
        program = humaneval_program(conversation["messages"][0]["content"], completion, conversation["test"],
                                    conversation["entry_point"])
        return int(run_program(program, timeout_s=TIMEOUT_S, memory_mb=MEMORY_MB).passed)

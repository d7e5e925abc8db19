"""
GSM8K: grade-school math word problems with worked solutions. Hub: openai/gsm8k, configs main and socratic,
splits train (7,473) and test (1,319). A row: {"question": str, "answer": str}; the answer is the solution text
with calculator annotations <<expression=result>> and a last line "#### <number>".

The annotations become tool use: each <<e=r>> turns into a python part (e) and a python_output part (r), so an
assistant trained on these conversations learns to call tasks.tools.calculator and read its result.
"""
import re

from tasks.hub import HubTask

CALCULATOR_CALL = re.compile(r"<<([^<>]*)>>")
FINAL_ANSWER = re.compile(r"#### (\-?[0-9\.\,]+)")


def extract_answer(text):
    """The number after the first "#### " in `text`, commas removed ("1,200" -> "1200"), or None: the
    normalisation of OpenAI's grade-school-math reference code, so scores compare with published ones."""
    match = FINAL_ANSWER.search(text)
    return match.group(1).strip().replace(",", "") if match else None


def solution_parts(answer):
    """A GSM8K answer as assistant parts: text, and for each <<expression=result>> a python part and its
    python_output (an annotation without "=" gets an empty output). Empty text between parts is left out."""
    parts, cursor = [], 0
    for match in CALCULATOR_CALL.finditer(answer):
        if match.start() > cursor:
            parts.append({"type": "text", "text": answer[cursor:match.start()]})
        expression, result = match.group(1).rsplit("=", 1) if "=" in match.group(1) else (match.group(1), "")
        parts.append({"type": "python", "text": expression})
        parts.append({"type": "python_output", "text": result})
        cursor = match.end()
    if cursor < len(answer):
        parts.append({"type": "text", "text": answer[cursor:]})
    return parts


def score_final_answer(conversation, completion):
    """1 if the completion's "#### N" number is the reference's (in the text of the last assistant message)."""
    content = conversation["messages"][-1]["content"]
    reference_text = content if isinstance(content, str) else "".join(p["text"] for p in content if p["type"] == "text")
    reference, predicted = extract_answer(reference_text), extract_answer(completion)
    return int(predicted is not None and predicted == reference)


class GSM8K(HubTask):
    name = "GSM8K"
    eval_type = "generative"
    repo_id = "openai/gsm8k"
    SUBSETS = ("main", "socratic")
    SPLITS = ("train", "test")

    def __init__(self, split="test", subset="main", **view):
        super().__init__(split, subset, **view)

    def get_example(self, index):
        row = self.rows[index]
        return {"messages": [
            {"role": "user", "content": row["question"]},
            {"role": "assistant", "content": solution_parts(row["answer"])},
        ]}

    def evaluate(self, conversation, completion):
        return score_final_answer(conversation, completion)

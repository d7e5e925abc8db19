"""
ARC (AI2 Reasoning Challenge): grade-school science questions with 3 to 5 options, as multiple choice.
Hub: allenai/ai2_arc, configs ARC-Easy and ARC-Challenge, splits train / validation / test. A row:
{"id": str, "question": str, "choices": {"text": [str], "label": [str]}, "answerKey": str}; the labels are
usually A-E, for a few questions 1-5, and the answer key is one of them.
"""
from tasks.common import render_mc, score_letter
from tasks.hub import HubTask


class ARC(HubTask):
    eval_type = "categorical"
    repo_id = "allenai/ai2_arc"
    SUBSETS = ("ARC-Easy", "ARC-Challenge")
    SPLITS = ("train", "validation", "test")

    def __init__(self, subset, split="test", **view):
        self.name = subset
        super().__init__(split, subset, **view)

    def get_example(self, index):
        row = self.rows[index]
        letters = list(row["choices"]["label"])
        if row["answerKey"] not in letters:
            raise ValueError(f"{self.name} row {self.rows.physical_index(index)}: answer {row['answerKey']!r} "
                             f"is not one of the labels {letters}")
        return {
            "messages": [
                {"role": "user", "content": render_mc(row["question"], letters, row["choices"]["text"])},
                {"role": "assistant", "content": row["answerKey"]},
            ],
            "letters": letters,  # chat_eval picks the highest-logit letter among these
        }

    def evaluate(self, conversation, completion):
        return score_letter(conversation, completion)

"""
MMLU: four-option questions over 57 subjects. Hub: cais/mmlu, config "all" (every subject), splits
auxiliary_train (about 100K rows of other multiple-choice sets, used for SFT; its subject is empty), dev,
validation and test. A row: {"question": str, "subject": str, "choices": [str] * 4, "answer": int 0-3}
(a class label in the hub's features, an int64 column in its parquet export).
"""
from tasks.common import render_mc, score_letter
from tasks.hub import HubTask

LETTERS = ("A", "B", "C", "D")


class MMLU(HubTask):
    name = "MMLU"
    eval_type = "categorical"
    repo_id = "cais/mmlu"
    SUBSETS = ("all",)
    SPLITS = ("auxiliary_train", "dev", "validation", "test")

    def __init__(self, split="test", subset="all", **view):
        super().__init__(split, subset, **view)

    def get_example(self, index):
        row = self.rows[index]
        if len(row["choices"]) != len(LETTERS) or not 0 <= row["answer"] < len(LETTERS):
            raise ValueError(f"MMLU row {self.rows.physical_index(index)}: expected 4 choices and an answer 0-3, "
                             f"got {len(row['choices'])} choices and answer {row['answer']}")
        return {
            "messages": [
                {"role": "user", "content": render_mc(row["question"], LETTERS, row["choices"])},
                {"role": "assistant", "content": LETTERS[row["answer"]]},
            ],
            "subject": row["subject"],
            "letters": list(LETTERS),
        }

    def evaluate(self, conversation, completion):
        return score_letter(conversation, completion)

"""
Spelling tasks, generated from an English word list with a seeded RNG (nanochat's spelling tasks):
- SpellingBee: "how many <letter> in <word>?". The assistant spells the word out, counts with a running tally,
  checks with the python tool ('word'.count('letter')) and ends with "#### <count>"; scored like GSM8K.
- SimpleSpelling: "spell <word>" -> "word:w,o,r,d", the skill that makes counting letters hard for a model that
  sees tokens, not characters, in concentrated form.

Example i of the train split is drawn from random.Random(i), of the test split from random.Random(10_000_000 + i)
(more than the word list's length, so the two never share a seed). The word list is dwyl/english-words'
words_alpha.txt (about 370K lowercase words, one a line), as in nanochat.
"""
import random

from tasks.common import Task, check_split
from tasks.gsm8k import score_final_answer
from tasks.hub import UrlFile

WORD_LIST_URL = "https://raw.githubusercontent.com/dwyl/english-words/refs/heads/master/words_alpha.txt"
WORD_LIST = UrlFile(WORD_LIST_URL, "words_alpha.txt")
TEST_SEED_OFFSET = 10_000_000
ALPHABET = "abcdefghijklmnopqrstuvwxyz"

# the user's question, varied in wording, case, quoting and language so the model learns the task, not a phrase
QUESTIONS = [
    "How many {letter} are in {word}",
    "How many times does the letter {letter} occur in {word}",
    "Count the {letter}s in the word {word}",
    "how many {letter} does {word} have",
    "What is the number of {letter} in {word}",
    "In {word}, how often does {letter} appear",
    "Tell me how many {letter} there are in {word}",
    "{word}: how many {letter}",
    "Number of {letter} letters in {word}",
    "Please count the letter {letter} in the word {word}",
    "¿Cuántas veces aparece la letra {letter} en {word}",
    "Combien de {letter} y a-t-il dans {word}",
    "Wie oft kommt {letter} in {word} vor",
    "{word} 里有几个 {letter}",
    "{word} に {letter} はいくつありますか",
]


def load_words(task_name, shuffle_seed=None):
    with open(WORD_LIST.ensure(task_name), encoding="utf-8") as f:
        words = [line.strip() for line in f if line.strip()]
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(words)
    return words


class GeneratedTask(Task):
    """`size` examples drawn from the word list; SIZES gives the default size per split."""
    SPLITS = ("train", "test")
    SIZES = {}
    eval_type = "generative"
    word_order_seed = None  # SimpleSpelling reads the list in another order than SpellingBee

    def __init__(self, split="test", size=None, **view):
        check_split(self.name, split, self.SPLITS)
        super().__init__(**view)
        self.split = split
        self.size = self.SIZES[split] if size is None else size
        self.words = load_words(self.name, self.word_order_seed)

    @classmethod
    def data_files(cls, split, subset=None):
        return [WORD_LIST]

    def num_examples(self):
        return self.size

    def rng(self, index):
        return random.Random(index if self.split == "train" else TEST_SEED_OFFSET + index)


class SpellingBee(GeneratedTask):
    name = "SpellingBee"
    SIZES = {"train": 80_000, "test": 256}  # nanochat's SFT and eval sizes

    def get_example(self, index):
        rng = self.rng(index)
        word = rng.choice(self.words)
        letter = rng.choice(word) if rng.random() < 0.9 else rng.choice(ALPHABET)  # sometimes a count of 0
        count = word.count(letter)
        question = rng.choice(QUESTIONS)
        if rng.random() < 0.3:
            question = question.lower()
        quote_letter, quote_word = rng.choice(["", "'", '"']), rng.choice(["", "'", '"'])
        question = question.format(letter=f"{quote_letter}{letter}{quote_letter}", word=f"{quote_word}{word}{quote_word}")
        if rng.random() < 0.5:
            question += "?"
        # the tally: one line per character; no space between position and character (":a", not ": a"), the
        # same tokens as the spelled-out word above it
        tally, running = [], 0
        for position, char in enumerate(word, 1):
            running += char == letter
            tally.append(f"{position}:{char}" + (f" hit! count={running}" if char == letter else ""))
        by_hand = (f"I need the number of '{letter}' in '{word}'. First I spell the word out:\n"
                   f"{word}:{','.join(word)}\n\nThen I go through it and count each '{letter}':\n"
                   + "\n".join(tally) + f"\n\nCounting by hand gives {running}.")
        parts = [
            {"type": "text", "text": by_hand},
            {"type": "text", "text": "\n\nI check it with Python:\n\n"},
            {"type": "python", "text": f"'{word}'.count('{letter}')"},
            {"type": "python_output", "text": str(count)},
            {"type": "text", "text": f"\n\nPython also gives {count}.\n\nThe answer:\n\n#### {count}"},
        ]
        return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": parts}]}

    def evaluate(self, conversation, completion):
        return score_final_answer(conversation, completion)


class SimpleSpelling(GeneratedTask):
    name = "SimpleSpelling"
    SIZES = {"train": 200_000, "test": 256}
    word_order_seed = 42

    def get_example(self, index):
        word = self.rng(index).choice(self.words)
        return {"messages": [
            {"role": "user", "content": f"Spell the word: {word}"},
            {"role": "assistant", "content": f"{word}:{','.join(word)}"},
        ]}

    def evaluate(self, conversation, completion):
        """1 if the completion is exactly the reference spelling (surrounding whitespace aside)."""
        return int(completion.strip() == conversation["messages"][-1]["content"])

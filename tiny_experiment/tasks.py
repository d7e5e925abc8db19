"""
The synthetic task mix: questions over four digits whose answers need one, two or several steps of work.

    easy    copy:3,7,1,5=3     recall the first digit                      (one step)
    medium  add:3,7,1,5=10     add the first two digits                    (two steps: recall two, add)
    hard    sum:3,7,1,5=16     add all four digits                         (several steps: three additions)

A problem is a question ("sum:3,7,1,5") and its completion ("=16\n"). The completion is what a model
is scored on and what pretraining puts its loss on; the prompt at evaluation ends at the last digit,
so "=" comes from the prompt's forward and the answer digits from decode steps (where exit gates act).

Splits are fixed by a hash of the question text alone (never by sampling order), so the same question
is always in the same split: "train" (pretraining and phases), "calib" (the phases' val shard and the
gate calibration) and "test" (the held-out problems every reported number is measured on). Each
difficulty has 10^4 questions; the medium answer depends on two of the four digits, so a test question's
digit pair also occurs in training with other distractor digits; a hard test question's four digits
never occur together in training.
"""
import hashlib
import itertools
import random
from dataclasses import dataclass

DIFFICULTIES = ("easy", "medium", "hard")
OPS = {"easy": "copy", "medium": "add", "hard": "sum"}
SPLITS = ("train", "calib", "test")
SPLIT_FRACTIONS = {"train": 0.8, "calib": 0.1, "test": 0.1}  # of each difficulty's 10^4 questions
N_DIGITS = 4


@dataclass(frozen=True)
class Problem:
    difficulty: str
    digits: tuple

    @property
    def question(self):
        return f"{OPS[self.difficulty]}:" + ",".join(str(d) for d in self.digits)

    @property
    def answer(self):
        d = self.digits
        if self.difficulty == "easy":
            return str(d[0])
        if self.difficulty == "medium":
            return str(d[0] + d[1])
        return str(sum(d))

    @property
    def completion(self):
        """What follows the question: '=' + answer + newline (the newline ends the answer)."""
        return f"={self.answer}\n"

    @property
    def text(self):
        return self.question + self.completion


def split_of(question, seed=0):
    """'train' | 'calib' | 'test' from a hash of (seed, question): a pure function of the text."""
    h = hashlib.sha256(f"{seed}:{question}".encode()).digest()
    u = int.from_bytes(h[:8], "big") / 2**64  # uniform in [0, 1)
    if u < SPLIT_FRACTIONS["test"]:
        return "test"
    if u < SPLIT_FRACTIONS["test"] + SPLIT_FRACTIONS["calib"]:
        return "calib"
    return "train"


def all_problems(difficulty):
    if difficulty not in DIFFICULTIES:
        raise ValueError(f"unknown difficulty {difficulty!r}; choose from {DIFFICULTIES}")
    return [Problem(difficulty, digits) for digits in itertools.product(range(10), repeat=N_DIGITS)]


def split_problems(seed=0):
    """{split: {difficulty: [Problem]}}, every question in exactly one split (sorted by digits)."""
    out = {s: {d: [] for d in DIFFICULTIES} for s in SPLITS}
    for d in DIFFICULTIES:
        for p in all_problems(d):
            out[split_of(p.question, seed)][d].append(p)
    return out


def check_disjoint(splits):
    """Raise if any question text is in two splits; return the number of distinct questions per split."""
    seen = {}
    for s in SPLITS:
        for d in DIFFICULTIES:
            for p in splits[s][d]:
                other = seen.setdefault(p.question, s)
                if other != s:
                    raise AssertionError(f"question {p.question!r} is in both the {other} and the {s} split")
    return {s: sum(len(splits[s][d]) for d in DIFFICULTIES) for s in SPLITS}


def make_pages(problems, n_pages, problems_per_page, rng):
    """
    n_pages documents, each `problems_per_page` problems of ONE difficulty drawn (with replacement) from
    problems[difficulty], difficulties in turn. One difficulty per page, so a packed row of the phases'
    loader (one page, cropped) shows the width predictor a prompt and a continuation of the same kind.
    Returns [(difficulty, [Problem])].
    """
    pages = []
    for i in range(n_pages):
        d = DIFFICULTIES[i % len(DIFFICULTIES)]
        pages.append((d, [rng.choice(problems[d]) for _ in range(problems_per_page)]))
    return pages


def page_text(page):
    return "".join(p.text for p in page[1])


def answer_spans(page):
    """The character spans [start, end) of every completion in page_text(page), flat [s0, e0, s1, e1, ...]: where
    the loss counts (the corpus shards' loss_spans)."""
    spans, at = [], 0
    for p in page[1]:
        at += len(p.question)
        spans += [at, at + len(p.completion)]
        at += len(p.completion)
    return spans


def sample_eval(splits, split, n_per_difficulty, seed):
    """{difficulty: [Problem]}: n distinct problems of one split, a fixed sample for the seed."""
    rng = random.Random(f"eval:{seed}:{split}")
    out = {}
    for d in DIFFICULTIES:
        pool = splits[split][d]
        if n_per_difficulty > len(pool):
            raise ValueError(f"asked for {n_per_difficulty} {d} problems but the {split} split has {len(pool)}")
        out[d] = rng.sample(pool, n_per_difficulty)
    return out


def exact_match(generated_text, problem):
    """The generated completion (stop token excluded) is exactly '=' + the answer."""
    return generated_text == "=" + problem.answer


# -----------------------------------------------------------------------------
# Tokens

def encode_problem(tokenizer, problem):
    """(question ids, completion ids); raises if encoding them apart differs from encoding the text whole,
    which would make the prompt at evaluation tokenize differently from training."""
    q = tokenizer.encode(problem.question)
    c = tokenizer.encode(problem.completion)
    if q + c != tokenizer.encode(problem.text):
        raise ValueError(f"{problem.text!r} tokenizes differently whole than as question + completion; "
                         "the task format and the tokenizer's pre-tokenisation disagree")
    return q, c


def encode_page(tokenizer, page, cache):
    """
    [BOS] + the page's problems as ids, and a 0/1 mask of the same length marking completion tokens
    (what pretraining puts its loss on). cache: dict Problem -> (q, c) ids, filled here.
    """
    ids, mask = [tokenizer.get_bos_token_id()], [0]
    for p in page[1]:
        if p not in cache:
            cache[p] = encode_problem(tokenizer, p)
        q, c = cache[p]
        ids += q + c
        mask += [0] * len(q) + [1] * len(c)
    return ids, mask

"""The six chat evaluation tasks as text: what the user is asked, and how an answer is read back.

Item formats (one list of dicts per task, as the evalset stage writes them):

- ``arc_easy``, ``arc_challenge``, ``mmlu``: ``{"id", "question", "choices": [str, ...] (2–26),
  "answer": index of the gold choice, "subject": str ("" for ARC)}``;
- ``gsm8k``: ``{"id", "question", "solution": reference reasoning ending in a line "#### 72",
  "answer": the final number as text, without commas}``;
- ``humaneval``: ``{"id", "prompt", "test" (defines ``check(candidate)``), "entry_point", "canonical_solution"}``;
- ``spellingbee``: ``{"id", "word", "letter", "answer": count of the letter in the word, "question"}``
  (`spellingbee_items` makes them).

User messages. Multiple choice: `render_mc` (the question, a blank line, one line per choice ``"A. text"``,
a blank line, an instruction to reply with the letter only); the expected assistant reply is the bare
letter. GSM8K and SpellingBee: the question as is. HumanEval: an instruction to write the whole function
in a python code block, then the prompt inside a ```` ```python ```` fence.

Reading answers:

- GSM8K (`gsm8k_answer`): the first number after the last ``####``, with commas between digits and ``$``
  removed and a trailing period dropped; no ``####`` means no answer. `numbers_equal` compares two
  such numbers as floats within 1e-6.
- SpellingBee (`spelling_answer`): the number after the last ``####`` if there is one, else the last
  number in the reply; it must be a whole number.
- HumanEval (`extract_code`, `humaneval_program`): the body of the first fenced block tagged ``python``,
  ``py``, ``python3`` or untagged (a fence left open by a truncated reply runs to the end), else the
  whole reply. When that code defines the entry point at top level (``def <entry_point>(``), the program
  is the task's prompt followed by the code: the prompt's imports and helper functions stay available
  (HumanEval/10, /32, /38 and /50 call helpers defined in their prompts), and the prompt's stub, whose
  docstring is a valid body, is replaced by the code's later definition. Should the prompt not parse on
  its own, only its import lines precede the code. Code that does not define the entry point is a body
  continuing the prompt: prompt + code. Then come the task's ``test`` and ``check(<entry_point>)``.
"""
from __future__ import annotations

import ast
import random
import re
import string
from typing import Sequence

from model.errors import InputError

CATEGORICAL = ("arc_easy", "arc_challenge", "mmlu")
GENERATIVE = ("gsm8k", "humaneval", "spellingbee")
TASK_NAMES = CATEGORICAL + GENERATIVE
LETTERS = string.ascii_uppercase

_NUMBER = re.compile(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)")
_DIGIT_COMMA = re.compile(r"(?<=\d),(?=\d)")
_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[^\n]*\n(.*?)(?:```|\Z)", re.S)
_CODE_TAGS = {"", "python", "py", "python3"}

SPELLING_TEMPLATES = (
    "How many times does the letter '{letter}' appear in the word '{word}'?",
    "How many {letter}'s are there in \"{word}\"?",
    "Count the letter '{letter}' in the word '{word}'. How many are there?",
    "In the word '{word}', how often does the letter '{letter}' occur?",
    "How many '{letter}' are in {word}?",
)


# ---------------------------------------------------------------- user messages

def mc_letters(n: int) -> list[str]:
    if not 2 <= n <= len(LETTERS):
        raise InputError(f"a multiple-choice item needs 2 to {len(LETTERS)} choices (got {n}): fix the item")
    return list(LETTERS[:n])


def render_mc(question: str, choices: Sequence[str]) -> str:
    """A multiple-choice question as a user message; the expected reply is the gold choice's letter alone."""
    letters = mc_letters(len(choices))
    options = "\n".join(f"{letter}. {choice}" for letter, choice in zip(letters, choices))
    allowed = ", ".join(letters[:-1]) + f" or {letters[-1]}"
    return f"{question.strip()}\n\n{options}\n\nReply with the letter of the correct answer ({allowed}) and nothing else."


def render_humaneval(prompt: str) -> str:
    return ("Write the following Python function. Reply with the complete function in a ```python code block."
            f"\n\n```python\n{prompt.rstrip()}\n```")


def user_message(task: str, item: dict) -> str:
    """The text of the single user turn that asks `item` of `task` (never contains the gold)."""
    if task in CATEGORICAL:
        return render_mc(item["question"], item["choices"])
    if task == "humaneval":
        return render_humaneval(item["prompt"])
    if task in ("gsm8k", "spellingbee"):
        return item["question"]
    raise KeyError(f"unknown chat task {task!r}: use one of {TASK_NAMES}")


def gold_response(task: str, item: dict) -> str | int:
    """What a perfect assistant answers (for test doubles): the gold index (categorical) or a reply text."""
    if task in CATEGORICAL:
        return int(item["answer"])
    if task == "gsm8k":
        return item["solution"]
    if task == "humaneval":
        return item["canonical_solution"]
    if task == "spellingbee":
        n = int(item["answer"])
        return f"The letter '{item['letter']}' appears {n} times in '{item['word']}'.\n#### {n}"
    raise KeyError(f"unknown chat task {task!r}: use one of {TASK_NAMES}")


# ---------------------------------------------------------------- reading answers

def _first_number(text: str) -> str | None:
    match = _NUMBER.search(_DIGIT_COMMA.sub("", text).replace("$", ""))
    return match.group(0).rstrip(".") if match else None


def gsm8k_answer(text: str) -> str | None:
    """The number after the last "####" (commas, $ and a trailing period removed), or None."""
    if "####" not in text:
        return None
    return _first_number(text.rsplit("####", 1)[1])


def numbers_equal(predicted: str | None, gold: str) -> bool:
    if predicted is None:
        return False
    try:
        return abs(float(predicted) - float(_DIGIT_COMMA.sub("", str(gold)))) <= 1e-6
    except ValueError:
        return False


def spelling_answer(text: str) -> int | None:
    """The count a SpellingBee reply gives: after the last "####" if present, else its last number."""
    if "####" in text:
        found = gsm8k_answer(text)
    else:
        numbers = _NUMBER.findall(_DIGIT_COMMA.sub("", text))
        found = numbers[-1].rstrip(".") if numbers else None
    if found is None:
        return None
    value = float(found)
    return int(value) if value.is_integer() else None


def extract_code(text: str) -> str:
    """The first python (or untagged) fenced block's body, else the whole reply."""
    for match in _FENCE.finditer(text):
        if match.group(1).lower() in _CODE_TAGS:
            return match.group(2)
    return text


def _parses(source: str) -> bool:
    try:
        ast.parse(source)
    except SyntaxError:
        return False
    return True


def humaneval_program(item: dict, completion: str) -> str:
    """The program that runs one HumanEval reply against the task's tests (rules in the module doc)."""
    code, entry, prompt = extract_code(completion), item["entry_point"], item["prompt"]
    if re.search(rf"^def\s+{re.escape(entry)}\s*\(", code, re.M):
        if _parses(prompt):
            head = prompt
        else:
            head = "\n".join(line for line in prompt.splitlines() if re.match(r"(import|from)\s", line))
        body = head.rstrip("\n") + "\n\n\n" + code
    else:
        body = prompt + code
    return f"{body.rstrip()}\n\n\n{item['test'].strip(chr(10))}\n\n\ncheck({entry})\n"


# ---------------------------------------------------------------- SpellingBee items

def spellingbee_items(words: Sequence[str], n: int, seed: int) -> list[dict]:
    """`n` letter-counting items drawn with ``random.Random(seed)`` from the a–z words of `words` (lowercased).

    Per item: a word; a letter, half the time one the word contains, else any of a–z; one of
    `SPELLING_TEMPLATES`. The same arguments always give the same items.
    """
    pool = list(dict.fromkeys(w.strip().lower() for w in words))
    pool = [w for w in pool if w and all(c in string.ascii_lowercase for c in w)]
    if not pool:
        raise InputError("spellingbee_items needs at least one word made of the letters a-z: pass a word list")
    if n < 0:
        raise InputError(f"spellingbee_items: n must be ≥ 0 (got {n})")
    rng = random.Random(seed)
    items = []
    for i in range(n):
        word = rng.choice(pool)
        if rng.random() < 0.5:
            letter = rng.choice(sorted(set(word)))
        else:
            letter = rng.choice(string.ascii_lowercase)
        question = rng.choice(SPELLING_TEMPLATES).format(letter=letter, word=word)
        items.append({"id": f"spellingbee-{seed}-{i}", "word": word, "letter": letter,
                      "answer": word.count(letter), "question": question})
    return items

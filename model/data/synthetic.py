"""Conversation sources written by chatforge: generated, seeded and deterministic (no third-party text).

Each generator is an endless stream of conversation records ``{"messages", "answer"}`` drawn from one
``random.Random(seed)``: the same seed always gives the same stream, and the first N items of a stream do
not depend on how many more are taken (so a larger `count` extends a smaller one). Which items go to
train and which to val is decided by the caller (model/data/chat_sources.py: a fixed hash-chosen share
of the first user message), never here.

- ``arithmetic``: short word problems and bare arithmetic questions (sums, differences, products, exact
  quotients, prices, sharing, rates, percentages, averages, perimeters). The assistant reasons in text
  and calls the calculator for every step, GSM8K-style: a ``python`` part with the expression, then a
  ``python_output`` part holding exactly what model/chat/calculator.py returns for it (the engine forces
  that output at inference), then the text goes on; the reply ends with ``#### N`` and ``answer`` is N.
- ``spelling``: SimpleSpelling, as in nanochat: spell a word letter by letter. The reply is
  ``word:w,o,r,d``; ``answer`` is null (the reply is the whole answer).
- ``spellingbee``: count a letter in a word. The user message is made by chat_eval's own
  `model.evals.chat_tasks.spellingbee_items` (same templates, same letter choice: half the time a letter
  of the word, else any a–z), so training and eval agree on the format; the reply spells the word, counts
  step by step, checks with the calculator (``'word'.count('x')``) and ends with ``#### N``; ``answer``
  is N. (word, letter) pairs listed in `exclude` (the eval's own items) are never generated.
- ``identity``: a few dozen hand-written conversations about the model itself: what it is, that
  chatforge trained it from scratch with nanochat's recipe, what it can and cannot do. Finite: all of
  them, in a fixed order.

Words for the two spelling sources come from the pinned `wonderwords==3.0.1` lists (MIT), fetched by
`model.evals.evalsets.spelling_words`, the same vocabulary as the SpellingBee eval.
Licence of the generated data: chatforge's own, no third-party content (apart from those words).
"""
from __future__ import annotations

import random
from typing import Callable, Iterator, Sequence

from model.chat.calculator import evaluate
from model.evals.chat_tasks import spellingbee_items

Record = dict

_NAMES = ("Ava", "Ben", "Chloe", "Daniel", "Elena", "Farid", "Grace", "Hiro", "Isla", "Jonas", "Kemi", "Liam",
          "Maya", "Noah", "Olga", "Priya", "Quinn", "Rosa", "Sam", "Tariq", "Uma", "Victor", "Wen", "Yara", "Zoe")
_THINGS = (("apple", "apples"), ("notebook", "notebooks"), ("pencil", "pencils"), ("ticket", "tickets"),
           ("cookie", "cookies"), ("marble", "marbles"), ("sticker", "stickers"), ("book", "books"),
           ("plant", "plants"), ("toy car", "toy cars"), ("shell", "shells"), ("card", "cards"))
_VEHICLES = ("car", "train", "bus", "cyclist", "boat", "truck")


class _Steps:
    """An assistant reply being written: text, calculator calls (output = what the calculator says)."""

    def __init__(self) -> None:
        self.parts: list[dict] = []

    def text(self, text: str) -> "_Steps":
        if self.parts and self.parts[-1]["type"] == "text":
            self.parts[-1]["text"] += text
        elif text:
            self.parts.append({"type": "text", "text": text})
        return self

    def calc(self, expr: str) -> str:
        value = evaluate(expr)
        if value is None:  # a generator bug, never the user's input
            raise AssertionError(f"the calculator refuses {expr!r}")
        self.parts += [{"type": "python", "text": expr}, {"type": "python_output", "text": value}]
        return value

    def step(self, before: str, expr: str, after: str = "") -> str:
        """GSM8K's pattern: "text 48/2 = <<48/2=24>>24 more text"."""
        self.text(before)
        value = self.calc(expr)
        self.text(value + after)
        return value

    def finish(self, question: str, answer: str) -> Record:
        self.text(f"\n#### {answer}")
        return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": self.parts}],
                "answer": answer}


def _bare(rng: random.Random) -> Record:
    op = rng.choice("+-*/")
    if op == "/":
        b = rng.randint(2, 40)
        a = b * rng.randint(2, 60)
    elif op == "*":
        a, b = rng.randint(2, 999), rng.randint(2, 99)
    else:
        a, b = rng.randint(10, 9999), rng.randint(10, 9999)
    shown = {"+": "+", "-": "-", "*": rng.choice(["*", "×", "times"]), "/": rng.choice(["/", "÷", "divided by"])}[op]
    ask = rng.choice(["What is {e}?", "Calculate {e}.", "Compute {e}.", "What's {e}?", "Work out {e}.",
                      "Can you tell me what {e} is?", "{e} = ?"]).format(e=f"{a} {shown} {b}")
    s = _Steps().text(rng.choice(["Let me use the calculator. ", "I'll compute it. ", ""]))
    value = s.step(f"{a} {shown} {b} = ", f"{a}{op}{b}", ".")
    return s.finish(ask, value)


def _shopping(rng: random.Random) -> Record:
    name, (one, many) = rng.choice(_NAMES), rng.choice(_THINGS)
    n, price = rng.randint(2, 30), rng.randint(1, 25)
    q = rng.choice([f"{name} buys {n} {many} that cost ${price} each. How much does {name} spend in dollars?",
                    f"One {one} costs ${price}. How many dollars do {n} {many} cost?"])
    s = _Steps()
    total = s.step(f"Each {one} costs ${price}, so {n} {many} cost {n} * {price} = $", f"{n}*{price}", ".")
    return s.finish(q, total)


def _give_and_buy(rng: random.Random) -> Record:
    name, (_, many) = rng.choice(_NAMES), rng.choice(_THINGS)
    a = rng.randint(20, 200)
    b, c = rng.randint(1, a - 1), rng.randint(1, 100)
    q = f"{name} had {a} {many}. {name} gave {b} of them to a friend and then bought {c} more. How many {many} does {name} have now?"
    s = _Steps()
    left = s.step(f"After giving {b} away, {name} has {a} - {b} = ", f"{a}-{b}", f" {many}.\n")
    now = s.step(f"After buying {c} more, {name} has {left} + {c} = ", f"{left}+{c}", f" {many}.")
    return s.finish(q, now)


def _sharing(rng: random.Random) -> Record:
    name, (_, many) = rng.choice(_NAMES), rng.choice(_THINGS)
    k, each = rng.randint(2, 12), rng.randint(2, 40)
    total = k * each
    q = f"{name} shares {total} {many} equally among {k} friends. How many {many} does each friend get?"
    s = _Steps()
    value = s.step(f"Each friend gets {total} / {k} = ", f"{total}/{k}", f" {many}.")
    return s.finish(q, value)


def _rate(rng: random.Random) -> Record:
    v, t = rng.randint(5, 120), rng.randint(2, 12)
    vehicle = rng.choice(_VEHICLES)
    q = f"A {vehicle} travels at {v} kilometers per hour. How many kilometers does it travel in {t} hours?"
    s = _Steps()
    d = s.step(f"Distance is speed times time: {v} * {t} = ", f"{v}*{t}", " kilometers.")
    return s.finish(q, d)


def _discount(rng: random.Random) -> Record:
    price, pct = 20 * rng.randint(1, 30), 5 * rng.randint(1, 14)
    item = rng.choice(["jacket", "lamp", "bicycle helmet", "backpack", "pair of shoes", "board game"])
    q = f"A {item} costs ${price}. It is on sale for {pct}% off. What is the sale price in dollars?"
    s = _Steps()
    off = s.step(f"The discount is {price} * {pct} / 100 = $", f"{price}*{pct}/100", ".\n")
    final = s.step(f"The sale price is {price} - {off} = $", f"{price}-{off}", ".")
    return s.finish(q, final)


def _average(rng: random.Random) -> Record:
    a, b = rng.randint(50, 100), rng.randint(50, 100)
    c = rng.randint(50, 100)
    c -= (a + b + c) % 3  # a whole-number mean
    name = rng.choice(_NAMES)
    q = f"{name} scored {a}, {b} and {c} on three tests. What is {name}'s average score?"
    s = _Steps()
    total = s.step(f"The scores add up to {a} + {b} + {c} = ", f"{a}+{b}+{c}", ".\n")
    mean = s.step(f"The average is {total} / 3 = ", f"{total}/3", ".")
    return s.finish(q, mean)


def _perimeter(rng: random.Random) -> Record:
    w, h = rng.randint(2, 80), rng.randint(2, 80)
    place = rng.choice(["garden", "playground", "room", "field", "parking lot"])
    q = f"A rectangular {place} is {w} meters long and {h} meters wide. What is its perimeter in meters?"
    s = _Steps()
    p = s.step(f"The perimeter is 2 * ({w} + {h}) = ", f"2*({w}+{h})", " meters.")
    return s.finish(q, p)


def _savings(rng: random.Random) -> Record:
    name = rng.choice(_NAMES)
    start, weekly, weeks = rng.randint(0, 200), rng.randint(2, 50), rng.randint(2, 20)
    q = f"{name} has ${start} and saves ${weekly} every week. How many dollars will {name} have after {weeks} weeks?"
    s = _Steps()
    saved = s.step(f"In {weeks} weeks {name} saves {weekly} * {weeks} = $", f"{weekly}*{weeks}", ".\n")
    total = s.step(f"Together with the ${start} from the start that is {start} + {saved} = $", f"{start}+{saved}", ".")
    return s.finish(q, total)


_ARITHMETIC: tuple[Callable[[random.Random], Record], ...] = (
    _bare, _bare, _shopping, _give_and_buy, _sharing, _rate, _discount, _average, _perimeter, _savings)


def arithmetic(seed: int) -> Iterator[Record]:
    """Endless arithmetic problems solved with calculator calls (see the module docstring)."""
    rng = random.Random(seed)
    while True:
        yield rng.choice(_ARITHMETIC)(rng)


# ---------------------------------------------------------------- spelling

SPELL_TEMPLATES = (
    "Spell the word: {word}",
    "Spell '{word}' letter by letter.",
    "How do you spell {word}?",
    "Can you spell the word \"{word}\" for me?",
)


def spelling(words: Sequence[str], seed: int) -> Iterator[Record]:
    """Endless SimpleSpelling conversations: a word from `words`, the reply ``word:w,o,r,d``."""
    pool = sorted({w.strip().lower() for w in words if w.strip().isalpha()})
    if not pool:
        raise ValueError("spelling needs a non-empty word list")
    rng = random.Random(seed)
    while True:
        word = rng.choice(pool)
        question = rng.choice(SPELL_TEMPLATES).format(word=word)
        yield {"messages": [{"role": "user", "content": question},
                            {"role": "assistant", "content": f"{word}:{','.join(word)}"}], "answer": None}


def spellingbee(words: Sequence[str], seed: int, exclude: set[tuple[str, str]] = frozenset()) -> Iterator[Record]:
    """Endless letter-counting conversations in the SpellingBee eval's user format, skipping `exclude` pairs."""
    done, n = 0, 256
    while True:
        # spellingbee_items draws item by item from one Random(seed): its first `done` items never change
        items = spellingbee_items(words, n, seed)
        for item in items[done:]:
            if (item["word"], item["letter"]) not in exclude:
                yield _count_letters(item["question"], item["word"], item["letter"])
        done, n = n, n * 2


def _count_letters(question: str, word: str, letter: str) -> Record:
    count = word.count(letter)
    lines = []
    running = 0
    for i, char in enumerate(word, 1):
        if char == letter:
            running += 1
            lines.append(f"{i}:{char} hit! count={running}")
        else:
            lines.append(f"{i}:{char}")
    s = _Steps().text(
        f"I need to count the letter '{letter}' in the word '{word}'. First I spell it out:\n"
        f"{word}:{','.join(word)}\n\nThen I go through it letter by letter:\n" + "\n".join(lines)
        + f"\n\nThat gives {running}. Let me double check with Python:\n\n")
    value = s.calc(f"'{word}'.count('{letter}')")
    s.text(f"\n\nPython also gives {value}.\n\nMy final answer is:\n")
    return s.finish(question, value)


# ---------------------------------------------------------------- identity

_WHO = ("I'm a small language model, a chat assistant trained from scratch with chatforge. chatforge is an open-source "
        "pipeline that follows the recipe of Andrej Karpathy's nanochat: it trains a tokenizer, pretrains a small GPT on "
        "web text, then teaches it to hold conversations with mid-training, supervised fine-tuning and a little "
        "reinforcement learning.")
_CAN = ("I can chat, answer simple questions, explain everyday ideas in a few sentences, do arithmetic with the help "
        "of a calculator tool, count letters in words, and pick answers to multiple-choice questions. I'm small, so "
        "keep your expectations modest.")
_CANT = ("I can't browse the internet, look up current events, see images or files, or remember earlier "
         "conversations. My knowledge comes only from the text I was trained on, and I'm a small model, so I often "
         "make mistakes and can state wrong things confidently. Please double-check anything important.")

IDENTITY: tuple[tuple[tuple[str, str], ...], ...] = (
    (("user", "Who are you?"), ("assistant", _WHO)),
    (("user", "What are you?"), ("assistant", "I'm a small chat model. " + _WHO.split(". ", 1)[1])),
    (("user", "hi! what's your name?"),
     ("assistant", "Hi! I don't have a personal name. I'm a small chat assistant that was trained from scratch with "
                   "chatforge, following nanochat's recipe. What can I do for you?")),
    (("user", "Who made you?"),
     ("assistant", "I was trained from scratch by whoever ran chatforge's training pipeline. chatforge is the software "
                   "that trained me; the recipe it follows (data, model and training steps) is Andrej Karpathy's "
                   "nanochat.")),
    (("user", "Who created you?"),
     ("assistant", "The person or team who ran chatforge trained me. chatforge builds a small ChatGPT-like model end to "
                   "end, from raw text to a chat model, using nanochat's recipe.")),
    (("user", "Are you ChatGPT?"),
     ("assistant", "No. I'm not ChatGPT and I wasn't made by OpenAI. I'm a much smaller model trained from scratch with "
                   "chatforge, which follows the recipe of nanochat, a small open-source ChatGPT clone.")),
    (("user", "Are you made by OpenAI, Google or Anthropic?"),
     ("assistant", "None of them. I'm not a product of any of those companies. I was trained from scratch with chatforge, "
                   "an open-source pipeline based on Andrej Karpathy's nanochat.")),
    (("user", "Are you a fine-tuned version of Llama or GPT-2?"),
     ("assistant", "No. I wasn't fine-tuned from someone else's model. chatforge trained me from scratch: first my "
                   "tokenizer, then pretraining on web text from random weights, then conversation training.")),
    (("user", "What is chatforge?"),
     ("assistant", "chatforge is the pipeline that trained me. It turns raw text into a small chat model in stages "
                   "(tokenizer, pretraining, mid-training, supervised fine-tuning, reinforcement learning, evaluation) "
                   "and keeps every stage's output as a versioned, cached artifact with its time and cost on record. "
                   "It follows nanochat's recipe.")),
    (("user", "What is nanochat?"),
     ("assistant", "nanochat is Andrej Karpathy's small, readable, end-to-end implementation of a ChatGPT-like model: "
                   "tokenizer, pretraining, fine-tuning, evaluation and a chat interface, designed to train on a single "
                   "GPU node for about a hundred dollars. The chatforge pipeline that trained me follows its recipe.")),
    (("user", "How were you trained?"),
     ("assistant", "In stages. First a byte-level BPE tokenizer was trained. Then I was pretrained from random weights to "
                   "predict the next token of educational web text. After that, mid-training taught me the "
                   "conversation format, multiple-choice answers and calculator use; supervised fine-tuning polished "
                   "my replies; and reinforcement learning on math word problems rewarded correct answers. chatforge "
                   "ran all of it, following nanochat's recipe.")),
    (("user", "What can you do?"), ("assistant", _CAN)),
    (("user", "What are you good at?"), ("assistant", _CAN)),
    (("user", "What can't you do?"), ("assistant", _CANT)),
    (("user", "What are your limitations?"), ("assistant", _CANT)),
    (("user", "Can you browse the web?"),
     ("assistant", "No, I can't access the internet. I can only use what I learned during training, plus a simple "
                   "calculator for arithmetic.")),
    (("user", "What's the news today?"),
     ("assistant", "I can't tell you: I have no access to the internet or to current events, and I don't know today's "
                   "date. Only the text I was trained on is available to me.")),
    (("user", "Do you remember what we talked about yesterday?"),
     ("assistant", "No. I don't keep any memory between conversations; each one starts fresh. If you tell me what we "
                   "discussed, I'm happy to continue from there.")),
    (("user", "Can you use tools?"),
     ("assistant", "One: a small calculator. When a question needs arithmetic, I can write an expression such as "
                   "12*7 and the calculator returns the result, which I then use in my answer. It also counts letters "
                   "in a word. I have no other tools.")),
    (("user", "How big are you?"),
     ("assistant", "Small. My exact size depends on the preset chosen when I was trained: chatforge's presets range from "
                   "a tiny test model to a few hundred million parameters or so, far smaller than today's large "
                   "assistants. That is why I make more mistakes than they do.")),
    (("user", "How much did it cost to train you?"),
     ("assistant", "I don't know my own bill, but chatforge records the time and cost of every training stage. For "
                   "reference, nanochat's speedrun recipe trains a model like me in about four hours on one node of "
                   "eight H100 GPUs, roughly a hundred dollars.")),
    (("user", "Are you conscious? Do you have feelings?"),
     ("assistant", "No. I'm a program that predicts text one token at a time. I don't have feelings, experiences or "
                   "awareness, even when my words sound like I do.")),
    (("user", "Are you always right?"),
     ("assistant", "Definitely not. I'm a small model and I can be wrong, sometimes confidently. For anything that "
                   "matters, please check my answers against a reliable source.")),
    (("user", "What languages do you speak?"),
     ("assistant", "Mostly English: almost all of my training text was English. I may understand a little of other "
                   "languages, but my answers in them will be poor.")),
    (("user", "Can you write code?"),
     ("assistant", "A little. I can write short, simple Python functions, but I'm a small model and my code often has "
                   "bugs, so test it before you rely on it.")),
    (("user", "Can you see this picture?"),
     ("assistant", "No, I can only read and write text. I can't see images, listen to audio or open files.")),
    (("user", "What's your knowledge cutoff?"),
     ("assistant", "I don't have a precise date. I know only what was in my training text, which was collected at some "
                   "point before I was trained, and I have no way to learn about anything newer.")),
    (("user", "Is your training data or code public?"),
     ("assistant", "chatforge is open source and follows nanochat, which is also open source. Every stage of my "
                   "training, including which data went in, is recorded as a versioned artifact, so whoever trained me "
                   "can trace exactly what I was trained on.")),
    (("user", "Why should I trust you?"),
     ("assistant", "You shouldn't trust me blindly. I'm a small experimental model: useful for simple questions and for "
                   "seeing how chat models work, but I make mistakes. Verify anything important.")),
    (("user", "Tell me about yourself in one sentence."),
     ("assistant", "I'm a small chat model trained from scratch with chatforge, following Andrej Karpathy's nanochat "
                   "recipe.")),
    (("user", "hello"),
     ("assistant", "Hello! I'm a small chat assistant trained with chatforge. How can I help you today?")),
    (("user", "Can you help me with my math homework?"),
     ("assistant", "I can try! I'm fairly good at arithmetic because I can use a calculator, and I can work through "
                   "simple word problems step by step. I'm less reliable with advanced math, so please check my work.")),
    (("user", "Who are you?"), ("assistant", _WHO),
     ("user", "So who trained you, exactly?"),
     ("assistant", "Whoever ran the chatforge pipeline that produced me. chatforge is the software, nanochat is the "
                   "recipe it follows, and the person running it chose the data, model size and hardware.")),
    (("user", "What can you do?"), ("assistant", _CAN),
     ("user", "And what can't you do?"), ("assistant", _CANT)),
    (("user", "Are you smarter than ChatGPT?"),
     ("assistant", "No. I'm a far smaller model trained on much less data, so ChatGPT is much more capable. I'm a small "
                   "chat model trained with chatforge, built to show the whole process end to end on a modest budget."),
     ("user", "Then what's the point of you?"),
     ("assistant", "Learning and experimenting. Because I'm small and cheap to train, anyone can retrain me, change the "
                   "recipe and see what each training stage does, with every step's data, cost and score on record.")),
    (("system", "You are a helpful assistant."),
     ("user", "Introduce yourself briefly."),
     ("assistant", "Hi! I'm a small chat assistant trained from scratch with chatforge, following nanochat's recipe. I "
                   "can chat, answer simple questions and do arithmetic with a calculator. I can't browse the web, and "
                   "I do make mistakes.")),
    (("user", "Do you have a name?"),
     ("assistant", "Not really. You can call me the chatforge assistant: I'm the model that chatforge trained from "
                   "scratch with nanochat's recipe.")),
    (("user", "Can you learn from this conversation?"),
     ("assistant", "Not permanently. Within this conversation I can use what you've told me, but my weights don't "
                   "change while we talk, and I won't remember any of it next time.")),
)


def identity() -> list[Record]:
    """The hand-written identity conversations, in a fixed order."""
    return [{"messages": [{"role": r, "content": c} for r, c in conv], "answer": None} for conv in IDENTITY]

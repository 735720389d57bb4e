"""Has a checkpoint learnt the chat format? Two probes, reported by chat_eval next to the task scores.

- `turn_end_rate`: over 32 fixed user prompts (greetings, questions, requests, small sums), the fraction of
  greedy replies that end with ``<|assistant_end|>`` within the token budget. A base model has never seen
  the chat tokens and rarely closes a turn; mid and SFT teach it to.
- `calculator_call_rate`: over 8 fixed GSM-style word problems, 4 samples each (temperature 1, top-k 50,
  fixed seed), the fraction of replies holding at least one well-formed calculator call: ``<|python_start|>``
  an expression the calculator evaluates ``<|python_end|>``. It measures the format, not the arithmetic.

Both are probes of behaviour, not benchmarks: the prompts are ours, written for this, and appear in no
training mixture.
"""
from __future__ import annotations

import re

from model.chat import calculator
from model.chat.conversation import render_for_completion

TURN_PROMPTS = (
    "Hello!", "Hi, how are you today?", "Who are you?", "What can you do?",
    "What is the capital of France?", "Name a color.", "What is 3 + 4?", "Tell me a fun fact.",
    "Can you help me?", "What day comes after Monday?", "Say something nice.", "What is a cat?",
    "How many legs does a dog have?", "Give me one word that rhymes with 'tree'.", "Thank you!", "Goodbye.",
    "What is water made of?", "Is the sun a star?", "Write one short sentence about rain.", "What is 10 minus 2?",
    "Spell the word 'cat'.", "What do bees make?", "Name a fruit.", "What is your name?",
    "Do you like music?", "What is the opposite of cold?", "Count to three.", "Where do fish live?",
    "What is 5 times 2?", "Tell me a short joke.", "What season comes after winter?", "Are you a robot?",
)

CALC_PROMPTS = (
    "Tom has 12 apples and buys 15 more. How many apples does he have now?",
    "A box holds 24 pencils. How many pencils are in 7 boxes?",
    "Sara had 90 stickers and gave away 35. How many stickers does she have left?",
    "A farmer splits 144 eggs equally into 12 baskets. How many eggs go in each basket?",
    "A book costs 8 dollars. How much do 9 books cost?",
    "There are 45 students and 17 of them are boys. How many girls are there?",
    "A train travels 60 miles each hour for 5 hours. How far does it go?",
    "Mia reads 23 pages on Monday and 38 pages on Tuesday. How many pages did she read?",
)

_CALL = re.compile(r"<\|python_start\|>(.*?)<\|python_end\|>", re.S)


def well_formed_calls(text: str) -> list[str]:
    """The expressions of the calculator calls in a decoded reply that the calculator can evaluate."""
    return [expr for expr in _CALL.findall(text) if calculator.evaluate(expr) is not None]


def _prompts(tok, texts, max_tokens: int, context: int) -> list[list[int]]:
    budget = max(2, context - max_tokens)
    return [render_for_completion([{"role": "user", "content": t}], tok, max_tokens=budget) for t in texts]


def turn_end_rate(engine, tok, max_tokens: int) -> float:
    """The fraction of TURN_PROMPTS whose greedy reply ends with <|assistant_end|> within `max_tokens`."""
    end = tok.special_id("<|assistant_end|>")
    prompts = _prompts(tok, TURN_PROMPTS, max_tokens, engine.model.config.sequence_len)
    replies = engine.generate_batch(prompts, max_tokens, temperature=0.0)
    return sum(1 for tokens, _ in replies if tokens and tokens[-1] == end) / len(replies)


def calculator_call_rate(engine, tok, max_tokens: int, samples: int = 4, seed: int = 1234) -> float:
    """The fraction of sampled replies to CALC_PROMPTS holding at least one well-formed calculator call."""
    prompts = _prompts(tok, CALC_PROMPTS, max_tokens, engine.model.config.sequence_len)
    replies = engine.generate_batch(prompts, max_tokens, temperature=1.0, top_k=50, seed=seed, num_samples=samples)
    return sum(1 for tokens, _ in replies if well_formed_calls(tok.decode(tokens))) / len(replies)

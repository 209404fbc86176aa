"""Generated arithmetic word problems in GSM8K's format (the demo's task): chains of running totals.

Each problem is a short story: someone starts with a number of things and
gains the same amount every day, for 4 to 8 days; the question asks how many
there are at the end. Its answer works the chain day by day in GSM8K's
format, each step carrying the previous result, with ``<<expr=value>>``
annotations and a final ``#### n`` line::

  {"question": "Mia has 75 pens. Each day she gets 6 more. How many pens does Mia have after 4 days?",
   "answer": "Day 1: <<75+6=81>>81\\nDay 2: <<6+81=87>>87\\nDay 3: <<6+87=93>>93\\nDay 4: <<93+6=99>>99\\n#### 99"}

Two properties make decoding many tokens at once hard, as on natural GSM8K,
while each step stays one skill a small model learns in minutes (a two-digit
number plus one digit, with digits as separate tokens):

- positions depend on each other: every step starts from the previous
  step's result, and the digits of a result depend on each other (the
  carry), so a later number is only easy once the earlier ones are written;
  the k-th result is start + k * amount, which nothing but the chain gives;
- an answer has several right spellings: every sum names its operands in
  either order (``75+6`` or ``6+75``), as people write them, so the
  per-position distributions are mixtures of the spellings.

Generation is deterministic: ``problems(n, seed)`` always returns the same
list. ``splits`` draws a train and a test set from different seeds and drops
every test problem whose question also occurs in the train set, so the test
set is held out. Every value is a two-digit number (10 to 99).
"""

from __future__ import annotations

import json
import os
import random

NAMES = (("Mia", "she"), ("Tom", "he"), ("Ava", "she"), ("Sam", "he"), ("Lily", "she"), ("Ben", "he"),
         ("Emma", "she"), ("Leo", "he"), ("Zoe", "she"), ("Max", "he"), ("Ella", "she"), ("Jack", "he"))
ITEMS = ("apple", "pen", "book", "card", "egg", "toy", "cookie", "marble", "sticker", "shell", "coin", "flower")
GAIN = ("buys", "finds", "gets", "wins")


def problem(r: random.Random, min_steps: int = 4, max_steps: int = 8) -> dict:
  """One random problem: {"question", "answer"} (one step per day, then ``#### n``)."""
  name, pron = r.choice(NAMES)
  item = r.choice(ITEMS)
  days = r.randint(min_steps, max_steps)
  d = r.randint(2, 9)
  total = start = r.randint(10, 99 - d * days)
  steps = []
  for day in range(1, days + 1):
    x, y = (total, d) if r.random() < 0.5 else (d, total)  # either order: both are right
    steps.append(f"Day {day}: <<{x}+{y}={total + d}>>{total + d}")
    total += d
  question = (f"{name} has {start} {item}s. Each day {pron} {r.choice(GAIN)} {d} more. "
              f"How many {item}s does {name} have after {days} days?")
  return {"question": question, "answer": "\n".join(steps) + f"\n#### {total}"}


def problems(n: int, seed: int, min_steps: int = 4, max_steps: int = 8) -> list[dict]:
  """``n`` problems, the same for the same arguments."""
  r = random.Random(seed)
  return [problem(r, min_steps, max_steps) for _ in range(n)]


def splits(n_train: int, n_test: int, seed: int, min_steps: int = 4, max_steps: int = 8
           ) -> tuple[list[dict], list[dict]]:
  """(train, test): the test problems drawn from another seed, none sharing a question with train."""
  train = problems(n_train, seed, min_steps, max_steps)
  seen = {p["question"] for p in train}
  test, r = [], random.Random(seed + 1_000_003)
  while len(test) < n_test:
    p = problem(r, min_steps, max_steps)
    if p["question"] not in seen:
      seen.add(p["question"])
      test.append(dict(p, id=len(test)))
  return train, test


def write_jsonl(rows: list[dict], path: str) -> None:
  """Writes ``rows`` one JSON object a line (via a temporary file, so the file appears whole)."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    for row in rows:
      f.write(json.dumps(row) + "\n")
  os.replace(tmp, path)

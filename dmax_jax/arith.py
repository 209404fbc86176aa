"""Generated arithmetic word problems in GSM8K's format (the demo's task).

Each problem is a short story with one to three operations on small
numbers (single-digit facts, so a small model can learn them in minutes);
commutative steps name their operands in either order, so an answer has
several right spellings, as natural text does (the ambiguity that makes
decoding many tokens at once hard); its answer gives the worked steps with ``<<expr=value>>``
annotations and ends with a ``#### n`` line, like GSM8K::

  {"question": "Mia has 7 pens. She buys 5 more. How many pens does Mia have now?",
   "answer": "7+5=<<7+5=12>>12 pens.\\n#### 12"}

Generation is deterministic: ``problems(n, seed)`` always returns the same
list. ``splits`` draws a train and a test set from different seeds and drops
every test problem whose question also occurs in the train set, so the test
set is held out. Every answer is a non-negative integer below 1000.
"""

from __future__ import annotations

import json
import os
import random
from typing import Callable

NAMES = (("Mia", "she"), ("Tom", "he"), ("Ava", "she"), ("Sam", "he"), ("Lily", "she"), ("Ben", "he"),
         ("Emma", "she"), ("Leo", "he"), ("Zoe", "she"), ("Max", "he"), ("Ella", "she"), ("Jack", "he"))
ITEMS = ("apple", "pen", "book", "card", "egg", "toy", "cookie", "marble", "sticker", "shell", "coin", "flower")
CONTAINERS = (("box", "boxes"), ("bag", "bags"), ("jar", "jars"), ("basket", "baskets"), ("pack", "packs"))


def _either(r: random.Random, a: int, b: int) -> tuple[int, int]:
  """The operands of a commutative step in either order: answers, like people, write both."""
  return (a, b) if r.random() < 0.5 else (b, a)


def _add(r: random.Random, name, pron, item, _):
  a, b = r.randint(2, 20), r.randint(2, 9)
  c = a + b
  q = f"{name} has {a} {item}s. {pron.capitalize()} buys {b} more. How many {item}s does {name} have now?"
  x, y = _either(r, a, b)
  return q, [f"{x}+{y}=<<{x}+{y}={c}>>{c} {item}s."], c


def _sub(r, name, pron, item, _):
  a, b = r.randint(10, 20), r.randint(2, 9)
  c = a - b
  q = f"{name} has {a} {item}s. {pron.capitalize()} gives away {b}. How many {item}s are left?"
  return q, [f"{a}-{b}=<<{a}-{b}={c}>>{c} {item}s are left."], c


def _mul(r, name, pron, item, box):
  box, boxes = box
  a, b = r.randint(2, 9), r.randint(2, 9)
  c = a * b
  q = f"{name} buys {a} {boxes} of {item}s. Each {box} has {b} {item}s. How many {item}s does {pron} buy?"
  x, y = _either(r, a, b)
  return q, [f"{x}*{y}=<<{x}*{y}={c}>>{c} {item}s."], c


def _div(r, name, pron, item, _):
  b, c = r.randint(2, 9), r.randint(2, 9)
  a = b * c
  q = f"{name} shares {a} {item}s equally among {b} friends. How many {item}s does each friend get?"
  return q, [f"Each gets {a}/{b}=<<{a}/{b}={c}>>{c}."], c


def _mul_sub(r, name, pron, item, box):
  box, boxes = box
  a, b = r.randint(2, 6), r.randint(2, 6)
  n = a * b
  d = r.randint(1, min(9, n - 1))
  c = n - d
  q = (f"{name} has {a} {boxes} with {b} {item}s in each. {pron.capitalize()} eats {d} {item}s. "
       f"How many {item}s are left?")
  x, y = _either(r, a, b)
  return q, [f"{x}*{y}=<<{x}*{y}={n}>>{n} {item}s.", f"{n}-{d}=<<{n}-{d}={c}>>{c} are left."], c


def _price(r, name, pron, item, _):
  a, b = r.randint(2, 5), r.randint(2, 5)
  cost = a * b
  paid = cost + r.randint(1, 9)
  c = paid - cost
  q = f"{name} buys {a} {item}s at ${b} each and pays with ${paid}. How much change does {pron} get?"
  x, y = _either(r, a, b)
  return q, [f"Cost: {x}*{y}=$<<{x}*{y}={cost}>>{cost}.", f"Change: {paid}-{cost}=$<<{paid}-{cost}={c}>>{c}."], c


def _two_days(r, name, pron, item, _):
  a, b, p = r.randint(2, 9), r.randint(2, 9), r.randint(2, 5)
  n = a + b
  c = n * p
  q = (f"One {item} costs ${p}. {name} buys {a} {item}s on Monday and {b} on Tuesday. "
       f"How much does {pron} spend?")
  (x, y), (u, v) = _either(r, a, b), _either(r, n, p)
  return q, [f"{x}+{y}=<<{x}+{y}={n}>>{n} {item}s.", f"Cost: {u}*{v}=$<<{u}*{v}={c}>>{c}."], c


def _three_steps(r, name, pron, item, box):
  _, boxes = box
  a, b = r.randint(2, 5), r.randint(2, 5)
  n = a * b
  g = r.randint(1, min(9, n - 1))
  m = n - g
  e = r.randint(2, 9)
  c = m + e
  q = (f"{name} has {a} {boxes} of {b} {item}s. {pron.capitalize()} gives {g} away and then finds {e} more. "
       f"How many {item}s does {name} have?")
  (x, y), (u, v) = _either(r, a, b), _either(r, m, e)
  return q, [f"{x}*{y}=<<{x}*{y}={n}>>{n} {item}s.", f"{n}-{g}=<<{n}-{g}={m}>>{m} are left.",
             f"{u}+{v}=<<{u}+{v}={c}>>{c} in all."], c


TEMPLATES: tuple[Callable, ...] = (_add, _sub, _mul, _div, _mul_sub, _price, _two_days, _three_steps)


def problem(r: random.Random) -> dict:
  """One random problem: {"question", "answer"} (the answer's steps, then ``#### n``)."""
  name, pron = r.choice(NAMES)
  template = r.choice(TEMPLATES)
  question, steps, value = template(r, name, pron, r.choice(ITEMS), r.choice(CONTAINERS))
  assert 0 <= value < 1000, (template.__name__, value)
  return {"question": question, "answer": "\n".join(steps) + f"\n#### {value}"}


def problems(n: int, seed: int) -> list[dict]:
  """``n`` problems, the same for the same ``seed``."""
  r = random.Random(seed)
  return [problem(r) for _ in range(n)]


def splits(n_train: int, n_test: int, seed: int) -> tuple[list[dict], list[dict]]:
  """(train, test): the test problems drawn from another seed, none sharing a question with train."""
  train = problems(n_train, seed)
  seen = {p["question"] for p in train}
  test, r = [], random.Random(seed + 1_000_003)
  while len(test) < n_test:
    p = problem(r)
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

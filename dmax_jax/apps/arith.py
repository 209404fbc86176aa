"""Generated arithmetic word problems in GSM8K's format (the demo's tasks): chains of running totals.

Five tasks, each worked line by line with ``<<expr=value>>`` annotations and a
final ``#### n`` line, every line carrying the previous line's result:

``savings``: someone starts with a number of things and
gains the same amount every day, for 4 to 8 days::

  {"question": "Mia has 75 pens. Each day she gets 6 more. How many pens does Mia have after 4 days?",
   "answer": "Day 1: <<75+6=81>>81\nDay 2: <<6+81=87>>87\nDay 3: <<6+87=93>>93\nDay 4: <<93+6=99>>99\n#### 99"}

``week``: a different amount on each of up to seven days, and the days are
independent, so the answer adds them in any order::

  {"question": "Mia has 26 shells. On Monday she finds 9 more, on Tuesday 8 and on Wednesday 6. How many shells
                does Mia have now?",
   "answer": "Tuesday: <<26+8=34>>34\nWednesday: <<34+6=40>>40\nMonday: <<9+40=49>>49\n#### 49"}

``bag`` (the GPU demo's task): ``week`` without the day names; the question
lists the amounts and each line adds one not added yet (``forms`` can make one
order, the listed one, and one operand order the most common, as one phrasing
is in natural text, while every order stays right)::

  {"question": "Mia has 26 shells. On three walks she finds 9, 8 and 6 more. How many shells does Mia have now?",
   "answer": "<<26+8=34>>34\n<<34+6=40>>40\n<<9+40=49>>49\n#### 49"}

``digits``: each day adds the ones digit of the running total. The steps
chain, but the ones digits alone run a fixed cycle (d -> 2d mod 10), so the
final number is the start plus a sum fixed by the start's ones digit and the
number of days: a closed form a model can learn (BENCHMARKS.md)::

  {"question": "Mia has 59 pens. Each day she finds as many more as the ones digit of the number she has. How
                many pens does Mia have after 3 days?",
   "answer": "Day 1: <<59+9=68>>68\nDay 2: <<8+68=76>>76\nDay 3: <<76+6=82>>82\n#### 82"}

``tens`` (the CPU demo's task): each day adds the tens digit of the running
total, which depends on every carry before it, so no cycle gives the final
number::

  {"question": "Sam has 48 toys. Each day he buys as many more as the tens digit of the number he has. How many
                toys does Sam have after 3 days?",
   "answer": "Day 1: <<4+48=52>>52\nDay 2: <<52+5=57>>57\nDay 3: <<5+57=62>>62\n#### 62"}

Properties that make decoding many tokens at once hard, as on natural GSM8K:

- positions depend on each other: every step starts from the previous
  step's result, and the digits of a result depend on each other (the
  carry), so a later number is only easy once the earlier ones are written.
  (In ``savings`` the k-th result is also start + k * amount, which a model
  can learn to compute from the prompt alone; in ``week`` and ``bag`` the
  final number is a sum of up to eight numbers, which only the chain gives.)
- an answer has several right forms: every sum names its operands in either
  order (``75+6`` or ``6+75``); in ``week`` and ``bag`` the days (amounts)
  also come in any order, so the running totals themselves differ from one
  right answer to another, and a position's most likely day, amount and
  total, each taken on its own, need not belong to the same order.

Generation is deterministic: ``problems(n, seed)`` always returns the same
list. ``splits`` draws a train and a test set from different seeds and drops
every test problem whose question also occurs in the train set, so the test
set is held out.
"""

from __future__ import annotations

import json
import os
import random

NAMES = (("Mia", "she"), ("Tom", "he"), ("Ava", "she"), ("Sam", "he"), ("Lily", "she"), ("Ben", "he"),
         ("Emma", "she"), ("Leo", "he"), ("Zoe", "she"), ("Max", "he"), ("Ella", "she"), ("Jack", "he"))
ITEMS = ("apple", "pen", "book", "card", "egg", "toy", "cookie", "marble", "sticker", "shell", "coin", "flower")
GAIN = ("buys", "finds", "gets", "wins")
DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")


def _running_sum(r: random.Random, start: int, lines: list[tuple[str, int]], total_first: float = 0.5) -> str:
  """The worked answer adding ``lines``' amounts to ``start`` in the order given: ``prefix<<a+b=c>>c`` lines, each
  sum's operands in either order (both are right; the running total first with probability ``total_first``), then
  ``#### total``."""
  total, steps = start, []
  for prefix, a in lines:
    x, y = (total, a) if r.random() < total_first else (a, total)
    steps.append(f"{prefix}<<{x}+{y}={total + a}>>{total + a}")
    total += a
  return "\n".join(steps) + f"\n#### {total}"


def _story(r: random.Random, min_steps: int, max_steps: int, amounts: tuple[int, int]):
  """(name, pronoun, item, start, amounts) of a story with one amount per step; small amounts keep every total
  under 100."""
  name, pron = r.choice(NAMES)
  item = r.choice(ITEMS)
  n = r.randint(min_steps, max_steps)
  start = r.randint(10, max(10, 99 - amounts[1] * n))
  return name, pron, item, start, [r.randint(*amounts) for _ in range(n)]


def savings_problem(r: random.Random, min_steps: int, max_steps: int, amounts: tuple[int, int],
                    part: str = "any") -> dict:
  """One ``savings`` problem: {"question", "answer"} (one step per day, then ``#### n``).

  The daily amount is drawn from ``amounts`` (inclusive); the start keeps every total two-digit.
  """
  if amounts[1] * max_steps > 89:
    raise ValueError(f"task 'savings' keeps totals two-digit: amounts[1] * max_steps must be <= 89, got "
                     f"{amounts[1]} * {max_steps}")
  name, pron = r.choice(NAMES)
  item = r.choice(ITEMS)
  days = r.randint(min_steps, max_steps)
  d = r.randint(*amounts)
  total = start = r.randint(10, 99 - d * days)
  answer = _running_sum(r, start, [(f"Day {day}: ", d) for day in range(1, days + 1)])
  question = (f"{name} has {start} {item}s. Each day {pron} {r.choice(GAIN)} {d} more. "
              f"How many {item}s does {name} have after {days} days?")
  return {"question": question, "answer": answer}


def week_problem(r: random.Random, min_steps: int, max_steps: int, amounts: tuple[int, int],
                 part: str = "any") -> dict:
  """One ``week`` problem: {"question", "answer"} (one line per day, the days in a random order, then ``#### n``).

  The start is a two-digit number (low enough that single-digit amounts keep every total two-digit), each
  day's amount is drawn from ``amounts`` (inclusive).
  """
  if max_steps > len(DAYS):
    raise ValueError(f"task 'week' has at most {len(DAYS)} days, got max_steps={max_steps}")
  name, pron, item, start, found = _story(r, min_steps, max_steps, amounts)
  days = len(found)
  parts = [f"On Monday {pron} {r.choice(GAIN)} {found[0]} more"] + [f"on {DAYS[i]} {a}" for i, a in
                                                                   enumerate(found[1:], 1)]
  question = (f"{name} has {start} {item}s. " + ", ".join(parts[:-1]) + f" and {parts[-1]}. "
              f"How many {item}s does {name} have now?")
  order = r.sample(range(days), days)  # the days are independent: any order is right
  return {"question": question, "answer": _running_sum(r, start, [(f"{DAYS[i]}: ", found[i]) for i in order])}


def digits_problem(r: random.Random, min_steps: int, max_steps: int, amounts: tuple[int, int],
                   part: str = "any", unit: str = "start") -> dict:
  """One ``digits`` problem: {"question", "answer"} (one step per day, then ``#### n``).

  Each day adds the ones digit of the running total, so every step is written from the previous step's result;
  the final number, though, is the start plus the sum of a fixed cycle of ones digits (d -> 2d mod 10), set by
  the start's ones digit and the number of days. ``amounts`` bounds the start's ones digit (inclusive); starts
  whose chain would reach a ones digit of 0 (a step adding nothing) or pass 99 are drawn again. There are only
  about fifty starts: with ``unit="start"``, ``part="test"`` draws from the quarter of them that
  ``heldout_start`` picks and ``part="train"`` from the rest (``splits(hold_out="start")``: no test start is
  ever a training start); with ``unit="chain"`` the split is by (start, days) pair (``heldout_chain``).
  """
  name, pron = r.choice(NAMES)
  item = r.choice(ITEMS)
  days = r.randint(min_steps, max_steps)
  while True:
    start = 10 * r.randint(1, 8) + r.randint(max(1, amounts[0]), min(9, amounts[1]))
    chain = [start]
    for _ in range(days):
      chain.append(chain[-1] + _DIGITS["ones"](chain[-1]))
    held = heldout_start(start) if unit == "start" else heldout_chain(start, days)
    if chain[-1] <= 99 and all(x % 10 for x in chain) and part in ("any", ("train", "test")[held]):
      break
  return _digit_chain(r, name, pron, item, chain, "ones")


_DIGITS = {"ones": lambda n: n % 10, "tens": lambda n: n // 10 % 10}


def _digit_chain(r: random.Random, name: str, pron: str, item: str, chain: list[int], which: str) -> dict:
  """The problem of ``chain`` (start, then each total): one ``Day k`` step per day adding the ``which`` digit
  of the total (operands in either order, both right), then ``#### n``."""
  digit = _DIGITS[which]
  steps = []
  for day, (total, nxt) in enumerate(zip(chain, chain[1:]), 1):
    d = digit(total)
    x, y = (total, d) if r.random() < 0.5 else (d, total)  # either order: both are right
    steps.append(f"Day {day}: <<{x}+{y}={nxt}>>{nxt}")
  question = (f"{name} has {chain[0]} {item}s. Each day {pron} {r.choice(GAIN)} as many more as the {which} digit "
              f"of the number {pron} has. How many {item}s does {name} have after {len(chain) - 1} days?")
  return {"question": question, "answer": "\n".join(steps) + f"\n#### {chain[-1]}"}


def tens_problem(r: random.Random, min_steps: int, max_steps: int, amounts: tuple[int, int],
                 part: str = "any") -> dict:
  """One ``tens`` problem: each day adds the tens digit of the running total (``amounts`` and ``part`` unused).

  Starts are 20-150 and totals stay within 199 with a nonzero tens digit (else the start is drawn again): about
  180 chains. Unlike ``digits`` no cycle gives the final number: the tens digit a day adds depends on every
  carry before it.
  """
  del amounts, part
  name, pron = r.choice(NAMES)
  item = r.choice(ITEMS)
  days = r.randint(min_steps, max_steps)
  while True:
    chain = [r.randint(20, 150)]
    for _ in range(days):
      chain.append(chain[-1] + _DIGITS["tens"](chain[-1]))
    if chain[-1] <= 199 and all(_DIGITS["tens"](x) for x in chain):
      break
  return _digit_chain(r, name, pron, item, chain, "tens")


def heldout_start(start: int) -> bool:
  """Whether a ``digits`` start belongs to the test split (a fixed quarter of the starts, spread over tens and ones)."""
  return (start // 10 + start) % 4 == 0


def heldout_chain(start: int, days: int) -> bool:
  """Whether a ``digits`` (start, days) pair belongs to the test split: a fixed quarter of the pairs, never
  both day counts of one start next to each other (consecutive ``days`` fall in different residues)."""
  return (start // 10 + start + days) % 4 == 0


COUNTS = ("two", "three", "four", "five", "six", "seven", "eight")


def bag_problem(r: random.Random, min_steps: int, max_steps: int, amounts: tuple[int, int],
                part: str = "any", listed_first: float = 0.0, total_first: float = 0.5) -> dict:
  """One ``bag`` problem: {"question", "answer"} (one line per amount, in any order, then ``#### n``).

  Like ``week`` without the names: the question lists the amounts and a line may add any of them not added
  yet, so choosing the next line is choosing an amount, and no amount has to be looked up by a name.

  Every order is right, but the forms need not be equally common (as in natural text, where one phrasing
  dominates): each line adds the next amount in the question's order with probability ``listed_first`` and
  otherwise one of those left, drawn uniformly; each sum names the running total first with probability
  ``total_first``. At 0.0 and 0.5 (the defaults) every order and both operand orders are equally likely.
  """
  if max_steps > 1 + len(COUNTS):
    raise ValueError(f"task 'bag' has at most {1 + len(COUNTS)} amounts, got max_steps={max_steps}")
  name, pron, item, start, found = _story(r, min_steps, max_steps, amounts)
  n = len(found)
  question = (f"{name} has {start} {item}s. On {COUNTS[n - 2]} walks {pron} {r.choice(GAIN)} "
              + ", ".join(map(str, found[:-1])) + f" and {found[-1]} more. How many {item}s does {name} have now?")
  order = biased_order(r, found, listed_first)  # the walks are independent: any order is right
  return {"question": question, "answer": _running_sum(r, start, [("", a) for a in order], total_first)}


def biased_order(r: random.Random, items: list[int], listed_first: float) -> list[int]:
  """A random order of ``items``: each next item is the first one left (in the listed order) with probability
  ``listed_first``, else one drawn uniformly from those left (the first one included). 0.0: uniform."""
  if listed_first == 0.0:
    return r.sample(items, len(items))
  left, order = list(items), []
  while left:
    i = 0 if r.random() < listed_first else r.randrange(len(left))
    order.append(left.pop(i))
  return order


TASKS = {"savings": savings_problem, "week": week_problem, "bag": bag_problem, "digits": digits_problem,
         "tens": tens_problem}

UNIFORM_FORMS = (0.0, 0.5)  # (listed_first, total_first) that prefer no order: every task's data as generated before


def problem(r: random.Random, min_steps: int = 4, max_steps: int = 8, task: str = "savings",
            amounts: tuple[int, int] = (2, 9), part: str = "any", unit: str = "start",
            forms: tuple[float, float] = UNIFORM_FORMS) -> dict:
  """One random problem of ``task`` with ``min_steps`` to ``max_steps`` steps (days).

  ``part`` ("any", "train" or "test"): tasks whose problems are few hold some out by construction (``digits``:
  by start, or with ``unit="chain"`` by (start, days) pair); the others ignore it and ``splits`` holds out by
  question. ``forms`` (``bag`` only): (listed_first, total_first), how strongly one order of the lines and of
  each sum's operands is preferred (``bag_problem``); ``UNIFORM_FORMS`` prefers none.
  """
  if task not in TASKS:
    raise ValueError(f"task must be one of {sorted(TASKS)}, got {task!r}")
  if part not in ("any", "train", "test"):
    raise ValueError(f"part must be 'any', 'train' or 'test', got {part!r}")
  if unit not in ("start", "chain"):
    raise ValueError(f"unit must be 'start' or 'chain', got {unit!r}")
  if not 2 <= min_steps <= max_steps:
    raise ValueError(f"steps must satisfy 2 <= min_steps <= max_steps, got {min_steps}, {max_steps}")
  if not 1 <= amounts[0] <= amounts[1]:
    raise ValueError(f"amounts must satisfy 1 <= low <= high, got {tuple(amounts)}")
  listed_first, total_first = forms
  if not (0.0 <= listed_first <= 1.0 and 0.0 <= total_first <= 1.0):
    raise ValueError(f"forms (listed_first, total_first) must be probabilities in [0, 1], got {tuple(forms)}")
  if tuple(forms) != UNIFORM_FORMS and task != "bag":
    raise ValueError(f"forms other than {UNIFORM_FORMS} need task 'bag', got {tuple(forms)} for task {task!r}")
  extra = {"digits": dict(unit=unit), "bag": dict(listed_first=listed_first, total_first=total_first)}
  return TASKS[task](r, min_steps, max_steps, tuple(amounts), part, **extra.get(task, {}))


def problems(n: int, seed: int, min_steps: int = 4, max_steps: int = 8, task: str = "savings",
             amounts: tuple[int, int] = (2, 9), part: str = "any", unit: str = "start",
             forms: tuple[float, float] = UNIFORM_FORMS) -> list[dict]:
  """``n`` problems, the same for the same arguments."""
  r = random.Random(seed)
  return [problem(r, min_steps, max_steps, task, amounts, part, unit, forms) for _ in range(n)]


def splits(n_train: int, n_test: int, seed: int, min_steps: int = 4, max_steps: int = 8, task: str = "savings",
           amounts: tuple[int, int] = (2, 9), hold_out: str = "question",
           forms: tuple[float, float] = UNIFORM_FORMS) -> tuple[list[dict], list[dict]]:
  """(train, test): the test problems drawn from another seed, none sharing a question with train.

  ``hold_out="question"`` holds out questions only: with few distinct chains (``digits`` has about a hundred)
  the test chains also occur in training under other names and items, so accuracy then measures decoding,
  not generalisation. ``hold_out="start"`` (``digits`` only) also keeps every test start out of training;
  ``hold_out="chain"`` (``digits`` only) every test (start, days) pair: a test chain's steps are all steps
  seen in training (its start's other day count, the same totals in other chains), but its final number was
  never seen after its question, so it must be reached through the steps.
  """
  if hold_out not in ("question", "start", "chain") or (hold_out != "question" and task != "digits"):
    raise ValueError(f"hold_out must be 'question' (any task), 'start' or 'chain' (task 'digits'), got "
                     f"{hold_out!r} for task {task!r}")
  part = "any" if hold_out == "question" else "train"
  unit = "chain" if hold_out == "chain" else "start"
  train = problems(n_train, seed, min_steps, max_steps, task, amounts, part, unit, forms)
  seen = {p["question"] for p in train}
  test, r = [], random.Random(seed + 1_000_003)
  while len(test) < n_test:
    p = problem(r, min_steps, max_steps, task, amounts, "test" if part == "train" else "any", unit, forms)
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

"""GSM8K answers: the reference's final ``#### n`` line and the number a model's text ends with.

Scoring compares numbers as values after normalisation: thousands commas,
a leading ``$``, a trailing ``.`` and trailing decimal zeros are dropped, so
``"$1,000.00"``, ``"1000."`` and ``"1000"`` all read ``"1000"``.

Prediction rule: the number after the last ``####`` when the text has one,
else the last number anywhere in the text.

Strict rule (``strictly_correct``): the prediction is right and the text has
at least one ``<<expr=value>>`` annotation, each of which is arithmetically
right (``expr``: numbers, ``+ - * /`` and parentheses; compared exactly, as
decimals).
"""

from __future__ import annotations

import ast
import decimal
import re
from typing import Optional

# A number as written in prose: optional sign and $, either comma-grouped
# thousands or plain digits, optional decimals. "5." leaves the dot out.
_NUMBER = re.compile(r"-?\$?\s?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?")


def normalize_number(text: str) -> Optional[str]:
  """The canonical string of a number (``"$1,000.50"`` -> ``"1000.5"``), None if ``text`` is not one."""
  s = text.strip().rstrip(".").replace(",", "").replace("$", "").replace(" ", "")
  try:
    value = decimal.Decimal(s)
  except decimal.InvalidOperation:
    return None
  if not value.is_finite():
    return None
  if value == value.to_integral_value():
    return str(int(value))
  return format(value.normalize(), "f")


def reference_answer(answer: str) -> str:
  """The normalised number of a GSM8K reference answer's final ``#### n`` line; ValueError if none."""
  if "####" not in answer:
    raise ValueError("reference answer has no '####' line")
  tail = answer.rsplit("####", 1)[1].strip()
  number = normalize_number(tail)
  if number is None:
    raise ValueError(f"reference answer after '####' is not a number: {tail[:40]!r}")
  return number


def extract_prediction(text: str) -> Optional[str]:
  """The normalised number a model's answer gives, None if it has no number where one is looked for."""
  if "####" in text:
    match = _NUMBER.search(text.rsplit("####", 1)[1])
    return normalize_number(match.group()) if match else None
  matches = _NUMBER.findall(text)
  return normalize_number(matches[-1]) if matches else None


def is_correct(prediction_text: str, reference: str) -> bool:
  """Whether the number extracted from ``prediction_text`` equals the normalised ``reference``."""
  return extract_prediction(prediction_text) == reference


_ANNOTATION = re.compile(r"<<([^<>=]*)=([^<>=]*)>>")
_OPS = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b, ast.Mult: lambda a, b: a * b,
        ast.Div: lambda a, b: a / b}


def _value(node) -> decimal.Decimal:
  """The exact value of an arithmetic expression tree (ValueError for anything else)."""
  if isinstance(node, ast.Expression):
    return _value(node.body)
  if isinstance(node, ast.Constant) and type(node.value) in (int, float):
    return decimal.Decimal(str(node.value))
  if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
    v = _value(node.operand)
    return -v if isinstance(node.op, ast.USub) else v
  if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
    return _OPS[type(node.op)](_value(node.left), _value(node.right))
  raise ValueError("not plain arithmetic")


def annotation_is_right(expr: str, value: str) -> bool:
  """Whether ``<<expr=value>>`` holds: ``expr`` evaluates exactly to the number ``value``."""
  number = normalize_number(value)
  if number is None or len(expr) > 64:
    return False
  try:
    with decimal.localcontext() as ctx:
      ctx.prec = 50
      return _value(ast.parse(expr.replace(",", "").strip(), mode="eval")) == decimal.Decimal(number)
  except (SyntaxError, ValueError, ArithmeticError, RecursionError):
    return False


def strictly_correct(prediction_text: str, reference: str) -> bool:
  """Right final number, and at least one ``<<expr=value>>`` annotation, every one of them right."""
  steps = _ANNOTATION.findall(prediction_text)
  if not steps or prediction_text.count("<<") != len(steps):  # a malformed annotation is a wrong one
    return False
  return is_correct(prediction_text, reference) and all(annotation_is_right(e, v) for e, v in steps)

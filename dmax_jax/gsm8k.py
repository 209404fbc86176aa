"""GSM8K answers: the reference's final ``#### n`` line and the number a model's text ends with.

Scoring compares numbers as values after normalisation: thousands commas,
a leading ``$``, a trailing ``.`` and trailing decimal zeros are dropped, so
``"$1,000.00"``, ``"1000."`` and ``"1000"`` all read ``"1000"``.

Prediction rule: the number after the last ``####`` when the text has one,
else the last number anywhere in the text.
"""

from __future__ import annotations

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

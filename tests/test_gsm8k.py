"""GSM8K answer extraction: every reference parses; predictions read as GSM8K scores them."""

import json
import re

import pytest

from conftest import GSM8K
from dmax_jax import gsm8k


@pytest.mark.parametrize("split", ["train", "test"])
def test_every_reference_answer_parses(split):
  path = GSM8K / f"{split}.jsonl"
  if not path.exists():
    pytest.fail(f"GSM8K data missing: {path}")
  count = 0
  with open(path) as f:
    for line in f:
      answer = json.loads(line)["answer"]
      ref = gsm8k.reference_answer(answer)
      # Independent restatement: the text after the last ####, commas dropped, is an integer.
      tail = answer.split("####")[-1].strip().replace(",", "")
      assert re.fullmatch(r"-?\d+", tail), tail
      assert ref == str(int(tail))
      count += 1
  assert count == {"train": 7473, "test": 1319}[split]


@pytest.mark.parametrize("text, expected", [
    ("1,000", "1000"), ("$5", "5"), ("5.00", "5"), ("5.", "5"), ("-3", "-3"), ("0.50", "0.5"),
    ("$1,234.50", "1234.5"), (" 42 ", "42"), ("007", "7"), ("abc", None), ("", None), ("1,2", "12"),
])
def test_normalize_number(text, expected):
  assert gsm8k.normalize_number(text) == expected


@pytest.mark.parametrize("prediction, expected", [
    ("She sells 9 eggs for $2 each, so she makes 9 * 2 = $18.\n#### 18", "18"),
    ("So the answer is 18.", "18"),
    ("The total is $1,000.", "1000"),
    ("It costs $5.00 in all", "5"),
    ("#### 12\nwait, 3 more makes 15", "12"),  # the number after the last #### wins over later numbers
    ("first #### 7 then #### 9", "9"),
    ("3 apples and 4 pears make 7 fruits", "7"),
    ("The temperature fell to -4 degrees.", "-4"),
    ("Half of it: 2.5 cups.", "2.5"),
    ("Final answer: \\boxed{1,250}", "1250"),
    ("no number here", None),
    ("I get 5, so\n####", None),  # a marker with no number after it is no answer,
])
def test_extract_prediction(prediction, expected):
  assert gsm8k.extract_prediction(prediction) == expected


def test_is_correct_compares_values():
  ref = gsm8k.reference_answer("work...\n#### 1,000")
  assert ref == "1000"
  assert gsm8k.is_correct("The answer is 1000.00", ref)
  assert gsm8k.is_correct("#### $1,000", ref)
  assert not gsm8k.is_correct("The answer is 100", ref)
  assert not gsm8k.is_correct("", ref)


def test_reference_without_marker_is_an_error():
  with pytest.raises(ValueError, match="####"):
    gsm8k.reference_answer("the answer is 5")
  with pytest.raises(ValueError, match="not a number"):
    gsm8k.reference_answer("#### five")

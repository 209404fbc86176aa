"""GSM8K answer extraction: every reference parses; predictions read as GSM8K scores them."""

import json
import re

import pytest

from conftest import GSM8K
from dmax_jax.apps import gsm8k


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


@pytest.mark.parametrize("text, reference, expected", [
    ("<<26-9=17>>17\n<<5+17=22>>22\n#### 22", "22", True),
    ("<<26-9=17>>17\n<<5+17=23>>23\n#### 23", "23", False),  # a wrong step, even with the "right" answer
    ("<<26-9=17>>17\n<<5+17=22>>22\n#### 21", "22", False),  # right steps, wrong answer
    ("She has 22.\n#### 22", "22", False),  # no worked step at all
    ("<<48/2=24>>24 and <<1.5*4=6>>6 then <<(3+2)*4=20>>20\n#### 20", "20", True),
    ("<<10/4=2.5>>2.5, <<$3*2=6>>6\n#### 6", "6", False),  # "$3" is no arithmetic
    ("<<2+2=4>>4 <<3+3=6\n#### 6", "6", False),  # an unclosed annotation counts as wrong
    ("<<1,000+1=1,001>>1001\n#### 1001", "1001", True),
])
def test_strictly_correct(text, reference, expected):
  assert gsm8k.strictly_correct(text, reference) is expected


def test_every_gsm8k_test_annotation_is_right_or_not_plain_arithmetic():
  """Independent check of annotation_is_right on the reference answers: most annotations hold exactly."""
  path = GSM8K / "test.jsonl"
  if not path.exists():
    pytest.fail(f"GSM8K data missing: {path}")
  right = total = 0
  for line in open(path):
    for expr, value in re.findall(r"<<([^<>=]*)=([^<>=]*)>>", json.loads(line)["answer"]):
      total += 1
      if re.fullmatch(r"\d+[+\-*]\d+", expr) and re.fullmatch(r"\d+", value):  # restated with Python ints
        assert gsm8k.annotation_is_right(expr, value) == (eval(expr) == int(value)), (expr, value)  # pylint: disable=eval-used
      right += gsm8k.annotation_is_right(expr, value)
  assert total > 3000 and right / total > 0.95

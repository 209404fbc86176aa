"""A decodable checkpoint directory for CLI tests: the tiny fixture's weights beside a trained tokenizer."""

import shutil

from conftest import TINY
from dmax_jax.tokenizer import train_tokenizer

TEXTS = ["What is 2 + 3? Let us think step by step.", "The quick brown fox jumps over the lazy dog.",
         "Tom has 1,000 apples and sells them for $5 each.", "hello there, how are you today?"] * 20


def make_checkpoint(path) -> str:
  """Writes tokenizer (vocab 512: eos 510, mask 511 like the fixture) + config.json + model.safetensors."""
  info = train_tokenizer(TEXTS, vocab_size=512, out_dir=str(path))
  assert (info["eos_token_id"], info["mask_token_id"]) == (510, 511)
  for name in ("config.json", "model.safetensors"):
    shutil.copy(TINY / name, path / name)
  return str(path)

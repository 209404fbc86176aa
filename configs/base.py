"""Defaults shared by every training config: the schema ``dmax_jax.training.config.defaults`` (each key
commented there)."""

from dmax_jax.training.config import defaults


def get_config():
  return defaults()

"""Block-wise diffusion decoding (see ``engine``)."""

from dmax_jax.decoding.engine import *  # noqa: F401,F403

"""Block-wise diffusion decoding: the strategies (``spd``, ``threshold``, ``low_confidence``, by name in
``registry``), the batch layout, the compiled loop (``engine.generate``) and its traces."""

from dmax_jax.decoding.engine import Generation, Program, compile_program, generate, prepare
from dmax_jax.decoding.layout import Layout, plan_batch, prompt_problem
from dmax_jax.decoding.low_confidence import LowConfidence
from dmax_jax.decoding.registry import STRATEGIES, make, name_of
from dmax_jax.decoding.spd import SPD
from dmax_jax.decoding.strategy import StepView, Strategy, strategy_dataclass
from dmax_jax.decoding.threshold import Threshold
from dmax_jax.decoding.trace import STATUS, TraceStep

__all__ = ["Generation", "Layout", "LowConfidence", "Program", "SPD", "STATUS", "STRATEGIES", "StepView", "Strategy",
           "Threshold", "TraceStep", "compile_program", "generate", "make", "name_of", "plan_batch", "prepare",
           "prompt_problem", "strategy_dataclass"]

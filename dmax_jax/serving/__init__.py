"""Serving: continuous batching of block-diffusion decoding over slots (``engine.Engine``), the device side in
``slots``. Pure and quiet like the rest of the library; the HTTP front end is ``dmax_jax.apps.serve``."""

from dmax_jax.serving.engine import (BlockEvent, Engine, EngineClosed, EngineConfig, FinishEvent, Handle, QueueFull,
                                     RequestError)

__all__ = ["BlockEvent", "Engine", "EngineClosed", "EngineConfig", "FinishEvent", "Handle", "QueueFull",
           "RequestError"]

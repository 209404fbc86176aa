"""Live in-process servers for the serving tests.

``start_server(checkpoint, ...)`` loads a checkpoint, starts a real ``dmax_jax.serving.Engine`` over it (every
program compiled first) and serves ``dmax_jax.apps.serve.create_app`` with uvicorn in a background thread on a
free 127.0.0.1 port. It returns ``(base_url, engine, stop)``; ``stop()`` stops the server and the engine (and
turns x64 back off when ``dtype="float64"`` turned it on). ``serve_app(app)`` serves another app (over the same
engine, say) and returns ``(base_url, stop)``.
"""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Optional

import jax

from dmax_jax.apps import runner, serve

MODEL_NAME = "tiny"


def load_engine(checkpoint: str, *, dtype: str = "float32", block_length: int = 4, max_slots: int = 4,
                max_queue: int = 64, window: Optional[int] = 64, strategy: str = "spd",
                threshold: Optional[float] = None, confidence_stop: float = 0.9, temperature: float = 0.0,
                k: Optional[int] = None, **engine_kw):
  """(started engine, tokenizer, model config, params) for ``checkpoint`` (XLA kernels)."""
  from dmax_jax.serving import Engine, EngineConfig  # pylint: disable=import-outside-toplevel

  config, params, tokenizer = runner.load_model(checkpoint, dtype, "xla")
  strategies = serve.strategy_templates(strategy, threshold, confidence_stop, temperature, k)
  engine = Engine(params, config, strategies, config=EngineConfig(
      block_length=block_length, max_slots=max_slots, max_queue=max_queue, window=window, **engine_kw))
  engine.start()
  return engine, tokenizer, config, params


def serve_app(app, timeout_s: float = 30.0):
  """Serves ``app`` from a background thread: (base_url, stop)."""
  sock = serve.listen("127.0.0.1", 0)
  server = serve.QuietServer.make(app, graceful_s=2)
  failed = []

  def target():
    try:
      asyncio.run(server.serve(sockets=[sock]))
    except BaseException as e:  # pylint: disable=broad-except
      failed.append(e)

  thread = threading.Thread(target=target, name="uvicorn", daemon=True)
  thread.start()
  deadline = time.monotonic() + timeout_s
  while not server.started:
    if failed or not thread.is_alive() or time.monotonic() > deadline:
      raise RuntimeError(f"the test server did not start: {failed}")
    time.sleep(0.01)

  def stop():
    server.should_exit = True
    thread.join(10)
    sock.close()

  return serve.url_of(sock), stop


def start_server(checkpoint: str, *, dtype: str = "float32", block_length: int = 4, max_slots: int = 4,
                 max_queue: int = 64, window: Optional[int] = 64, strategy: str = "spd",
                 threshold: Optional[float] = None, gen_length: int = 16, api_key: Optional[str] = None,
                 model_name: str = MODEL_NAME, **engine_kw):
  """A live server over a fresh engine: (base_url, engine, stop)."""
  x64 = jax.config.jax_enable_x64
  if dtype == "float64":
    jax.config.update("jax_enable_x64", True)
  engine, tokenizer, _, _ = load_engine(checkpoint, dtype=dtype, block_length=block_length, max_slots=max_slots,
                                        max_queue=max_queue, window=window, strategy=strategy, threshold=threshold,
                                        **engine_kw)
  app = serve.create_app(engine, tokenizer, model_name=model_name, api_key=api_key, strategy=strategy,
                         threshold=threshold, max_tokens=gen_length)
  url, stop_server = serve_app(app)

  def stop():
    stop_server()
    engine.shutdown(cancel=True)
    jax.config.update("jax_enable_x64", x64)

  return url, engine, stop

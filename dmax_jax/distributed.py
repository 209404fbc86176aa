"""Multi-process (multi-host) start-up: one JAX process per host, one global device mesh.

Every script runs the same code on one GPU, on one host with several GPUs and
on several hosts: after ``initialize`` the mesh in ``sharding.make_mesh``
spans every process's devices, each process feeds the slices of the global
batch its own devices hold (``trainer.put_batch``), and Orbax writes and reads
checkpoints collectively. Process 0 alone writes metrics and shows progress.
"""

from __future__ import annotations

import jax


def initialize(coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None):
  """Joins this process to a multi-process JAX run (``jax.distributed.initialize``).

  With no arguments JAX reads the cluster's own environment (SLURM, Open MPI,
  Kubernetes / GKE and Cloud TPU are detected); otherwise pass the
  coordinator's ``host:port`` (process 0 listens there), the number of
  processes and this process's id. Must run before anything touches a device.
  Processes without accelerators (CPU runs and tests) exchange data over gloo.
  """
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes, process_id=process_id)

"""Multi-host start-up: JAX's own multi-controller runtime (`jax.distributed`).

Every process runs the same program; JAX joins them through a coordinator and from then on
`jax.devices()` lists the devices of all processes, `jax.process_index()` says which process
this is, and one global mesh spans them all.
"""

from __future__ import annotations

import os

import jax

# Environment variables set by the cluster managers that `jax.distributed.initialize()` can
# read on its own (SLURM, Open MPI, Cloud TPU pods); seeing one means "several processes".
_CLUSTER_HINTS = ('SLURM_NTASKS', 'OMPI_COMM_WORLD_SIZE', 'TPU_WORKER_HOSTNAMES',
                  'MEGASCALE_COORDINATOR_ADDRESS')


def initialize(coordinator_address: str = '', num_processes: int = 0, process_id: int = -1,
               ) -> None:
  """Joins the other processes of a multi-process run; does nothing for a single process.

  Explicit arguments win; otherwise the cluster environment is detected by JAX itself. On
  CPU the collectives go through gloo, which is what makes multi-process CPU tests possible.
  """
  explicit = bool(coordinator_address) or num_processes > 1
  detected = any(int(os.environ.get(k, '1') or 1) > 1 if k.endswith(('NTASKS', 'SIZE'))
                 else bool(os.environ.get(k)) for k in _CLUSTER_HINTS)
  if not (explicit or detected):
    return
  if jax.config.jax_platforms in (None, '', 'cpu') or os.environ.get('JAX_PLATFORMS') == 'cpu':
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  if explicit:
    jax.distributed.initialize(coordinator_address=coordinator_address or None,
                               num_processes=num_processes or None,
                               process_id=process_id if process_id >= 0 else None)
  else:
    jax.distributed.initialize()

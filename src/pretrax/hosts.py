"""Joining the processes of a multi-host job: `jax.distributed` before anything touches a device.

Explicit flags (`--coordinator_address --num_processes --process_id`) work anywhere, including
several processes on one machine. Without them, JAX's own cluster detection runs where a cluster
says it is one: multi-host TPU VMs, SLURM jobs of several tasks, or JAX_COORDINATOR_ADDRESS set by
a launcher. A lone process on a laptop or a single accelerator host joins nothing.
"""

import os
import socket
import time

import jax

from pretrax import errors


class HostsError(errors.PretraxError, RuntimeError):
  """Processes that cannot form the job; the message names the address and the fix."""


def cluster_detected() -> bool:
  """Whether the environment describes more than one process (JAX then finds the details)."""
  if os.environ.get('JAX_COORDINATOR_ADDRESS'):
    return True
  if int(os.environ.get('SLURM_NTASKS', '1') or 1) > 1:
    return True
  tpu_hosts = os.environ.get('TPU_WORKER_HOSTNAMES', '')
  return ',' in tpu_hosts or bool(os.environ.get('MEGASCALE_COORDINATOR_ADDRESS'))


def process_share(num_processes: int = 0, process_id: int = -1) -> tuple[int, int]:
  """(index, count) of this process among those sharing work without joining JAX (prepare):
  the flags, else SLURM's or a TPU VM's own variables, else (0, 1)."""
  if num_processes > 0:
    if not 0 <= process_id < num_processes:
      raise HostsError(
        f'--process_id={process_id} must be in [0, {num_processes}) with '
        f'--num_processes={num_processes}.'
      )
    return process_id, num_processes
  if int(os.environ.get('SLURM_NTASKS', '1') or 1) > 1:
    return int(os.environ['SLURM_PROCID']), int(os.environ['SLURM_NTASKS'])
  tpu_hosts = os.environ.get('TPU_WORKER_HOSTNAMES', '')
  if ',' in tpu_hosts:
    return int(os.environ.get('TPU_WORKER_ID', '0')), len(tpu_hosts.split(','))
  return 0, 1


def _wait_for_coordinator(address: str, timeout_s: float) -> None:
  """Returns once the coordinator accepts TCP connections; raises HostsError at the deadline.

  jax.distributed aborts the whole process (a C++ fatal error, no Python exception) when it
  cannot register in time, so the non-coordinator processes look first and fail with a message.
  """
  host, _, port = address.rpartition(':')
  if not host or not port.isdigit():
    raise HostsError(f'--coordinator_address={address!r} is not HOST:PORT.')
  deadline = time.monotonic() + timeout_s
  while True:
    try:
      with socket.create_connection((host.strip('[]'), int(port)), timeout=2):
        return
    except OSError as e:
      if time.monotonic() >= deadline:
        raise HostsError(
          f'cannot reach the coordinator at {address} within {timeout_s:.0f} s ({e}): start '
          'process 0 there, check the host and port are reachable from this machine, or raise '
          '--distributed_timeout.'
        ) from None
      time.sleep(0.5)


def initialize(
  coordinator_address: str = '', num_processes: int = 0, process_id: int = -1, timeout_s: int = 300
) -> None:
  """Joins the job's processes, or does nothing for a single process."""
  explicit = bool(coordinator_address) or num_processes > 1
  if not explicit and not cluster_detected():
    return
  if explicit:
    if not coordinator_address or num_processes < 1 or not 0 <= process_id < num_processes:
      raise HostsError(
        f'multi-process flags need all three: --coordinator_address=HOST:PORT (got '
        f'{coordinator_address!r}), --num_processes=N (got {num_processes}) and '
        f'--process_id in [0, N) (got {process_id}).'
      )
    if process_id != 0:
      _wait_for_coordinator(coordinator_address, timeout_s)
    jax.distributed.initialize(
      coordinator_address,
      num_processes=num_processes,
      process_id=process_id,
      initialization_timeout=timeout_s,
    )
  else:
    jax.distributed.initialize(initialization_timeout=timeout_s)
  if jax.process_index() == 0:
    print(
      f'joined {jax.process_count()} processes, {jax.device_count()} devices '
      f'({jax.local_device_count()} here)',
      flush=True,
    )

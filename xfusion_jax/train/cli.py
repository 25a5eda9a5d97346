"""Command line of the training job.

  python -m xfusion_jax.train --config=configs/NAME.py \
      [--config.key=value ...] --workdir=DIR

Rerunning the same command resumes from the latest complete checkpoint in
DIR. On several hosts, run the same command on each with the --distributed
flags (or --distributed alone where JAX detects the cluster, e.g. on TPU
VMs).
"""

from __future__ import annotations

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from xfusion_jax import hostenv

_CONFIG = config_flags.DEFINE_config_file(
    "config", None,
    "Training config file, e.g. configs/lm_adapter_tiny.py. Override fields "
    "with --config.FIELD=VALUE; unknown fields are rejected.",
    lock_config=True)
_WORKDIR = flags.DEFINE_string(
    "workdir", None,
    "Folder for checkpoints, TensorBoard events and samples; a rerun with "
    "the same folder resumes.")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False,
    "Call jax.distributed.initialize() before anything else. Implied by "
    "--coordinator_address. Without the flags below JAX detects the cluster "
    "(TPU VMs, SLURM, ...).")
_COORDINATOR_ADDRESS = flags.DEFINE_string(
    "coordinator_address", None,
    "host:port of process 0's coordination service.")
_NUM_PROCESSES = flags.DEFINE_integer(
    "num_processes", None, "Number of processes of the job.")
_PROCESS_ID = flags.DEFINE_integer(
    "process_id", None, "Index of this process, 0 .. num_processes - 1.")
_INITIALIZATION_TIMEOUT = flags.DEFINE_integer(
    "initialization_timeout", 300,
    "Seconds to wait for every process to join the coordination service.")

flags.mark_flags_as_required(["config", "workdir"])


def initialize_distributed() -> None:
  """Start `jax.distributed` when the flags ask for several processes."""
  if not (_DISTRIBUTED.value or _COORDINATOR_ADDRESS.value):
    return
  jax.distributed.initialize(
      coordinator_address=_COORDINATOR_ADDRESS.value,
      num_processes=_NUM_PROCESSES.value,
      process_id=_PROCESS_ID.value,
      initialization_timeout=_INITIALIZATION_TIMEOUT.value)


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
  initialize_distributed()
  logging.info("JAX process %d of %d: local devices %s.", jax.process_index(),
               jax.process_count(), jax.local_devices())
  # Imported after jax.distributed.initialize, which must run before
  # anything touches the devices.
  from xfusion_jax.train import loop  # pylint: disable=g-import-not-at-top
  result = loop.train(_CONFIG.value, _WORKDIR.value)
  if result.preempted:
    logging.warning("Exiting after a preemption request; rerun the same "
                    "command to resume.")


def run() -> None:
  hostenv.restart_with_hugepage_malloc()
  app.run(main)

r"""Command line: `python -m dpo_jax.main --config=configs/quickstart.py --workdir=/tmp/run`.

Any config value can be overridden, e.g. `--config.dpo.beta=0.05`. Running again on the same
workdir resumes from its latest checkpoints.
"""

import os
import signal
import sys

HALTED_EXIT_CODE = 3     # --halt_after_steps reached, checkpoint written
PREEMPTED_EXIT_CODE = 4  # SIGTERM received, checkpoint written


def _terminated_while_starting(signum, frame):
    del signum, frame
    print("Error: preempted (SIGTERM) while starting, before the run did any work; rerun the same command",
          file=sys.stderr, flush=True)
    # Not SystemExit: the handler may run inside a callback that swallows exceptions (the garbage
    # collector's, during the imports), and nothing is open yet that an exit would need to close.
    os._exit(PREEMPTED_EXIT_CODE)


# First of all, so that a preemption notice during the imports below is answered too; `train.run`
# installs the handler of the run.
signal.signal(signal.SIGTERM, _terminated_while_starting)

import jax  # noqa: E402
from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from dpo_jax import checkpointing, commands, experiment, train  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/quickstart.py[:arg].",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and the summary.")
_HALT_AFTER_STEPS = flags.DEFINE_integer(
    "halt_after_steps", None, "Stop after this many optimizer steps of this invocation, with a checkpoint "
    "written (exit code 3); the same command resumes. For time-limited jobs.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", os.environ.get("JAX_COORDINATOR_ADDRESS"),
    "host:port of process 0, to run as one of several processes (default: $JAX_COORDINATOR_ADDRESS).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", int(os.environ.get("JAX_NUM_PROCESSES", "0")) or None,
                                      "Processes in the run, with --coordinator_address ($JAX_NUM_PROCESSES).")
_PROCESS_ID = flags.DEFINE_integer("process_id", int(os.environ.get("JAX_PROCESS_ID", "-1")) if
                                   "JAX_PROCESS_ID" in os.environ else None,
                                   "This process's index, with --coordinator_address ($JAX_PROCESS_ID).")
flags.mark_flags_as_required(["config", "workdir"])


def _cluster_environment():
    """True on a multi-process cluster that jax.distributed detects by itself (SLURM, TPU pod, Open MPI)."""
    return (int(os.environ.get("SLURM_NTASKS", "1")) > 1 or "," in os.environ.get("TPU_WORKER_HOSTNAMES", "")
            or int(os.environ.get("OMPI_COMM_WORLD_SIZE", "1")) > 1)


def _maybe_initialize_distributed():
    """Joins the multi-controller runtime when asked to (coordinator flags) or on a known cluster."""
    if _COORDINATOR.value or _cluster_environment():
        # Cross-process collectives on CPU (tests, local multi-process runs) go through gloo.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address=_COORDINATOR.value, num_processes=_NUM_PROCESSES.value,
                                   process_id=_PROCESS_ID.value)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    checkpointing.quiet_orbax_logs()
    _maybe_initialize_distributed()
    logging.info("JAX %s on %s: %d devices, process %d of %d", jax.__version__, jax.default_backend(),
                 jax.device_count(), jax.process_index(), jax.process_count())
    config = _CONFIG.value
    try:
        if config.experiment.name:  # several runs (dpo_jax/experiment.py); its workdir holds them all
            rows = experiment.run(config, _WORKDIR.value)
            if jax.process_index() == 0:
                print(experiment.format_rows(rows))
            return
        summary = train.run(config, _WORKDIR.value, halt_after_steps=_HALT_AFTER_STEPS.value)
    except train.Halted as halted:
        logging.warning("%s", halted)
        sys.exit(HALTED_EXIT_CODE)
    except train.Preempted as preempted:
        logging.warning("%s", preempted)
        sys.exit(PREEMPTED_EXIT_CODE)
    except (train.NonFiniteError, checkpointing.CheckpointError) as error:
        sys.exit(f"Error: {error}")
    except ValueError as error:  # a config or workdir problem: say it plainly, without a traceback
        sys.exit(f"Error: {error}")
    except OSError as error:  # a full disk or an unwritable workdir (storage's writes name the file)
        if error.filename is None:
            raise
        sys.exit(f"Error: {error.filename}: {error.strerror}")
    if jax.process_index() == 0:
        print(train.format_report(summary))


def run():
    """Console script `dpo-jax` (and `python -m dpo_jax.main`)."""
    commands.run(main, __name__)


if __name__ == "__main__":
    run()

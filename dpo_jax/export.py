r"""Exports a run's trained policy as a Hugging Face checkpoint directory.

  python -m dpo_jax.export --workdir=/tmp/dpo_run --out=/tmp/dpo_run/hf [--stage=dpo] [--dtype=bfloat16]

Reads `<workdir>/config.json` (the resolved config) and the newest checkpoint of the stage (default:
the last stage of `config.stages` that has one), merges LoRA adapters, and writes config.json,
safetensors shards and, when the run started from `model.init_from_hf`, that checkpoint's tokenizer
and generation files. transformers, vLLM and other serving stacks load the result directly.
"""

import os

import jax
from absl import flags, logging
from flax import nnx

from dpo_jax import checkpointing, commands, models, restore, sharding, storage

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Run directory (holds config.json and checkpoints/).", required=True)
flags.DEFINE_string("out", None, "Directory to write the Hugging Face checkpoint into (empty or new).",
                    required=True)
flags.DEFINE_string("stage", None, "Stage whose checkpoint to export (default: the last one trained).")
flags.DEFINE_string("dtype", None, "Cast the weights, e.g. bfloat16 (default: as trained).")
flags.DEFINE_integer("max_shard_mb", 5 * 1024, "Largest safetensors shard, in MiB.")


def last_trained_stage(workdir, config):
    """The last stage of `config.stages` with a checkpoint directory."""
    for stage in reversed(list(config.stages)):
        if storage.isdir(os.path.join(workdir, "checkpoints", stage)):
            return stage
    raise FileNotFoundError(f"{workdir}/checkpoints holds no checkpoint of the stages {list(config.stages)}")


def export(workdir, out, *, stage=None, dtype=None, max_shard_bytes=5 * 2**30):
    """Writes the policy of `stage`'s newest checkpoint in `workdir` to `out`; returns the stage."""
    config = restore.read_config(workdir)
    stage = stage or last_trained_stage(workdir, config)
    graphdef, abstract_params, logical_specs = models.abstract_model(config.model)
    # Parameters split over every local device (FSDP), so a model larger than one device exports.
    mesh = sharding.make_mesh({**{axis: 1 for axis in config.mesh}, "fsdp": -1}, devices=jax.local_devices())
    shardings = sharding.param_shardings(abstract_params, logical_specs, mesh)
    params = checkpointing.restore_params(os.path.join(workdir, "checkpoints", stage),
                                          checkpointing.with_shardings(abstract_params, shardings))
    models.save_hf(nnx.merge(graphdef, params), out, dtype=dtype, max_shard_bytes=max_shard_bytes)
    return stage


def main(argv):
    del argv
    stage = export(FLAGS.workdir, FLAGS.out, stage=FLAGS.stage, dtype=FLAGS.dtype,
                   max_shard_bytes=FLAGS.max_shard_mb * 2**20)
    logging.info("Exported the %s policy of %s to %s", stage, FLAGS.workdir, FLAGS.out)


if __name__ == "__main__":
    commands.run(main, __name__)

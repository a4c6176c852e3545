"""Padding and tokens per pair of each layout on a real dataset: `python -m dpo_jax.data.measure`.

    python -m dpo_jax.data.measure --manual_dir=../shared/data/hh-rlhf --name=hh_rlhf/harmless-base --split=test

Trains a byte-level BPE of --vocab_size tokens on the split itself (deterministic, as the benchmark
does), tokenises the pairs with the default boundary checks, truncates them to --max_length /
--max_prompt_length, and prints, per layout, the fraction of row slots that are padding and the
row slots (tokens computed) per pair.
"""

import os
import tempfile

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("name", "hh_rlhf/harmless-base", "TFDS dataset name")
flags.DEFINE_string("split", "test", "split to measure")
flags.DEFINE_string("manual_dir", "", "raw files on disk")
flags.DEFINE_string("data_dir", "", "TFDS data dir ('': a temporary one)")
flags.DEFINE_integer("vocab_size", 8192, "byte-level BPE vocabulary")
flags.DEFINE_integer("max_length", 512, "tokens per sequence")
flags.DEFINE_integer("max_prompt_length", 256, "prompt tokens kept")
flags.DEFINE_integer("max_pairs_per_row", 8, "packed layouts: pairs per row at most")


def main(argv):
    del argv
    # Imported here, so that --help answers without loading TFDS.
    from dpo_jax.configs import base_config
    from dpo_jax.data import layouts, records, task, tokenize

    with tempfile.TemporaryDirectory() as scratch:
        data_config = base_config().data
        data_config.update(name=(FLAGS.name,), manual_dir=FLAGS.manual_dir, data_dir=FLAGS.data_dir or scratch,
                           max_length=FLAGS.max_length, max_prompt_length=FLAGS.max_prompt_length,
                           max_pairs_per_row=FLAGS.max_pairs_per_row)
        examples, _ = task.read_split(task.prepare(FLAGS.name, data_config), FLAGS.split, data_config)
        texts = [e["prompt"] + e["chosen"] for e in examples] + [e["prompt"] + e["rejected"] for e in examples]
        tokenizer = tokenize.load(tokenize.train_byte_level_bpe(texts, os.path.join(scratch, "bpe"),
                                                                vocab_size=FLAGS.vocab_size))
        bad = records.BadExamples("skip")
        tokenized = tokenize.tokenize(examples, tokenizer, bad=bad)
        pairs, num_truncated = task.truncated_pairs(tokenized, data_config, need_rejected=True)
        print(f"{FLAGS.name}/{FLAGS.split}: {len(pairs)} pairs ({dict(bad.counts)} skipped), {num_truncated} "
              f"truncated to max_length={FLAGS.max_length}, max_prompt_length={FLAGS.max_prompt_length}; "
              f"byte-level BPE of {FLAGS.vocab_size}")
        print(f"{'layout':<22}{'padding fraction':>18}{'tokens per pair':>17}")
        for layout in layouts.LAYOUTS:
            arrays = layouts.pair_arrays(pairs, layout, max_length=FLAGS.max_length, row_length=2 * FLAGS.max_length,
                                         max_pairs_per_row=FLAGS.max_pairs_per_row)
            stats = layouts.token_stats(arrays, len(pairs))
            print(f"{layout:<22}{stats['padding_fraction']:>18.3f}{stats['tokens_per_example']:>17.1f}")


if __name__ == "__main__":
    app.run(main)

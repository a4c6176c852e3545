"""Data: TFDS builders, reading and tokenisation, layouts, the grain loader, and a run's token arrays.

- `task.load_task(config)`: the token arrays of a run (`task.Task`);
- `builders`: the TFDS builders (`import dpo_jax.data.builders` registers them, so that
  `tfds.builder("hh_rlhf/harmless-base", data_dir=...)` works);
- `records`, `tokenize`, `unpaired`: reading records of files, examples to token ids;
- `layouts`: padded, packed and prefix-shared rows (pure NumPy); `loader`: the grain batches;
- `synthetic`: the quickstart's built-in task; `reviews`: the controlled-sentiment review corpus.

Importing this package imports none of them, so the pure core (`layouts`) loads without TFDS.
"""

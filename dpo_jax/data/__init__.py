"""Data: preference pairs as token ids, laid out into fixed-shape arrays, batched by grain."""

import dataclasses
from typing import Dict

import numpy as np

from dpo_jax.data import layouts, synthetic


@dataclasses.dataclass
class Task:
    """Token arrays of one task: DPO pairs and SFT rows, train and eval; plus how many were truncated."""
    dpo_train: Dict[str, np.ndarray]
    dpo_eval: Dict[str, np.ndarray]
    sft_train: Dict[str, np.ndarray]
    sft_eval: Dict[str, np.ndarray]
    num_truncated: int


def load_task(config) -> Task:
    """Builds the token arrays of `config.data` for `config.model`'s vocabulary."""
    data = config.data
    if data.name != "synthetic":
        raise ValueError(f"config.data.name={data.name!r} is not a known dataset; known: ('synthetic',)")
    train_pairs = synthetic.make_pairs(data.num_train, seed=config.seed, vocab_size=config.model.vocab_size)
    eval_pairs = synthetic.make_pairs(data.num_eval, seed=config.seed + 1, vocab_size=config.model.vocab_size)
    lengths = dict(max_length=data.max_length, max_prompt_length=data.max_prompt_length, pad_id=synthetic.PAD)
    dpo_train, truncated_train = layouts.padded_pairs(train_pairs, **lengths)
    dpo_eval, truncated_eval = layouts.padded_pairs(eval_pairs, **lengths)
    sft_train, _ = layouts.sft_rows(train_pairs, **lengths)
    sft_eval, _ = layouts.sft_rows(eval_pairs, **lengths)
    return Task(dpo_train, dpo_eval, sft_train, sft_eval, truncated_train + truncated_eval)

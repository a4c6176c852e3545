"""The toy task every online stage's unit tests train on: tiny models, random prompts, and a host
reward, the share of a response's tokens that are REWARDED_TOKEN."""

import jax
import jax.numpy as jnp
import numpy as np

from dpo_jax import configs, models

REWARDED_TOKEN = 9
NUM_PROMPTS, PROMPT_WIDTH = 16, 4


def tiny_models():
    """(decoder graph, policy params, scalar-model graph, scalar params started from the policy)."""
    model_config = configs.model_config("tiny")
    graphdef, _, _ = models.abstract_model(model_config)
    policy = models.init_params(model_config, seed=0, shardings=None)
    decoder_config = models.decoder_config(model_config)
    value_graphdef, _, _ = models.abstract_scalar_model(decoder_config)
    value = models.init_scalar_params(decoder_config, policy, seed=1)
    return graphdef, policy, value_graphdef, value


def fraction_of_rewarded_tokens(prompt_ids, prompt_lengths, response_tokens, response_lengths):
    """A ground-truth scorer on the host: the share of a response's tokens that are REWARDED_TOKEN;
    NaN, a failing scorer, for a prompt that starts with the pad id 0 (test prompts never do)."""
    del prompt_lengths
    real = np.arange(response_tokens.shape[1])[None, :] < response_lengths[:, None]
    shares = np.sum((response_tokens == REWARDED_TOKEN) & real, axis=1) / np.maximum(response_lengths, 1)
    return np.where(prompt_ids[:, 0] == 0, np.nan, shares)


def negated(host_reward_fn):
    """The same scorer with its sign flipped: what a sign error in a loss amounts to."""
    return lambda *arrays: -host_reward_fn(*arrays)


def prompts(seed=0, num_prompts=NUM_PROMPTS):
    rng = np.random.RandomState(seed)
    return {"prompt_ids": jnp.asarray(rng.randint(1, 64, (num_prompts, PROMPT_WIDTH)), jnp.int32),
            "prompt_lengths": jnp.asarray(rng.randint(1, PROMPT_WIDTH + 1, num_prompts), jnp.int32)}


def copy(tree):
    """A fresh copy, since the steps donate their state."""
    return jax.tree.map(lambda x: jnp.array(x, copy=True), tree)

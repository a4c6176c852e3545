"""TRL's prediction metrics (logits/*, mean_token_accuracy, entropy): the same from chunked scored-token
logits as from full logits, equal to a NumPy computation, and without effect on the gradient."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dpo_jax import losses, models
from dpo_jax.configs import model_config


def _model_and_rows(chunk_size):
    config = model_config("tiny", vocab_size=96, logits_chunk_size=chunk_size)
    graphdef, _, _ = models.abstract_model(config)
    params = models.init_params(config, seed=0, shardings=None)
    rng = np.random.default_rng(0)
    input_ids = jnp.asarray(rng.integers(0, 96, (3, 20)), jnp.int32)
    loss_mask = jnp.asarray(np.arange(20)[None] >= np.array([[5], [9], [14]]), jnp.int32)
    return graphdef, params, input_ids, loss_mask


def test_chunked_statistics_equal_the_full_logits_and_numpy():
    graphdef, params, input_ids, loss_mask = _model_and_rows(4)
    logps, stats = models.apply_token_logps(graphdef, params, input_ids, loss_mask, with_stats=True)
    full_graphdef, _, _ = models.abstract_model(model_config("tiny", vocab_size=96, logits_chunk_size=0))
    full_logps, full_stats = models.apply_token_logps(full_graphdef, params, input_ids, loss_mask, with_stats=True)
    np.testing.assert_allclose(logps, full_logps, rtol=1e-5, atol=1e-5)
    for name in ("logit_mean", "entropy", "correct"):
        np.testing.assert_allclose(stats[name], full_stats[name], rtol=1e-5, atol=1e-5)

    logits = np.asarray(nnx.merge(full_graphdef, params)(input_ids), np.float64)[:, :-1]
    labels, scored = np.asarray(input_ids)[:, 1:], np.asarray(loss_mask)[:, 1:] > 0
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    expected = {"logit_mean": logits.mean(-1), "entropy": -(probs * np.log(probs)).sum(-1),
                "correct": (logits.argmax(-1) == labels).astype(np.float64)}
    for name, values in expected.items():
        np.testing.assert_allclose(np.asarray(stats[name])[scored], values[scored], rtol=1e-4, atol=1e-5)
        assert not np.asarray(stats[name])[~scored].any(), f"{name} must be 0 where no token is scored"


def test_the_statistics_do_not_change_the_gradient():
    graphdef, params, input_ids, loss_mask = _model_and_rows(4)

    def total(p, with_stats):
        out = models.apply_token_logps(graphdef, p, input_ids, loss_mask, with_stats=with_stats)
        logps, stats = out if with_stats else (out, {})
        return jnp.sum(logps) + sum(jnp.sum(v) for v in stats.values()) * 0.0

    with_stats, without = jax.grad(total)(params, True), jax.grad(total)(params, False)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), with_stats, without)


def test_token_logps_and_stats_matches_token_logps():
    logits = jax.random.normal(jax.random.PRNGKey(0), (2, 5, 11)) * 3
    labels = jax.random.randint(jax.random.PRNGKey(1), (2, 5), 0, 11)
    logps, stats = losses.token_logps_and_stats(logits, labels)
    np.testing.assert_allclose(logps, losses.token_logps(logits, labels), rtol=1e-6)
    assert float(stats["entropy"].min()) >= 0 and float(stats["entropy"].max()) <= np.log(11) + 1e-5

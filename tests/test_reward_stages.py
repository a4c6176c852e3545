"""The DPO paper's baselines' stage functions: the Bradley-Terry reward model, Unlikelihood, pretraining."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_data_layouts import MAX_LENGTH, _random_pairs

from dpo_jax import losses, models, planning, sharding, stages, steps
from dpo_jax.configs import validation
from dpo_jax.data import layouts, synthetic

LAYOUT_SIZES = dict(max_length=MAX_LENGTH, row_length=2 * MAX_LENGTH + 6, max_pairs_per_row=4)


def _scalar_model(config, *, head_scale=30.0, seed=1):
    """A scalar model on a rope decoder (positions matter), its head scaled up so that rewards differ
    clearly between sequences (a fresh head scores everything near 0)."""
    config.model.position_embedding = "rope"
    decoder_config = models.decoder_config(config.model)
    graphdef, _, _ = models.abstract_scalar_model(decoder_config)
    decoder_params = models.init_params(config.model, seed=seed, shardings=None)
    params = models.init_scalar_params(decoder_config, decoder_params, seed=seed)
    params["head"] = jax.tree.map(lambda p: p * head_scale, params["head"])
    return graphdef, params


def _decoder(config):
    config.model.position_embedding = "rope"
    graphdef, _, _ = models.abstract_model(config.model)
    return graphdef, models.init_params(config.model, seed=1, shardings=None)


def _stage_functions(name, config):
    """(loss_fn, eval_fn) of stage `name`'s plan on one device (the reward stage: the scalar model's)."""
    mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
    plan = stages.STAGES[name].plan(config, mesh, planning.plan_model(config, mesh))
    return plan.loss_fn, plan.eval_fn


def _real_pairs(values, arrays):
    """The [pairs] values of a batch's real pair slots (packed layouts have empty ones)."""
    values = np.asarray(values).reshape(-1)
    return values[arrays["pair_mask"].reshape(-1)] if "pair_mask" in arrays else values


def _as_batch(arrays):
    return jax.tree.map(jnp.asarray, arrays)


def _right_padded(sequences):
    """Token lists as one [sequences, MAX_LENGTH] batch padded on the right, for plain forward passes
    (causal attention: the padding changes nothing before it)."""
    return np.array([list(tokens) + [0] * (MAX_LENGTH - len(tokens)) for tokens in sequences], np.int32)


# ---------------------------------------------------------------------------------------------
# Bradley-Terry
# ---------------------------------------------------------------------------------------------

def test_bradley_terry_loss_matches_the_formula_and_stays_finite_for_huge_rewards():
    rng = np.random.default_rng(0)
    chosen = np.concatenate([rng.normal(size=8) * 3, [1e3, -1e3, 1e9, -1e9, 1e30, -1e30]]).astype(np.float32)
    rejected = np.concatenate([rng.normal(size=8) * 3, [-1e3, 1e3, -1e9, 1e9, -1e30, 1e30]]).astype(np.float32)
    pair_losses, metrics = losses.bradley_terry_loss(jnp.asarray(chosen), jnp.asarray(rejected))
    margins = chosen.astype(np.float64) - rejected.astype(np.float64)
    expected = np.logaddexp(0.0, -margins)  # -log sigmoid(m), exactly, in float64
    assert pair_losses.dtype == jnp.float32 and np.all(np.isfinite(pair_losses))
    np.testing.assert_allclose(pair_losses, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(metrics["rewards/chosen"], chosen.astype(np.float64).mean(), rtol=1e-5)
    np.testing.assert_allclose(metrics["rewards/rejected"], rejected.astype(np.float64).mean(), rtol=1e-5)
    np.testing.assert_allclose(metrics["rewards/margins"], margins.mean(), rtol=1e-5)
    # d loss / d r_w = -sigmoid(-m): finite, and 0 or -1 at the extremes.
    grad_chosen = jax.grad(lambda c: losses.bradley_terry_loss(c, jnp.asarray(rejected))[0].sum())(jnp.asarray(chosen))
    np.testing.assert_allclose(grad_chosen, -1.0 / (1.0 + np.exp(np.clip(margins, -700, 700))), rtol=1e-5, atol=1e-7)


def test_bradley_terry_accuracy_counts_a_tie_as_half():
    chosen = jnp.array([2.0, 1.0, 0.5, -3.0])
    rejected = jnp.array([1.0, 1.0, 0.7, -3.0])  # a win, a tie, a loss, a tie
    pair_losses, metrics = losses.bradley_terry_loss(chosen, rejected)
    assert float(metrics["rewards/accuracies"]) == pytest.approx((1 + 0.5 + 0 + 0.5) / 4)
    np.testing.assert_allclose(np.asarray(pair_losses)[[1, 3]], np.log(2.0), rtol=1e-6)  # a tie is a coin flip


def test_bradley_terry_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="rejected_rewards"):
        losses.bradley_terry_loss(jnp.zeros(3), jnp.zeros(4))


# ---------------------------------------------------------------------------------------------
# The reward model on DPO batches
# ---------------------------------------------------------------------------------------------

def test_reward_loss_is_the_same_in_every_layout(tiny_config):
    pairs = _random_pairs(16, seed=0)
    graphdef, params = _scalar_model(tiny_config)
    loss_fn = jax.jit(functools.partial(steps.reward_loss, graphdef=graphdef))
    scores_fn = jax.jit(functools.partial(steps.reward_pair_scores, graphdef=graphdef))
    results, rewards = {}, {}
    for layout in layouts.LAYOUTS:
        arrays = layouts.pair_arrays(pairs, layout, **LAYOUT_SIZES)
        loss, (metrics, weight) = loss_fn(params, None, _as_batch(arrays), None)
        results[layout] = [float(loss), float(weight)] + [float(metrics[key]) for key in sorted(metrics)]
        chosen, rejected = scores_fn(params, _as_batch(arrays))
        rewards[layout] = sorted(zip(_real_pairs(chosen, arrays).tolist(), _real_pairs(rejected, arrays).tolist()))
    # The check has teeth: rewards differ across pairs and not every pair is ranked the same way.
    padded_rewards = np.array(rewards["padded"])
    assert np.std(padded_rewards) > 0.1 and 0 < np.mean(padded_rewards[:, 0] > padded_rewards[:, 1]) < 1
    assert results["padded"][1] == len(pairs)
    for layout in layouts.LAYOUTS:
        np.testing.assert_allclose(rewards[layout], rewards["padded"], rtol=1e-5, atol=1e-5, err_msg=layout)
        np.testing.assert_allclose(results[layout], results["padded"], rtol=1e-5, atol=1e-5, err_msg=layout)


def test_reward_is_the_score_at_the_last_token_of_the_sequence_run_alone(tiny_config):
    pairs = _random_pairs(5, seed=3)
    graphdef, params = _scalar_model(tiny_config)
    # Each sequence alone in its row: chosen, rejected, chosen, ...
    sequences = [pair["prompt"] + pair[side] for pair in pairs for side in ("chosen", "rejected")]
    scores = np.asarray(models.apply_scalar(graphdef, params, _right_padded(sequences)))
    last_scores = scores[np.arange(len(sequences)), [len(tokens) - 1 for tokens in sequences]]
    expected = list(zip(last_scores[0::2].tolist(), last_scores[1::2].tolist()))
    scores_fn = jax.jit(functools.partial(steps.reward_pair_scores, graphdef=graphdef))
    for layout in layouts.LAYOUTS:
        arrays = layouts.pair_arrays(pairs, layout, **LAYOUT_SIZES)
        chosen, rejected = scores_fn(params, _as_batch(arrays))
        got = sorted(zip(_real_pairs(chosen, arrays).tolist(), _real_pairs(rejected, arrays).tolist()))
        np.testing.assert_allclose(got, sorted(expected), rtol=1e-5, atol=1e-5, err_msg=layout)


def test_reward_model_learns_the_synthetic_preference(tiny_config):
    """Chosen responses have more words of the prompt's mood: a reward model trained on pairs ranks
    held-out pairs well above chance."""
    config = tiny_config
    config.reward.learning_rate = 3e-3
    config.reward.warmup_steps = 5
    batch_size, num_steps = 32, 150
    train_pairs = synthetic.make_pairs(batch_size * num_steps // 2, seed=0)  # two passes over the data
    eval_pairs = synthetic.make_pairs(256, seed=1)
    arrays = lambda pairs: layouts.pair_arrays(pairs, "padded", max_length=24, row_length=48, max_pairs_per_row=4)
    train_arrays, eval_batch = arrays(train_pairs), _as_batch(arrays(eval_pairs))

    decoder_config = models.decoder_config(config.model)
    graphdef, _, _ = models.abstract_scalar_model(decoder_config)
    params = models.init_scalar_params(decoder_config, models.init_params(config.model, seed=0, shardings=None),
                                       seed=0)
    loss_fn = functools.partial(steps.reward_loss, graphdef=graphdef)
    eval_fn = functools.partial(steps.reward_eval_step, graphdef=graphdef)
    optimizer, schedule = steps.make_optimizer(config.train, config.reward)
    state = steps.init_state(params, optimizer, seed=0, live_reference=False)
    train_step = jax.jit(functools.partial(steps.train_step, loss_fn=loss_fn, optimizer=optimizer,
                                           schedule=schedule), donate_argnums=0)
    eval_fn = jax.jit(eval_fn)
    before = eval_fn(state.params, None, eval_batch)
    num_train = len(train_pairs)
    for step in range(num_steps):
        rows = np.arange(step * batch_size, (step + 1) * batch_size) % num_train
        state, metrics = train_step(state, _as_batch(jax.tree.map(lambda x: x[rows], train_arrays)))
    after = eval_fn(state.params, None, eval_batch)
    assert np.isfinite(float(metrics["loss"]))
    assert float(after["rewards/accuracies"]) > 0.7, (before, after)
    assert float(after["loss"]) < min(float(before["loss"]), np.log(2.0)) - 0.1, (before, after)
    assert float(after["rewards/margins"]) > 0


# ---------------------------------------------------------------------------------------------
# Unlikelihood
# ---------------------------------------------------------------------------------------------

def test_log1m_exp_matches_the_formula_and_is_finite_at_zero():
    x = np.array([-80.0, -5.0, -1.0, -0.7, -np.log(2.0), -0.69, -0.1, -1e-3, -1e-5], np.float32)
    np.testing.assert_allclose(losses.log1m_exp(jnp.asarray(x)), np.log(-np.expm1(x.astype(np.float64))),
                               rtol=1e-5, atol=1e-30)
    # A certain token (log-prob 0, or a rounding error above it) gives a finite value and gradient.
    near_zero = jnp.array([0.0, -1e-9, 1e-7])
    values, grads = losses.log1m_exp(near_zero), jax.grad(lambda v: losses.log1m_exp(v).sum())(near_zero)
    assert np.all(np.isfinite(values)) and np.all(np.isfinite(grads))
    assert np.all(np.asarray(values) < -13.0)  # still a large penalty, about log(1e-6)


def _numpy_unlikelihood(logits, labels, chosen_mask, rejected_mask, alpha):
    """Per-pair unlikelihood losses from [pairs, time, vocab] chosen and rejected logits, in float64."""
    chosen_logits, rejected_logits = (np.asarray(x, np.float64) for x in logits)
    chosen_labels, rejected_labels = labels

    def label_probs(side_logits, side_labels):
        probs = np.exp(side_logits - side_logits.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        return np.take_along_axis(probs, side_labels[..., None], -1)[..., 0]

    chosen_p, rejected_p = label_probs(chosen_logits, chosen_labels), label_probs(rejected_logits, rejected_labels)
    nll = -(np.log(chosen_p) * chosen_mask).sum(-1) / chosen_mask.sum(-1)
    unlikelihood = -(np.log1p(-rejected_p) * rejected_mask).sum(-1) / rejected_mask.sum(-1)
    return nll + alpha * unlikelihood


def test_unlikelihood_loss_matches_the_formula_on_random_logits():
    rng = np.random.default_rng(0)
    pairs, time, vocab, alpha = 6, 7, 11, 0.6
    logits = [rng.normal(size=(pairs, time, vocab)).astype(np.float32) * 2 for _ in range(2)]
    labels = [rng.integers(0, vocab, size=(pairs, time)) for _ in range(2)]
    masks = [(rng.random((pairs, time)) < 0.7).astype(np.float32) for _ in range(2)]
    for mask in masks:
        mask[:, 0] = 1.0  # no empty response
    token_logps = [losses.token_logps(jnp.asarray(x), jnp.asarray(y)) for x, y in zip(logits, labels)]
    pair_losses, metrics = losses.unlikelihood_loss(
        jnp.sum(token_logps[0] * masks[0], -1), jnp.sum(losses.log1m_exp(token_logps[1]) * masks[1], -1),
        masks[0].sum(-1), masks[1].sum(-1), alpha=alpha, rejected_logps=jnp.sum(token_logps[1] * masks[1], -1))
    np.testing.assert_allclose(pair_losses, _numpy_unlikelihood(logits, labels, *masks, alpha), rtol=1e-5)
    np.testing.assert_allclose(metrics["nll"], _numpy_unlikelihood(logits, labels, *masks, 0.0).mean(), rtol=1e-5)
    assert float(metrics["logps/rejected"]) < 0 and float(metrics["unlikelihood"]) > 0


def test_unlikelihood_gradient_is_finite_when_a_rejected_token_is_certain():
    vocab = 5
    labels = jnp.array([[1, 2, 3]])
    # The rejected response's tokens: certain in float32 (p rounds to 1), nearly certain, likely.
    rejected_logits = jnp.zeros((1, 3, vocab)).at[0, jnp.arange(3), labels[0]].set(jnp.array([200.0, 12.0, 2.0]))
    chosen_logits = jnp.zeros((1, 3, vocab))

    def loss(chosen_logits, rejected_logits):
        chosen_logps = losses.token_logps(chosen_logits, labels).sum(-1)
        log_one_minus = losses.log1m_exp(losses.token_logps(rejected_logits, labels)).sum(-1)
        return losses.unlikelihood_loss(chosen_logps, log_one_minus, jnp.array([3.0]), jnp.array([3.0]),
                                        alpha=1.0)[0].sum()

    value, grads = jax.value_and_grad(loss, argnums=(0, 1))(chosen_logits, rejected_logits)
    assert np.isfinite(float(value)) and all(np.all(np.isfinite(g)) for g in grads)
    # The likely and the nearly certain token are pushed down; the certain one sits past the clamp.
    rejected_grad = np.asarray(grads[1])[0, np.arange(3), np.asarray(labels[0])]
    assert rejected_grad[1] > rejected_grad[2] > 0


def test_unlikelihood_rejects_a_negative_alpha():
    with pytest.raises(ValueError, match="alpha"):
        losses.unlikelihood_loss(jnp.zeros(2), jnp.zeros(2), jnp.ones(2), jnp.ones(2), alpha=-0.5)


def test_unlikelihood_step_matches_plain_forward_passes_in_every_layout(tiny_config):
    pairs = _random_pairs(8, seed=2)
    graphdef, params = _decoder(tiny_config)
    alpha = 0.5
    # The formula on each sequence's own forward pass, right-padded to a common length.
    forward = jax.jit(functools.partial(models.apply, graphdef))
    logits, labels, masks = [], [], []
    for side in ("chosen", "rejected"):
        tokens = [pair["prompt"] + pair[side] for pair in pairs]
        ids = _right_padded(tokens)
        logits.append(np.asarray(forward(params, ids))[:, :-1])
        labels.append(ids[:, 1:])
        masks.append(np.array([[len(pair["prompt"]) <= t + 1 < len(tokens[i]) for t in range(MAX_LENGTH - 1)]
                               for i, pair in enumerate(pairs)], np.float64))
    expected = _numpy_unlikelihood(logits, labels, *masks, alpha).mean()

    loss_fn = jax.jit(functools.partial(steps.unlikelihood_loss, graphdef=graphdef, alpha=alpha))
    for layout in layouts.LAYOUTS:
        arrays = layouts.pair_arrays(pairs, layout, **LAYOUT_SIZES)
        loss, (metrics, weight) = loss_fn(params, None, _as_batch(arrays), None)
        np.testing.assert_allclose(float(loss), expected, rtol=1e-5, err_msg=layout)
        assert float(weight) == len(pairs), layout
        np.testing.assert_allclose(float(metrics["nll"]) + alpha * float(metrics["unlikelihood"]), expected,
                                   rtol=1e-5, err_msg=layout)


# ---------------------------------------------------------------------------------------------
# Pretraining and the stages' loss functions
# ---------------------------------------------------------------------------------------------

def test_pretrain_loss_is_the_mean_next_token_nll_over_whole_texts(tiny_config):
    graphdef, params = _decoder(tiny_config)
    rng = np.random.default_rng(4)
    texts = [rng.integers(1, 64, size=n).tolist() for n in (5, 12, 20)]
    ids = _right_padded(texts)
    real = np.array([[i < len(t) for i in range(MAX_LENGTH)] for t in texts], np.int32)
    loss_mask = real.copy()
    loss_mask[:, 0] = 0  # every token after the first is predicted
    batch = _as_batch(dict(input_ids=ids, loss_mask=loss_mask, segment_ids=real))
    loss_fn, eval_fn = map(jax.jit, _stage_functions("pretrain", tiny_config))
    loss, (_, weight) = loss_fn(params, None, batch, None)

    logits = jax.jit(functools.partial(models.apply, graphdef))(params, ids)
    log_probs = jax.nn.log_softmax(np.asarray(logits, np.float64), axis=-1)
    token_nll = [-log_probs[row, t - 1, tokens[t]] for row, tokens in enumerate(texts) for t in range(1, len(tokens))]
    assert float(weight) == len(token_nll) == sum(len(t) - 1 for t in texts)
    np.testing.assert_allclose(float(loss), np.mean(token_nll), rtol=1e-5)
    np.testing.assert_allclose(float(eval_fn(params, None, batch)["loss"]), np.mean(token_nll), rtol=1e-5)


def test_stage_loss_functions_of_the_baselines(tiny_config):
    pairs = _random_pairs(4, seed=5)
    batch = _as_batch(layouts.pair_arrays(pairs, "padded", **LAYOUT_SIZES))
    graphdef, params = _decoder(tiny_config)

    tiny_config.unlikelihood.alpha = 0.25
    loss_fn, eval_fn = map(jax.jit, _stage_functions("unlikelihood", tiny_config))
    loss, (metrics, _) = loss_fn(params, None, batch, None)
    np.testing.assert_allclose(float(loss), float(metrics["nll"]) + 0.25 * float(metrics["unlikelihood"]),
                               rtol=1e-6)
    assert float(metrics["unlikelihood"]) > 0
    evaluated = eval_fn(params, None, batch)
    assert {"loss", "nll", "unlikelihood", "logps/chosen", "logps/rejected"} <= set(evaluated)
    np.testing.assert_allclose(float(evaluated["loss"]), float(loss), rtol=1e-6)

    scalar_graphdef, scalar_params = _scalar_model(tiny_config)
    loss_fn, eval_fn = map(jax.jit, _stage_functions("reward", tiny_config))
    loss, (metrics, weight) = loss_fn(scalar_params, None, batch, None)
    chosen, rejected = jax.jit(functools.partial(steps.reward_pair_scores, graphdef=scalar_graphdef))(scalar_params,
                                                                                                     batch)
    np.testing.assert_allclose(float(loss), np.logaddexp(0.0, -(np.asarray(chosen, np.float64) - rejected)).mean(),
                               rtol=1e-5)
    assert float(weight) == len(pairs)
    evaluated = eval_fn(scalar_params, None, batch)
    assert {"loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins"} == set(evaluated)

    pretrain_loss, _ = _stage_functions("pretrain", tiny_config)
    assert pretrain_loss.func is steps.sft_loss
    tiny_config.stages = ("reinforce",)
    with pytest.raises(ValueError, match="'reinforce'"):
        validation.validate(tiny_config)

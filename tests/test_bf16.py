"""bfloat16 compute against float32: a DPO train step on the same float32 parameters and batch agrees within
bf16's precision, and what must stay float32 (log-probs, loss, KL, metrics, parameters) does."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import run_config
from flax import nnx

from dpo_jax import losses, models, steps
from dpo_jax.configs import presets
from dpo_jax.data import loader
from dpo_jax.data.task import load_task

# bf16 keeps 8 significant bits: each rounding is off by up to 2^-8 relative, and every matmul rounds
# its inputs, so one token's log-prob (|log p| ~ 4.2 here) moves by ~1e-3; errors of different tokens
# and pairs partly cancel in sums and means. Each tolerance is 4-20x the error measured on these models
# (noted with it, and in docs/models.md): loose enough for other backends' bf16 kernels, tight enough
# that doing a float32 part of the step in bf16 fails it (tried: the log-softmax, 2.2e-2 per token; the
# sums over tokens, 3.7e-2 in logps/chosen; the per-pair losses, 5.2e-4 relative; the KL, 5.9e-2 relative).
TOKEN_LOGP_ATOL = 5e-3        # each scored token's log-prob: measured max 1.4e-3
MEAN_LOGP_ATOL = 3e-3         # logps/chosen, logps/rejected (means of ~9-token sums, |log p| ~ 40): 2.1e-4
MARGIN_ATOL = 3e-3            # each pair's beta * margin, rewards/*: measured max 4.5e-4 (beta = 0.1)
LOSS_RTOL = 2e-4              # measured 3.4e-5
KL_RTOL = 5e-3                # measured 2.2e-4 (KL ~ 0.11 per response)
GRAD_NORM_RTOL = 2 ** -8      # measured 6.0e-4
GRAD_COSINE_MIN = 0.999       # the whole gradient: measured 0.99996 (relative error 9.1e-3)
GRAD_LEAF_RTOL = 0.1          # per leaf: measured max 3.0e-2 (biases: sums of bf16 cotangents that cancel)
# A leaf whose gradient is this small a part of the whole is rounding noise in both runs: the key
# projection's bias gets no gradient in exact arithmetic (softmax ignores a shift shared by all keys).
NEGLIGIBLE_LEAF = 1e-6
# One block, 32 wide: each compiled step takes seconds.
SMALL = dict(num_layers=1, embed_dim=32, mlp_dim=64)


def _setup(preset):
    config = run_config("quickstart", "runlocal")
    config.model = presets.model_config(preset, **SMALL)
    batch = loader.train_batches(load_task(config).pairs_train, global_batch_size=8, seed=0)[0]
    # A reference other than the policy, so that rewards, margins and KL are not zero in both runs.
    params = models.init_params(config.model, seed=1, shardings=None)
    reference = models.init_params(config.model, seed=2, shardings=None)
    return config, batch, params, reference


def _both_sides(batch):
    """The padded batch's chosen rows, then its rejected rows."""
    return [jnp.concatenate([batch["chosen_" + key], batch["rejected_" + key]])
            for key in ("input_ids", "loss_mask", "segment_ids")]


def _step(config, params, reference, batch):
    """One jitted DPO train step and the quantities it is made of, in `config.model.dtype`."""
    graphdef, _, _ = models.abstract_model(config.model)
    loss_fn = functools.partial(steps.dpo_loss, graphdef=graphdef, dpo_config=config.dpo)
    # Plain SGD with learning rate 1: the step's update is minus its gradient, so one compiled step
    # gives both (the parameters' dtype does not depend on the optimizer: their gradient is float32).
    optimizer, schedule = optax.sgd(1.0), optax.constant_schedule(1.0)
    state = steps.init_state(params, optimizer, seed=config.seed, live_reference=True).replace(ref_params=reference)

    @jax.jit
    def run(state, batch):
        new_state, metrics = steps.train_step(state, batch, loss_fn=loss_fn, optimizer=optimizer, schedule=schedule)
        input_ids, loss_mask, segment_ids = _both_sides(batch)
        token_logps = {name: models.apply_token_logps(graphdef, p, input_ids, loss_mask, segment_ids=segment_ids)
                       for name, p in (("policy", state.params), ("reference", state.ref_params))}
        evaluation = steps.dpo_eval_step(state.params, state.ref_params, batch, graphdef=graphdef,
                                         dpo_config=config.dpo)
        return dict(params=new_state.params, grads=jax.tree.map(jnp.subtract, state.params, new_state.params),
                    metrics=metrics, token_logps=token_logps, evaluation=evaluation)

    return run(state, batch)


def test_a_bf16_dpo_step_agrees_with_float32():
    """GPT-2 style: LayerNorm, learned positions, the output layer tied to the token embedding."""
    config, batch, params, reference = _setup("tiny")
    runs = {}
    for dtype in ("float32", "bfloat16"):
        config.model.dtype = dtype
        runs[dtype] = _step(config, params, reference, batch)
    exact, bf16 = runs["float32"], runs["bfloat16"]

    # What must stay float32 does: log-probs, loss, KL and every metric; the gradient and the updated parameters.
    floats = (bf16["token_logps"], bf16["metrics"], bf16["evaluation"], bf16["grads"], bf16["params"])
    assert {leaf.dtype for leaf in jax.tree.leaves(floats)} == {jnp.dtype("float32")}

    scored = np.asarray(_both_sides(batch)[1][:, 1:]) > 0
    pairs = scored.shape[0] // 2
    for model in ("policy", "reference"):
        np.testing.assert_allclose(np.asarray(bf16["token_logps"][model])[scored],
                                   np.asarray(exact["token_logps"][model])[scored], rtol=0, atol=TOKEN_LOGP_ATOL)

    # Each pair's margin, beta * ((policy - reference) chosen - (policy - reference) rejected), from the
    # token log-probs. Preference accuracy is equal but for pairs whose margin is within tolerance of
    # 0, the only ones whose sign bf16 may flip.
    beta = config.dpo.beta

    def margins(run):
        rewards = beta * np.sum(np.asarray(run["token_logps"]["policy"], np.float64)
                                - np.asarray(run["token_logps"]["reference"], np.float64), axis=1)
        return rewards[:pairs] - rewards[pairs:]

    np.testing.assert_allclose(margins(bf16), margins(exact), rtol=0, atol=MARGIN_ATOL)
    for name, atol in (("logps/chosen", MEAN_LOGP_ATOL), ("logps/rejected", MEAN_LOGP_ATOL),
                       ("rewards/chosen", MARGIN_ATOL), ("rewards/rejected", MARGIN_ATOL),
                       ("rewards/margins", MARGIN_ATOL)):
        np.testing.assert_allclose(bf16["metrics"][name], exact["metrics"][name], rtol=0, atol=atol, err_msg=name)
    np.testing.assert_allclose(bf16["metrics"]["loss"], exact["metrics"]["loss"], rtol=LOSS_RTOL)
    undecided = np.mean(np.abs(margins(exact)) <= MARGIN_ATOL)
    accuracies = [float(run["metrics"]["rewards/accuracies"]) for run in (exact, bf16)]
    assert abs(accuracies[0] - accuracies[1]) <= undecided, (accuracies, undecided)
    assert float(exact["evaluation"]["kl"]) > 0.01  # the check has teeth
    np.testing.assert_allclose(bf16["evaluation"]["kl"], exact["evaluation"]["kl"], rtol=KL_RTOL)

    np.testing.assert_allclose(bf16["metrics"]["grad_norm"], exact["metrics"]["grad_norm"], rtol=GRAD_NORM_RTOL)
    flat = {name: jnp.concatenate([leaf.ravel() for leaf in jax.tree.leaves(run["grads"])])
            for name, run in runs.items()}
    cosine = jnp.vdot(flat["float32"], flat["bfloat16"]) / (jnp.linalg.norm(flat["float32"])
                                                            * jnp.linalg.norm(flat["bfloat16"]))
    assert float(cosine) >= GRAD_COSINE_MIN, float(cosine)
    grad_norm = optax.global_norm(exact["grads"])
    for (path, want), got in zip(jax.tree_util.tree_leaves_with_path(exact["grads"]), jax.tree.leaves(bf16["grads"])):
        norm = jnp.linalg.norm(want)
        if norm > NEGLIGIBLE_LEAF * grad_norm:
            error = float(jnp.linalg.norm(got - want) / norm)
            assert error <= GRAD_LEAF_RTOL, (jax.tree_util.keystr(path), error)


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-gptj"])
def test_bf16_log_probs_agree_with_float32_through_an_untied_output_layer(preset):
    """RMSNorm and an untied lm_head (Llama), LayerNorm and an lm_head with a bias (GPT-J): float32
    logits, and log-probs from the scored tokens' chunks and from full logits alike."""
    config, batch, params, _ = _setup(preset)
    input_ids, loss_mask, segment_ids = _both_sides(batch)
    results = {}
    for dtype in ("float32", "bfloat16"):
        config.model.dtype = dtype
        graphdef, _, _ = models.abstract_model(config.model)
        results[dtype] = jax.jit(lambda p, graphdef=graphdef: (
            models.apply(graphdef, p, input_ids, segment_ids=segment_ids),
            models.apply_token_logps(graphdef, p, input_ids, loss_mask, segment_ids=segment_ids)))(params)
    exact_logps = np.asarray(results["float32"][1])
    logits, logps = results["bfloat16"]
    assert logits.dtype == logps.dtype == jnp.float32
    scored = np.asarray(loss_mask[:, 1:]) > 0
    for got in (logps, losses.token_logps(logits[:, :-1], input_ids[:, 1:])):
        np.testing.assert_allclose(np.asarray(got)[scored], exact_logps[scored], rtol=0, atol=TOKEN_LOGP_ATOL)


def _statistics(jaxpr):
    """(primitive, operand dtype) of every reduction and rsqrt in a jaxpr, nested ones included."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name.startswith("reduce_") or eqn.primitive.name == "rsqrt":
            found.append((eqn.primitive.name, eqn.invars[0].aval.dtype))
        for param in eqn.params.values():
            for sub in param if isinstance(param, (list, tuple)) else (param,):
                if hasattr(sub, "eqns") or hasattr(sub, "jaxpr"):
                    found += _statistics(getattr(sub, "jaxpr", sub))
    return found


@pytest.mark.parametrize("preset", ["tiny", "tiny-llama"])  # LayerNorm, RMSNorm
def test_the_norms_take_their_statistics_in_float32(preset):
    """The final norm of a bf16-compute model, traced: its mean, variance and rsqrt in float32, its
    output bf16. (In a model this small, bf16 statistics could not be told from bf16's other
    roundings in the log-probs, and XLA:CPU may widen them itself.)"""
    config = models.decoder_config(presets.model_config(preset, dtype="bfloat16", **SMALL))
    norm = models.Decoder(config, rngs=nnx.Rngs(0)).final_norm
    traced = jax.make_jaxpr(norm)(jnp.ones((2, 3, config.embed_dim), jnp.bfloat16))
    assert traced.out_avals[0].dtype == jnp.bfloat16
    statistics = _statistics(traced.jaxpr)
    assert {name for name, _ in statistics} == {"reduce_sum", "rsqrt"}
    assert all(dtype == jnp.float32 for _, dtype in statistics), statistics


@pytest.mark.parametrize("backend, dtype", [("cpu", "float32"), ("tpu", "bfloat16"), ("gpu", "bfloat16")])
def test_auto_computes_in_bf16_on_accelerators_and_float32_on_cpu(backend, dtype):
    assert models.compute_dtype("auto", backend) == dtype
    assert models.compute_dtype("float32", backend) == "float32"  # a named dtype is kept on every backend


def test_auto_is_the_default_and_resolves_where_the_model_is_built():
    config = presets.model_config("tiny")
    assert config.dtype == "auto" and config.param_dtype == "float32"
    assert models.decoder_config(config).dtype == models.compute_dtype("auto", jax.default_backend())
    _, abstract_params, _ = models.abstract_model(config)
    assert {leaf.dtype for leaf in jax.tree.leaves(abstract_params)} == {jnp.dtype("float32")}

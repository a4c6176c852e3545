"""dpo_jax.losses against independent NumPy implementations of the papers' formulas, finite
differences, closed forms and properties; plus argument checking, sequence scores, LD-DPO and KTO."""

import functools
import math

import hypothesis
import hypothesis.extra.numpy as hnp
import hypothesis.strategies as st
import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np
import pytest
from loss_cases import (
    ARRAY_NAMES,
    BATCH,
    CASES,
    case_id,
    library_losses,
    loss_types_of,
    random_inputs,
    with_case_references,
)

from dpo_jax import losses

BETA = 0.3

# ---------------------------------------------------------------------------------------------
# NumPy references, float64, written from the papers (not from dpo_jax.losses)
# ---------------------------------------------------------------------------------------------

# The library's documented conventions, which a formula alone does not fix: exp() arguments capped
# at 40, average log-probs capped at -1e-6 for ORPO's odds, empty responses counted as one token,
# EXO's epsilon 1e-3 when label_smoothing is 0.
MAX_EXPONENT = 40.0


def log_sigmoid(x):
    return -np.logaddexp(0.0, -x)


def sigmoid(x):
    return np.exp(log_sigmoid(x))


def capped_exp(x):
    return np.exp(np.minimum(x, MAX_EXPONENT))


def f_prime(logratio, f_divergence_type, f_alpha):
    """f'(t) - f'(1), t = pi / pi_ref, of Table 1 of Wang et al. 2023 (f-DPO)."""
    if f_divergence_type == "reverse_kl":  # f(t) = t log t
        return logratio
    if f_divergence_type == "forward_kl":  # f(t) = -log t
        return 1.0 - capped_exp(-logratio)
    if f_divergence_type == "js_divergence":  # f'(t) = log(2t / (1 + t))
        return np.log(2.0) + logratio - np.logaddexp(0.0, logratio)
    return (1.0 - capped_exp(-f_alpha * logratio)) / f_alpha  # f'(t) = (1 - t^-alpha) / alpha


def bradley_terry_nll(margin, epsilon):
    """-log P(chosen wins) when the label is flipped with probability epsilon."""
    return -(1.0 - epsilon) * log_sigmoid(margin) - epsilon * log_sigmoid(-margin)


def log_odds(average_logp):
    a = np.minimum(average_logp, -1e-6)
    return a - np.log(-np.expm1(a))  # log p - log(1 - p)


def reference_variant(loss_type, x, beta, epsilon, options):
    pc, pr = x["policy_chosen_logps"], x["policy_rejected_logps"]
    rc, rr = x["reference_chosen_logps"], x["reference_rejected_logps"]
    n_chosen, n_rejected = np.maximum(x["chosen_lengths"], 1.0), np.maximum(x["rejected_lengths"], 1.0)
    f_type = options.get("f_divergence_type", "reverse_kl")
    f_alpha = options.get("f_alpha", 0.5)
    c = None if rc is None else f_prime(pc - rc, f_type, f_alpha)
    r = None if rr is None else f_prime(pr - rr, f_type, f_alpha)
    if loss_type == "sigmoid":  # DPO eq. 7; cDPO
        return bradley_terry_nll(beta * (c - r), epsilon)
    if loss_type == "robust":  # rDPO eq. 8: unbiased loss under flip rate epsilon
        loss_clean, loss_flipped = -log_sigmoid(beta * (c - r)), -log_sigmoid(-beta * (c - r))
        return ((1 - epsilon) * loss_clean - epsilon * loss_flipped) / (1 - 2 * epsilon)
    if loss_type == "hinge":  # SLiC-HF calibration loss, margin 1 / beta
        return np.maximum(0.0, 1.0 - beta * (c - r))
    if loss_type == "ipo":  # IPO eq. 17, tau = beta
        if options.get("ipo_length_normalize", True):
            c, r = c / n_chosen, r / n_rejected
        return (c - r - 1.0 / (2.0 * beta)) ** 2
    if loss_type == "exo_pair":  # EXO: KL(p_policy || p_data) over {chosen, rejected}
        epsilon = epsilon or 1e-3
        q = np.stack([sigmoid(beta * (c - r)), sigmoid(beta * (r - c))])
        log_q = np.stack([log_sigmoid(beta * (c - r)), log_sigmoid(beta * (r - c))])
        p = np.array([1.0 - epsilon, epsilon])[:, None]
        return np.sum(q * (log_q - np.log(p)), axis=0)
    if loss_type == "nca_pair":  # NCA, K = 2
        return -log_sigmoid(beta * c) - 0.5 * (log_sigmoid(-beta * c) + log_sigmoid(-beta * r))
    if loss_type == "bco_pair":  # BCO: chosen as class 1, rejected as class 0
        return -log_sigmoid(beta * c) - log_sigmoid(-beta * r)
    if loss_type == "sppo_hard":  # SPPO eq. 4.7 with P(winner) = 1, P(loser) = 0, eta = 1 / beta
        eta = 1.0 / beta
        return (c - eta * (1.0 - 0.5)) ** 2 + (r - eta * (0.0 - 0.5)) ** 2
    if loss_type == "aot":
        d = np.sort(pc - pr) - np.sort(rc - rr)
        return bradley_terry_nll(beta * d, epsilon)
    if loss_type == "aot_unpaired":
        d = np.sort(pc - rc) - np.sort(pr - rr)
        return bradley_terry_nll(beta * d, epsilon)
    if loss_type == "apo_zero":  # APO eq. 7, shifted by 1 to be >= 0
        return 1.0 - sigmoid(beta * c) + sigmoid(beta * r)
    if loss_type == "apo_down":  # APO eq. 8, shifted by 1
        return sigmoid(beta * c) + 1.0 - sigmoid(beta * (c - r))
    if loss_type == "discopop":  # LRML eq. 5
        tau = options.get("discopop_tau", 0.05)
        rho = beta * (c - r)
        mix = sigmoid(rho / tau)
        exp_term = capped_exp(-rho + log_sigmoid(rho / tau))  # = mix * exp(-rho), without inf * 0
        return (1.0 - mix) * -log_sigmoid(rho) + exp_term
    if loss_type == "sigmoid_norm":
        return bradley_terry_nll(beta * (c / n_chosen - r / n_rejected), epsilon)
    if loss_type == "simpo":  # SimPO eq. 6
        gamma = options.get("simpo_gamma", 0.5)
        return bradley_terry_nll(beta * (pc / n_chosen - pr / n_rejected) - gamma, epsilon)
    if loss_type == "orpo":  # ORPO eq. 6-7, lambda = beta
        nll = -pc / n_chosen
        return nll - beta * log_sigmoid(log_odds(pc / n_chosen) - log_odds(pr / n_rejected))
    if loss_type == "rpo":  # RPO: DPO + alpha * length-normalised NLL of the winner
        return bradley_terry_nll(beta * (c - r), epsilon) + options.get("rpo_alpha", 1.0) * -pc / n_chosen
    if loss_type == "sigmoid_ref_free":
        return bradley_terry_nll(beta * (pc - pr), epsilon)
    if loss_type == "sft":
        return -pc / n_chosen
    raise AssertionError(f"no reference for {loss_type}")


def reference_losses(inputs, beta, case, frozen=None):
    """float64 [batch] losses of `case`; `frozen` are the inputs of no-gradient parts (WPO weights)."""
    x = {key: None if value is None else np.asarray(value, np.float64) for key, value in inputs.items()}
    options = {key: value for key, value in case.items() if key not in ("loss_type", "label_smoothing")}
    loss_types = loss_types_of(case)
    weights = options.get("loss_weights", (1.0,) * len(loss_types))
    epsilon = case.get("label_smoothing", 0.0)
    total = sum(w * reference_variant(t, x, beta, epsilon, options) for t, w in zip(loss_types, weights))
    if options.get("use_weighting"):  # WPO eq. 2: length-normalised sequence probabilities, no gradient
        f = x if frozen is None else {key: np.asarray(value, np.float64) for key, value in frozen.items()}
        mean_logp = f["policy_chosen_logps"] / np.maximum(f["chosen_lengths"], 1) + \
            f["policy_rejected_logps"] / np.maximum(f["rejected_lengths"], 1)
        total = total * np.exp(np.minimum(mean_logp, 0.0))
    return total


def adversarial_inputs():
    """Huge log-ratios of both signs, zeros, equal chosen and rejected, policy == reference, empty responses.

    Values are exact in float32 so the float32 library and the float64 reference see the same numbers.
    """
    rows = [
        # policy chosen, policy rejected, reference chosen, reference rejected, chosen len, rejected len
        (0.0, -1e4, -1e4, 0.0, 10, 10),          # margin +2e4
        (-1e4, 0.0, 0.0, -1e4, 10, 10),          # margin -2e4
        (0.0, 0.0, 0.0, 0.0, 0, 0),              # all zeros, empty responses
        (-7.0, -7.0, -5.0, -5.0, 3, 3),          # chosen == rejected
        (-12.0, -30.0, -12.0, -30.0, 4, 9),      # policy == reference
        (0.0, 0.0, -1e4, -1e4, 1000, 1),         # both log-ratios +1e4
        (-1e4, -0.5, 0.0, -0.5, 1, 1000),        # chosen log-ratio -1e4, rejected 0
        (-3e3, -2e3, -1e3, -5e3, 7, 2),
    ]
    columns = np.array(rows, np.float32).T
    return dict(zip(ARRAY_NAMES + ("chosen_lengths", "rejected_lengths"), columns))


# ---------------------------------------------------------------------------------------------
# Golden values and gradients
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("inputs_name", ["random", "adversarial"])
def test_losses_match_numpy_reference(case, inputs_name):
    inputs = random_inputs(seed=0) if inputs_name == "random" else adversarial_inputs()
    inputs = with_case_references(inputs, case)
    got, _ = library_losses(inputs, BETA, case)
    expected = reference_losses(inputs, BETA, case)
    assert got.dtype == jnp.float32 and got.shape == expected.shape
    assert np.all(np.isfinite(expected))
    np.testing.assert_allclose(np.asarray(got), expected, rtol=2e-5, atol=1e-5)


def finite_difference_gradient(function, inputs, names, step=1e-6):
    """Central differences of sum(function(inputs)) with respect to each element of inputs[names]."""
    gradients = {}
    for name in names:
        gradient = np.zeros(len(inputs[name]))
        for i in range(len(gradient)):
            shifted = []
            for sign in (1.0, -1.0):
                values = np.asarray(inputs[name], np.float64).copy()
                values[i] += sign * step
                shifted.append(np.sum(function({**inputs, name: values})))
            gradient[i] = (shifted[0] - shifted[1]) / (2.0 * step)
        gradients[name] = gradient
    return gradients


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_gradients_match_finite_differences(case):
    inputs = with_case_references(random_inputs(seed=1), case)
    names = [name for name in ARRAY_NAMES if inputs[name] is not None]
    expected = finite_difference_gradient(functools.partial(reference_losses, beta=BETA, case=case, frozen=inputs),
                                          inputs, names)

    def total_loss(arrays):
        return jnp.sum(library_losses({**inputs, **arrays}, BETA, case)[0])

    got = jax.grad(total_loss)({name: jnp.asarray(inputs[name]) for name in names})
    assert any(np.abs(expected[name]).max() > 1e-3 for name in names)  # the check has something to compare
    for name in names:
        np.testing.assert_allclose(np.asarray(got[name]), expected[name], rtol=2e-4, atol=2e-5, err_msg=name)


def test_dpo_gradient_is_the_papers_closed_form():
    """DPO's gradient: -beta s(r_rejected - r_chosen) (grad log pi(y_w) - grad log pi(y_l)), r = beta log-ratio."""
    inputs = random_inputs(seed=2)
    grads = jax.grad(lambda chosen, rejected: jnp.sum(losses.preference_loss(
        chosen, rejected, inputs["reference_chosen_logps"], inputs["reference_rejected_logps"], beta=BETA)[0]),
        argnums=(0, 1))(inputs["policy_chosen_logps"], inputs["policy_rejected_logps"])
    reward_chosen = BETA * (inputs["policy_chosen_logps"].astype(np.float64) - inputs["reference_chosen_logps"])
    reward_rejected = BETA * (inputs["policy_rejected_logps"].astype(np.float64) - inputs["reference_rejected_logps"])
    weight = sigmoid(reward_rejected - reward_chosen)
    assert np.std(weight) > 0.05  # the pairs are weighted differently
    np.testing.assert_allclose(np.asarray(grads[0]), -BETA * weight, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(np.asarray(grads[1]), BETA * weight, rtol=1e-5, atol=1e-7)


def test_bfloat16_inputs_are_computed_in_float32():
    inputs = random_inputs(seed=3)
    rounded = {name: np.asarray(jnp.asarray(value, jnp.bfloat16).astype(jnp.float32)) for name, value in inputs.items()}
    for case in CASES:
        got, _ = library_losses({name: jnp.asarray(value, jnp.bfloat16) for name, value in inputs.items()}, BETA, case)
        assert got.dtype == jnp.float32
        np.testing.assert_allclose(np.asarray(got), reference_losses(rounded, BETA, case), rtol=2e-5, atol=1e-5,
                                   err_msg=case_id(case))


def test_reference_free_rewards_come_from_the_policy():
    inputs = random_inputs(seed=4)
    no_reference = {**inputs, "reference_chosen_logps": None, "reference_rejected_logps": None}
    average_chosen = inputs["policy_chosen_logps"] / inputs["chosen_lengths"]
    average_rejected = inputs["policy_rejected_logps"] / inputs["rejected_lengths"]
    _, simpo = library_losses(no_reference, BETA, dict(loss_type="simpo"))
    np.testing.assert_allclose(float(simpo["rewards/chosen"]), BETA * average_chosen.mean(), rtol=1e-5)
    np.testing.assert_allclose(float(simpo["rewards/accuracies"]), np.mean(average_chosen > average_rejected))
    _, ref_free = library_losses(no_reference, BETA, dict(loss_type="sigmoid_ref_free"))
    policy_margins = inputs["policy_chosen_logps"] - inputs["policy_rejected_logps"]
    np.testing.assert_allclose(float(ref_free["rewards/margins"]), BETA * np.mean(policy_margins), rtol=1e-5)
    # Given references, rewards are beta * log-ratio for every variant (the DESIGN definition).
    _, with_reference = library_losses(inputs, BETA, dict(loss_type="simpo"))
    np.testing.assert_allclose(float(with_reference["rewards/chosen"]),
                               BETA * np.mean(inputs["policy_chosen_logps"] - inputs["reference_chosen_logps"]),
                               rtol=1e-5)


def test_metrics_have_the_design_names_and_values():
    inputs = random_inputs(seed=5)
    _, metrics = library_losses(inputs, BETA, dict(loss_type="sigmoid"))
    reward_chosen = BETA * (inputs["policy_chosen_logps"] - inputs["reference_chosen_logps"].astype(np.float64))
    reward_rejected = BETA * (inputs["policy_rejected_logps"] - inputs["reference_rejected_logps"].astype(np.float64))
    expected = {
        "rewards/chosen": reward_chosen.mean(), "rewards/rejected": reward_rejected.mean(),
        "rewards/accuracies": np.mean(reward_chosen > reward_rejected),
        "rewards/margins": np.mean(reward_chosen - reward_rejected),
        "logps/chosen": inputs["policy_chosen_logps"].mean(), "logps/rejected": inputs["policy_rejected_logps"].mean(),
    }
    assert set(metrics) == set(expected)
    for name, value in expected.items():
        assert metrics[name].shape == ()
        np.testing.assert_allclose(float(metrics[name]), value, rtol=1e-5, err_msg=name)
    assert 0.0 < expected["rewards/accuracies"] < 1.0  # both wins and losses in the batch


# ---------------------------------------------------------------------------------------------
# Properties
# ---------------------------------------------------------------------------------------------

def logps_arrays(batch, bound):
    return hnp.arrays(np.float32, batch, elements=st.floats(-bound, bound, width=32))


@st.composite
def pair_batches(draw, bound=1e9, batch=BATCH):
    arrays = {name: draw(logps_arrays(batch, bound)) for name in ARRAY_NAMES}
    for name in ("chosen_lengths", "rejected_lengths"):
        arrays[name] = draw(hnp.arrays(np.float32, batch, elements=st.integers(0, 100_000).map(float)))
    return arrays


@hypothesis.settings(max_examples=25, deadline=None)
@hypothesis.given(logps=pair_batches(bound=100.0), beta=st.floats(0.01, 2.0))
def test_swapping_chosen_and_rejected_mirrors_the_sigmoid_loss(logps, beta):
    """-log s(x) + log s(-x) = -x: loss(d) - loss(-d) = -beta d."""
    swapped = {**logps, "policy_chosen_logps": logps["policy_rejected_logps"],
               "policy_rejected_logps": logps["policy_chosen_logps"],
               "reference_chosen_logps": logps["reference_rejected_logps"],
               "reference_rejected_logps": logps["reference_chosen_logps"]}
    loss, _ = library_losses(logps, beta, dict(loss_type="sigmoid"))
    mirrored, _ = library_losses(swapped, beta, dict(loss_type="sigmoid"))
    d = ((logps["policy_chosen_logps"] - logps["reference_chosen_logps"].astype(np.float64))
         - (logps["policy_rejected_logps"] - logps["reference_rejected_logps"].astype(np.float64)))
    np.testing.assert_allclose(np.asarray(loss - mirrored), -beta * d, rtol=1e-5, atol=1e-4)


@hypothesis.settings(max_examples=40, deadline=None)
@hypothesis.given(logps=pair_batches(), case=st.sampled_from(CASES), beta=st.floats(1e-3, 10.0))
def test_every_variant_is_finite_with_finite_gradients(logps, case, beta):
    """Finite for any log-probs up to 1e9 in magnitude, and accuracies stay in [0, 1]."""
    logps = with_case_references(logps, case)
    names = [name for name in ARRAY_NAMES if logps[name] is not None]

    def total_loss(arrays):
        per_example, metrics = library_losses({**logps, **arrays}, beta, case)
        return jnp.sum(per_example), (per_example, metrics)

    gradients, (per_example, metrics) = jax.grad(total_loss, has_aux=True)({name: logps[name] for name in names})
    assert np.all(np.isfinite(per_example)), per_example
    assert all(np.all(np.isfinite(gradient)) for gradient in gradients.values()), gradients
    assert all(np.isfinite(value) for value in metrics.values())
    assert 0.0 <= float(metrics["rewards/accuracies"]) <= 1.0


@hypothesis.settings(max_examples=25, deadline=None)
@hypothesis.given(logps=pair_batches(bound=1e4), beta=st.floats(1e-3, 10.0), label_smoothing=st.floats(0.0, 0.49))
def test_policy_equal_to_reference_gives_log_2_and_chance_accuracy(logps, beta, label_smoothing):
    at_reference = {**logps, "reference_chosen_logps": logps["policy_chosen_logps"],
                    "reference_rejected_logps": logps["policy_rejected_logps"]}
    per_example, metrics = library_losses(at_reference, beta,
                                          dict(loss_type="sigmoid", label_smoothing=label_smoothing))
    np.testing.assert_allclose(np.asarray(per_example), math.log(2.0), rtol=1e-6)
    assert float(metrics["rewards/accuracies"]) == 0.5


# ---------------------------------------------------------------------------------------------
# Arguments
# ---------------------------------------------------------------------------------------------

BAD_ARGUMENTS = [
    (dict(loss_type="dpo"), "loss_type"),
    (dict(loss_type=("sigmoid", "nope")), "loss_type"),
    (dict(beta=0.0), "beta"),
    (dict(beta=-1.0), "beta"),
    (dict(label_smoothing=0.5), "label_smoothing"),
    (dict(label_smoothing=-0.1), "label_smoothing"),
    (dict(loss_type="hinge", label_smoothing=0.1), "label_smoothing"),  # hinge has no use for it
    (dict(loss_type="simpo", chosen_lengths=None), "chosen_lengths"),
    (dict(loss_type="orpo", rejected_lengths=None), "rejected_lengths"),
    (dict(loss_type="ipo", chosen_lengths=None), "chosen_lengths"),
    (dict(use_weighting=True, rejected_lengths=None), "rejected_lengths"),
    (dict(reference_chosen_logps=None), "reference_chosen_logps"),
    (dict(loss_type="ipo", reference_rejected_logps=None), "reference_rejected_logps"),
    (dict(policy_rejected_logps=np.zeros(3, np.float32)), "policy_rejected_logps"),
    (dict(chosen_lengths=np.ones(5, np.float32)), "chosen_lengths"),
    (dict(policy_chosen_logps=np.zeros((4, 2), np.float32)), "policy_chosen_logps"),
    (dict(gamma=1.0), "gamma"),
    (dict(loss_type="sigmoid", simpo_gamma=1.0), "simpo_gamma"),
    (dict(loss_type="simpo", simpo_gamma=float("nan")), "simpo_gamma"),
    (dict(loss_type="rpo", rpo_alpha=-1.0), "rpo_alpha"),
    (dict(loss_type="discopop", discopop_tau=0.0), "discopop_tau"),
    (dict(loss_type="ipo", ipo_length_normalize="yes"), "ipo_length_normalize"),
    (dict(f_divergence_type="chi2"), "f_divergence_type"),
    (dict(loss_type="simpo", f_divergence_type="forward_kl"), "f_divergence_type"),
    (dict(f_divergence_type="alpha_divergence", f_alpha=1.5), "f_alpha"),
    (dict(f_alpha=0.5), "f_divergence_type"),
    (dict(use_weighting=1), "use_weighting"),
    (dict(loss_type=("sigmoid", "sft"), loss_weights=(1.0,)), "loss_weights"),
]


@pytest.mark.parametrize("overrides,argument", BAD_ARGUMENTS,
                         ids=[f"{argument}-{i}" for i, (_, argument) in enumerate(BAD_ARGUMENTS)])
def test_bad_arguments_raise_value_error_naming_them_at_trace_time(overrides, argument):
    arguments = {**random_inputs(seed=6), **overrides}
    arrays = {name: arguments.pop(name) for name in ARRAY_NAMES}
    traced = jax.jit(lambda arrays: losses.preference_loss(*(arrays[name] for name in ARRAY_NAMES), **arguments))
    with pytest.raises(ValueError, match=argument):
        traced(arrays)


def test_good_arguments_around_the_bad_ones_are_accepted():
    """The boundaries the checks draw are where they should be (so the failures above are not spurious)."""
    inputs = random_inputs(seed=6)
    for case in (dict(label_smoothing=0.0), dict(label_smoothing=0.49), dict(loss_type="rpo", rpo_alpha=0.0),
                 dict(loss_type=("sigmoid", "sft")), dict(loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.5]),
                 dict(loss_type="sigmoid", f_divergence_type="reverse_kl"),
                 dict(loss_type="sigmoid", use_weighting=False)):
        per_example, _ = library_losses(inputs, 1e-6, case)
        assert np.all(np.isfinite(per_example))


def test_mixture_is_the_weighted_sum_of_its_parts():
    inputs = random_inputs(seed=7)
    parts = [library_losses(inputs, BETA, dict(loss_type=name))[0] for name in ("sigmoid", "bco_pair", "sft")]
    mixture, _ = library_losses(inputs, BETA, dict(loss_type=("sigmoid", "bco_pair", "sft"),
                                                         loss_weights=(0.8, 0.2, 1.0)))
    np.testing.assert_allclose(mixture, 0.8 * parts[0] + 0.2 * parts[1] + parts[2], rtol=1e-6)


def test_robust_without_label_noise_and_reverse_kl_are_dpo():
    inputs = random_inputs(seed=8)
    dpo, dpo_metrics = library_losses(inputs, BETA, dict(loss_type="sigmoid"))
    robust, _ = library_losses(inputs, BETA, dict(loss_type="robust"))
    np.testing.assert_allclose(robust, dpo, rtol=1e-6)
    reverse_kl, reverse_kl_metrics = library_losses(inputs, BETA, dict(loss_type="sigmoid",
                                                                       f_divergence_type="reverse_kl"))
    np.testing.assert_array_equal(reverse_kl, dpo)
    for name, value in dpo_metrics.items():
        np.testing.assert_array_equal(reverse_kl_metrics[name], value)


# ---------------------------------------------------------------------------------------------
# Sequence scores
# ---------------------------------------------------------------------------------------------

def numpy_token_logps(logits, labels):
    logits = np.asarray(logits, np.float64)
    top = logits.max(-1, keepdims=True)
    log_softmax = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
    return np.take_along_axis(log_softmax, labels[..., None], -1)[..., 0]


def numpy_sequence_logps(logits, labels, mask, average):
    sums = (numpy_token_logps(logits, labels) * mask).sum(-1)
    return sums / np.maximum(mask.sum(-1), 1) if average else sums


def token_batch(seed, batch=3, time=11, vocab=37, embed=8):
    rng = np.random.default_rng(seed)
    hidden = rng.normal(size=(batch, time, embed)).astype(np.float32)
    unembedding = rng.normal(size=(embed, vocab)).astype(np.float32)
    labels = rng.integers(0, vocab, (batch, time))
    mask = (rng.uniform(size=(batch, time)) < 0.7).astype(np.float32)
    mask[-1] = 0.0  # an empty response
    return hidden, unembedding, labels, mask


@pytest.mark.parametrize("average", [False, True])
def test_sequence_logps_match_numpy(average):
    hidden, unembedding, labels, mask = token_batch(seed=0)
    logits = hidden @ unembedding
    np.testing.assert_allclose(losses.sequence_logps(logits, labels, mask, average=average),
                               numpy_sequence_logps(logits, labels, mask, average), rtol=1e-5, atol=1e-5)


# chunk 4 leaves a remainder of the 11 steps, 11 divides them, 64 exceeds them.
@pytest.mark.parametrize("chunk_size,average", [(4, False), (11, True), (64, False)])
def test_chunked_sequence_logps_equal_the_full_ones_with_gradients(chunk_size, average):
    hidden, unembedding, labels, mask = token_batch(seed=1)
    weights = jnp.asarray(np.random.default_rng(2).normal(size=labels.shape[0]), jnp.float32)

    def full(hidden, unembedding):
        return weights @ losses.sequence_logps(hidden @ unembedding, labels, mask, average=average)

    def chunked_logits(hidden, unembedding):
        return weights @ losses.chunked_sequence_logps(hidden @ unembedding, labels, mask, average=average,
                                                       chunk_size=chunk_size)

    def chunked_hidden(hidden, unembedding):
        return weights @ losses.chunked_sequence_logps(hidden, labels, mask, average=average, chunk_size=chunk_size,
                                                       logits_fn=lambda h: h @ unembedding)

    expected_value, expected_grads = jax.value_and_grad(full, argnums=(0, 1))(hidden, unembedding)
    for function in (chunked_logits, chunked_hidden):
        value, grads = jax.value_and_grad(function, argnums=(0, 1))(hidden, unembedding)
        np.testing.assert_allclose(value, expected_value, rtol=1e-5)
        for got, expected in zip(grads, expected_grads):
            np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def intermediate_shapes(jaxpr):
    """(shape, dtype) of every value computed anywhere in a jaxpr, inner jaxprs (scan, checkpoint) included."""
    for equation in jaxpr.eqns:
        for var in equation.outvars:
            yield var.aval.shape, var.aval.dtype
        for inner in jax.extend.core.jaxprs_in_params(equation.params):
            yield from intermediate_shapes(inner)


def test_chunked_sequence_logps_never_build_a_full_float32_log_softmax():
    """Forward and backward: float32 values are at most [batch, chunk, vocab], never [batch, time, vocab]."""
    batch, time, vocab, embed, chunk = 2, 64, 1000, 16, 8
    rng = np.random.default_rng(3)
    hidden = jnp.asarray(rng.normal(size=(batch, time, embed)), jnp.bfloat16)
    unembedding = jnp.asarray(rng.normal(size=(embed, vocab)), jnp.bfloat16)
    labels = jnp.asarray(rng.integers(0, vocab, (batch, time)))
    mask = jnp.ones((batch, time))

    def largest_float32(function):
        jaxpr = jax.make_jaxpr(jax.grad(function, argnums=(0, 1)))(hidden, unembedding).jaxpr
        return max(math.prod(shape) for shape, dtype in intermediate_shapes(jaxpr) if dtype == jnp.float32)

    full = lambda h, w: losses.sequence_logps(h @ w, labels, mask).sum()
    from_logits = lambda h, w: losses.chunked_sequence_logps(h @ w, labels, mask, chunk_size=chunk).sum()
    from_hidden = lambda h, w: losses.chunked_sequence_logps(h, labels, mask, chunk_size=chunk,
                                                             logits_fn=lambda x: x @ w).sum()
    assert largest_float32(full) >= batch * time * vocab  # the measure sees the full log-softmax
    assert largest_float32(from_logits) <= batch * chunk * vocab
    assert largest_float32(from_hidden) <= batch * chunk * vocab
    # From hidden states, not even the bfloat16 logits exist in full.
    jaxpr = jax.make_jaxpr(jax.grad(from_hidden, argnums=(0, 1)))(hidden, unembedding).jaxpr
    assert max(math.prod(shape) for shape, _ in intermediate_shapes(jaxpr)) < batch * time * vocab


# chunk 4 leaves a remainder of the 11 steps, 11 divides them, 64 exceeds them.
@pytest.mark.parametrize("chunk_size", [4, 11, 64])
def test_scored_token_logps_equal_the_full_ones_with_gradients(chunk_size):
    """Token log-probs where the mask scores them (a row scores none), 0 elsewhere; and gradients."""
    hidden, unembedding, labels, mask = token_batch(seed=4)
    weights = jnp.asarray(np.random.default_rng(5).normal(size=labels.shape), jnp.float32)
    expected_logps = np.where(mask > 0, numpy_token_logps(hidden @ unembedding, labels), 0.0)
    scored = lambda h, w: losses.scored_token_logps(h, labels, mask, lambda x: x @ w, chunk_size=chunk_size)
    np.testing.assert_allclose(scored(hidden, unembedding), expected_logps, rtol=1e-5, atol=1e-5)

    def full(hidden, unembedding):
        return jnp.sum(weights * jnp.where(mask > 0, losses.token_logps(hidden @ unembedding, labels), 0.0))

    expected_value, expected_grads = jax.value_and_grad(full, argnums=(0, 1))(hidden, unembedding)
    value, grads = jax.value_and_grad(lambda h, w: jnp.sum(weights * scored(h, w)), argnums=(0, 1))(hidden, unembedding)
    np.testing.assert_allclose(value, expected_value, rtol=1e-5)
    for got, expected in zip(grads, expected_grads):
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_scored_token_logps_compute_only_the_chunks_holding_scored_tokens():
    """Logits are computed for ceil(most scored tokens in a row / chunk) chunks, whatever their
    positions, and unscored positions (here poisoned with NaN) do not reach the result."""
    batch, time, chunk = 3, 40, 4
    hidden, unembedding, labels, _ = token_batch(seed=6, batch=batch, time=time)
    mask = np.zeros((batch, time), np.float32)
    mask[0, [1, 7, 30]] = 1.0            # scattered: 3 tokens
    mask[1, 20:29] = 1.0                 # a span of 9 tokens: 3 chunks of 4
    hidden = np.where(mask[..., None] > 0, hidden, np.nan).astype(np.float32)
    calls = []

    def logits_fn(x):
        jax.debug.callback(lambda: calls.append(1))
        return x @ unembedding

    logps = jax.jit(lambda h: losses.scored_token_logps(h, labels, mask, logits_fn, chunk_size=chunk))(hidden)
    jax.effects_barrier()
    assert len(calls) == 3  # of 10 chunks
    expected = np.where(mask > 0, numpy_token_logps(np.nan_to_num(hidden) @ unembedding, labels), 0.0)
    np.testing.assert_allclose(logps, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_scored_token_logps_sum_a_bfloat16_weight_gradient_in_float32(seed):
    """The output layer's gradient sums over 128 chunks. Summed in bfloat16 it drifts ~1% from
    the float32 computation on the same bfloat16 inputs; summed in float32 and rounded once, it
    stays within a few bfloat16 roundings (2**-8 = 0.4%)."""
    batch, time, embed, vocab, chunk = 2, 512, 32, 64, 4
    rng = np.random.default_rng(seed)
    hidden = jnp.asarray(rng.normal(size=(batch, time, embed)), jnp.bfloat16)
    embedding = jnp.asarray(rng.normal(size=(vocab, embed)) * 0.3, jnp.bfloat16)
    labels = jnp.asarray(rng.integers(0, vocab, (batch, time)))
    mask = jnp.ones((batch, time))

    def weight_grad(dtype):
        total = lambda w: jnp.sum(losses.scored_token_logps(hidden.astype(dtype), labels, mask, lambda x: x @ w.T,
                                                            chunk_size=chunk))
        return np.asarray(jax.grad(total)(embedding.astype(dtype)).astype(jnp.float32), np.float64)

    expected, got = weight_grad(jnp.float32), weight_grad(jnp.bfloat16)
    assert np.linalg.norm(got - expected) / np.linalg.norm(expected) < 0.005


# ---------------------------------------------------------------------------------------------
# LD-DPO
# ---------------------------------------------------------------------------------------------

def numpy_desensitized(token_logps, mask, other_mask, alpha):
    """LD-DPO eq. 10: the first l_p response tokens count fully, the rest alpha."""
    shared = min(mask.sum(), other_mask.sum())
    total, seen = 0.0, 0
    for logp, used in zip(token_logps, mask):
        if used:
            seen += 1
            total += logp if seen <= shared else alpha * logp
    return total


def test_desensitized_sequence_logps_match_the_paper():
    rng = np.random.default_rng(4)
    chosen_logps, rejected_logps = -rng.uniform(0, 5, (4, 12)), -rng.uniform(0, 5, (4, 9))
    chosen_mask = np.zeros((4, 12), np.float32)
    rejected_mask = np.zeros((4, 9), np.float32)
    for row, (start, chosen_end, rejected_end) in enumerate([(2, 12, 5), (3, 6, 9), (0, 7, 7), (4, 4, 8)]):
        chosen_mask[row, start:chosen_end] = 1  # responses after prompts of different lengths
        rejected_mask[row, start:rejected_end] = 1
    alpha = 0.3
    chosen, rejected = losses.desensitized_sequence_logps(chosen_logps, chosen_mask, rejected_logps, rejected_mask,
                                                          ld_alpha=alpha)
    for row in range(4):
        np.testing.assert_allclose(chosen[row], numpy_desensitized(chosen_logps[row], chosen_mask[row],
                                                                   rejected_mask[row], alpha), rtol=1e-5)
        np.testing.assert_allclose(rejected[row], numpy_desensitized(rejected_logps[row], rejected_mask[row],
                                                                     chosen_mask[row], alpha), rtol=1e-5)
    # The longer response loses weight; alpha = 1 is plain summation.
    assert chosen[0] > (chosen_logps[0] * chosen_mask[0]).sum()
    plain_chosen, plain_rejected = losses.desensitized_sequence_logps(chosen_logps, chosen_mask, rejected_logps,
                                                                      rejected_mask, ld_alpha=1.0)
    np.testing.assert_allclose(plain_chosen, (chosen_logps * chosen_mask).sum(-1), rtol=1e-6)
    np.testing.assert_allclose(plain_rejected, (rejected_logps * rejected_mask).sum(-1), rtol=1e-6)
    with pytest.raises(ValueError, match="ld_alpha"):
        losses.desensitized_sequence_logps(chosen_logps, chosen_mask, rejected_logps, rejected_mask, ld_alpha=1.5)


# ---------------------------------------------------------------------------------------------
# KTO
# ---------------------------------------------------------------------------------------------

def numpy_kto(policy_logps, reference_logps, desirable, policy_kl_logps, reference_kl_logps, beta,
              desirable_weight, undesirable_weight):
    """KTO eq. 8: value v = lambda_D s(b (r - z0)) or lambda_U s(b (z0 - r)); loss = lambda - v."""
    z0 = max(0.0, np.mean(np.asarray(policy_kl_logps, np.float64) - reference_kl_logps))
    reward = np.asarray(policy_logps, np.float64) - reference_logps
    return np.where(desirable, desirable_weight * (1 - sigmoid(beta * (reward - z0))),
                    undesirable_weight * (1 - sigmoid(beta * (z0 - reward))))


def kto_inputs(seed, batch=8, kl_shift=2.0):
    rng = np.random.default_rng(seed)
    policy = -rng.uniform(5, 50, batch)
    policy_kl = -rng.uniform(5, 50, batch)
    return dict(policy_logps=policy.astype(np.float32),
                reference_logps=(policy + 2 * rng.normal(size=batch)).astype(np.float32),
                desirable=rng.uniform(size=batch) < 0.5,
                policy_kl_logps=policy_kl.astype(np.float32),
                reference_kl_logps=(policy_kl - kl_shift + rng.normal(size=batch)).astype(np.float32))


@pytest.mark.parametrize("kl_shift", [2.0, -5.0])  # a positive KL estimate, and one clamped to 0
def test_kto_matches_numpy_and_finite_differences(kl_shift):
    inputs = kto_inputs(seed=9, kl_shift=kl_shift)
    options = dict(beta=0.5, desirable_weight=1.0, undesirable_weight=1.33)
    per_example, metrics = losses.kto_loss(**inputs, **options)
    np.testing.assert_allclose(per_example, numpy_kto(**inputs, **options), rtol=1e-5, atol=1e-6)
    expected_kl = max(0.0, np.mean(inputs["policy_kl_logps"] - inputs["reference_kl_logps"].astype(np.float64)))
    np.testing.assert_allclose(float(metrics["kl"]), expected_kl, rtol=1e-5, atol=1e-6)
    rewards = 0.5 * (inputs["policy_logps"] - inputs["reference_logps"].astype(np.float64))
    np.testing.assert_allclose(float(metrics["rewards/chosen"]), rewards[inputs["desirable"]].mean(), rtol=1e-5)
    np.testing.assert_allclose(float(metrics["rewards/rejected"]), rewards[~inputs["desirable"]].mean(), rtol=1e-5)

    # The reference point carries no gradient: differentiate with it held at its value.
    def numpy_loss(arrays):
        return numpy_kto(**{**inputs, **arrays}, **options)
    expected = finite_difference_gradient(numpy_loss, inputs, ["policy_logps", "reference_logps"])
    got = jax.grad(lambda p, r: jnp.sum(losses.kto_loss(p, r, *(inputs[k] for k in (
        "desirable", "policy_kl_logps", "reference_kl_logps")), **options)[0]), argnums=(0, 1))(
        inputs["policy_logps"], inputs["reference_logps"])
    np.testing.assert_allclose(got[0], expected["policy_logps"], rtol=2e-4, atol=1e-6)
    np.testing.assert_allclose(got[1], expected["reference_logps"], rtol=2e-4, atol=1e-6)
    kl_gradient = jax.grad(lambda kl_logps: jnp.sum(losses.kto_loss(**{**inputs, "policy_kl_logps": kl_logps},
                                                                    **options)[0]))(inputs["policy_kl_logps"])
    assert not np.any(kl_gradient)


def test_kto_reference_point_can_span_a_mapped_axis():
    """With axis_name, every shard uses the KL estimate of the whole batch."""
    inputs = kto_inputs(seed=10, batch=12)
    whole, whole_metrics = losses.kto_loss(**inputs)
    shards = {name: value.reshape(3, 4) for name, value in inputs.items()}
    sharded, sharded_metrics = jax.vmap(functools.partial(losses.kto_loss, axis_name="shards"),
                                        axis_name="shards")(**shards)
    np.testing.assert_allclose(sharded.reshape(-1), whole, rtol=1e-6)
    np.testing.assert_allclose(sharded_metrics["kl"], np.full(3, whole_metrics["kl"]), rtol=1e-6)
    unsynchronised, _ = jax.vmap(losses.kto_loss)(**shards)
    assert not np.allclose(unsynchronised.reshape(-1), whole)  # the local estimates differ


def test_kto_bad_arguments_raise_value_error_naming_them():
    inputs = kto_inputs(seed=11)
    for overrides, argument in ((dict(beta=0.0), "beta"), (dict(undesirable_weight=0.0), "undesirable_weight"),
                                (dict(desirable=np.ones(3, bool)), "desirable")):
        arguments = {**inputs, **overrides}
        with pytest.raises(ValueError, match=argument):
            losses.kto_loss(**arguments)

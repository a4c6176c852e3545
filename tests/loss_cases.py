"""The preference-loss configurations every loss test runs, and the inputs they share.

A case is the keyword arguments of `dpo_jax.losses.preference_loss` besides the arrays and beta:
every loss type at least once, cDPO, both IPO forms, each f-divergence, WPO weighting and an MPO mixture.
"""

import jax
import numpy as np

from dpo_jax import losses

ARRAY_NAMES = ("policy_chosen_logps", "policy_rejected_logps", "reference_chosen_logps", "reference_rejected_logps")

CASES = [
    dict(loss_type="sigmoid"),
    dict(loss_type="sigmoid", label_smoothing=0.1),  # cDPO
    dict(loss_type="robust", label_smoothing=0.1),
    dict(loss_type="hinge"),
    dict(loss_type="ipo"),
    dict(loss_type="ipo", ipo_length_normalize=False),
    dict(loss_type="exo_pair"),
    dict(loss_type="exo_pair", label_smoothing=0.2),
    dict(loss_type="nca_pair"),
    dict(loss_type="bco_pair"),
    dict(loss_type="sppo_hard"),
    dict(loss_type="aot", label_smoothing=0.1),
    dict(loss_type="aot_unpaired"),
    dict(loss_type="apo_zero"),
    dict(loss_type="apo_down"),
    dict(loss_type="discopop"),
    dict(loss_type="discopop", discopop_tau=2.0),
    dict(loss_type="sigmoid_norm"),
    dict(loss_type="simpo", simpo_gamma=0.7, label_smoothing=0.05),
    dict(loss_type="orpo"),
    dict(loss_type="rpo", rpo_alpha=0.5),
    dict(loss_type="sigmoid_ref_free"),
    dict(loss_type="sft"),
    dict(loss_type="sigmoid", f_divergence_type="forward_kl"),
    dict(loss_type="sigmoid", f_divergence_type="js_divergence"),
    dict(loss_type="sigmoid", f_divergence_type="alpha_divergence", f_alpha=0.3),
    dict(loss_type="ipo", f_divergence_type="js_divergence"),
    dict(loss_type="bco_pair", f_divergence_type="forward_kl"),
    dict(loss_type="sigmoid", use_weighting=True),  # WPO
    dict(loss_type=("sigmoid", "bco_pair", "sft"), loss_weights=(0.8, 0.2, 1.0)),  # MPO
]

REFERENCE_FREE = ("simpo", "orpo", "sigmoid_ref_free", "sft")


def case_id(case):
    return "-".join(f"{value}" if key == "loss_type" else f"{key}={value}" for key, value in case.items())


def loss_types_of(case):
    loss_type = case["loss_type"]
    return (loss_type,) if isinstance(loss_type, str) else loss_type


# One batch size for all the loss tests, so that eagerly run operations compile once for all of them.
BATCH = 8


def random_inputs(seed, batch=BATCH, scale=3.0):
    """float32 [batch] arrays: policy and reference log-probs of chosen and rejected, and lengths.

    Reference log-probs are the policy's plus noise of `scale` nats, so the log-ratios are moderate
    and of both signs.
    """
    rng = np.random.default_rng(seed)
    policy_chosen = -rng.uniform(5.0, 60.0, batch)
    policy_rejected = -rng.uniform(5.0, 60.0, batch)
    return dict(
        policy_chosen_logps=policy_chosen.astype(np.float32),
        policy_rejected_logps=policy_rejected.astype(np.float32),
        reference_chosen_logps=(policy_chosen + scale * rng.normal(size=batch)).astype(np.float32),
        reference_rejected_logps=(policy_rejected + scale * rng.normal(size=batch)).astype(np.float32),
        chosen_lengths=rng.integers(1, 40, batch).astype(np.float32),
        rejected_lengths=rng.integers(1, 40, batch).astype(np.float32),
    )


def with_case_references(inputs, case):
    """Drops the reference log-probs for reference-free cases, which must work without them."""
    if all(loss_type in REFERENCE_FREE for loss_type in loss_types_of(case)):
        return {**inputs, "reference_chosen_logps": None, "reference_rejected_logps": None}
    return inputs


def library_losses(inputs, beta, case):
    """preference_loss of `case` on a dict of inputs like `random_inputs`'."""
    return losses.preference_loss(*(inputs[name] for name in ARRAY_NAMES), beta=beta,
                                  chosen_lengths=inputs["chosen_lengths"], rejected_lengths=inputs["rejected_lengths"],
                                  **case)


def all_cases(inputs, beta):
    """[(losses, metrics)] of every case, reference-free ones without references: one function to transform."""
    return [library_losses(with_case_references(inputs, case), beta, case) for case in CASES]


def policy_gradients(inputs, beta):
    """[{name: d sum(losses) / d policy log-probs}] of every case."""
    def total_loss(policy, case):
        return library_losses(with_case_references({**inputs, **policy}, case), beta, case)[0].sum()
    policy = {name: inputs[name] for name in ARRAY_NAMES[:2]}
    return [jax.grad(total_loss)(policy, case) for case in CASES]

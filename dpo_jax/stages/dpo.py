"""DPO and its loss family on preference pairs, against a frozen reference (normally the SFT model).

Starts from `dpo.init_from`, else the run's last policy stage (SFT), else the model init. The
reference is that starting point: a live frozen copy in the train state, log-probs precomputed once
(no reference model in training), or, with LoRA, the same weights with the adapters off. A
reference-free loss (simpo, orpo, sigmoid_ref_free) runs none of them, whatever `dpo.reference`
says, and logs the rewards the loss itself defines.
"""

import functools
import os

import jax
import jax.numpy as jnp
import ml_collections

from dpo_jax import losses, models, planning, reference, steps
from dpo_jax.stages import base

REFERENCES = ("live", "precomputed", "lora")


def config_block():
    block = base.optimizer_block(
        num_steps=100, learning_rate=1e-4, warmup_steps=10,
        beta=0.1,                             # how far the policy may move from the reference (--dpo-beta)
        loss_type=("sigmoid",),               # preference loss (dpo_jax.losses.LOSS_TYPES); several: a mixture
        label_smoothing=0.0,                  # cDPO: assumed probability that a label is flipped
        reference="live",                     # live: frozen copy of the starting params, run in the step |
                                              #   precomputed: reference log-probs computed once, no reference
                                              #   model in training | lora: the weights with adapters off
        reference_cache_dir="",               # precomputed: where reference log-probs are cached and reused
                                              #   ("" = <workdir>/reference_logps)
        reference_dtype="",                   # live: store the reference in this dtype ("" = as params; bfloat16)
        reference_update_every=0,             # TR-DPO: move the reference toward the policy every N steps (0 = off)
        reference_update_alpha=0.5,           # TR-DPO: reference <- alpha * policy + (1 - alpha) * reference
    )
    # Options of particular loss types (dpo_jax.losses); None = unset, not passed to the loss.
    unset = lambda field_type: ml_collections.FieldReference(None, field_type=field_type)
    block.loss_options = ml_collections.ConfigDict(dict(
        loss_weights=(),                      # a mixture's weights, one per loss_type (empty: unset)
        simpo_gamma=unset(float),             # simpo: target margin gamma (--simpo-gamma)
        rpo_alpha=unset(float),               # rpo: weight of the NLL term on the chosen response (--rpo-alpha)
        ipo_length_normalize=unset(bool),     # ipo: average log-ratios over tokens (default True)
        discopop_tau=unset(float),            # discopop: temperature tau
        f_divergence_type=unset(str),         # reverse_kl | forward_kl | js_divergence | alpha_divergence
        f_alpha=unset(float),                 # alpha_divergence: alpha
        use_weighting=unset(bool),            # WPO weighting of each pair's loss
    ))
    return block


def _check_loss(dpo):
    """Traces the loss once on dummy pairs, so a bad option fails here, naming itself."""
    pairs = jnp.zeros(2, jnp.float32)
    lengths = jnp.ones(2, jnp.float32)
    try:
        jax.eval_shape(lambda: losses.preference_loss(
            pairs, pairs, pairs, pairs, chosen_lengths=lengths, rejected_lengths=lengths,
            **steps.preference_options(dpo)))
    except (ValueError, TypeError) as error:
        raise ValueError(f"config.dpo.loss_options / loss_type: {error}") from error


def validate(config):
    dpo = config.dpo
    base.check(dpo.beta > 0, "dpo.beta", f"must be > 0, got {dpo.beta}")
    base.check(0 <= dpo.label_smoothing < 0.5, "dpo.label_smoothing",
               f"must be in [0, 0.5), got {dpo.label_smoothing}")
    base.check(dpo.loss_type and all(name in losses.LOSS_TYPES for name in dpo.loss_type), "dpo.loss_type",
               f"{dpo.loss_type!r}: each must be one of {losses.LOSS_TYPES}")
    _check_loss(dpo)
    base.check({"aot", "aot_unpaired"}.isdisjoint(dpo.loss_type) or "packed" not in config.data.layout,
               "dpo.loss_type", f"{dpo.loss_type!r} sorts over the batch, which packed layouts fill with empty pair "
               "slots; use data.layout='padded' or 'prefix_shared'")
    base.check(dpo.reference in REFERENCES, "dpo.reference",
               f"must be live, precomputed or lora, got {dpo.reference!r}")
    base.check(dpo.reference != "lora" or config.model.lora.rank > 0, "dpo.reference",
               "'lora' needs LoRA adapters: set model.lora.rank > 0")
    base.check(dpo.reference_dtype in ("", "float32", "bfloat16", "float16"), "dpo.reference_dtype",
               f"must be '', float32, bfloat16 or float16, got {dpo.reference_dtype!r}")
    base.check(dpo.reference_update_every >= 0, "dpo.reference_update_every", "must be >= 0")
    base.check(not dpo.reference_update_every or dpo.reference == "live", "dpo.reference_update_every",
               "TR-DPO updates a live reference: needs dpo.reference='live'")
    base.check(not dpo.reference_update_every or losses.uses_reference(dpo.loss_type), "dpo.reference_update_every",
               f"TR-DPO updates the reference, which loss_type={dpo.loss_type!r} does not use")
    base.check(0 < dpo.reference_update_alpha <= 1, "dpo.reference_update_alpha", "must be in (0, 1]")


def _precomputed_reference(config, mesh, model):
    """The `prepare_data` of a precomputed reference: each split with the starting params' log-probs."""
    def prepare(splits, start_params, workdir):
        return reference.with_reference_logps(
            splits, start_params, graphdef=model.graphdef, mesh=mesh, param_shardings=model.param_shardings,
            batch_size=config.eval.batch_size,
            cache_dir=config.dpo.reference_cache_dir or os.path.join(workdir, "reference_logps"))
    return prepare


def reference_mode(dpo):
    """`dpo.reference`, or None for a reference-free loss (simpo, orpo, sigmoid_ref_free, sft): no
    reference model in the state, no reference forward, no precomputed log-probs."""
    return dpo.reference if losses.uses_reference(dpo.loss_type) else None


def plan(config, mesh, model, task=None):
    del task
    dpo = config.dpo
    mode = reference_mode(dpo)
    reference_update = None
    if mode == "live" and dpo.reference_update_every:
        reference_update = (dpo.reference_update_every, dpo.reference_update_alpha)
    return planning.plan_train_stage(
        "dpo", config, mesh, model, functools.partial(steps.dpo_loss, graphdef=model.graphdef, dpo_config=dpo),
        functools.partial(steps.dpo_eval_step, graphdef=model.graphdef, dpo_config=dpo),
        reference_mode=mode, reference_dtype=dpo.reference_dtype or None, reference_update=reference_update,
        prepare_data=_precomputed_reference(config, mesh, model) if mode == "precomputed" else None)


def initial_params(config, model, stage_plan, results):
    params = base.start_from_policy(config, model, stage_plan, results)
    if config.dpo.reference == "lora":
        # Adapters off must give this stage's starting model (e.g. the LoRA-SFT result), not the base:
        # the adapters are folded into the weights and start again from zero.
        params = models.fold_adapters(config.model, params, seed=config.seed, shardings=model.param_shardings)
    return params


def report(result):
    """Held-out preference accuracy, reward margin and KL before and after DPO."""
    before, final = result.get("eval_before"), result.get("eval") or {}
    if not before:
        return base.final_eval_lines(result)
    lines = [f"  {'held-out':<22}{'before DPO':>12}{'after DPO':>12}"]
    for key, name in (("rewards/accuracies", "preference accuracy"), ("rewards/margins", "reward margin"),
                      ("kl", "KL to reference")):
        if key in final:  # no KL without a reference model (dpo.reference='precomputed')
            lines.append(f"  {name:<22}{before[key]:>12.4f}{final[key]:>12.4f}")
    return lines


STAGE = base.Stage(name="dpo", data="pairs", config_block=config_block, plan=plan, validate=validate,
                   initial_params=initial_params, report=report)

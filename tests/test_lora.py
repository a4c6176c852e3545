"""LoRA adapters: fresh ones change nothing, switching them off gives the base model, export merges them."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from test_models import random_model, run

from dpo_jax import configs, losses, models
from dpo_jax.models import lora

LORA = dict(rank=4, alpha=8.0, targets=("query", "value", "out", "gate", "up", "down"))


def _params(model):
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def _at(tree, path):
    for key in path:
        tree = tree[key.key]
    return tree


def _with_adapters(preset="tiny-llama", lora_b_std=0.2):
    """A random base model, and its weights plus LoRA adapters (lora_b ~ N(0, lora_b_std); 0: fresh)."""
    base = random_model(preset)
    adapted = random_model(preset, lora=LORA)
    base_params, rng = _params(base), np.random.RandomState(7)

    def leaf(path, value):
        if path[-1].key == "lora_b":
            return jnp.asarray(lora_b_std * rng.standard_normal(value.shape), value.dtype)
        return value if path[-1].key == "lora_a" else _at(base_params, path)

    nnx.update(adapted, jax.tree_util.tree_map_with_path(leaf, _params(adapted)))
    return base, adapted


def _tokens(shape=(2, 9)):
    return jnp.asarray(np.random.RandomState(0).randint(0, 64, shape), jnp.int32)


def test_fresh_adapters_leave_the_model_unchanged():
    base, fresh = _with_adapters(lora_b_std=0.0)
    assert lora.has_adapters(_params(fresh)) and not lora.has_adapters(_params(base))
    np.testing.assert_allclose(run(fresh, _tokens()), run(base, _tokens()), atol=1e-6)


def test_adapters_off_is_the_base_model():
    base, adapted = _with_adapters()
    x = _tokens()
    labels, mask = x[:, 1:], jnp.ones(x[:, 1:].shape)
    base_logps = losses.sequence_logps(run(base, x)[:, :-1], labels, mask)
    reference_logps = losses.sequence_logps(run(adapted, x, use_lora=False)[:, :-1], labels, mask)
    policy_logps = losses.sequence_logps(run(adapted, x)[:, :-1], labels, mask)
    np.testing.assert_allclose(reference_logps, base_logps, atol=1e-5)
    assert np.abs(policy_logps - base_logps).max() > 1e-2  # the adapters do act when switched on


def test_only_the_targets_get_adapters():
    params = _params(random_model("tiny-llama", lora=dict(LORA, targets=("value",))))
    block = params["blocks"][0]
    assert set(block["attention"]["value"]) == {"kernel", "lora_a", "lora_b"}
    assert "lora_a" not in block["attention"]["query"] and "lora_a" not in block["mlp"]["up"]
    assert block["attention"]["value"]["lora_a"].shape == (64, 4)


def test_trainable_mask_selects_the_adapters():
    mask = models.trainable_mask(_params(random_model("tiny-llama", lora=LORA)))
    paths = {jax.tree_util.keystr(path): value for path, value in jax.tree_util.tree_leaves_with_path(mask)}
    assert all(value == ("lora_" in path) for path, value in paths.items())
    assert all(jax.tree.leaves(models.trainable_mask(_params(random_model("tiny-llama")))))  # no LoRA: all


def test_masked_optimizer_updates_only_the_adapters():
    """The wiring train.py uses: optax.multi_transform with labels from trainable_mask."""
    _, adapted = _with_adapters()
    graphdef, params = nnx.split(adapted, nnx.Param)
    params = nnx.to_pure_dict(params)
    labels = jax.tree.map(lambda trainable: "train" if trainable else "freeze", models.trainable_mask(params))
    optimizer = optax.multi_transform({"train": optax.adamw(1e-2), "freeze": optax.set_to_zero()}, labels)
    x = _tokens()

    def loss(params):
        return -jnp.mean(losses.token_logps(models.apply(graphdef, params, x)[:, :-1], x[:, 1:]))

    @jax.jit
    def step(params):
        updates, _ = optimizer.update(jax.grad(loss)(params), optimizer.init(params), params)
        return optax.apply_updates(params, updates)

    new_params = step(params)
    for path, old in jax.tree_util.tree_leaves_with_path(params):
        changed = not np.array_equal(old, _at(new_params, path))
        assert changed == ("lora_" in jax.tree_util.keystr(path)), jax.tree_util.keystr(path)


def test_merged_adapters_give_the_adapted_model():
    base, adapted = _with_adapters()
    merged = lora.merge_adapters(_params(adapted), adapted.config.lora_alpha / adapted.config.lora_rank)
    assert not lora.has_adapters(merged)
    merged_model = nnx.merge(nnx.split(base, nnx.Param)[0], merged)
    np.testing.assert_allclose(run(merged_model, _tokens()), run(adapted, _tokens()), atol=1e-5)


def test_export_merges_the_adapters(tmp_path):
    _, adapted = _with_adapters("tiny-qwen2")
    models.save_hf(adapted, tmp_path)
    exported = models.load_hf(tmp_path)
    assert not lora.has_adapters(_params(exported))
    np.testing.assert_allclose(run(exported, _tokens()), run(adapted, _tokens()), atol=1e-5)


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny"])
def test_init_from_hf_adds_fresh_adapters_to_the_checkpoint(preset, tmp_path):
    base = random_model(preset)
    models.save_hf(base, tmp_path)
    model_config = configs.model_config("tiny", init_from_hf=str(tmp_path), lora=LORA)
    graphdef, abstract_params, _ = models.abstract_model(model_config)
    params = models.init_params(model_config, seed=0, shardings=None)
    assert jax.tree.structure(params) == jax.tree.structure(abstract_params)
    assert lora.has_adapters(params)
    np.testing.assert_allclose(run(nnx.merge(graphdef, params), _tokens()), run(base, _tokens()), atol=1e-6)


def test_folding_makes_the_adapted_model_the_new_reference():
    """LoRA-SFT then LoRA-DPO: the DPO reference (adapters off) must be the SFT model, not the base."""
    _, adapted = _with_adapters()
    graphdef, params = nnx.split(adapted, nnx.Param)
    params = nnx.to_pure_dict(params)
    sft_logits = run(adapted, _tokens())
    model_config = configs.model_config("tiny-llama", lora=LORA)
    folded = models.fold_adapters(model_config, jax.tree.map(jnp.copy, params), seed=1, shardings=None)
    assert not np.any(np.asarray(folded["blocks"][0]["attention"]["query"]["lora_b"]))  # fresh adapters
    folded_model = nnx.merge(graphdef, folded)
    np.testing.assert_allclose(run(folded_model, _tokens()), sft_logits, atol=1e-5)
    np.testing.assert_allclose(run(folded_model, _tokens(), use_lora=False), sft_logits, atol=1e-5)

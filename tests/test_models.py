"""The decoder: masks (padding, packing, prefix sharing, sliding window), config checks, axis names, presets."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dpo_jax import configs, models

FAMILIES = ["tiny", "tiny-gpt_neox", "tiny-gptj", "tiny-llama", "tiny-mistral", "tiny-qwen2", "tiny-gemma"]


def random_model(preset, seed=0, **overrides):
    """A tiny model whose every parameter (biases and norms included) is random, so each one matters.

    Drawn with numpy (nothing to compile); LoRA adapters start fresh (lora_b = 0). Shared with
    test_hf, test_sampling and test_lora (`from test_models import random_model, run`).
    """
    graphdef, abstract_params, _ = models.abstract_model(configs.model_config(preset, **overrides))
    rng = np.random.RandomState(seed)

    def sample(path, leaf):
        name = path[-1].key
        if name == "lora_b":
            return jnp.zeros(leaf.shape, leaf.dtype)
        return jnp.asarray((name == "scale") + 0.1 * rng.standard_normal(leaf.shape), leaf.dtype)

    return nnx.merge(graphdef, jax.tree_util.tree_map_with_path(sample, abstract_params))


_apply = jax.jit(models.apply, static_argnums=0, static_argnames="use_lora")


def run(model, input_ids, **kwargs):
    """The model's logits, compiled (op-by-op dispatch of a whole model is slow)."""
    graphdef, params = nnx.split(model, nnx.Param)
    return _apply(graphdef, params, input_ids, **kwargs)


def tokens(shape, seed=0, vocab=64):
    return jnp.asarray(np.random.RandomState(seed).randint(0, vocab, shape), jnp.int32)


@pytest.mark.parametrize("preset", FAMILIES)
def test_packed_sequences_equal_separate_runs(preset):
    model = random_model(preset)
    first, second = tokens((1, 5), seed=1), tokens((1, 7), seed=2)
    packed = jnp.concatenate([first, second, tokens((1, 4), seed=3)], axis=1)  # 4 padding tokens at the end
    segment_ids = jnp.asarray([[1] * 5 + [2] * 7 + [0] * 4])
    positions = jnp.asarray([list(range(5)) + list(range(7)) + list(range(4))])
    logits = run(model, packed, positions=positions, segment_ids=segment_ids)
    np.testing.assert_allclose(logits[:, :5], run(model, first), atol=1e-5)
    np.testing.assert_allclose(logits[:, 5:12], run(model, second), atol=1e-5)


@pytest.mark.parametrize("preset", ["tiny", "tiny-llama"])
def test_right_padding_leaves_real_tokens_unchanged(preset):
    model = random_model(preset)
    real = tokens((2, 6), seed=4)
    padded = jnp.concatenate([real, tokens((2, 3), seed=5)], axis=1)
    segment_ids = jnp.asarray([[1] * 6 + [0] * 3] * 2)
    np.testing.assert_allclose(run(model, padded, segment_ids=segment_ids)[:, :6], run(model, real), atol=1e-5)


def test_explicit_mask_shares_a_prompt_between_two_responses():
    """Prefix sharing: [prompt, response A, response B] in one row, B attending to the prompt but not A."""
    model = random_model("tiny-llama")
    prompt, response_a, response_b = tokens((1, 4), seed=6), tokens((1, 3), seed=7), tokens((1, 5), seed=8)
    row = jnp.concatenate([prompt, response_a, response_b], axis=1)
    positions = jnp.asarray([list(range(4)) + list(range(4, 7)) + list(range(4, 9))])
    causal = np.tril(np.ones((12, 12), bool))
    mask = causal.copy()
    mask[7:, 4:7] = False  # B does not see A
    logits = run(model, row, positions=positions, mask=jnp.asarray(mask[None]))
    np.testing.assert_allclose(logits[:, 7:], run(model, jnp.concatenate([prompt, response_b], axis=1))[:, 4:],
                               atol=1e-5)
    np.testing.assert_allclose(logits[:, :7], run(model, jnp.concatenate([prompt, response_a], axis=1)), atol=1e-5)


def test_sliding_window_sees_only_the_last_window_positions():
    """With one layer, the last token's logits depend only on the last `window` tokens (at their positions)."""
    window, length = 4, 11
    model = random_model("tiny-mistral", num_layers=1, sliding_window=window)
    sequence = tokens((1, length), seed=9)
    positions = jnp.arange(length - window, length)[None]
    tail = run(model, sequence[:, -window:], positions=positions)
    np.testing.assert_allclose(run(model, sequence)[:, -1], tail[:, -1], atol=1e-5)
    full_attention = random_model("tiny-mistral", num_layers=1, sliding_window=0)
    assert not np.allclose(run(full_attention, sequence)[:, -1],
                           run(full_attention, sequence[:, -window:], positions=positions)[:, -1], atol=1e-3)


def test_remat_gives_the_same_logits():
    model = random_model("tiny-llama")
    remat_model = random_model("tiny-llama", remat=True)  # the same seed: the same parameters
    x = tokens((2, 9), seed=10)
    np.testing.assert_allclose(run(remat_model, x), run(model, x), atol=1e-6)


@pytest.mark.parametrize("preset", ["tiny", "tiny-gptj"])  # tied unembedding; an output layer with a bias
def test_token_logps_of_scored_tokens_equal_the_full_logits_path(preset):
    """`apply_token_logps` with `logits_chunk_size` (logits of the scored tokens only) against the
    full logits: the values, 0 where the mask scores nothing, and the parameter gradients."""
    model = random_model(preset)
    graphdef, params = nnx.split(model, nnx.Param)
    chunked_graphdef = nnx.split(random_model(preset, logits_chunk_size=4), nnx.Param)[0]
    input_ids = tokens((3, 13), seed=11)
    loss_mask = jnp.asarray(np.random.RandomState(12).rand(3, 13) < 0.5, jnp.int32).at[2].set(0)
    log_probs = jax.nn.log_softmax(np.asarray(run(model, input_ids), np.float64)[:, :-1], axis=-1)
    expected = np.where(loss_mask[:, 1:] > 0,
                        np.take_along_axis(log_probs, np.asarray(input_ids)[:, 1:, None], -1)[..., 0], 0.0)
    weights = jnp.asarray(np.random.RandomState(13).randn(3, 12), jnp.float32)
    results = {}
    for name, definition in (("full", graphdef), ("chunked", chunked_graphdef)):
        fn = lambda p, definition=definition: models.apply_token_logps(definition, p, input_ids, loss_mask)
        np.testing.assert_allclose(jax.jit(fn)(params), expected, atol=1e-5, err_msg=name)
        results[name] = jax.jit(jax.grad(lambda p, fn=fn: jnp.sum(weights * fn(p))))(params)
    for full, chunked in zip(jax.tree.leaves(results["full"]), jax.tree.leaves(results["chunked"])):
        np.testing.assert_allclose(chunked, full, atol=1e-5)


def _assert_same_logits_and_gradients(model, other):
    x = tokens((2, 11), seed=14)
    np.testing.assert_allclose(run(model, x), run(other, x), atol=1e-5)
    weights = jnp.asarray(np.random.RandomState(15).randn(2, 11, 64), jnp.float32)
    grads = [jax.jit(jax.grad(lambda p, g=graphdef: jnp.sum(weights * models.apply(g, p, x))))(params)
             for graphdef, params in (nnx.split(m, nnx.Param) for m in (model, other))]
    # float32 sums in another order: errors relative to the largest gradient entry (the key bias's
    # gradient is 0 in exact arithmetic, round-off in float32)
    scale = max(float(np.abs(b).max()) for b in jax.tree.leaves(grads[1]))
    for a, b in zip(jax.tree.leaves(grads[0]), jax.tree.leaves(grads[1]), strict=True):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6 * scale)


@pytest.mark.parametrize("preset", ["tiny", "tiny-llama", "tiny-gemma"])  # biases; grouped kv heads; one kv head
def test_fused_qkv_gives_the_unfused_logits_and_gradients(preset):
    """One matmul for q, k and v computes the three projections' numbers, forward and backward."""
    fused, unfused = (random_model(preset, fused_qkv=flag) for flag in (True, False))  # the same parameters
    assert all(block.attention.fusable() for block in fused.blocks)
    assert not any(block.attention.fusable() for block in unfused.blocks)
    _assert_same_logits_and_gradients(fused, unfused)


@pytest.mark.parametrize("preset, overrides", [("tiny-llama", {}), ("tiny-gemma", {}),  # silu; gelu
                                               ("tiny-llama", {"mlp_bias": True})])
def test_fused_gate_up_gives_the_unfused_logits_and_gradients(preset, overrides):
    """One matmul for a gated MLP's gate and up computes the two projections' numbers, forward and backward."""
    fused, unfused = (random_model(preset, fused_gate_up=flag, **overrides) for flag in (True, False))
    assert all(block.mlp.fusable() for block in fused.blocks)
    assert not any(block.mlp.fusable() for block in unfused.blocks)
    assert (fused.blocks[0].mlp.up.bias is not None) == bool(overrides)
    _assert_same_logits_and_gradients(fused, unfused)


def test_fused_gate_up_needs_a_gated_mlp():
    assert not random_model("tiny", fused_gate_up=True).blocks[0].mlp.fusable()


@pytest.mark.parametrize("overrides", [{}, {"attention_bias": True}])  # GPT-J: biases on the MLP's input only; on all
def test_fused_parallel_inputs_give_the_unfused_logits_and_gradients(overrides):
    """GPT-J's block, one norm for attention and the MLP: q, k, v and the MLP's input as one matmul."""
    fused, unfused = (random_model("tiny-gptj", fused_parallel_inputs=flag, **overrides) for flag in (True, False))
    assert all(block.fuses_inputs() for block in fused.blocks)
    assert not any(block.fuses_inputs() for block in unfused.blocks)
    block = fused.blocks[0]
    assert block.mlp.up.bias is not None and (block.attention.query.bias is not None) == bool(overrides)
    _assert_same_logits_and_gradients(fused, unfused)


def test_fused_parallel_inputs_need_one_norm_and_fused_qkv():
    assert not random_model("tiny-gpt_neox", fused_parallel_inputs=True).blocks[0].fuses_inputs()  # two norms
    assert not random_model("tiny-gptj", fused_parallel_inputs=True, fused_qkv=False).blocks[0].fuses_inputs()


def test_fused_projections_step_aside_for_lora_adapters_on_them():
    model = random_model("tiny-llama", fused_qkv=True, fused_gate_up=True,
                         lora=dict(rank=2, alpha=4.0, targets=("query", "value", "up")))
    assert not model.blocks[0].attention.fusable()
    assert not model.blocks[0].mlp.fusable()
    base = nnx.view(model, use_lora=False)  # adapters off: nothing stands in the way
    assert base.blocks[0].attention.fusable()
    assert base.blocks[0].mlp.fusable()
    gptj = random_model("tiny-gptj", fused_parallel_inputs=True, lora=dict(rank=2, alpha=4.0, targets=("up",)))
    assert not gptj.blocks[0].fuses_inputs() and nnx.view(gptj, use_lora=False).blocks[0].fuses_inputs()


def test_parameters_carry_the_logical_axis_names():
    _, abstract_params, specs = models.abstract_model(configs.model_config("tiny-llama", lora=dict(
        rank=4, alpha=8.0, targets=("query", "down"))))
    names = {name for spec in jax.tree.leaves(specs, is_leaf=lambda s: isinstance(s, jax.sharding.PartitionSpec))
             for name in spec}
    assert names <= {"vocab", "embed", "heads", "kv_heads", "mlp", None}
    attention = specs["blocks"][0]["attention"]
    assert tuple(attention["query"]["kernel"]) == ("embed", "heads")
    assert tuple(attention["key"]["kernel"]) == ("embed", "kv_heads")
    assert tuple(attention["query"]["lora_a"]) == ("embed", None)
    assert tuple(specs["blocks"][0]["mlp"]["down"]["lora_b"]) == (None, "embed")
    assert tuple(specs["token_embedding"]["embedding"]) == ("vocab", "embed")
    assert "lora_a" not in attention["key"]  # not a target
    assert abstract_params["blocks"][0]["attention"]["key"]["kernel"].shape == (64, 2 * 16)  # grouped-query


@pytest.mark.parametrize("overrides, culprit", [
    (dict(activation="swishy"), "model.activation"),
    (dict(num_kv_heads=3), "model.num_kv_heads"),
    (dict(rope_scaling="yarn"), "model.rope_scaling"),
    (dict(shared_block_norm=True), "model.shared_block_norm"),
    (dict(lora=dict(rank=2, alpha=1.0, targets=("q_proj",))), "model.lora.targets"),
])
def test_bad_config_names_the_field(overrides, culprit):
    with pytest.raises(ValueError, match=culprit.replace(".", r"\.")):
        models.decoder_config(configs.model_config("tiny", **overrides))


@pytest.mark.parametrize("preset, published", [
    ("gpt2", 124_439_808),            # GPT2LMHeadModel, tied
    ("pythia-2.8b", 2_775_208_960),
    ("llama-3.1-8b", 8_030_261_248),
    ("mistral-7b-v0.1", 7_241_732_096),
    ("qwen2.5-0.5b", 494_032_768),
    ("gemma-2b", 2_506_172_416),
])
def test_presets_have_the_published_parameter_counts(preset, published):
    _, abstract_params, _ = models.abstract_model(configs.model_config(preset))
    assert sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(abstract_params)) == published

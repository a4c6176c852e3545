"""The fused segment-attention kernels, run in Pallas interpret mode on CPU, against the dense masked reference.

Tolerances: `_assert_close` bounds |kernel - dense| by tol * (|dense| + max |dense|), elementwise, with
tol 1e-5 in float32 (the kernels and XLA sum in a different order) and 2e-2 in bfloat16 (a few bf16
roundings of the largest value: both cast probabilities to bf16 before the value matmul, at
different points of an online softmax).
"""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from dpo_jax import models, steps
from dpo_jax.data import layouts
from dpo_jax.models import kernels, transformer

TOLERANCES = {"float32": 1e-5, "bfloat16": 2e-2}
FUSED = ("splash", "pallas_gpu")


def _packed_segment_ids(length):
    """Two rows of `length` slots: row 0 packs three sequences, the second crossing slot 128 (a block
    boundary), then padding; row 1 packs a short sequence and a long one filling the row (no padding)."""
    segment_ids = np.zeros((2, length), np.int32)
    segment_ids[0, :length * 2 // 5] = 1
    segment_ids[0, length * 2 // 5:length * 4 // 5] = 2
    segment_ids[0, length * 4 // 5:length * 15 // 16] = 3
    segment_ids[1, :length // 8] = 1
    segment_ids[1, length // 8:] = 2
    return jnp.asarray(segment_ids)


def _inputs(length, num_heads, num_kv_heads, head_dim, dtype):
    rng = np.random.default_rng(0)
    q_shape, kv_shape = (2, length, num_heads, head_dim), (2, length, num_kv_heads, head_dim)
    query, key, value, out_grad = (jnp.asarray(rng.standard_normal(shape, np.float32), dtype)
                                   for shape in (q_shape, kv_shape, kv_shape, q_shape))
    return query, key, value, _packed_segment_ids(length), out_grad


@functools.partial(jax.jit, static_argnames=("implementation", "block_size", "interpret"))
def _forward_and_grads(query, key, value, segment_ids, out_grad, branch_ids=None, *, implementation, block_size=128,
                       interpret=True):
    """(output, (query, key, value) gradients of <output, out_grad>): one compile for both; with
    `branch_ids`, of `prefix_shared_attention`."""
    options = dict(implementation=implementation, block_size=block_size, interpret=interpret)
    if branch_ids is None:
        attend = functools.partial(kernels.segment_attention, segment_ids=segment_ids, **options)
    else:
        attend = functools.partial(kernels.prefix_shared_attention, segment_ids=segment_ids, branch_ids=branch_ids,
                                   **options)
    out, vjp = jax.vjp(attend, query, key, value)
    return out, vjp(out_grad)


def _assert_close(actual, expected, tol, name):
    actual, expected = np.asarray(actual, np.float32), np.asarray(expected, np.float32)
    assert np.isfinite(actual).all(), f"{name}: not finite"
    scale = np.abs(expected).max()
    np.testing.assert_allclose(actual, expected, rtol=tol, atol=tol * scale, err_msg=name)


def _check_against_dense(implementation, length, num_heads, num_kv_heads, head_dim, dtype, block_size=128,
                         interpret=True, branch_ids=None, segment_ids=None):
    query, key, value, packed_ids, out_grad = _inputs(length, num_heads, num_kv_heads, head_dim, dtype)
    segment_ids = packed_ids if segment_ids is None else segment_ids
    out, grads = _forward_and_grads(query, key, value, segment_ids, out_grad, branch_ids,
                                    implementation=implementation, block_size=block_size, interpret=interpret)
    dense_out, dense_grads = _forward_and_grads(query, key, value, segment_ids, out_grad, branch_ids,
                                                implementation="dense")
    assert out.shape == query.shape and out.dtype == query.dtype
    assert [g.dtype for g in grads] == [query.dtype] * 3
    tol = TOLERANCES[jnp.dtype(dtype).name]
    _assert_close(out, dense_out, tol, "output")
    for name, grad, dense_grad in zip(("query", "key", "value"), grads, dense_grads):
        _assert_close(grad, dense_grad, tol, f"{name} gradient")
    # Padding outputs 0 and takes no gradient; query padding only ever sees key padding.
    padding = np.asarray(segment_ids == 0)
    assert padding.any()
    for x in (out,) + tuple(grads):
        assert not np.asarray(x, np.float32)[padding].any()


@pytest.mark.parametrize("implementation", FUSED)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_fused_matches_dense_on_packed_rows(implementation, dtype):
    """Two blocks of 128 per row; grouped-query attention, 4 query heads over 2 kv heads."""
    _check_against_dense(implementation, length=256, num_heads=4, num_kv_heads=2, head_dim=64, dtype=dtype)


@pytest.mark.parametrize("implementation", FUSED)
def test_fused_pads_time_and_head_dim(implementation):
    """A row of 200 slots (padded to whole blocks inside), head_dim 48 (neither 128 lanes nor a power of two),
    one kv head for 2 query heads, blocks of 128 in a row of 200 (the GPU kernel: blocks of 64, 4 per row)."""
    block_size = {"splash": 128, "pallas_gpu": 64}[implementation]
    _check_against_dense(implementation, length=200, num_heads=2, num_kv_heads=1, head_dim=48, dtype="float32",
                         block_size=block_size)


@pytest.mark.parametrize("implementation", FUSED)
def test_fused_on_rows_shorter_than_a_block(implementation):
    _check_against_dense(implementation, length=40, num_heads=2, num_kv_heads=2, head_dim=32, dtype="float32")


def _prefix_shared_rows(length):
    """Segment and branch ids of two packed prefix-shared rows of `length` slots, as the data layout
    builds them: row 0 holds a long pair whose branches cross slot 128 and a short one, then
    padding; row 1 a pair with a one-token prompt (nothing to copy) and one filling the row."""
    rng = np.random.default_rng(1)

    def pair(prompt, chosen, rejected):
        return {side: rng.integers(3, 50, n).tolist() for side, n in
                (("prompt", prompt), ("chosen", chosen), ("rejected", rejected))}

    # Sizes: prompt + 1 + chosen + rejected each; row 0: 149 + 25, row 1: 30 + (length - 30).
    rows = [[pair(60, 50, 38), pair(9, 8, 7)], [pair(1, 16, 12), pair(20, 90, length - 30 - 111)]]
    arrays = [layouts.packed_pairs(pairs, row_length=length, max_pairs_per_row=2, share_prompt=True)
              for pairs in rows]
    assert all(len(a["segment_ids"]) == 1 for a in arrays)
    return (jnp.asarray(np.concatenate([a[key] for a in arrays])) for key in ("segment_ids", "branch_ids"))


@pytest.mark.parametrize("implementation", FUSED)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_fused_matches_dense_on_prefix_shared_rows(implementation, dtype):
    """The rejected response sees its prompt and itself, never the chosen one: values and gradients
    (the prompt's key and value gradients summed over its copy) equal the dense masked reference."""
    segment_ids, branch_ids = _prefix_shared_rows(200)
    assert np.asarray(segment_ids[1]).all()  # a full row: the kernel's row of 400 has no slot to spare
    _check_against_dense(implementation, length=200, num_heads=4, num_kv_heads=2, head_dim=32, dtype=dtype,
                         segment_ids=segment_ids, branch_ids=branch_ids)


def test_the_prompt_is_copied_in_front_of_the_rejected_branch():
    """Row: prompt [a b], chosen [c d], rejected [e], padding; the kernel's row is
    a b c d | a b e | pad | unused, segments 2 (prompt, chosen) and 3 (the copy, rejected)."""
    segment_ids = jnp.asarray([1, 1, 1, 1, 1, 0])
    branch_ids = jnp.asarray([0, 0, 1, 1, 2, 0])
    source, kernel_segment_ids, destination = kernels._with_prompt_copies(segment_ids, branch_ids)
    np.testing.assert_array_equal(destination, [0, 1, 2, 3, 6, 7])
    np.testing.assert_array_equal(source[:8], [0, 1, 2, 3, 0, 1, 4, 5])
    np.testing.assert_array_equal(kernel_segment_ids, [2, 2, 2, 2, 3, 3, 3, 0, 0, 0, 0, 0])
    assert kernels.attention_length(6, prefix_shared=True) == len(source)
    assert (kernels.PROMPT_BRANCH, kernels.REJECTED_BRANCH) == (layouts.PROMPT_BRANCH, layouts.REJECTED_BRANCH)


def test_dense_prefix_shared_is_the_decoder_mask():
    segment_ids, branch_ids = _prefix_shared_rows(200)
    query, key, value, _, _ = _inputs(200, 2, 2, 16, "float32")
    index = jnp.arange(200)
    mask = transformer.attention_mask(segment_ids, segment_ids, index, index) & transformer.branch_mask(branch_ids)[
        :, None]
    expected = jax.nn.dot_product_attention(query, key, value, mask=mask)
    out = kernels.prefix_shared_attention(query, key, value, segment_ids, branch_ids, implementation="dense")
    real = np.asarray(segment_ids != 0)
    np.testing.assert_allclose(np.asarray(out)[real], np.asarray(expected)[real], rtol=1e-6, atol=1e-6)


def test_splash_under_the_tpu_interpreter():
    """The TPU-faithful interpreter (`pltpu.InterpretParams`: TPU memory spaces, DMAs and semaphores)."""
    _check_against_dense("splash", length=256, num_heads=2, num_kv_heads=1, head_dim=32, dtype="float32",
                         interpret=pltpu.InterpretParams())


@pytest.mark.parametrize("implementation", FUSED)
def test_fused_runs_a_pallas_kernel(implementation):
    query, key, value, segment_ids, _ = _inputs(128, 2, 2, 32, "float32")
    jaxpr = jax.make_jaxpr(functools.partial(kernels.segment_attention, implementation=implementation,
                                             interpret=True))(query, key, value, segment_ids)
    assert "pallas_call" in str(jaxpr)


def test_dense_is_the_decoder_mask_attention():
    """The reference is the decoder's mask path (`transformer.attention_mask`) at every real token."""
    query, key, value, segment_ids, _ = _inputs(64, 4, 2, 16, "float32")
    index = jnp.arange(64)
    mask = transformer.attention_mask(segment_ids, segment_ids, index, index)
    expected = jax.nn.dot_product_attention(query, key, value, mask=mask)
    out = kernels.segment_attention(query, key, value, segment_ids, implementation="dense")
    real = np.asarray(segment_ids != 0)
    np.testing.assert_allclose(np.asarray(out)[real], np.asarray(expected)[real], rtol=1e-6, atol=1e-6)
    assert not np.asarray(out)[~real].any()


def test_default_implementation_by_backend():
    assert [kernels.default_implementation(b) for b in ("tpu", "gpu", "cpu")] == ["splash", "pallas_gpu", "dense"]
    assert kernels.default_implementation() == "dense"  # the tests run on CPU


@pytest.mark.parametrize("implementation, block_size, message", [
    ("splash", 64, "multiple of 128"),
    ("pallas_gpu", 96, "power of two"),
    ("flash", 128, "is not one of"),
])
def test_bad_arguments(implementation, block_size, message):
    query, key, value, segment_ids, _ = _inputs(128, 2, 2, 16, "float32")
    with pytest.raises(ValueError, match=message):
        kernels.segment_attention(query, key, value, segment_ids, implementation=implementation,
                                  block_size=block_size, interpret=True)
    with pytest.raises(ValueError, match="must divide"):
        kernels.segment_attention(query, key[:, :, :1].repeat(3, axis=2), value[:, :, :1].repeat(3, axis=2),
                                  segment_ids, implementation="dense")


# ---------------------------------------------------------------------------------------------
# The decoder's fused path: a DPO loss and its parameter gradients in every layout
# ---------------------------------------------------------------------------------------------

def _decoder_pairs(num_pairs, seed, max_length):
    rng = np.random.default_rng(seed)
    pairs = []
    for _ in range(num_pairs):
        prompt = [1] + rng.integers(3, 64, size=rng.integers(0, max_length // 2)).tolist()
        chosen, rejected = ([*rng.integers(3, 64, size=rng.integers(0, max_length - len(prompt))).tolist(), 2]
                            for _ in range(2))
        pairs.append(dict(prompt=prompt, chosen=chosen, rejected=rejected))
    return pairs


def _loss_and_grads(model_config, dpo_config, arrays, kernel):
    graphdef = models.abstract_model({**model_config, "attention_kernel": kernel})[0]
    params = models.init_params(model_config, seed=1, shardings=None)
    reference_params = jax.tree.map(lambda p: p * 1.05, params)  # so that the rewards are not all 0
    loss_fn = functools.partial(steps.dpo_loss, graphdef=graphdef, dpo_config=dpo_config)
    value_and_grad = jax.jit(jax.value_and_grad(lambda p, batch: loss_fn(p, reference_params, batch, None)[0]))
    return value_and_grad(params, jax.tree.map(np.asarray, arrays))


@pytest.fixture(scope="module")
def decoder_setup():
    from conftest import run_config  # pylint: disable=import-outside-toplevel
    config = run_config("quickstart", "runlocal")
    # Rotary positions (which restart per sequence), grouped-query heads, two layers.
    config.model.update(position_embedding="rope", num_heads=4, num_kv_heads=2, num_layers=2,
                        max_position_embeddings=256)
    pairs = _decoder_pairs(8, seed=0, max_length=80)
    arrays = {layout: layouts.pair_arrays(pairs, layout, max_length=80, row_length=160, max_pairs_per_row=4)
              for layout in layouts.LAYOUTS}
    dense = {layout: _loss_and_grads(config.model, config.dpo, arrays[layout], "dense") for layout in layouts.LAYOUTS}
    return config, arrays, dense


@pytest.mark.parametrize("implementation", FUSED)
@pytest.mark.parametrize("layout", layouts.LAYOUTS)
def test_the_decoder_on_a_fused_kernel_gives_the_dense_loss_and_gradients(decoder_setup, implementation, layout):
    """Rows of up to 160 tokens (packed rows cross the kernels' 128-token block), float32: the
    loss within 1e-5 and every parameter gradient within 1e-4 of its largest entry (two layers of
    float32 attention summed in another order)."""
    config, arrays, dense = decoder_setup
    assert max(len(v) for k, v in arrays[layout].items() if k.endswith("input_ids")) > 0
    loss, grads = _loss_and_grads(config.model, config.dpo, arrays[layout], implementation)
    dense_loss, dense_grads = dense[layout]
    np.testing.assert_allclose(float(loss), float(dense_loss), rtol=1e-5)
    assert np.isfinite(float(loss)) and float(jnp.abs(jnp.asarray(dense_loss) - np.log(2))) > 1e-4  # not all ties
    for path, grad in jax.tree_util.tree_leaves_with_path(grads):
        dense_grad = functools.reduce(lambda tree, key: tree[key.key], path, dense_grads)
        _assert_close(grad, dense_grad, 1e-4, jax.tree_util.keystr(path))


def test_the_decoder_takes_the_fused_path_only_where_it_applies(decoder_setup):
    config, arrays, _ = decoder_setup
    batch = jax.tree.map(np.asarray, arrays["packed_prefix_shared"])

    def jaxpr_of(**overrides):
        model_config = {**config.model, **overrides}
        graphdef = models.abstract_model(model_config)[0]
        params = models.init_params(model_config, seed=1, shardings=None)
        return str(jax.make_jaxpr(lambda p: steps.dpo_loss(p, p, batch, None, graphdef=graphdef,
                                                            dpo_config=config.dpo)[0])(params))

    assert "pallas_call" in jaxpr_of(attention_kernel="splash")
    assert "pallas_call" not in jaxpr_of(attention_kernel="dense")
    assert "pallas_call" not in jaxpr_of(attention_kernel="auto")  # CPU: the dense path
    assert transformer.DecoderConfig.from_config({**config.model, "attention_kernel": "auto",
                                                  "sliding_window": 8}).fused_attention is None
    with pytest.raises(ValueError, match="takes no sliding window"):
        transformer.DecoderConfig.from_config({**config.model, "attention_kernel": "splash", "sliding_window": 8})
    with pytest.raises(ValueError, match="attention_kernel='flash' is not one of"):
        transformer.DecoderConfig.from_config({**config.model, "attention_kernel": "flash"})


@pytest.mark.parametrize("implementation, block", [(name, "gated") for name in FUSED] + [(FUSED[0], "parallel")])
def test_the_fused_path_splits_over_a_mesh(implementation, block):
    """8 devices: rows over data x fsdp and heads over tensor (2 kv heads, 4 query heads), then rows
    only, then with no mesh in context; the loss and gradients equal one device's dense path with
    unfused projections (float32, within 1e-4)."""
    from conftest import host_devices, run_python  # pylint: disable=import-outside-toplevel
    result = run_python(["tests/attention_multidevice.py", implementation, block],
                        env={**host_devices(8), "PYTHONPATH": "tests"})
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert set(report["meshes"]) == {"rows_and_heads", "rows", "no_mesh_in_context"}
    for name, mesh in report["meshes"].items():
        # A pallas_call inside a shard_map, unless no mesh says how to split it.
        assert mesh["devices"] == 8 and mesh["kernel_per_device"] == (name != "no_mesh_in_context"), name
        np.testing.assert_allclose(mesh["loss"], report["expected_loss"], rtol=1e-5, err_msg=name)
        assert mesh["max_gradient_error"] < 1e-4, (name, mesh)

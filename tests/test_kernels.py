"""The fused segment-attention kernels, run in Pallas interpret mode on CPU, against the dense masked reference.

Tolerances: `_assert_close` bounds |kernel - dense| by tol * (|dense| + max |dense|), elementwise, with
tol 1e-5 in float32 (the kernels and XLA sum in a different order) and 2e-2 in bfloat16 (a few bf16
roundings of the largest value: both cast probabilities to bf16 before the value matmul, at
different points of an online softmax).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

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
def _forward_and_grads(query, key, value, segment_ids, out_grad, *, implementation, block_size=128, interpret=True):
    """(output, (query, key, value) gradients of <output, out_grad>): one compile for both."""
    attend = functools.partial(kernels.segment_attention, segment_ids=segment_ids, implementation=implementation,
                               block_size=block_size, interpret=interpret)
    out, vjp = jax.vjp(attend, query, key, value)
    return out, vjp(out_grad)


def _assert_close(actual, expected, tol, name):
    actual, expected = np.asarray(actual, np.float32), np.asarray(expected, np.float32)
    assert np.isfinite(actual).all(), f"{name}: not finite"
    scale = np.abs(expected).max()
    np.testing.assert_allclose(actual, expected, rtol=tol, atol=tol * scale, err_msg=name)


def _check_against_dense(implementation, length, num_heads, num_kv_heads, head_dim, dtype, block_size=128,
                         interpret=True):
    query, key, value, segment_ids, out_grad = _inputs(length, num_heads, num_kv_heads, head_dim, dtype)
    out, grads = _forward_and_grads(query, key, value, segment_ids, out_grad, implementation=implementation,
                                    block_size=block_size, interpret=interpret)
    dense_out, dense_grads = _forward_and_grads(query, key, value, segment_ids, out_grad, implementation="dense")
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

"""LoRA adapters in a params tree: which leaves the optimizer trains, and merging adapters for export.

Adapters live next to the kernel they adapt (`.../query/lora_a`, `.../query/lora_b`), so the optimizer
sees them as ordinary parameters; the reference model of LoRA-DPO is the same tree applied with
`use_lora=False` (see `dpo_jax.models.apply`).
"""

import jax
import jax.numpy as jnp

ADAPTER_KEYS = ("lora_a", "lora_b")


def _is_adapter(path):
    return getattr(path[-1], "key", None) in ADAPTER_KEYS


def has_adapters(params):
    return any(_is_adapter(path) for path, _ in jax.tree_util.tree_leaves_with_path(params))


def trainable_mask(params):
    """Bools shaped like `params`: True where the optimizer updates (only the adapters when there are any)."""
    adapters_only = has_adapters(params)
    return jax.tree_util.tree_map_with_path(lambda path, _: _is_adapter(path) or not adapters_only, params)


def adapters(tree):
    """The adapter leaves of a nested dict (params, shardings, ...), in the same nesting."""
    result = {}
    for key, value in tree.items():
        if key in ADAPTER_KEYS:
            result[key] = value
        elif isinstance(value, dict) and (nested := adapters(value)):
            result[key] = nested
    return result


def merge_adapters(params, scale):
    """`params` without adapters, each adapted kernel replaced by kernel + scale * lora_a @ lora_b.

    The sum is taken in float32 and stored in the kernel's dtype; `scale` is lora_alpha / lora_rank.
    """
    if not isinstance(params, dict):
        return params
    merged = {key: merge_adapters(value, scale) for key, value in params.items() if key not in ADAPTER_KEYS}
    if "lora_a" in params:
        kernel = merged["kernel"]
        delta = scale * (params["lora_a"].astype(jnp.float32) @ params["lora_b"].astype(jnp.float32))
        merged["kernel"] = (kernel.astype(jnp.float32) + delta).astype(kernel.dtype)
    return merged

"""Configs inside the package, so that a plain `pip install` runs any config file.

    from dpo_jax.configs import base_config, model_config, parse_arg, paper

`schema` holds the config tree (`base_config`), `presets` the model presets, `paper` the DPO
paper's shared settings, `args` the `key=value,...` parser of config args and `load_config`,
`validation` the checks that run before anything compiles.
"""

from dpo_jax.configs import paper
from dpo_jax.configs.args import load_config, parse_arg
from dpo_jax.configs.presets import MODEL_PRESETS, model_config
from dpo_jax.configs.schema import LIST_KEYS, base_config, bench_config

__all__ = ["LIST_KEYS", "MODEL_PRESETS", "base_config", "bench_config", "load_config", "model_config", "paper",
           "parse_arg"]

"""Config files as arguments: the `path.py[:arg]` spec of `--config`, and the `key=value,...` arg parser."""

import importlib.util
import os

import ml_collections


def parse_arg(arg, **defaults):
    """Parses a config arg such as `runlocal,variant=B` into a ConfigDict over `defaults`.

    A bare word sets a boolean default to True. Values are converted to the type of their default.
    """
    result = ml_collections.ConfigDict(defaults)
    for item in filter(None, (arg or "").split(",")):
        key, sep, value = item.partition("=")
        if key not in defaults:
            raise ValueError(f"Unknown config arg {key!r}; known: {sorted(defaults)}")
        if not sep:
            result[key] = True
        elif isinstance(defaults[key], bool):
            result[key] = value.lower() in ("1", "true", "yes")
        else:
            result[key] = type(defaults[key])(value) if defaults[key] is not None else value
    return result


def load_config(spec):
    """The config of `path/to/config.py[:arg]`, as `--config` reads it: `get_config(arg)` of that file.

    For code and tests that take a run config without absl flags. The file is loaded by its path, so
    it needs no package of its own.
    """
    path, _, arg = spec.partition(":")
    if not os.path.isfile(path):
        raise ValueError(f"config file {path!r} does not exist")
    module_spec = importlib.util.spec_from_file_location(f"_dpo_jax_config_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ValueError(f"config file {path!r} defines no get_config(arg)")
    config = module.get_config(arg or None)
    if not isinstance(config, ml_collections.ConfigDict):
        raise ValueError(f"config file {path!r}: get_config returned a {type(config).__name__}, not a ConfigDict")
    return config

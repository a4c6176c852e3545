"""Config files as arguments: the `path.py[:arg]` spec of `--config`, and the `key=value,...` arg parser."""

import importlib.util
import os
import traceback

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

    For code and tests that take a run config without absl flags, and for the command lines' one-line
    error when `--config` fails (`dpo_jax.commands`). The file is loaded by its path, so it needs no
    package of its own. Any failure is a ValueError naming the file (and its line, if it raised).
    """
    path, *arg = spec.split(":", 1)  # as config_flags: `path.py` calls get_config(), `path.py:x` get_config("x")
    if not os.path.isfile(path):
        raise ValueError(f"{path}: no such config file" if not os.path.isdir(path) else
                         f"{path}: a directory, not a config file")
    module_spec = importlib.util.spec_from_file_location(f"_dpo_jax_config_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except SyntaxError as error:
        if error.filename and os.path.abspath(error.filename) == os.path.abspath(path):
            raise ValueError(f"{path}:{error.lineno}: the config file does not parse ({error.msg})") from error
        raise ValueError(f"{path}: loading the config file raised {_describe(error)}") from error
    except Exception as error:  # pylint: disable=broad-except  # whatever the file raises is the file's
        raise ValueError(f"{_raised_at(path, error)}: loading the config file raised {_describe(error)}") from error
    if not hasattr(module, "get_config"):
        raise ValueError(f"{path}: defines no get_config(arg)")
    try:
        config = module.get_config(*arg)
    except Exception as error:  # pylint: disable=broad-except
        call = f"get_config({', '.join(map(repr, arg))})"
        raise ValueError(f"{_raised_at(path, error)}: {call} raised {_describe(error)}") from error
    if not isinstance(config, ml_collections.ConfigDict):
        raise ValueError(f"{path}: get_config returned a {type(config).__name__}, not a ConfigDict")
    return config


def _raised_at(path, error):
    """`path:line` of the last line of file `path` in the traceback of `error` (`path` if none)."""
    lines = [frame.lineno for frame in traceback.extract_tb(error.__traceback__)
             if os.path.abspath(frame.filename) == os.path.abspath(path)]
    return f"{path}:{lines[-1]}" if lines else path


def _describe(error):
    """`Type: message` of an exception, on one line."""
    message = " ".join(str(error).split())
    return f"{type(error).__name__}: {message}" if message else type(error).__name__

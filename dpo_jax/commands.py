"""What every command line of the project shares: absl's `app.run`, with `--help` an answer and a bad
command line one line `Error: <culprit>: <reason>` on stderr.

A flag that does not parse (a bad value, a missing required flag, an unknown flag or config key, a
config file that is missing, does not parse, raises or returns no ConfigDict) exits with code 1, as
every other error of the command lines does (absl's own parse failure is code 1 too), without absl's
FATAL message or the chained tracebacks of ml_collections' config flags.
"""

import difflib
import re
import sys

import ml_collections
from absl import app, flags
from ml_collections.config_flags import config_flags

from dpo_jax.configs import args, validation


def run(main, module_name):
    """Runs `main` under absl with the flags of module `module_name`.

    `--help` prints them and exits 0 (absl exits 1, as for a usage error). absl's help lists the
    flags of the module that sys.argv[0] names, which for a console script is its launcher, so the
    module's flags are registered for it too.
    """
    for flag in flags.FLAGS.get_key_flags_for_module(module_name):
        flags.FLAGS.register_key_flag_for_module(sys.argv[0], flag)
    if {"-h", "--help", "--helpshort"} & set(sys.argv[1:]):
        app.usage(shorthelp=True, writeto_stdout=True, exitcode=0)
    app.run(main, flags_parser=parse_flags)


def parse_flags(argv):
    """absl's flag parsing (the `flags_parser` of `app.run`): a failure exits with one line `Error: ...`."""
    try:
        remaining = flags.FLAGS(argv)
    except Exception as error:  # pylint: disable=broad-except  # whatever parsing raises, the command line caused
        sys.exit(f"Error: {_parse_error(error, argv)}")
    for flag in _config_file_flags():
        # config_flags defers a config file that failed to load to the config's first use; a file whose
        # get_config returned no ConfigDict is not a config either.
        if (flag.present or flag.value is not None) and not isinstance(flag.value, ml_collections.ConfigDict):
            sys.exit(f"Error: {_config_file_error(flag, argv)}")
    return remaining


def _config_file_flags():
    """The `DEFINE_config_file` flags."""
    return [flags.FLAGS[name] for name in flags.FLAGS
            if isinstance(flags.FLAGS[name].parser, config_flags.ConfigFileFlagParser)]


def _one_line(error):
    """The message of `error` on one line, without a traceback it may embed."""
    lines = []
    for line in str(error).splitlines():
        if line.strip().startswith("Traceback"):
            break
        lines.append(line.strip())
    return " ".join(line for line in lines if line) or type(error).__name__


def _flag_being_parsed(error):
    """The flag whose parsing raised `error`: the innermost frame of the traceback that is a Flag's method."""
    flag = None
    traceback = error.__traceback__
    while traceback is not None:
        candidate = traceback.tb_frame.f_locals.get("self")
        if isinstance(candidate, flags.Flag):
            flag = candidate
        traceback = traceback.tb_next
    return flag


def _parse_error(error, argv):
    """`<culprit>: <reason>` of a failure of `flags.FLAGS(argv)`."""
    flag = _flag_being_parsed(error)
    if flag is not None and isinstance(flag.parser, config_flags.ConfigFileFlagParser):
        return _config_file_error(flag, argv, error)
    if isinstance(error, flags.UnrecognizedFlagError):
        close = difflib.get_close_matches(error.flagname, list(flags.FLAGS), n=1)
        return f"--{error.flagname}: unknown flag" + (f" (did you mean --{close[0]}?)" if close else "")
    message = _one_line(error)
    required = re.search(r"Flag --(\S+) must have a value other than None", message)
    if required:
        return f"--{required.group(1)}: required"
    if message.startswith("flag --"):  # absl's "flag --name=value: reason"
        return message[len("flag "):]
    return f"--{flag.name}: {message}" if flag is not None else message


def _flag_argument(argv, name):
    """The value given to `--name` in `argv` (`--name=value` or `--name value`), else None."""
    for index, arg in enumerate(argv):
        if re.match(rf"^--?{re.escape(name)}=", arg):
            return arg.split("=", 1)[1]
        if arg in (f"--{name}", f"-{name}") and index + 1 < len(argv):
            return argv[index + 1]
    return None


def _overridden_keys(argv, name):
    """The keys that `--name.a.b=value` (or `--noname.a.b`) flags of `argv` override, in order."""
    keys = (re.match(rf"^--?(?:no)?{re.escape(name)}\.([^=]+)", arg) for arg in argv)
    return [match.group(1) for match in keys if match]


def _config_file_error(flag, argv, error=None):
    """`<culprit>: <reason>` of a config flag that failed: its file (`args.load_config` names what is wrong
    with it), else the first override naming an unknown key, else `error`."""
    spec = _flag_argument(argv, flag.name) or flag.default
    if not isinstance(spec, str):
        return f"--{flag.name}: {_one_line(error) if error else 'no config'}"
    try:
        config = args.load_config(spec)
    except ValueError as load_error:
        return str(load_error)
    known = validation.flatten(config)
    for key in _overridden_keys(argv, flag.name):
        parts = key.split(".")
        for end in range(1, len(parts) + 1):  # the first unknown part is the culprit: config.nope of config.nope.x
            prefix = ".".join(parts[:end])
            if prefix not in known and not any(name.startswith(prefix + ".") for name in known):
                return f"{flag.name}.{prefix}: {validation.unknown_key(prefix, known, prefix=flag.name)}"
    return f"--{flag.name}={spec}: {_one_line(error) if error else 'did not load'}"

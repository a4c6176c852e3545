"""What every command line of the project shares: absl's `app.run`, with `--help` an answer."""

import sys

from absl import app, flags


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
    app.run(main)

"""The ``robust-ops`` console script's entry point (pyproject.toml's [project.scripts]).

A module outside the robust_ops package, standard library only: importing anything in robust_ops first runs the
package's __init__, which imports torch and loads the compiled ops (seconds), and a Ctrl-C there ended in a
KeyboardInterrupt traceback, before robust_ops.cli.main could catch it as it catches one in a command. Here the
import itself is guarded. ``python -m robust_ops`` imports the package before its __main__ runs: there the package's
__init__ guards its imports itself, for that case only (robust_ops.cli.exit_on_interrupted_package_import).
robust_ops itself never imports this module: an editable install made before it existed has no mapping for it.
"""

import sys


def main():
    """robust_ops.cli.main, imported here: a Ctrl-C during the import exits quietly with status 130, as in a
    command."""
    try:
        from robust_ops.cli import finished, main as cli_main
    except (KeyboardInterrupt, RuntimeError) as err:
        # Python 3.11 wraps an interrupt raised in a __set_name__ (enum members, as torch's classes are created) in a
        # RuntimeError, as robust_ops.cli.interrupts_unwrapped says
        if not isinstance(err, KeyboardInterrupt) and not any(
                isinstance(e, KeyboardInterrupt) for e in (err.__cause__, err.__context__)):
            raise
        print("\nrobust-ops: interrupted", file=sys.stderr)
        return 130
    return finished(cli_main())

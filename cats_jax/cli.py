"""What every command-line entry point shares: bad input as one line (exit 2), Ctrl-C as one line (exit 130).

    if __name__ == "__main__":
        cli.run(main)
"""

from __future__ import annotations

import sys


class InputError(ValueError):
    """Bad input the user can fix (a file, a flag, a checkpoint): the message names it and says what to do."""


def run(main, argv=None) -> None:
    """Call main(argv); exit with its return code (0 for None), 2 on InputError, 130 on Ctrl-C."""
    spec = getattr(sys.modules["__main__"], "__spec__", None)  # python -m NAME: sys.argv[0] is a file path
    prog = "cats-jax" if argv is not None else f"python -m {spec.name.removesuffix('.__main__')}" if spec else sys.argv[0]
    try:
        code = main(argv)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        sys.exit(130)
    except InputError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        sys.exit(2)
    sys.exit(code or 0)

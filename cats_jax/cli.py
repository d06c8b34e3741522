"""What every command-line entry point shares: bad input as one line (exit 2), Ctrl-C as one line (exit 130),
no noise that carries no information, and JAX's persistent compilation cache.

    if __name__ == "__main__":
        cli.run(main)

The compilation cache lives in ~/.cache/cats-jax/jax (under $CATS_JAX_CACHE if set), so a second
run of a command skips most of its compile time. CATS_JAX_COMPILE_CACHE=0 turns it off.
Stdlib only at import: modules import this before anything heavy.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path


class InputError(ValueError):
    """Bad input the user can fix (a file, a flag, a checkpoint): the message names it and says what to do."""


def fraction(text: str) -> float:
    """argparse type of a sparsity: a fraction in (0, 1)."""
    try:
        value = float(text)
    except ValueError:
        value = None
    if value is None or not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a fraction in (0, 1), e.g. 0.5")
    return value


def count(text: str) -> int:
    """argparse type of a count that must be at least 1 (tokens, rows, repeats)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a whole number >= 1")
    return value


def counts(text: str) -> list[int]:
    """argparse type of several counts: comma-separated whole numbers >= 1 (e.g. batch sizes 1,4,8)."""
    values = [count(s.strip()) for s in text.split(",") if s.strip()]
    if not values:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated whole numbers >= 1, e.g. 1,4,8")
    return values


def fractions(text: str) -> list[float]:
    """argparse type of several sparsities: comma-separated fractions in (0, 1), sorted, each once."""
    values = sorted({fraction(s.strip()) for s in text.split(",") if s.strip()})
    if not values:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated fractions, e.g. 0.3,0.5")
    return values


def output_file(ap: argparse.ArgumentParser, flag: str, path) -> Path | None:
    """The file an output flag names, checked before the work that fills it (so none is lost at the
    end): not a directory, its folder made. None stays None."""
    if path is None:
        return None
    path = Path(path)
    if path.is_dir():
        ap.error(f"{flag} {path}: is a directory; give a file name")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        ap.error(f"{flag} {path}: cannot make its folder ({e.strerror})")
    return path


def add_allow_quantization_mismatch(ap: argparse.ArgumentParser) -> None:
    """The flag that applies thresholds of the same weights at another quantization (cats_jax.thresholds)."""
    ap.add_argument("--allow-quantization-mismatch", action="store_true",
                    help="apply thresholds calibrated for these weights at another quantization (the bf16 "
                         "model's on its int8 copy); calibrating this checkpoint is better")


def note_impl(impl: str) -> None:
    """One line on stderr when the Pallas kernels were asked for but cannot run (no GPU)."""
    from pallas_kernels.common import kernels_enabled

    if impl.removeprefix("cats-") == "pallas" and not kernels_enabled():
        print("note: --impl pallas: no GPU here, so decode steps run the jnp path (same results, no kernels)",
              file=sys.stderr)


# ---- noise --------------------------------------------------------------------------------------
class _DropOrbaxNoise(logging.Filter):
    # orbax warns on every write that it skips an OCDBT merge (we write without OCDBT on purpose),
    # naming a temporary path; and on a damaged checkpoint, that it found no item metadata, before
    # the error that we report in one line.
    NOISE = ("Skipping merge of OCDBT checkpoints", "Failed to get item metadata")

    def filter(self, record: logging.LogRecord) -> bool:
        return not any(n in str(record.msg) for n in self.NOISE)


def _unraisable(hook):
    # When orbax's restore fails (a damaged params file), its event loop closes while tensorstore
    # reads are still in flight; each of them then reports "Event loop is closed" as unraisable.
    def filtered(u):
        if not (isinstance(u.exc_value, RuntimeError) and str(u.exc_value) == "Event loop is closed"):
            hook(u)

    return filtered


def quiet() -> None:
    """Silence the messages of libraries that tell the user nothing (idempotent)."""
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")  # "PyTorch was not found": we never use it
    absl = logging.getLogger("absl")
    if not any(isinstance(f, _DropOrbaxNoise) for f in absl.filters):
        absl.addFilter(_DropOrbaxNoise())
    if not getattr(sys.unraisablehook, "cats_jax", False):
        sys.unraisablehook = _unraisable(sys.unraisablehook)
        sys.unraisablehook.cats_jax = True


def compile_cache() -> str | None:
    """Turn on JAX's persistent compilation cache; returns its directory (None: turned off)."""
    if os.environ.get("CATS_JAX_COMPILE_CACHE", "1").lower() in ("0", "off", "false", "no"):
        return None
    import jax

    from cats_jax.hub import cache_dir

    path = str(cache_dir() / "jax")
    jax.config.update("jax_compilation_cache_dir", path)
    return path


def _prog() -> str:
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    return f"python -m {spec.name.removesuffix('.__main__')}" if spec else os.path.basename(sys.argv[0])


def run(main, argv=None) -> None:
    """Call main(argv); exit with its return code (0 for None), 2 on InputError, 130 on Ctrl-C."""
    prog = _prog() if argv is None else "cats-jax"
    quiet()
    compile_cache()
    try:
        code = main(argv)
    except KeyboardInterrupt:
        sys.unraisablehook = lambda u: None  # work cut short is not worth a traceback
        print(f"{prog}: interrupted", file=sys.stderr)
        sys.exit(130)
    except InputError as e:
        sys.unraisablehook = lambda u: None  # async work that dies with the error: reported already
        print(f"{prog}: error: {e}", file=sys.stderr)
        sys.exit(2)
    sys.exit(code or 0)

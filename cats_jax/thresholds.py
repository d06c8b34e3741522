"""Calibrated sparsity thresholds: the `thresholds.json` of a checkpoint directory.

    {
      "format": "cats-jax-thresholds", "version": 1,
      "model": {"name": ..., "num_layers": ..., "hidden_size": ..., "intermediate_size": ...,
                "vocab_size": ..., "embedding_sha256": ...},
      "method": "cats",
      "calibration": {"source": {...}, "tokens": N, ...},
      "levels": [
        {"sparsity": 0.5,
         "thresholds": {"mlp.act": [t_0, ..., t_L-1]},
         "realised": {"mlp.act": {"calibration": [...], "held_out": [...]}}},
        ...
      ]
    }

Thresholds are keyed by *site*, one value per layer. CATS has one site, "mlp.act" (|SiLU(gate)|
in each gated MLP). TEAL (magnitude thresholds on the input of every linear layer) adds the sites
"attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.o_proj", "mlp.gate_proj", "mlp.up_proj",
"mlp.down_proj" (the input of that projection) and, per level, its per-site sparsities under
"site_sparsity" (same keys, one value per layer; TEAL's greedy allocation or uniform) and each
layer's effective sparsity under realised["effective"]. Its "calibration" holds "allocation" and,
for greedy, the search's settings and per-layer output errors (cats_jax.teal). A TEAL file also
holds "mlp.act", so it serves the modes cats and (uniform allocation) cats+teal-attn too.

The "model" entry ties the file to one model: its shapes, its name, and a hash of its first
embedding row (rounded to bf16, so the same weights loaded in any dtype match). Applying the file
to another model is an error.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import tempfile
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from cats_jax.cli import InputError
from cats_jax.sparsity import CATS_SITE, MODES, TEAL_SITES

FILENAME = "thresholds.json"
FORMAT = "cats-jax-thresholds"
VERSION = 1
# The sites each method's levels must hold. TEAL files also hold "mlp.act" (the CATS quantiles of
# the same pass), so that one file serves the modes cats, teal and cats+teal-attn.
METHOD_SITES = {"cats": (CATS_SITE,), "teal": TEAL_SITES}


class ThresholdsError(InputError):
    """A thresholds file that is malformed or belongs to another model."""


def model_identity(model) -> dict:
    cfg = model.cfg
    row = np.asarray(model.embed.embedding[0].astype(jnp.bfloat16)).view(np.uint16)
    return {
        "name": cfg.name,
        "num_layers": cfg.num_layers,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "vocab_size": cfg.vocab_size,
        "embedding_sha256": hashlib.sha256(row.tobytes()).hexdigest(),
    }


@dataclasses.dataclass
class Level:
    sparsity: float  # the target, a fraction in (0, 1)
    thresholds: dict[str, list[float]]  # site -> one threshold per layer
    realised: dict[str, dict[str, list[float]]] = dataclasses.field(default_factory=dict)  # site -> {data: per layer}
    site_sparsity: dict[str, list[float]] | None = None  # TEAL: per-site, per-layer targets


@dataclasses.dataclass
class Thresholds:
    model: dict  # model_identity() of the calibrated model
    method: str  # "cats" (issue 7 adds "teal")
    levels: list[Level]
    calibration: dict  # data source, token count, method details

    @property
    def sparsities(self) -> list[float]:
        return [lv.sparsity for lv in self.levels]

    def level(self, sparsity: float) -> Level:
        if not 0 < sparsity < 1:  # no calibration can give it: do not suggest running one
            raise ThresholdsError(f"sparsity {sparsity:g} is not a fraction in (0, 1)")
        for lv in self.levels:
            if abs(lv.sparsity - sparsity) < 1e-9:
                return lv
        raise ThresholdsError(
            f"no thresholds for sparsity {sparsity:g} (calibrated: {', '.join(f'{s:g}' for s in self.sparsities)}); "
            f"run python -m cats_jax.calibrate --sparsity {sparsity:g}"
        )

    def check_model(self, model) -> None:
        """Raise ThresholdsError naming every field in which `model` differs from the calibrated one."""
        mine = model_identity(model)
        diff = [f"{k}: thresholds {self.model.get(k)!r}, model {v!r}" for k, v in mine.items() if self.model.get(k) != v]
        if diff:
            raise ThresholdsError("these thresholds were calibrated for another model (" + "; ".join(diff) + ")")

    # ---- JSON ------------------------------------------------------------------------------
    def to_json(self) -> str:
        d = {"format": FORMAT, "version": VERSION, "model": self.model, "method": self.method,
             "calibration": self.calibration, "levels": []}
        for lv in self.levels:
            entry = {"sparsity": lv.sparsity, "thresholds": lv.thresholds, "realised": lv.realised}
            if lv.site_sparsity is not None:
                entry["site_sparsity"] = lv.site_sparsity
            d["levels"].append(entry)
        # one line per list of numbers (per-layer values), indented structure otherwise
        return re.sub(r"\[\s*([-+0-9.e,\s]+?)\s*\]", lambda m: "[" + ", ".join(v.strip() for v in m[1].split(",")) + "]",
                      json.dumps(d, indent=1))

    @classmethod
    def from_json(cls, text: str, where: str = FILENAME) -> "Thresholds":
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise ThresholdsError(f"{where}: not JSON ({e})") from e
        if d.get("format") != FORMAT or d.get("version") != VERSION:
            raise ThresholdsError(f"{where}: not a {FORMAT} v{VERSION} file (format={d.get('format')!r}, version={d.get('version')!r})")
        method = d.get("method")
        if method not in METHOD_SITES:
            raise ThresholdsError(f"{where}: unknown method {method!r} (known: {', '.join(METHOD_SITES)})")
        try:
            layers = d["model"]["num_layers"]
            levels = []
            for lv in d["levels"]:
                for site in METHOD_SITES[method]:
                    got = lv["thresholds"].get(site)
                    if got is None or len(got) != layers:
                        raise ThresholdsError(f"{where}: level {lv['sparsity']}: site {site!r} needs {layers} thresholds, has {got and len(got)}")
                levels.append(Level(lv["sparsity"], lv["thresholds"], lv.get("realised", {}), lv.get("site_sparsity")))
        except (KeyError, TypeError, AttributeError) as e:  # a field missing or of the wrong type
            raise ThresholdsError(f"{where}: malformed ({type(e).__name__}: {e}); re-calibrate "
                                  "(python -m cats_jax.calibrate) or restore the file") from e
        return cls(d["model"], method, levels, d.get("calibration", {}))

    def save(self, ckpt_dir: str | Path) -> Path:
        """Write DIR/thresholds.json atomically (replacing any earlier calibration)."""
        path = Path(ckpt_dir) / FILENAME
        fd, tmp = tempfile.mkstemp(prefix=f".{FILENAME}.", dir=ckpt_dir)
        with os.fdopen(fd, "w") as f:
            f.write(self.to_json())
        os.replace(tmp, path)
        return path


def load(ckpt_dir: str | Path) -> Thresholds | None:
    """The checkpoint's thresholds, or None if it has not been calibrated."""
    path = Path(ckpt_dir) / FILENAME
    if not path.is_file():
        return None
    return Thresholds.from_json(path.read_text(), str(path))


def apply(model, thresholds: Thresholds, sparsity: float, impl: str = "cats-jnp", mode: str | None = None) -> Level:
    """Set the model's thresholds for `sparsity` (after checking they belong to it) and its mode
    (sparsity.MODES; default: the file's method). impl "cats-jnp"/"jnp" or "cats-pallas"/"pallas"."""
    thresholds.check_model(model)
    mode = mode or thresholds.method
    if mode not in MODES or mode == "dense":
        raise ThresholdsError(f"unknown sparsity mode {mode!r} (choose from {', '.join(m for m in MODES if m != 'dense')})")
    if mode != "cats" and thresholds.method != "teal":
        raise ThresholdsError(f"mode {mode!r} needs TEAL thresholds; these are {thresholds.method!r} "
                              "(run python -m cats_jax.calibrate --method teal)")
    if mode == "cats+teal-attn" and thresholds.calibration.get("allocation") != "uniform":
        raise ThresholdsError("mode 'cats+teal-attn' needs TEAL thresholds of uniform allocation (its attention sites "
                              "at the target sparsity); run python -m cats_jax.calibrate --method teal --allocation uniform")
    level = thresholds.level(sparsity)
    for site in MODES[mode]:
        if site not in level.thresholds:
            raise ThresholdsError(f"level {sparsity:g} has no thresholds for site {site!r}")
        model.set_thresholds(site, level.thresholds[site])
    model.set_mode(mode, impl.removeprefix("cats-"))
    return level


def load_into(model, ckpt_dir: str | Path, sparsity: float, impl: str = "cats-jnp", mode: str | None = None) -> Level:
    """Apply DIR/thresholds.json at `sparsity`; an error names the missing calibration."""
    thresholds = load(ckpt_dir)
    if thresholds is None:
        raise ThresholdsError(f"{ckpt_dir}: no {FILENAME}; run python -m cats_jax.calibrate --ckpt {ckpt_dir} first")
    return apply(model, thresholds, sparsity, impl, mode)

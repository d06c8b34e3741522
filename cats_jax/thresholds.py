"""Calibrated sparsity thresholds: the `thresholds.json` of a checkpoint directory.

    {
      "format": "cats-jax-thresholds", "version": 2,
      "model": {"name": ..., "num_layers": ..., "hidden_size": ..., "intermediate_size": ...,
                "vocab_size": ..., "embedding_sha256": ...},
      "methods": {
        "cats": {
          "calibration": {"source": {...}, "tokens": N, ...},
          "levels": [
            {"sparsity": 0.5,
             "thresholds": {"mlp.act": [t_0, ..., t_L-1]},
             "realised": {"mlp.act": {"calibration": [...], "held_out": [...]}}},
            ...
          ]
        },
        "teal": {...}
      }
    }

Thresholds are keyed by *site*, one value per layer. CATS has one site, "mlp.act" (|SiLU(gate)|
in each gated MLP). TEAL (magnitude thresholds on the input of every linear layer) adds the sites
"attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.o_proj", "mlp.gate_proj", "mlp.up_proj",
"mlp.down_proj" (the input of that projection) and, per level, its per-site sparsities under
"site_sparsity" (same keys, one value per layer; TEAL's greedy allocation or uniform) and each
layer's effective sparsity under realised["effective"]. Its "calibration" holds "allocation" and,
for greedy, the search's settings and per-layer output errors (cats_jax.teal). A TEAL file also
holds "mlp.act", so it serves the modes cats and (uniform allocation) cats+teal-attn too. A CATS
file allocated across layers ("allocation": "layers") has its per-layer levels under
"site_sparsity" and, under calibration["greedy"], the search's settings and each layer's
next-token KL (cats_jax.calibrate).

The selection criterion (sparsity.CRITERIA) is the method's calibration["criterion"]; absent (files
written before it existed) means "magnitude". Applying thresholds sets the model's criterion to
theirs; asking for the other one is an error. A method's levels share one criterion: calibrating
it with the other replaces all of that method's levels, and only with force. The up-rms
criterion's factors (each neuron's rms of x W_up, measured on the calibration text) are the
calibration's "factors": {"mlp.act": [[f_0, ..., f_I-1] per layer]}.

Calibrating adds to the file: each method keeps its levels, and a new run replaces only the levels
it calibrates (with force; without, calibrate refuses before its pass). A level kept from an
earlier run carries that run's "calibration". Version 1 files (one method, no "methods") are read.

The "model" entry ties the file to one model: its shapes, its name, a hash of its first
embedding row (rounded to bf16, so the same weights loaded in any dtype match) and, for a
quantized model, its "quantization" (the embedding is not quantized: the hash alone would not tell
the int8 copy from its source). Applying the file to another model is an error; thresholds of the
same weights at another quantization (the bf16 model's on its int8 copy) only when asked for
(allow_quantization_mismatch: calibrating the quantized model is better, its activations differ).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from cats_jax import fileio
from cats_jax.cli import InputError
from cats_jax.sparsity import CATS_SITE, CRITERIA, MODES, TEAL_SITES

FILENAME = "thresholds.json"
FORMAT = "cats-jax-thresholds"
VERSION = 2
# The sites each method's levels must hold. TEAL files also hold "mlp.act" (the CATS quantiles of
# the same pass), so that one file serves the modes cats, teal and cats+teal-attn.
METHOD_SITES = {"cats": (CATS_SITE,), "teal": TEAL_SITES}


class ThresholdsError(InputError):
    """A thresholds file that is malformed or belongs to another model."""


def model_identity(model) -> dict:
    return identity(model.cfg, model.embed.embedding[0])


def identity(cfg, embedding_row) -> dict:
    """The "model" entry of a model of config cfg whose first embedding row is embedding_row."""
    row = np.asarray(jnp.asarray(embedding_row).astype(jnp.bfloat16)).view(np.uint16)
    model = {
        "name": cfg.name,
        "num_layers": cfg.num_layers,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "vocab_size": cfg.vocab_size,
        "embedding_sha256": hashlib.sha256(row.tobytes()).hexdigest(),
    }
    if cfg.quantization is not None:  # absent for float weights: files written before it still match
        model["quantization"] = cfg.quantization
    return model


@dataclasses.dataclass
class Level:
    sparsity: float  # the target, a fraction in (0, 1)
    thresholds: dict[str, list[float]]  # site -> one threshold per layer
    realised: dict[str, dict[str, list[float]]] = dataclasses.field(default_factory=dict)  # site -> {data: per layer}
    site_sparsity: dict[str, list[float]] | None = None  # TEAL: per-site, per-layer targets
    calibration: dict | None = None  # the run that calibrated this level, if not the method's latest


@dataclasses.dataclass
class Thresholds:
    model: dict  # model_identity() of the calibrated model
    method: str  # "cats" or "teal"
    levels: list[Level]
    calibration: dict  # data source, token count, method details

    @property
    def sparsities(self) -> list[float]:
        return [lv.sparsity for lv in self.levels]

    @property
    def criterion(self) -> str:
        """The selection criterion these thresholds were calibrated with (sparsity.CRITERIA)."""
        return self.calibration.get("criterion", "magnitude")

    def check_criterion(self, criterion: str | None) -> None:
        """Raise ThresholdsError if `criterion` (None: any) is not the one these were calibrated with."""
        if criterion is not None and criterion not in CRITERIA:
            raise ThresholdsError(f"unknown selection criterion {criterion!r} (choose from {', '.join(CRITERIA)})")
        if criterion not in (None, self.criterion):
            raise ThresholdsError(f"these {self.method} thresholds were calibrated with the {self.criterion} criterion, "
                                  f"not {criterion}; pass --criterion {self.criterion} or calibrate with "
                                  f"--criterion {criterion}")

    def factors(self, level: Level) -> np.ndarray | None:
        """The criterion's calibrated factors of `level` (up-rms: fp32 [layers, intermediate]), or None
        for a criterion whose factors come from the weights or that has none; ThresholdsError if missing
        or misshapen."""
        if self.criterion != "up-rms":
            return None
        got = ((level.calibration or self.calibration).get("factors") or {}).get(CATS_SITE)
        want = (self.model["num_layers"], self.model["intermediate_size"])
        try:
            f = np.asarray(got, np.float32)
        except (TypeError, ValueError):
            f = None
        if got is None or f is None or f.shape != want:
            raise ThresholdsError(f"these up-rms thresholds need their factors {list(want)} (calibration.factors."
                                  f"{CATS_SITE}), have {None if f is None else list(f.shape)}; re-calibrate "
                                  "(python -m cats_jax.calibrate --criterion up-rms) or restore the file")
        return f

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

    def check_model(self, model, allow_quantization_mismatch: bool = False) -> None:
        """Raise ThresholdsError naming every field in which `model` differs from the calibrated one
        (its quantization only if not allow_quantization_mismatch)."""
        mine = model_identity(model)
        fields = [k for k in dict.fromkeys([*mine, *self.model]) if k in mine or k == "quantization"]
        diff = [k for k in fields if self.model.get(k) != mine.get(k)]
        if diff == ["quantization"]:
            if allow_quantization_mismatch:
                return
            theirs, ours = (q or "no quantization" for q in (self.model.get("quantization"), mine.get("quantization")))
            raise ThresholdsError(f"these thresholds were calibrated for the same weights with {theirs}, this model has "
                                  f"{ours}: calibrate it (python -m cats_jax.calibrate), or pass "
                                  "--allow-quantization-mismatch to apply them anyway")
        if diff:
            raise ThresholdsError("these thresholds were calibrated for another model (" + "; ".join(
                f"{k}: thresholds {self.model.get(k)!r}, model {mine.get(k)!r}" for k in diff) + ")")

    # ---- JSON ------------------------------------------------------------------------------
    def section(self) -> dict:
        """This method's entry of the file's "methods"."""
        levels = []
        for lv in self.levels:
            entry = {"sparsity": lv.sparsity, "thresholds": lv.thresholds, "realised": lv.realised}
            if lv.site_sparsity is not None:
                entry["site_sparsity"] = lv.site_sparsity
            if lv.calibration is not None:
                entry["calibration"] = lv.calibration
            levels.append(entry)
        return {"calibration": self.calibration, "levels": levels}

    def to_json(self) -> str:
        return _file_json(self.model, {self.method: self})

    @classmethod
    def from_json(cls, text: str, where: str = FILENAME) -> Thresholds:
        """The thresholds of a file that holds one method."""
        methods = parse(text, where)
        if len(methods) != 1:
            raise ThresholdsError(f"{where}: holds the methods {', '.join(methods)}; read it with thresholds.parse")
        return next(iter(methods.values()))

    def save(self, ckpt_dir: str | Path, force: bool = False) -> Path:
        """Add these levels to DIR/thresholds.json (atomically), keeping every other level and
        method. Levels it already holds, or a file of another model, are replaced only with force."""
        check_merge(ckpt_dir, self.model, self.method, self.sparsities, force, self.criterion)
        existing = {} if force and _other_model(ckpt_dir, self.model) else (read(ckpt_dir) or {})
        merged = dict(existing)
        old = existing.get(self.method)
        if old is not None and old.criterion == self.criterion:
            kept = [dataclasses.replace(lv, calibration=lv.calibration or old.calibration)
                    for lv in old.levels if not any(abs(lv.sparsity - p) < 1e-9 for p in self.sparsities)]
            levels = sorted(kept + self.levels, key=lambda lv: lv.sparsity)
            merged[self.method] = dataclasses.replace(self, levels=levels)
        else:
            merged[self.method] = self
        path = Path(ckpt_dir) / FILENAME
        fileio.write_text_atomic(path, _file_json(self.model, merged))
        return path


def _file_json(model: dict, methods: dict[str, Thresholds]) -> str:
    d = {"format": FORMAT, "version": VERSION, "model": model,
         "methods": {m: th.section() for m, th in sorted(methods.items())}}
    # one line per list of numbers (per-layer values), indented structure otherwise
    return re.sub(r"\[\s*([-+0-9.e,\s]+?)\s*\]", lambda m: "[" + ", ".join(v.strip() for v in m[1].split(",")) + "]",
                  json.dumps(d, indent=1))


def parse(text: str, where: str = FILENAME) -> dict[str, Thresholds]:
    """Method -> Thresholds of a thresholds file's text (version 1 or 2)."""
    try:
        d = json.loads(text)
    except json.JSONDecodeError as e:
        raise ThresholdsError(f"{where}: not JSON ({e})") from e
    if not isinstance(d, dict) or d.get("format") != FORMAT or d.get("version") not in (1, VERSION):
        got = (d.get("format"), d.get("version")) if isinstance(d, dict) else (None, None)
        raise ThresholdsError(f"{where}: not a {FORMAT} v1/v{VERSION} file (format={got[0]!r}, version={got[1]!r})")
    sections = {d.get("method"): d} if d["version"] == 1 else d.get("methods", {})
    layers = (d.get("model") or {}).get("num_layers") if isinstance(d.get("model"), dict) else None
    if not isinstance(layers, int):
        raise ThresholdsError(f"{where}: malformed (no model.num_layers); re-calibrate (python -m cats_jax.calibrate) "
                              "or restore the file")
    out = {}
    for method, section in sections.items():
        if method not in METHOD_SITES:
            raise ThresholdsError(f"{where}: unknown method {method!r} (known: {', '.join(METHOD_SITES)})")
        try:
            levels = []
            for lv in section["levels"]:
                for site in METHOD_SITES[method]:
                    got = lv["thresholds"].get(site)
                    if got is None or len(got) != layers:
                        raise ThresholdsError(f"{where}: level {lv['sparsity']}: site {site!r} needs {layers} "
                                              f"thresholds, has {got and len(got)}")
                levels.append(Level(lv["sparsity"], lv["thresholds"], lv.get("realised", {}), lv.get("site_sparsity"),
                                    lv.get("calibration")))
        except (KeyError, TypeError, AttributeError) as e:  # a field missing or of the wrong type
            raise ThresholdsError(f"{where}: malformed ({type(e).__name__}: {e}); re-calibrate "
                                  "(python -m cats_jax.calibrate) or restore the file") from e
        out[method] = Thresholds(d["model"], method, levels, section.get("calibration", {}))
    return out


def read(ckpt_dir: str | Path) -> dict[str, Thresholds] | None:
    """Method -> Thresholds of DIR/thresholds.json, or None if it has not been calibrated."""
    path = Path(ckpt_dir) / FILENAME
    if not path.is_file():
        return None
    return parse(path.read_text(), str(path))


def load(ckpt_dir: str | Path, mode: str | None = None) -> Thresholds | None:
    """The checkpoint's thresholds that serve `mode` (default: the file's method; with both,
    cats), or None if it has not been calibrated. Modes other than cats need TEAL's."""
    methods = read(ckpt_dir)
    if not methods:
        return None
    prefer = ("cats", "teal") if mode in (None, "cats") else ("teal", "cats")
    return next(methods[m] for m in prefer if m in methods)


def carry_over(old_dir: str | Path, new_dir: str | Path, model: dict) -> str | None:
    """When a checkpoint is written over old_dir: copy its thresholds.json into new_dir if it was
    calibrated for the new weights (identity `model`), else leave it behind. Says which (None:
    there was none)."""
    path = Path(old_dir) / FILENAME
    if not path.is_file():
        return None
    try:
        methods = read(old_dir)
    except (ThresholdsError, KeyError, TypeError) as e:
        return f"removed {path}: unreadable ({e}); calibrate again"
    if next(iter(methods.values())).model != model:
        return f"removed {path}: it was calibrated for other weights; calibrate again"
    fileio.write_text_atomic(Path(new_dir) / FILENAME, path.read_text())
    return f"kept {path}: it was calibrated for these weights"


def _other_model(ckpt_dir, model: dict) -> bool:
    methods = read(ckpt_dir)
    return bool(methods) and next(iter(methods.values())).model != model


def check_merge(ckpt_dir: str | Path, model: dict, method: str, sparsities: list[float], force: bool = False,
                criterion: str = "magnitude") -> None:
    """Raise ThresholdsError (unless force) if saving `method` levels at `sparsities` of `criterion`
    for `model` would replace calibrations in DIR/thresholds.json. Calibration calls it before its pass."""
    methods = read(ckpt_dir)
    if force or not methods:
        return
    path = Path(ckpt_dir) / FILENAME
    mine = next(iter(methods.values())).model
    if mine != model:
        diff = ", ".join(k for k in model if mine.get(k) != model[k])
        raise ThresholdsError(f"{path} holds thresholds of another model (differs in {diff}); pass --force to "
                              "replace them, or move the file away")
    if method in methods and methods[method].criterion != criterion:
        raise ThresholdsError(f"{path} holds {method} levels of the {methods[method].criterion} criterion; pass --force "
                              f"to replace them all by these of the {criterion} criterion, or calibrate a copy of the "
                              "checkpoint")
    same = [p for p in sparsities if method in methods and any(abs(p - q) < 1e-9 for q in methods[method].sparsities)]
    if same:
        raise ThresholdsError(f"{path} already holds {method} levels {', '.join(f'{p:g}' for p in same)}; pass --force "
                              "to replace them (other levels are kept either way)")


def apply(model, thresholds: Thresholds, sparsity: float, mode: str | None = None,
          criterion: str | None = None, allow_quantization_mismatch: bool = False) -> Level:
    """Set the model's thresholds for `sparsity` (after checking they belong to it: see
    Thresholds.check_model), its mode (sparsity.MODES; default: the file's method) and its selection
    criterion (the thresholds'; one given must be theirs)."""
    thresholds.check_model(model, allow_quantization_mismatch)
    thresholds.check_criterion(criterion)
    mode = mode or thresholds.method
    if mode not in MODES or mode == "dense":
        raise ThresholdsError(f"unknown sparsity mode {mode!r} (choose from {', '.join(m for m in MODES if m != 'dense')})")
    if mode != "cats" and thresholds.method != "teal":
        raise ThresholdsError(f"mode {mode!r} needs TEAL thresholds; these are {thresholds.method!r} "
                              "(run python -m cats_jax.calibrate --method teal)")
    level = thresholds.level(sparsity)
    if mode == "cats+teal-attn" and (level.calibration or thresholds.calibration).get("allocation") != "uniform":
        raise ThresholdsError("mode 'cats+teal-attn' needs TEAL thresholds of uniform allocation (its attention sites "
                              "at the target sparsity); run python -m cats_jax.calibrate --method teal --allocation uniform")
    factors = thresholds.factors(level)
    for site in MODES[mode]:
        if site not in level.thresholds:
            raise ThresholdsError(f"level {sparsity:g} has no thresholds for site {site!r}")
        model.set_thresholds(site, level.thresholds[site])
    model.set_mode(mode)
    model.set_criterion(thresholds.criterion, factors=factors)
    return level


def load_into(model, ckpt_dir: str | Path, sparsity: float, mode: str | None = None,
              criterion: str | None = None, allow_quantization_mismatch: bool = False) -> Level:
    """Apply DIR/thresholds.json at `sparsity`; an error names the missing calibration."""
    thresholds = load(ckpt_dir, mode)
    if thresholds is None:
        raise ThresholdsError(f"{ckpt_dir}: no {FILENAME}; run python -m cats_jax.calibrate --ckpt {ckpt_dir} first")
    return apply(model, thresholds, sparsity, mode, criterion, allow_quantization_mismatch)

"""The converted-checkpoint layout, written by the converters and read by everything else.

    DIR/config.json       ModelConfig (ours, not HF's; its "quantization": null or "int8", and
                          "quantize_head": whether the LM head is int8 too)
    DIR/params/           orbax checkpoint of the model's nnx.Param state as a nested dict (int8:
                          each linear layer's int8 kernel and fp32 scales, cats_jax.quantize)
    DIR/tokenizer*.json   HF tokenizer files (tokenizer.json, tokenizer_config.json, ...)
    DIR/thresholds.json   sparsity thresholds, added by calibration (cats_jax.thresholds)

A checkpoint is written into a temporary sibling directory and renamed into place at the end,
so a failure midway never leaves a DIR that looks valid. Written over an older checkpoint (force),
it replaces only a checkpoint's files (any other file is refused) and keeps thresholds.json if
that was calibrated for the same weights.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from cats_jax import thresholds
from cats_jax.cli import InputError
from cats_jax.config import ModelConfig
from cats_jax.model import Transformer, from_params

DTYPES = {"bfloat16": jnp.bfloat16, "float16": jnp.float16, "float32": jnp.float32}


def param_shapes(cfg: ModelConfig, dtype=jnp.bfloat16) -> dict:
    """Nested dict of jax.ShapeDtypeStruct: the exact tree a checkpoint's params must have (dtype:
    that of the float weights; a quantized config's int8 kernels and fp32 scales keep theirs)."""
    abstract = nnx.eval_shape(lambda: Transformer(cfg, dtype=dtype, rngs=nnx.Rngs(0)))
    return _plain_keys(nnx.to_pure_dict(nnx.state(abstract, nnx.Param)))


def _plain_keys(tree):
    # nnx.List children have int keys; orbax stores str keys. Use str everywhere on disk.
    if isinstance(tree, dict):
        return {str(k): _plain_keys(v) for k, v in tree.items()}
    return tree


def _model_keys(tree):
    # back to the model's keys: nnx.List children (the layers) have int keys
    if isinstance(tree, dict):
        return {int(k) if k.isdigit() else k: _model_keys(v) for k, v in tree.items()}
    return tree


def check_out_dir(out_dir: str | Path, force: bool = False) -> None:
    """Refuse a non-empty out_dir unless force, and with force one that holds anything but a
    checkpoint's files (converters call this before any slow work)."""
    out = Path(out_dir).absolute()
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise FileExistsError(f"{out} exists and is not empty; pass --force to overwrite it")
    others = sorted(p.name for p in out.iterdir() if p.name not in CHECKPOINT_FILES) if out.is_dir() else [out.name]
    if out.exists() and others:
        raise FileExistsError(f"{out} holds files that are not a checkpoint's ({', '.join(others[:5])}); --force "
                              "replaces only a checkpoint: move them away or choose another directory")


@contextlib.contextmanager
def staged_dir(out_dir: str | Path, force: bool = False):
    """Yield a temporary directory next to out_dir; on success it replaces out_dir atomically."""
    check_out_dir(out_dir, force)
    out = Path(out_dir).absolute()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    tmp.chmod(0o755)  # mkdtemp makes it owner-only; the checkpoint is an ordinary directory
    try:
        yield tmp
        if out.exists():
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def check_params(params: dict, cfg: ModelConfig) -> None:
    """Every expected tensor present with the expected shape (and int8 where the config says so),
    nothing extra."""
    expected = jax.tree_util.tree_flatten_with_path(param_shapes(cfg))[0]
    got = dict(jax.tree_util.tree_flatten_with_path(_plain_keys(params))[0])
    for path, spec in expected:
        name = jax.tree_util.keystr(path)
        if path not in got:
            raise ValueError(f"checkpoint is missing tensor {name}")
        wrong = _mismatch(name, got[path], spec, "config says")
        if wrong:
            raise ValueError(wrong)
    extra = set(got) - {p for p, _ in expected}
    if extra:
        raise ValueError(f"unexpected tensors: {sorted(jax.tree_util.keystr(p) for p in extra)[:5]}")


def _mismatch(name: str, got, spec, says: str) -> str | None:
    """What is wrong with tensor got (an array or its metadata) against spec: its shape, or int8
    where the config says float or the reverse (a quantized kernel); None if nothing."""
    if got is None:  # a directory in params/ that its metadata does not list
        return f"tensor {name} is not in the checkpoint's metadata"
    if tuple(got.shape) != tuple(spec.shape):
        return f"tensor {name} has shape {tuple(got.shape)}, {says} {tuple(spec.shape)}"
    if (got.dtype == jnp.int8) != (spec.dtype == jnp.int8):
        return f"tensor {name} is {got.dtype}, {says} {spec.dtype}"
    return None


def write_params(directory: Path, params: dict) -> None:
    # Without OCDBT, tensorstore writes each array's chunks as it goes; with it, the whole
    # compressed checkpoint was buffered until commit (+70% of the model's size in host RAM).
    # Pass jax arrays: orbax deep-copies numpy leaves before writing them.
    with ocp.StandardCheckpointer(use_ocdbt=False) as ckptr:
        ckptr.save(Path(directory).absolute() / "params", _plain_keys(params))


def save(out_dir, cfg: ModelConfig, params: dict, tokenizer_dir: str | Path | None = None, force=False):
    """Write a whole checkpoint (small models, training exports). Converters stream instead."""
    check_params(params, cfg)
    with staged_dir(out_dir, force) as tmp:
        (tmp / "config.json").write_text(cfg.to_json())
        write_params(tmp, params)
        if tokenizer_dir is not None:
            copy_tokenizer(tokenizer_dir, tmp)
        # thresholds.json belongs to the weights it was calibrated for
        identity = thresholds.identity(cfg, _plain_keys(params)["embed"]["embedding"][0])
        said = thresholds.carry_over(out_dir, tmp, identity)
        if said:
            print(said, file=sys.stderr)
    return Path(out_dir)


TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "generation_config.json", "chat_template.jinja",
)
CHECKPOINT_FILES = ("config.json", "params", "thresholds.json") + TOKENIZER_FILES


def copy_tokenizer(src: str | Path, dst: str | Path) -> None:
    for name in TOKENIZER_FILES:
        if (Path(src) / name).is_file():
            shutil.copy2(Path(src) / name, Path(dst) / name)


def load_params(ckpt_dir: str | Path, cfg: ModelConfig, dtype=None, *, only=None, sharding=None) -> dict:
    """Params as a nested dict with the model's keys, the float weights cast to dtype if given
    (a quantized checkpoint's int8 kernels and fp32 scales stay as they are). only: the on-disk key
    paths to read, nothing else (e.g. [("layers", "3")]: one layer); sharding(key path, spec): each
    tensor's jax.sharding.Sharding, so that every device reads only its own slice (cats_jax.sharding)."""
    path = Path(ckpt_dir).absolute() / "params"
    redo = f"re-convert it (python -m convert ... --out {ckpt_dir} --force)"
    if cfg.quantization is not None:
        flags = f"--quantize {cfg.quantization}" + (" --quantize-head" if cfg.quantize_head else "")
        redo = f"re-convert it (python -m convert ... {flags} --out {ckpt_dir} --force)"
    if not path.is_dir():
        raise InputError(f"{path}: no params/ directory (is {ckpt_dir} a converted checkpoint?)")
    missing = [name for name in _tensor_names(cfg) if not (path / name).is_dir()]
    if missing:  # orbax would fail with an IndexError that names nothing
        listed = ", ".join(missing[:3]) + (", ..." if len(missing) > 3 else "")
        what = "quantization scales" if all(n.endswith(".scales") for n in missing) else "tensors"
        raise InputError(f"{path}: {len(missing)} of its {what} are missing ({listed}); the checkpoint is "
                         f"incomplete: {redo}")
    try:
        with ocp.StandardCheckpointer() as ckptr:
            meta = ckptr.metadata(path)
            meta = meta.item_metadata if hasattr(meta, "item_metadata") else meta
            target = param_shapes(cfg, meta["embed"]["embedding"].dtype)
            stored = dict(jax.tree_util.tree_flatten_with_path(meta)[0])
            wrong = [_mismatch(".".join(str(k.key) for k in key), stored.get(key), spec, "config.json says")
                     for key, spec in jax.tree_util.tree_flatten_with_path(target)[0]]  # orbax would cast them
            wrong = [w for w in wrong if w]
            params = None if wrong else _restore(ckptr, path, target, only, sharding)
    except Exception as e:  # a damaged file; orbax's own message is ~100 lines of TensorStore spec
        raise InputError(f"{path}: cannot read the params ({_first_line(e)}); the checkpoint is damaged: {redo}") from e
    if wrong:
        more = f" (and {len(wrong) - 1} more)" if len(wrong) > 1 else ""
        raise InputError(f"{path}: {wrong[0]}{more}; the checkpoint does not match its config.json: {redo}")
    if dtype is not None:
        dtypes = {key: spec.dtype for key, spec in jax.tree_util.tree_flatten_with_path(param_shapes(cfg, dtype))[0]}
        params = jax.tree_util.tree_map_with_path(lambda key, x: x.astype(dtypes[key]), params)
    return params


def _restore(ckptr, path: Path, target: dict, only, sharding) -> dict:
    if sharding is None and only is not None:  # jax arrays, as a whole restore gives
        sharding = lambda *_: jax.sharding.SingleDeviceSharding(jax.devices()[0])  # noqa: E731
    if sharding is not None:
        target = jax.tree_util.tree_map_with_path(lambda key, s: jax.ShapeDtypeStruct(
            s.shape, s.dtype, sharding=sharding(tuple(k.key for k in key), s)), target)
    if only is None:
        return ckptr.restore(path, target)
    part: dict = {}
    for keys in only:
        src, dst = target, part
        for k in keys[:-1]:
            src, dst = src[k], dst.setdefault(k, {})
        dst[keys[-1]] = src[keys[-1]]
    with ocp.PyTreeCheckpointer() as reader:  # StandardCheckpointer restores whole trees only
        restore_args = ocp.checkpoint_utils.construct_restore_args(part)
        return reader.restore(path, args=ocp.args.PyTreeRestore(part, restore_args, partial_restore=True))


def _tensor_names(cfg: ModelConfig) -> list[str]:
    """The directory name of each tensor in params/ (orbax joins the keys with dots)."""
    return [".".join(str(k.key) for k in p) for p, _ in jax.tree_util.tree_flatten_with_path(param_shapes(cfg))[0]]


def _first_line(e: BaseException) -> str:
    while e.__cause__ is not None:  # the innermost cause names the file and the fault
        e = e.__cause__
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def load_model(ckpt_dir: str | Path, dtype=None, sharding=None) -> Transformer:
    """Build the model of a converted checkpoint (thresholds, if any, are loaded by the caller);
    sharding: each weight's placement, as in load_params."""
    cfg = ModelConfig.load(ckpt_dir)
    return from_params(cfg, _model_keys(load_params(ckpt_dir, cfg, dtype, sharding=sharding)))


def model_params(model: Transformer) -> dict:
    """The nested dict of a model's weights, in the on-disk key form."""
    return _plain_keys(nnx.to_pure_dict(nnx.state(model, nnx.Param)))


def numpy_params(model: Transformer) -> dict:
    return jax.tree.map(np.asarray, model_params(model))

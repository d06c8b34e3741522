"""Training batches: documents -> token ids with loss weights -> packed fixed-length rows.

Documents come from cats_jax.data (local .txt / .jsonl or a streamed `datasets` source). Chat
records (for --chat) are read here: cats_jax.data yields text only.

Documents are joined with EOS separators and cut into rows of seq_len + 1 tokens that overlap by
one (row i's last token is row i+1's first), so every token is a target exactly once. Each token
carries a loss weight: 1 for plain text; in chat data 1 only for the assistant's replies. This is
cats_jax.data.pack plus weights and a resumable position, which training needs and it lacks.

`Packer.state()` (a small JSON-able dict: epoch, documents used, the partial row) is saved with
each checkpoint and `Packer(..., state=...)` continues from it exactly. The first `holdout`
documents of the source never reach training (they are the eval data).
"""

from __future__ import annotations

import gzip
import itertools
import json
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from cats_jax import data
from cats_jax.data import DataError, TextSource

Encoded = tuple[list[int], list[float]]  # token ids, loss weight of each token as a target


def text_encoder(tokenizer) -> Callable[[str], Encoded]:
    def encode(text: str) -> Encoded:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]  # as cats_jax.data.encode
        return ids, [1.0] * len(ids)

    return encode


# ---- chat ------------------------------------------------------------------------------------
def iter_chat_records(src: TextSource) -> Iterator[dict]:
    """Raw records of a local .jsonl(.gz) or a streamed `datasets` source."""
    if src.is_local and not src.is_jsonl:
        raise DataError(f"{src.name}: --chat needs .jsonl records ('messages' or 'prompt' + 'response')")
    if src.is_local:
        if not Path(src.name).is_file():
            raise DataError(f"{src.name}: no such file")
        with (gzip.open if src.name.endswith(".gz") else open)(src.name, "rt", encoding="utf-8") as f:
            yield from (json.loads(line) for line in f if line.strip())
        return
    import datasets

    yield from datasets.load_dataset(src.name, src.config, split=src.split, streaming=True)


def chat_messages(rec: dict) -> list[dict]:
    """A chat record as a message list: {"messages": [...]} or {"prompt": ..., "response": ...}."""
    if "messages" in rec:
        return rec["messages"]
    if "prompt" in rec and "response" in rec:
        return [{"role": "user", "content": rec["prompt"]}, {"role": "assistant", "content": rec["response"]}]
    raise DataError(f"a chat record needs 'messages' or 'prompt' + 'response' (it has {sorted(rec)})")


def chat_encoder(tokenizer) -> Callable[[dict], Encoded]:
    """Render with the tokenizer's chat template; only the assistant turns' tokens are trained on.

    Each assistant turn's tokens are those that rendering the conversation up to it adds to the
    rendering of the conversation before it with the generation prompt (the "assistant" header)."""
    if not getattr(tokenizer, "chat_template", None):
        raise DataError("--chat: the checkpoint's tokenizer has no chat template")

    def render(messages, prompt: bool) -> list[int]:
        return list(tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=prompt,
                                                  return_dict=True)["input_ids"])

    def encode(rec: dict) -> Encoded:
        messages = chat_messages(rec)
        ids: list[int] = []
        weights: list[float] = []
        for i, msg in enumerate(messages):
            if msg["role"] != "assistant":
                continue
            prompt, full = render(messages[:i], True), render(messages[: i + 1], False)
            if prompt[: len(ids)] != ids or full[: len(prompt)] != prompt:
                raise DataError("--chat: this chat template does not render a conversation as a prefix "
                                "of its continuation, so prompt tokens cannot be masked")
            weights += [0.0] * (len(prompt) - len(ids)) + [1.0] * (len(full) - len(prompt))
            ids = full
        if not ids:
            raise DataError(f"--chat: a record has no assistant message: {str(rec)[:200]}")
        return ids, weights

    return encode


# ---- packing -----------------------------------------------------------------------------------
class Packer:
    """Packs encoded documents into rows of seq_len + 1 tokens, cycling over the source.

    records: returns a fresh iterator over the source (called at each epoch and on resume)."""

    def __init__(self, records: Callable[[], Iterator], encode: Callable[..., Encoded], seq_len: int, sep_id: int,
                 holdout: int = 0, sep_weight: float = 1.0, state: dict | None = None):
        self.records, self.encode, self.seq_len, self.sep_id = records, encode, seq_len, sep_id
        self.holdout, self.sep_weight = holdout, sep_weight
        state = state or {"epoch": 0, "docs": holdout, "ids": [], "weights": []}
        self.epoch, self.docs = state["epoch"], state["docs"]
        self.ids, self.weights = list(state["ids"]), list(state["weights"])
        self._it = None

    def state(self) -> dict:
        return {"epoch": self.epoch, "docs": self.docs, "ids": list(self.ids), "weights": list(self.weights)}

    def _next_doc(self):
        if self._it is None:  # (re)open the source where the state says we are
            self._it = itertools.islice(self.records(), self.docs, None)
        rec = next(self._it, None)
        if rec is None:  # end of the source: the next epoch starts after the held-out documents
            self.epoch, self.docs = self.epoch + 1, self.holdout
            self._it = itertools.islice(self.records(), self.holdout, None)
            rec = next(self._it, None)
            if rec is None:
                raise DataError(f"the training data has no documents beyond the {self.holdout} held out for eval "
                                "(a .txt file is one document: give --eval-data, or --eval-docs 0)")
        self.docs += 1
        return rec

    def next_row(self) -> tuple[np.ndarray, np.ndarray]:
        """(ids [seq_len + 1] int32, weights [seq_len + 1] float32)."""
        n = self.seq_len + 1
        while len(self.ids) < n:
            ids, weights = self.encode(self._next_doc())
            self.ids += list(ids) + [self.sep_id]
            self.weights += list(weights) + [self.sep_weight]
        row = np.asarray(self.ids[:n], np.int32), np.asarray(self.weights[:n], np.float32)
        # Keep the last token: it is the next row's first input (its target weight was used here).
        self.ids, self.weights = self.ids[n - 1:], self.weights[n - 1:]
        return row

    def next_batch(self, shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
        """Rows stacked to shape + (seq_len + 1,)."""
        rows = [self.next_row() for _ in range(int(np.prod(shape)))]
        return (np.stack([r[0] for r in rows]).reshape(*shape, -1),
                np.stack([r[1] for r in rows]).reshape(*shape, -1))


def eval_rows(records: Callable[[], Iterator], encode, seq_len: int, sep_id: int, docs: int | None, max_rows: int,
              sep_weight: float = 1.0, where: str = "the eval text",
              way_out: str = "") -> tuple[np.ndarray, np.ndarray]:
    """The first max_rows rows (packed as Packer packs them) of the first `docs` documents (None:
    as many as needed); the partial row at the end is dropped. where, way_out: the text's name and
    a last remedy, for the error where it holds less than one row."""
    ids: list[int] = []
    weights: list[float] = []
    for rec in itertools.islice(records(), docs):
        i, w = encode(rec)
        ids += list(i) + [sep_id]
        weights += list(w) + [sep_weight]
        if len(ids) > max_rows * seq_len:
            break
    rows = min(max_rows, (len(ids) - 1) // seq_len)
    if rows < 1:
        raise DataError(f"{where}: {len(ids)} eval tokens, fewer than one row of {seq_len + 1}; "
                        f"give more text or a shorter --seq-len{way_out}")
    idx = np.arange(rows)[:, None] * seq_len + np.arange(seq_len + 1)
    return np.asarray(ids, np.int32)[idx], np.asarray(weights, np.float32)[idx]


def tokenizer_and_records(ckpt: str, src: TextSource, chat: bool):
    """(tokenizer, records(), encode) for a source in text or chat mode."""
    tok = data.load_tokenizer(ckpt)
    if chat:
        return tok, (lambda: iter_chat_records(src)), chat_encoder(tok)
    return tok, (lambda: data.iter_documents(src)), text_encoder(tok)

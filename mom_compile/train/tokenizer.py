"""Tokenizers for `--data`: UTF-8 bytes by default, or a tokenizer folder loaded offline.

A tokenizer here is anything with `encode(text) -> list[int]`, `vocab_size` and `eos_token_id`
(None when it has no end-of-document token).
"""
from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .errors import TrainError


class ByteTokenizer:
    """Token id = byte value of the UTF-8 text (256 ids, no special tokens): needs no files and
    fits any model whose vocab_size is at least 256 (the "tiny" preset has exactly 256)."""

    vocab_size = 256
    eos_token_id = None
    name = "bytes"

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8)


@dataclass
class FolderTokenizer:
    """A Hugging Face tokenizer folder (tokenizer.json, ...), read from disk only."""

    encode: Callable[[str], list[int]]
    vocab_size: int
    eos_token_id: int | None
    name: str


def end_of_document(tokenizer: ByteTokenizer | FolderTokenizer,
                    model_eos: int | list[int] | None) -> int | None:
    """The id put between documents: the tokenizer's end-of-document token; for UTF-8 bytes, which
    have none, the model's eos id (the first of a list; a control byte, 2 by default); None for a
    tokenizer folder without one, whose every id is a real token (documents are joined as they are)."""
    if tokenizer.eos_token_id is not None:
        return tokenizer.eos_token_id
    if not isinstance(tokenizer, ByteTokenizer):
        return None
    return model_eos[0] if isinstance(model_eos, list) else model_eos


def load_tokenizer(path: str | None) -> ByteTokenizer | FolderTokenizer:
    """The byte tokenizer for None, else the folder's tokenizer via `transformers` (any tokenizer
    it knows) or `tokenizers` (tokenizer.json), whichever is installed; never downloads."""
    if path is None:
        return ByteTokenizer()
    if not os.path.isdir(path):
        raise TrainError(f"--tokenizer: {path!r} is not a folder")
    try:
        from transformers import AutoTokenizer
    except ImportError:
        return _load_tokenizer_json(path)
    try:
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as e:
        if os.path.isfile(os.path.join(path, "tokenizer.json")):  # a bare tokenizer.json
            return _load_tokenizer_json(path)
        raise TrainError(f"--tokenizer: cannot load {path!r}: {str(e).strip().splitlines()[0]}") from None
    return FolderTokenizer(lambda text: tok(text, add_special_tokens=False)["input_ids"], len(tok),
                           tok.eos_token_id, path)


def _load_tokenizer_json(path: str) -> FolderTokenizer:
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise TrainError("--tokenizer: reading a tokenizer folder needs `transformers` or `tokenizers` "
                         "(pip install tokenizers); without --tokenizer, text is read as bytes") from None
    file = os.path.join(path, "tokenizer.json")
    if not os.path.isfile(file):
        raise TrainError(f"--tokenizer: {path!r} has no tokenizer.json (install `transformers` for "
                         "other tokenizer formats)")
    try:
        tok = Tokenizer.from_file(file)
    except Exception as e:  # the Rust library raises its own exception type
        raise TrainError(f"--tokenizer: cannot read {file!r}: {e}") from None
    return FolderTokenizer(lambda text: tok.encode(text, add_special_tokens=False).ids,
                           tok.get_vocab_size(), _eos_id(tok, path), path)


def _eos_id(tok, path: str) -> int | None:
    """The id of tokenizer_config.json's eos_token, if the folder names one."""
    config = os.path.join(path, "tokenizer_config.json")
    if not os.path.isfile(config):
        return None
    try:
        with open(config) as f:
            settings = json.load(f)
    except (OSError, ValueError) as e:
        raise TrainError(f"--tokenizer: cannot read {config!r} ({e})") from None
    eos = settings.get("eos_token") if isinstance(settings, dict) else None
    if isinstance(eos, dict):  # {"content": "</s>", ...}
        eos = eos.get("content")
    return None if eos is None else tok.token_to_id(eos)

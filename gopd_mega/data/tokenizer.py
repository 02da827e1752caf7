"""Tokenizers: the protocol the system uses, and the project's character-level tokenizer.

Everything outside this module (prompt datasets, rollout engines, evaluation) talks to a
:class:`Tokenizer`: ``encode``, ``decode``, ``vocab_size``, ``pad_id``, ``eos_id``, ``bos_id`` and
``stop_ids``. :class:`CharTokenizer` implements it for the synthetic arithmetic domains; an adapter
around a Hugging Face tokenizer (real models) implements the same protocol.

CharTokenizer vocabulary (ids are fixed, so a saved model never disagrees with its tokenizer):
    0 <pad>   1 <bos>   2 <eos>   3..12 '0'..'9'   then '+', '*', '-', '=', ' ', then a-z.
``encode`` adds no special tokens (callers add bos/eos where they mean them); ``decode`` stops at
the first eos and drops pad/bos.
"""

from __future__ import annotations

import json
import os
from abc import ABC, abstractmethod
from pathlib import Path

PAD, BOS, EOS = "<pad>", "<bos>", "<eos>"
SPECIALS: tuple[str, ...] = (PAD, BOS, EOS)
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
CHARS: tuple[str, ...] = (*"0123456789", "+", "*", "-", "=", " ", *"abcdefghijklmnopqrstuvwxyz")


class Tokenizer(ABC):
    """What the rest of gopd-mega needs of a tokenizer."""

    @abstractmethod
    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` without any special tokens."""

    @abstractmethod
    def decode(self, ids: list[int]) -> str:
        """Text of ``ids``, stopping at the first stop id and dropping special tokens."""

    @property
    @abstractmethod
    def vocab_size(self) -> int:
        """Number of real token ids (a model's output layer may be padded beyond it)."""

    @property
    @abstractmethod
    def pad_id(self) -> int: ...

    @property
    @abstractmethod
    def eos_id(self) -> int: ...

    @property
    def bos_id(self) -> int | None:
        """Id prepended to every prompt, or None when the model has no bos token."""
        return None

    @property
    def stop_ids(self) -> list[int]:
        """Ids that end a response (eos plus e.g. chat end-of-turn tokens)."""
        return [self.eos_id]


class CharTokenizer(Tokenizer):
    """Character-level tokenizer of the synthetic arithmetic domains (see the module docstring)."""

    def __init__(self, chars: tuple[str, ...] | list[str] = CHARS):
        self._itos: list[str] = list(SPECIALS) + list(chars)
        if len(set(self._itos)) != len(self._itos):
            raise ValueError("CharTokenizer: duplicate characters in the vocabulary")
        self._stoi = {s: i for i, s in enumerate(self._itos)}

    def encode(self, text: str) -> list[int]:
        try:
            return [self._stoi[c] for c in text]
        except KeyError as exc:
            raise ValueError(f"CharTokenizer cannot encode character {exc.args[0]!r} in {text!r}") from None

    def decode(self, ids) -> str:
        out = []
        for i in ids:
            i = int(i)
            if i == self.eos_id:
                break
            if i in (PAD_ID, BOS_ID):
                continue
            out.append(self._itos[i])
        return "".join(out)

    @property
    def vocab_size(self) -> int:
        return len(self._itos)

    @property
    def pad_id(self) -> int:
        return PAD_ID

    @property
    def bos_id(self) -> int:
        return BOS_ID

    @property
    def eos_id(self) -> int:
        return EOS_ID

    def save(self, directory: str | os.PathLike) -> Path:
        """Write ``tokenizer.json`` into ``directory`` (created if needed); returns its path."""
        path = Path(directory) / "tokenizer.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"type": "char", "vocab": self._itos}, indent=1))
        return path

    @classmethod
    def load(cls, directory: str | os.PathLike) -> CharTokenizer:
        path = Path(directory) / "tokenizer.json"
        data = json.loads(path.read_text())
        if data.get("type") != "char" or tuple(data["vocab"][:3]) != SPECIALS:
            raise ValueError(f"{path} is not a gopd-mega character tokenizer")
        return cls(data["vocab"][3:])

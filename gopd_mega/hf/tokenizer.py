"""Hugging Face tokenizers behind the project's :class:`~gopd_mega.data.tokenizer.Tokenizer`.

:class:`HFTokenizer` wraps ``transformers.AutoTokenizer`` loaded from a local model folder:
  * ``encode`` adds no special tokens (as the protocol says); ``bos_id`` is the token the HF
    tokenizer itself prepends with ``add_special_tokens=True`` (Llama 3: <|begin_of_text|>;
    Qwen, SmolLM2: none), so ``[bos] + encode(text)`` equals what HF feeds its own model.
  * ``stop_ids``: ``eos_token_id`` of generation_config.json (an int or a list, e.g. Qwen's
    <|im_end|> and <|endoftext|>) plus the tokenizer's eos.
  * ``apply_chat_template(prompt)``: one user turn + generation prompt, as text; passes
    ``enable_thinking=False`` when the template knows that switch (Qwen3 non-thinking mode, the
    mode the paper distils in).

:func:`check_same_vocab` refuses a teacher/student pair whose token ids mean different things:
G-OPD's reward is log pi_teacher(y_t) - log pi_ref(y_t) at the SAME id y_t, so one shifted id
silently corrupts the reward. Embedding-row padding (151936 vs 152064 for Qwen) is allowed.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from gopd_mega.data.tokenizer import Tokenizer


class TokenizerMismatch(ValueError):
    """Two models do not share a vocabulary; the message names both."""


_TOKENIZER_DEFINITIONS = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")
"""Files of which a folder needs at least one for AutoTokenizer to build a tokenizer from it."""


def _load_auto(directory: str | os.PathLike):
    from transformers import AutoTokenizer

    from gopd_mega.hf.safetensors_io import CheckpointError

    path = Path(directory)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: tokenizer folder does not exist")
    if not any((path / f).is_file() for f in _TOKENIZER_DEFINITIONS):
        raise CheckpointError(
            f"{path}: no tokenizer in this Hugging Face folder (none of {', '.join(_TOKENIZER_DEFINITIONS)}); "
            "copy the model's tokenizer files into it"
        )
    config = path / "config.json"
    if config.is_file():  # AutoTokenizer reads it too, and reports a broken one as a tokenizer problem
        try:
            json.loads(config.read_text())
        except ValueError as exc:
            raise CheckpointError(f"{config}: not valid JSON ({exc})") from None
    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise CheckpointError(
            f"{path}: transformers cannot load its tokenizer: {' '.join(str(exc).split())[:300]}"
        ) from None


class HFTokenizer(Tokenizer):
    """The project's tokenizer protocol over a local Hugging Face tokenizer folder."""

    def __init__(self, directory: str | os.PathLike):
        self.path = Path(directory)
        self.hf = _load_auto(directory)
        gen = self.path / "generation_config.json"
        eos = json.loads(gen.read_text()).get("eos_token_id") if gen.is_file() else None
        eos_list = [eos] if isinstance(eos, int) else list(eos or [])
        if self.hf.eos_token_id is not None and self.hf.eos_token_id not in eos_list:
            eos_list.append(self.hf.eos_token_id)
        if not eos_list:
            raise ValueError(
                f"{self.path}: no eos token (neither generation_config.json eos_token_id nor the tokenizer's)"
            )
        self._stop_ids = eos_list
        # What HF prepends on its own (a probe string, compared with and without special tokens).
        with_special = self.hf("a", add_special_tokens=True)["input_ids"]
        plain = self.hf("a", add_special_tokens=False)["input_ids"]
        self._bos = (
            with_special[0]
            if len(with_special) > len(plain) and with_special[1:] == plain[: len(with_special) - 1]
            else None
        )

    def encode(self, text: str) -> list[int]:
        return list(self.hf.encode(text, add_special_tokens=False))

    def decode(self, ids) -> str:
        ids = [int(i) for i in ids]
        stops = set(self._stop_ids)
        for k, i in enumerate(ids):
            if i in stops:
                ids = ids[:k]
                break
        return self.hf.decode(ids, skip_special_tokens=True)

    @property
    def vocab_size(self) -> int:
        return len(self.hf)  # base vocabulary plus added tokens

    @property
    def pad_id(self) -> int:
        return self.hf.pad_token_id if self.hf.pad_token_id is not None else self._stop_ids[0]

    @property
    def eos_id(self) -> int:
        return self._stop_ids[0]

    @property
    def bos_id(self) -> int | None:
        return self._bos

    @property
    def stop_ids(self) -> list[int]:
        return list(self._stop_ids)

    @property
    def bos_token(self) -> str | None:
        return None if self._bos is None else self.hf.convert_ids_to_tokens(self._bos)

    def apply_chat_template(
        self, prompt: str | list[dict[str, str]], system: str | None = None, enable_thinking: bool = False
    ) -> str:
        """Text of the chat-formatted prompt ending in the assistant's generation prompt."""
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        if system is not None:
            messages.insert(0, {"role": "system", "content": system})
        if not self.hf.chat_template:
            raise ValueError(f"{self.path}: the tokenizer has no chat template (set data.chat_template=false)")
        kwargs: dict[str, Any] = {}
        if "enable_thinking" in self.hf.chat_template:
            kwargs["enable_thinking"] = enable_thinking
        return self.hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **kwargs)

    def check_compatible(
        self, other: str | os.PathLike | HFTokenizer, name: str = "other model", self_name: str = "student"
    ) -> None:
        """Raise :class:`TokenizerMismatch` unless ``other`` (a model folder or tokenizer) tokenizes
        like this one; embedding sizes are read from each folder's config.json when present."""
        other_tok = other if isinstance(other, HFTokenizer) else HFTokenizer(other)
        check_same_vocab(
            self,
            other_tok,
            _config_vocab(self.path),
            _config_vocab(other_tok.path),
            (f"{self_name} ({self.path})", f"{name} ({other_tok.path})"),
        )


def _config_vocab(directory: Path) -> int | None:
    cfg = directory / "config.json"
    return json.loads(cfg.read_text()).get("vocab_size") if cfg.is_file() else None


_PROBE = "G-OPD probe: Résumé 12345 +-*/ 你好 <think> def f(x):\n\treturn x**2  # ok"


def check_same_vocab(
    student_tok,
    other_tok,
    student_vocab: int | None,
    other_vocab: int | None,
    names: tuple[str, str] = ("student", "teacher"),
) -> None:
    """Refuse two tokenizers (HFTokenizer or transformers tokenizers) that differ on any real id.

    Compared: the full token -> id maps (added tokens included), eos/bos/pad tokens and the ids of
    a probe text. ``*_vocab`` are the models' embedding rows; each must cover its tokenizer, and
    they may differ from each other only by padding (ids beyond both tokenizers' vocabularies).
    """
    a_name, b_name = names
    a = getattr(student_tok, "hf", student_tok)
    b = getattr(other_tok, "hf", other_tok)
    va, vb = a.get_vocab(), b.get_vocab()
    if va != vb:
        only_a = sorted(set(va) - set(vb))[:3]
        only_b = sorted(set(vb) - set(va))[:3]
        moved = sorted(t for t in set(va) & set(vb) if va[t] != vb[t])[:3]
        raise TokenizerMismatch(
            f"{a_name} and {b_name} have different vocabularies ({len(va)} vs {len(vb)} tokens; "
            f"only in {a_name}: {only_a}, only in {b_name}: {only_b}, different ids: "
            f"{[(t, va[t], vb[t]) for t in moved]}); their log-probs are not comparable"
        )
    for attr in ("eos_token", "bos_token", "pad_token"):
        if getattr(a, attr) != getattr(b, attr):
            raise TokenizerMismatch(
                f"{a_name} and {b_name} differ in {attr}: {getattr(a, attr)!r} vs {getattr(b, attr)!r}"
            )
    if a.encode(_PROBE, add_special_tokens=False) != b.encode(_PROBE, add_special_tokens=False):
        raise TokenizerMismatch(
            f"{a_name} and {b_name} tokenize the same text differently "
            "(same vocabulary, different merges/normalisation)"
        )
    for name, rows in ((a_name, student_vocab), (b_name, other_vocab)):
        if rows is not None and rows < len(a):
            raise TokenizerMismatch(f"{name}: model has {rows} embedding rows but the tokenizer has {len(a)} tokens")

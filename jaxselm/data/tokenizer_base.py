"""The :class:`Tokenizer` interface and the file-free built-in tokenizers (bytes, words).

Everything downstream (sampling, training, the online loop) needs the same few things from a
tokenizer: text -> ids, ids -> text, the BOS/EOS/pad ids and the vocabulary size, and the chat
template that turns a conversation into the prompt the model was tuned on. :class:`Tokenizer`
is that interface. The built-ins here have a deterministic vocabulary and need no files:

* :class:`ByteTokenizer`: UTF-8 bytes (``builtin:bytes``), for CPU demos;
* :class:`WordTokenizer`: whitespace-separated words from a fixed list, for the synthetic tasks
  (see :func:`jaxselm.data.tasks.task_tokenizer`).

The tokenizers read from files (``tokenizer.json``, SentencePiece) and :func:`load_tokenizer`
are in :mod:`jaxselm.data.tokenizer`.
"""

from __future__ import annotations

import abc
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from jaxselm.data.chat_template import check_chat_template, render_chat_template
from jaxselm.errors import TokenizerError

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"

# A plain template for the built-ins: message contents separated by single spaces; roles are not
# written (the built-in vocabularies are for single-turn synthetic tasks).
SIMPLE_CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['content'] }}{% if not loop.last %} {% endif %}{% endfor %}"
)


class Tokenizer(abc.ABC):
    """The interface every tokenizer offers; see the module docstring."""

    #: Where the tokenizer came from (a path or ``builtin:...``), for messages.
    source: str

    @abc.abstractmethod
    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        """Text to ids; special-token strings in ``text`` become their ids."""

    @abc.abstractmethod
    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Ids to text."""

    @property
    @abc.abstractmethod
    def vocab_size(self) -> int:
        """Number of ids (including added/special tokens)."""

    @property
    @abc.abstractmethod
    def bos_id(self) -> int | None:
        """Beginning-of-sequence id, or None when the tokenizer has none."""

    @property
    @abc.abstractmethod
    def eos_id(self) -> int | None:
        """End-of-sequence id, or None when the tokenizer has none."""

    @property
    @abc.abstractmethod
    def pad_id(self) -> int:
        """Padding id: the declared pad token, else EOS, else 0 (padding is always masked)."""

    @property
    def special_tokens(self) -> dict[str, str]:
        """Named special tokens as strings, e.g. {"bos_token": "<s>"}; seen by chat templates."""
        return {}

    @property
    def chat_template(self) -> str | None:
        """The Jinja chat template, or None."""
        return None

    @property
    def add_bos_token(self) -> bool:
        """Whether the model expects BOS before a plain text (HF ``add_bos_token``, GGUF
        ``tokenizer.ggml.add_bos_token``); :meth:`encode` still adds it only when asked."""
        return False

    def save(self, directory: str | os.PathLike) -> Path:
        """Writes the tokenizer's files into ``directory`` in the Hugging Face layout
        (``AutoTokenizer.from_pretrained(directory)`` loads them); returns the directory."""
        raise TokenizerError(f"{self.source}: this tokenizer has no files to save")

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = False,
        **kwargs: Any,
    ) -> str:
        """Renders ``messages`` to prompt text with the tokenizer's chat template."""
        if self.chat_template is None:
            raise TokenizerError(f"{self.source}: the tokenizer has no chat template")
        return render_chat_template(
            self.chat_template,
            messages,
            add_generation_prompt=add_generation_prompt,
            special_tokens=self.special_tokens,
            source=self._template_source(),
            **kwargs,
        )

    def check_chat_template(self) -> None:
        """A chat template that does not compile: one line now, not at the first prompt."""
        if self.chat_template is not None:
            check_chat_template(self.chat_template, self._template_source())

    def _template_source(self) -> str:
        return self.source

    def _add_specials(self, ids: list[int], add_bos: bool, add_eos: bool) -> list[int]:
        """``ids`` with BOS prepended / EOS appended as requested (an error if there is none)."""
        if add_bos:
            if self.bos_id is None:
                raise TokenizerError(
                    f"{self.source}: add_bos requested but the tokenizer has no BOS token"
                )
            ids = [self.bos_id] + ids
        if add_eos:
            if self.eos_id is None:
                raise TokenizerError(
                    f"{self.source}: add_eos requested but the tokenizer has no EOS token"
                )
            ids = ids + [self.eos_id]
        return ids


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes: ids 0/1/2 are pad/BOS/EOS and byte b is id b + 3 (vocabulary 259)."""

    _OFFSET = 3

    def __init__(self, chat_template: str = SIMPLE_CHAT_TEMPLATE):
        self.source = "builtin:bytes"
        self._template = chat_template

    vocab_size = property(lambda self: 256 + self._OFFSET)
    bos_id = property(lambda self: 1)
    eos_id = property(lambda self: 2)
    pad_id = property(lambda self: 0)
    chat_template = property(lambda self: self._template)

    @property
    def special_tokens(self) -> dict[str, str]:
        return {"pad_token": PAD, "bos_token": BOS, "eos_token": EOS}

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        return self._add_specials(
            [b + self._OFFSET for b in text.encode("utf-8")], add_bos, add_eos
        )

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        data = bytes(
            int(i) - self._OFFSET for i in ids if self._OFFSET <= int(i) < self._OFFSET + 256
        )
        return data.decode("utf-8", errors="replace")


class WordTokenizer(Tokenizer):
    """Whitespace-separated words from a fixed list: ids 0..3 are pad/BOS/EOS/unk, then the words.

    Deterministic and file-free: the synthetic tasks build theirs from their own vocabulary
    (see :func:`jaxselm.data.tasks.task_tokenizer`), so ids are stable across runs and hosts.
    """

    def __init__(
        self, words: Sequence[str], chat_template: str = SIMPLE_CHAT_TEMPLATE, name: str = "words"
    ):
        self.source = f"builtin:{name}"
        words = list(words)
        bad = [
            w for w in words if not w or any(c.isspace() for c in w) or w in (PAD, BOS, EOS, UNK)
        ]
        if bad:
            raise TokenizerError(
                f"{self.source}: invalid vocabulary word {bad[0]!r} "
                "(empty, contains whitespace, or reserved)"
            )
        if len(set(words)) != len(words):
            dup = next(w for w in words if words.count(w) > 1)
            raise TokenizerError(f"{self.source}: duplicate vocabulary word {dup!r}")
        self.words: tuple[str, ...] = (PAD, BOS, EOS, UNK, *words)
        self._ids = {w: i for i, w in enumerate(self.words)}
        self._template = chat_template

    vocab_size = property(lambda self: len(self.words))
    bos_id = property(lambda self: 1)
    eos_id = property(lambda self: 2)
    pad_id = property(lambda self: 0)
    unk_id = property(lambda self: 3)
    chat_template = property(lambda self: self._template)

    @property
    def special_tokens(self) -> dict[str, str]:
        return {"pad_token": PAD, "bos_token": BOS, "eos_token": EOS, "unk_token": UNK}

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        ids = [self._ids.get(w, 3) for w in text.split()]
        return self._add_specials(ids, add_bos, add_eos)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        out = []
        for i in (int(i) for i in ids):
            if not 0 <= i < len(self.words):
                out.append(UNK)
            elif i < 4 and skip_special_tokens:
                continue
            else:
                out.append(self.words[i])
        return " ".join(out)

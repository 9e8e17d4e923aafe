"""Tokenizers read from files, and :func:`load_tokenizer`, which picks one from what it finds.

Both implement :class:`~jaxselm.data.tokenizer_base.Tokenizer` (the interface, with the
file-free built-ins :class:`~jaxselm.data.tokenizer_base.ByteTokenizer` and
:class:`~jaxselm.data.tokenizer_base.WordTokenizer`, lives in :mod:`jaxselm.data.tokenizer_base`):

* :class:`HFTokenizer`: a ``tokenizer.json`` (fast tokenizer format) read with the ``tokenizers``
  library; special tokens and the chat template come from ``tokenizer_config.json`` (and
  ``chat_template.jinja`` when present), as in the Hugging Face checkpoint layout of Llama-3,
  Mistral/Zephyr and others.
* :class:`SentencePieceTokenizer`: a SentencePiece ``.model`` (MAP-Neo's and Llama-2's format);
  special-token strings inside the text (e.g. ``<s>`` written by a chat template) map to their
  ids, the rest goes through SentencePiece.

:func:`load_tokenizer` also gives the built-ins (``builtin:bytes``, ``builtin:task:NAME``).
Missing or malformed files raise :class:`~jaxselm.errors.TokenizerError` naming the file.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from jaxselm.data.chat_template import one_line
from jaxselm.data.tasks import task_tokenizer
from jaxselm.data.tokenizer_base import ByteTokenizer, Tokenizer
from jaxselm.errors import TokenizerError

# The names transformers exposes to chat templates (its ``special_tokens_map``).
_SPECIAL_NAMES = (
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
)


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------


def _read_json(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise TokenizerError(f"{path}: file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise TokenizerError(f"{path}: cannot read: {one_line(e)}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise TokenizerError(
            f"{path}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})"
        ) from None


def _token_content(value: Any, path: Path, key: str) -> str | None:
    """A special token in tokenizer_config.json: a string, an AddedToken dict, or null."""
    if value is None:
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return value["content"]
    raise TokenizerError(f"{path}: field '{key}' must be a string or a dict with 'content'")


class _TokenizerConfig:
    """What we use from ``tokenizer_config.json`` and ``chat_template.jinja``."""

    def __init__(self, directory: Path | None):
        self.path: Path | None = None
        self.tokens: dict[str, str] = {}
        self.added: dict[int, str] = {}
        self.chat_template: str | None = None
        self.template_source: str | None = None
        if directory is None:
            return
        cfg_path = directory / "tokenizer_config.json"
        cfg: Mapping[str, Any] = {}
        if cfg_path.exists():
            cfg = _read_json(cfg_path)
            if not isinstance(cfg, Mapping):
                raise TokenizerError(f"{cfg_path}: expected a JSON object")
            self.path = cfg_path
        for name in _SPECIAL_NAMES:
            content = _token_content(cfg.get(name), cfg_path, name)
            if content is not None:
                self.tokens[name] = content
        decoder = cfg.get("added_tokens_decoder", {}) or {}
        if not isinstance(decoder, Mapping):
            raise TokenizerError(f"{cfg_path}: field 'added_tokens_decoder' must be an object")
        for key, value in decoder.items():
            content = _token_content(value, cfg_path, f"added_tokens_decoder.{key}")
            try:
                self.added[int(key)] = content
            except ValueError:
                raise TokenizerError(
                    f"{cfg_path}: field 'added_tokens_decoder' has a non-integer id {key!r}"
                ) from None
        jinja_path = directory / "chat_template.jinja"
        if jinja_path.exists():
            try:
                self.chat_template = jinja_path.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as e:
                raise TokenizerError(f"{jinja_path}: cannot read: {one_line(e)}") from None
            self.template_source = str(jinja_path)
        elif "chat_template" in cfg and cfg["chat_template"] is not None:
            template = cfg["chat_template"]
            if isinstance(template, list):  # [{"name": ..., "template": ...}]: take "default"
                named = {
                    t.get("name"): t.get("template") for t in template if isinstance(t, Mapping)
                }
                template = named.get("default")
            if not isinstance(template, str):
                raise TokenizerError(
                    f"{cfg_path}: field 'chat_template' must be a string or a list "
                    "of {name, template} with a 'default'"
                )
            self.chat_template = template
            self.template_source = str(cfg_path)


class _FileTokenizer(Tokenizer):
    """What the file-backed tokenizers share: special ids by name and ``tokenizer_config.json``
    (``_ids`` and ``_config``, set by the subclass)."""

    _ids: dict[str, int]
    _config: _TokenizerConfig

    @property
    def bos_id(self) -> int | None:
        return self._ids.get("bos_token")

    @property
    def eos_id(self) -> int | None:
        return self._ids.get("eos_token")

    @property
    def pad_id(self) -> int:
        pad = self._ids.get("pad_token")
        if pad is not None:
            return pad
        return self.eos_id if self.eos_id is not None else 0

    @property
    def chat_template(self) -> str | None:
        return self._config.chat_template

    def _template_source(self) -> str:
        return self._config.template_source or self.source


# --------------------------------------------------------------------------------------------
# Hugging Face tokenizer.json
# --------------------------------------------------------------------------------------------


class HFTokenizer(_FileTokenizer):
    """A ``tokenizer.json`` read with the ``tokenizers`` library, plus ``tokenizer_config.json``."""

    def __init__(self, path: str | os.PathLike):
        import tokenizers  # imported here: only this implementation needs it

        path = Path(path)
        self.source = str(path)
        data = _read_json(path)  # a clear error for a missing or non-JSON file
        try:
            self._tok = tokenizers.Tokenizer.from_str(json.dumps(data))
        except Exception as e:  # the library raises plain Exception subclasses
            raise TokenizerError(f"{path}: not a valid tokenizer.json: {one_line(e)}") from None
        self._config = _TokenizerConfig(path.parent)
        self._ids: dict[str, int] = {}
        for name, content in self._config.tokens.items():
            tid = self._tok.token_to_id(content)
            if tid is None:
                raise TokenizerError(
                    f"{self._config.path}: field '{name}' is {content!r}, which is "
                    f"not in the vocabulary of {path}"
                )
            self._ids[name] = tid

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def special_tokens(self) -> dict[str, str]:
        return dict(self._config.tokens)

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        ids = list(self._tok.encode(text, add_special_tokens=False).ids)
        return self._add_specials(ids, add_bos, add_eos)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)


# --------------------------------------------------------------------------------------------
# SentencePiece
# --------------------------------------------------------------------------------------------


class SentencePieceTokenizer(_FileTokenizer):
    """A SentencePiece ``.model``; ``tokenizer_config.json`` beside it may rename the specials."""

    def __init__(self, path: str | os.PathLike):
        import sentencepiece

        path = Path(path)
        self.source = str(path)
        if not path.is_file():
            raise TokenizerError(f"{path}: file not found")
        try:
            self._sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
        except Exception as e:
            raise TokenizerError(
                f"{path}: not a valid SentencePiece model: {one_line(e)}"
            ) from None
        self._config = _TokenizerConfig(path.parent)
        sp = self._sp
        n = sp.get_piece_size()
        pieces = {sp.id_to_piece(i): i for i in range(n)}
        defaults = {
            "bos_token": sp.bos_id(),
            "eos_token": sp.eos_id(),
            "unk_token": sp.unk_id(),
            "pad_token": sp.pad_id(),
        }
        self._ids: dict[str, int] = {}
        self._names: dict[str, str] = {}
        for name, tid in defaults.items():
            if tid is not None and 0 <= tid < n:
                self._ids[name] = tid
                self._names[name] = sp.id_to_piece(tid)
        for name, content in self._config.tokens.items():
            if content not in pieces:
                raise TokenizerError(
                    f"{self._config.path}: field '{name}' is {content!r}, which is "
                    f"not a piece of {path}"
                )
            self._ids[name] = pieces[content]
            self._names[name] = content
        # Strings that stand for one id when they appear in text: control pieces, user-defined
        # pieces, named specials and added tokens that are pieces of the model.
        specials = {
            sp.id_to_piece(i): i
            for i in range(n)
            if sp.is_control(i)
            or sp.IdToPiece(i) in self._names.values()
            or _is_user_defined(sp, i)
        }
        for tid, content in self._config.added.items():
            if pieces.get(content) == tid:
                specials[content] = tid
        specials = {k: v for k, v in specials.items() if k}
        self._special_ids = frozenset(specials.values())
        self._special_re = (
            re.compile("|".join(re.escape(s) for s in sorted(specials, key=len, reverse=True)))
            if specials
            else None
        )
        self._specials = specials

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    @property
    def special_tokens(self) -> dict[str, str]:
        return dict(self._names)

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        ids: list[int] = []
        pos = 0
        if self._special_re is not None:
            for m in self._special_re.finditer(text):
                if m.start() > pos:
                    ids.extend(self._sp.encode(text[pos : m.start()]))
                ids.append(self._specials[m.group(0)])
                pos = m.end()
        if pos < len(text):
            ids.extend(self._sp.encode(text[pos:]))
        return self._add_specials(ids, add_bos, add_eos)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        out: list[str] = []
        run: list[int] = []
        for i in (int(i) for i in ids):
            if i in self._special_ids:
                if run:
                    out.append(self._sp.decode(run))
                    run = []
                if not skip_special_tokens:
                    out.append(self._sp.id_to_piece(i))
            else:
                run.append(i)
        if run:
            out.append(self._sp.decode(run))
        return "".join(out)


def _is_user_defined(sp: Any, i: int) -> bool:
    fn = getattr(sp, "is_user_defined", None) or getattr(sp, "IsUserDefined", None)
    return bool(fn(i)) if fn is not None else False


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """Loads a tokenizer, choosing the implementation from the files present.

    ``path`` may be a directory (``tokenizer.json`` is preferred, then ``tokenizer.model``, then
    a single ``*.model``), a ``.json`` or ``.model`` file, ``builtin:bytes``, or
    ``builtin:task:NAME`` for a synthetic task's word tokenizer.
    """
    spec = str(path)
    if spec == "builtin:bytes":
        return ByteTokenizer()
    if spec.startswith("builtin:task:"):
        return task_tokenizer(spec.removeprefix("builtin:task:"))
    if spec.startswith("builtin:"):
        raise TokenizerError(
            f"{spec}: unknown built-in tokenizer (expected builtin:bytes or builtin:task:NAME)"
        )
    p = Path(path)
    if p.is_dir():
        if (p / "tokenizer.json").is_file():
            return HFTokenizer(p / "tokenizer.json")
        if (p / "tokenizer.model").is_file():
            return SentencePieceTokenizer(p / "tokenizer.model")
        models = sorted(p.glob("*.model"))
        if len(models) == 1:
            return SentencePieceTokenizer(models[0])
        raise TokenizerError(f"{p}: no tokenizer.json or tokenizer.model found in the directory")
    if not p.exists():
        raise TokenizerError(f"{p}: file not found")
    if p.suffix == ".json":
        return HFTokenizer(p)
    if p.suffix == ".model":
        return SentencePieceTokenizer(p)
    raise TokenizerError(
        f"{p}: unknown tokenizer file type (expected tokenizer.json or a SentencePiece .model)"
    )

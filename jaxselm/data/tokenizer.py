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
* a ``.gguf`` file's tokenizer (:func:`load_gguf_tokenizer`): an :class:`HFTokenizer` over the
  ``tokenizers.Tokenizer`` that :mod:`jaxselm.data.tokenizer_gguf` builds from its metadata.

:func:`load_tokenizer` also gives the built-ins (``builtin:bytes``, ``builtin:task:NAME``).
``save(directory)`` writes a file tokenizer in the Hugging Face layout (``tokenizer.json`` or a
copy of the ``.model``, ``tokenizer_config.json``, ``special_tokens_map.json``) that
``transformers.AutoTokenizer.from_pretrained`` loads:

    tok = load_tokenizer("SmolLM2-135M-Instruct.Q4_1.gguf")
    tok.save("out/hf-model")          # beside config.json and the safetensors

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
from jaxselm.data.tokenizer_gguf import (
    GGUFVocab,
    build_backend,
    read_gguf_vocab,
    vocab_from_backend,
    vocab_from_sentencepiece,
)
from jaxselm.errors import TokenizerError
from jaxselm.files import atomic_write, write_text

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
        self.add_bos_token: bool | None = None
        self.model_max_length: int | None = None
        if directory is None:
            return
        cfg_path = directory / "tokenizer_config.json"
        cfg: Mapping[str, Any] = {}
        if cfg_path.exists():
            cfg = _read_json(cfg_path)
            if not isinstance(cfg, Mapping):
                raise TokenizerError(f"{cfg_path}: expected a JSON object")
            self.path = cfg_path
        for key, kind in (("add_bos_token", bool), ("model_max_length", int)):
            value = cfg.get(key)
            if isinstance(value, kind) and (kind is bool or not isinstance(value, bool)):
                setattr(self, key, value)
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

    @property
    def special_token_ids(self) -> dict[str, int]:
        """Ids of the named special tokens, e.g. {"bos_token": 1, "eos_token": 2}."""
        return dict(self._ids)

    def _template_source(self) -> str:
        return self._config.template_source or self.source

    def _save_config(self, directory: Path, tokenizer_class: str) -> None:
        """``tokenizer_config.json`` and ``special_tokens_map.json`` as transformers has them."""
        specials = self.special_tokens
        config: dict[str, Any] = {"tokenizer_class": tokenizer_class, **specials}
        config |= {"add_bos_token": self.add_bos_token, "add_eos_token": False}
        optional = {"model_max_length": self._config.model_max_length}
        optional |= {"chat_template": self.chat_template}
        config |= {"clean_up_tokenization_spaces": False}
        config |= {k: v for k, v in optional.items() if v is not None}
        for name, obj in (("tokenizer_config.json", config), ("special_tokens_map.json", specials)):
            write_text(directory / name, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


# --------------------------------------------------------------------------------------------
# Hugging Face tokenizer.json
# --------------------------------------------------------------------------------------------


class HFTokenizer(_FileTokenizer):
    """A ``tokenizers.Tokenizer``: read from a ``tokenizer.json`` with ``tokenizer_config.json``
    beside it, or built in memory (:meth:`from_backend`, e.g. from a GGUF file's metadata)."""

    def __init__(self, path: str | os.PathLike):
        import tokenizers  # imported here: only this implementation needs it

        path = Path(path)
        data = _read_json(path)  # a clear error for a missing or non-JSON file
        try:
            backend = tokenizers.Tokenizer.from_str(json.dumps(data))
        except Exception as e:  # the library raises plain Exception subclasses
            raise TokenizerError(f"{path}: not a valid tokenizer.json: {one_line(e)}") from None
        self._setup(backend, _TokenizerConfig(path.parent), str(path))

    @classmethod
    def from_backend(
        cls,
        backend: Any,
        *,
        source: str,
        special_tokens: Mapping[str, str | int],
        chat_template: str | None = None,
        add_bos_token: bool | None = None,
    ) -> HFTokenizer:
        """A tokenizer over a ``tokenizers.Tokenizer`` object, with its named special tokens
        (``{"bos_token": "<s>" or its id, ...}``) and chat template; ``source`` (a path) names it
        in messages."""
        config = _TokenizerConfig(None)
        ids = {k: v for k, v in special_tokens.items() if isinstance(v, int)}
        for name, tid in special_tokens.items():
            content = backend.id_to_token(tid) if name in ids else tid
            if content is None:
                raise TokenizerError(f"{source}: {name} id {tid} is not in the vocabulary")
            config.tokens[name] = content
        config.chat_template, config.template_source = chat_template, source
        config.add_bos_token, tok = add_bos_token, cls.__new__(cls)
        tok._setup(backend, config, source)
        tok._ids |= ids  # the ids as given, even where a token string occurs twice
        return tok

    def _setup(self, backend: Any, config: _TokenizerConfig, source: str) -> None:
        self.source = source
        self._tok = backend
        self._config = config
        self._ids: dict[str, int] = {}
        for name, content in config.tokens.items():
            tid = backend.token_to_id(content)
            if tid is None:
                raise TokenizerError(
                    f"{config.path or source}: field '{name}' is {content!r}, which is "
                    f"not in the vocabulary of {source}"
                )
            self._ids[name] = tid

    @property
    def backend(self) -> Any:
        """The underlying ``tokenizers.Tokenizer``."""
        return self._tok

    @property
    def add_bos_token(self) -> bool:
        if self._config.add_bos_token is not None:
            return self._config.add_bos_token
        ids = self._tok.encode("a", add_special_tokens=True).ids  # the post-processor's choice
        return self.bos_id is not None and ids[:1] == [self.bos_id]

    def save(self, directory: str | os.PathLike) -> Path:
        """``tokenizer.json``, ``tokenizer_config.json`` and ``special_tokens_map.json``."""
        d = Path(directory)
        write_text(d / "tokenizer.json", self._tok.to_str())
        self._save_config(d, "PreTrainedTokenizerFast")
        return d

    def gguf_vocab(self) -> GGUFVocab:
        """The ``tokenizer.ggml.*`` metadata a GGUF export writes for this tokenizer."""
        return vocab_from_backend(
            self._tok,
            special_ids=self._ids,
            chat_template=self.chat_template,
            add_bos=self.add_bos_token,
            where=self.source,
        )

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

    @property
    def add_bos_token(self) -> bool:
        add = self._config.add_bos_token
        return add if add is not None else self.bos_id is not None  # transformers' default

    def save(self, directory: str | os.PathLike) -> Path:
        """A copy of the ``.model`` file as ``tokenizer.model`` and the config files."""
        d = Path(directory)
        atomic_write(d / "tokenizer.model", self._sp.serialized_model_proto())
        self._save_config(d, "LlamaTokenizer")
        return d

    def gguf_vocab(self) -> GGUFVocab:
        """The ``tokenizer.ggml.*`` metadata (model ``llama``) a GGUF export writes."""
        return vocab_from_sentencepiece(
            self._sp,
            special_ids=self._ids,
            chat_template=self.chat_template,
            add_bos=self.add_bos_token,
        )

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
    a single ``*.model``, then a single ``*.gguf``), a ``.json``, ``.model`` or ``.gguf`` file,
    ``builtin:bytes``, or ``builtin:task:NAME`` for a synthetic task's word tokenizer.
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
        ggufs = sorted(p.glob("*.gguf"))
        if len(ggufs) == 1:
            return load_gguf_tokenizer(ggufs[0])
        raise TokenizerError(
            f"{p}: no tokenizer.json or tokenizer.model (or single .gguf) found in the directory"
        )
    if not p.exists():
        raise TokenizerError(f"{p}: file not found")
    if p.suffix == ".json":
        return HFTokenizer(p)
    if p.suffix == ".model":
        return SentencePieceTokenizer(p)
    if p.suffix == ".gguf":
        return load_gguf_tokenizer(p)
    raise TokenizerError(
        f"{p}: unknown tokenizer file type (expected tokenizer.json, a SentencePiece .model "
        "or a .gguf file)"
    )


def load_gguf_tokenizer(path: str | os.PathLike) -> HFTokenizer:
    """The tokenizer a GGUF file's ``tokenizer.ggml.*`` metadata describes (see
    :mod:`jaxselm.data.tokenizer_gguf`), with its special tokens and chat template."""
    vocab = read_gguf_vocab(path)
    return HFTokenizer.from_backend(
        build_backend(vocab, str(path)),
        source=str(path),
        special_tokens=vocab.special_ids(),
        chat_template=vocab.chat_template,
        add_bos_token=vocab.add_bos,
    )

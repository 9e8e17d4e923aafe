"""GGUF tokenizers: llama.cpp's ``tokenizer.ggml.*`` metadata <-> a ``tokenizers.Tokenizer``.

A GGUF file (llama.cpp, ollama) carries no ``tokenizer.json``: its tokenizer is metadata, the token
strings and their types, the BPE merges (model ``gpt2``) or the scores (model ``llama``,
SentencePiece style), the special ids, ``add_bos_token`` and the chat template.
:func:`read_gguf_vocab` reads them into a :class:`GGUFVocab`; :func:`build_backend` rebuilds the
tokenizer they describe with the ``tokenizers`` library:

* ``gpt2``: byte-level BPE. The text is split by the regexes llama.cpp uses for the file's
  ``tokenizer.ggml.pre``, each one splitting the pieces the previous one left (llama.cpp's
  ``unicode_regex_split``; ``Split(..., "isolated")`` here), then spelled in the byte alphabet and
  merged: "gpt-2" the GPT-2 regex, "smollm" every digit apart first, then the GPT-2 regex,
  "llama-bpe" Llama-3's, "default" llama.cpp's fallback.
* ``llama``: SentencePiece-style BPE with byte fallback, as transformers' GGUF converter builds it
  (its ``LlamaTokenizer``: Metaspace "▁" with a prefix space, the merges from the file or recovered
  from the scores).

Control tokens (``<|im_start|>``) become special added tokens and user-defined ones plain added
tokens, so both stay whole in text, as llama.cpp parses them. :func:`vocab_from_backend` and
:func:`vocab_from_sentencepiece` go the other way: the metadata a GGUF export writes.
:func:`jaxselm.data.load_tokenizer` on a ``.gguf`` file puts it together:

    from jaxselm.data import load_tokenizer
    tok = load_tokenizer("SmolLM2-135M-Instruct.Q4_1.gguf")
    chat = [{"role": "user", "content": "hi"}]
    ids = tok.encode(tok.apply_chat_template(chat, add_generation_prompt=True))

Problems with the file raise a one-line TokenizerError naming it and the key. Reading needs the
``gguf`` package (llama.cpp's own reader), imported only here.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from jaxselm.data.chat_template import one_line
from jaxselm.errors import TokenizerError

# llama.cpp's token types (gguf.TokenType).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_DEFAULT = (r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", r"[0-9][0-9][0-9]")
#: ``tokenizer.ggml.pre`` -> (the regexes llama.cpp's llama-vocab.cpp splits with, in order;
#: ignore_merges: a piece that is a whole token is taken as is). Canonical names come first.
PRE_TOKENIZERS: dict[str, tuple[tuple[str, ...], bool]] = {
    "default": (_DEFAULT, False),
    "gpt-2": ((_GPT2,), False),
    "smollm": ((r"\p{N}", _GPT2), False),
    "llama-bpe": ((_LLAMA3,), True),
    "qwen2": ((_QWEN2,), False),
    **{n: ((_GPT2,), False) for n in ("phi-2", "mpt", "olmo")},
    **{n: ((r"\p{N}", _GPT2), False) for n in ("starcoder", "refact", "command-r", "codeshell")},
    **{n: ((_LLAMA3,), True) for n in ("llama3", "llama-v3", "falcon3", "pixtral")},
}


@dataclasses.dataclass(frozen=True)
class GGUFVocab:
    """The ``tokenizer.ggml.*`` values of a GGUF file (ids are None when the file has none)."""

    model: str  # "gpt2" (byte-level BPE) or "llama" (SentencePiece style)
    tokens: tuple[str, ...]
    token_types: tuple[int, ...]
    pre: str | None = None  # gpt2: the pre-tokenizer name; None reads as "default"
    merges: tuple[str, ...] | None = None  # "left right"
    scores: tuple[float, ...] | None = None
    bos_id: int | None = None
    eos_id: int | None = None
    unk_id: int | None = None
    pad_id: int | None = None
    add_bos: bool = False
    add_eos: bool = False
    add_space_prefix: bool = True
    chat_template: str | None = None

    def special_ids(self) -> dict[str, int]:
        """{"bos_token": 1, ...} for the ids the file names."""
        names = {"bos_token": self.bos_id, "eos_token": self.eos_id}
        names |= {"unk_token": self.unk_id, "pad_token": self.pad_id}
        return {k: i for k, i in names.items() if i is not None}


def open_gguf(path: str | os.PathLike, error: type[Exception] = TokenizerError) -> Any:
    """A ``gguf.GGUFReader`` over the file (memory-mapped); ``error`` naming it if unreadable."""
    p = Path(path)
    try:
        import gguf
    except ImportError:
        raise error(
            f"{p}: reading GGUF files needs the 'gguf' package (pip install gguf)"
        ) from None
    if not p.is_file():
        raise error(f"{p}: file not found")
    try:
        return gguf.GGUFReader(str(p))
    except Exception as e:  # a damaged file fails anywhere in the reader's parsing
        raise error(
            f"{p}: not a readable GGUF file (truncated or corrupt: {type(e).__name__}: "
            f"{one_line(e)})"
        ) from None


_MISSING = object()


def gguf_value(
    reader: Any,
    key: str,
    kind: type | tuple[type, ...],
    *,
    array: bool | None = False,
    default: Any = _MISSING,
    where: str = "",
    error: type[Exception] = TokenizerError,
) -> Any:
    """Metadata ``key`` checked to be of ``kind`` (a list of them with ``array=True``; either
    with ``array=None``); ``default`` when absent, else ``error`` naming ``where`` and the key."""
    field = reader.fields.get(key)
    if field is None:
        if default is _MISSING:
            raise error(f"{where}: {key}: missing")
        return default
    try:
        value = field.contents()
    except (UnicodeDecodeError, IndexError, ValueError) as e:
        raise error(f"{where}: {key}: unreadable ({type(e).__name__})") from None
    kinds = kind if isinstance(kind, tuple) else (kind,)
    is_list = isinstance(value, list)
    items = value if is_list else [value]
    good = all(isinstance(v, kinds) and (bool in kinds or not isinstance(v, bool)) for v in items)
    if not good or (array is not None and is_list != array):
        names = "/".join(k.__name__ for k in kinds)
        expected = f"an array of {names}" if array else names
        raise error(f"{where}: {key}: expected {expected}, got {one_line(repr(value))[:80]}")
    return value


def read_gguf_vocab(path: str | os.PathLike) -> GGUFVocab:
    """The tokenizer metadata of a GGUF file; a one-line TokenizerError naming it and the key."""
    where = str(path)
    reader = open_gguf(path)

    def get(key: str, kind: Any, default: Any = _MISSING, array: bool = False) -> Any:
        key = f"tokenizer.{key}"
        return gguf_value(reader, key, kind, array=array, default=default, where=where)

    model = get("ggml.model", str)
    if model not in ("gpt2", "llama"):
        raise TokenizerError(
            f"{where}: tokenizer.ggml.model: unsupported {model!r}; supported: gpt2, llama"
        )
    tokens = tuple(get("ggml.tokens", str, array=True))
    types = tuple(get("ggml.token_type", int, [NORMAL] * len(tokens), array=True))
    scores = get("ggml.scores", (float, int), None, array=True)
    if len(types) != len(tokens) or (scores is not None and len(scores) != len(tokens)):
        raise TokenizerError(
            f"{where}: tokenizer.ggml.token_type/scores: lengths differ from the "
            f"{len(tokens)} tokens"
        )
    merges = get("ggml.merges", str, None, array=True)
    if model == "gpt2" and merges is None:
        raise TokenizerError(f"{where}: tokenizer.ggml.merges: missing (needed by gpt2)")
    ids = {}
    for name, key in (("bos", "bos"), ("eos", "eos"), ("unk", "unknown"), ("pad", "padding")):
        tid = get(f"ggml.{key}_token_id", int, None)
        if tid is not None and not 0 <= tid < len(tokens):
            raise TokenizerError(f"{where}: tokenizer.ggml.{key}_token_id: {tid} out of range")
        ids[f"{name}_id"] = tid
    pre = get("ggml.pre", str, None)
    if model == "gpt2" and (pre or "default") not in PRE_TOKENIZERS:
        raise TokenizerError(
            f"{where}: tokenizer.ggml.pre: unsupported {pre!r}; supported: "
            + ", ".join(PRE_TOKENIZERS)
        )
    template = get("chat_template", str, None)
    return GGUFVocab(
        model=model,
        tokens=tokens,
        token_types=types,
        pre=pre,
        merges=None if merges is None else tuple(merges),
        scores=None if scores is None else tuple(float(s) for s in scores),
        add_bos=get("ggml.add_bos_token", bool, model == "llama"),
        add_eos=get("ggml.add_eos_token", bool, False),
        add_space_prefix=get("ggml.add_space_prefix", bool, model == "llama"),
        chat_template=template,
        **ids,
    )


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map (``tokenizers`` exposes only the alphabet)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs, n = list(bs), 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def merges_from_scores(tokens: Sequence[str], scores: Sequence[float]) -> list[tuple[str, str]]:
    """BPE merges implied by a scored vocabulary, best first.

    transformers' ``generate_merges``, which its GGUF converter uses for files without merges;
    repeated here because transformers is not a dependency of jaxselm.
    """
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = []
    for token, score in dict(zip(tokens, scores)).items():
        local = [
            (token[:i], token[i:], score)
            for i in range(1, len(token))
            if token[:i] in vocab and token[i:] in vocab
        ]
        merges += sorted(local, key=lambda m: (vocab[m[0]], vocab[m[1]]))
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(a, b) for a, b, _ in merges]


def build_backend(vocab: GGUFVocab, where: str = "GGUF file") -> Any:
    """The ``tokenizers.Tokenizer`` the metadata describes (see the module docstring);
    TokenizerError naming ``where`` when the merges do not fit the tokens."""
    try:
        return _build_backend(vocab)
    except Exception as e:  # the library raises plain Exception subclasses
        raise TokenizerError(
            f"{where}: tokenizer.ggml.*: not a valid tokenizer ({one_line(e)})"
        ) from None


def _build_backend(vocab: GGUFVocab) -> Any:
    from tokenizers import (
        AddedToken,
        Regex,
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        processors,
    )

    if vocab.model == "gpt2":
        spell = bytes_to_unicode()
        alphabet = set(spell.values())
        whole = {CONTROL, USER_DEFINED, UNKNOWN}
        table: dict[str, int] = {}
        for i, (tok, typ) in enumerate(zip(vocab.tokens, vocab.token_types)):
            if typ not in whole and not set(tok) <= alphabet:  # respelled as transformers does
                tok = "".join(spell[b] for b in tok.encode("utf-8"))
            table.setdefault(tok, i)
        regexes, ignore_merges = PRE_TOKENIZERS[vocab.pre or "default"]
        merges = [tuple(m.split(" ", 1)) for m in vocab.merges or ()]
        backend = Tokenizer(models.BPE(vocab=table, merges=merges, ignore_merges=ignore_merges))
        splits = [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in regexes]
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [*splits, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
        )
        backend.decoder = decoders.ByteLevel()
    else:
        table = {t: i for i, t in enumerate(vocab.tokens)}
        merges = (
            [tuple(m.split(" ", 1)) for m in vocab.merges]
            if vocab.merges is not None
            else merges_from_scores(vocab.tokens, vocab.scores or [0.0] * len(vocab.tokens))
        )
        backend = Tokenizer(models.BPE(table, merges, fuse_unk=True, byte_fallback=True))
        scheme = "first" if vocab.add_space_prefix else "never"
        backend.pre_tokenizer = pre_tokenizers.Metaspace("▁", prepend_scheme=scheme, split=False)
        steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
        if vocab.add_space_prefix:
            steps.append(decoders.Strip(" ", 1, 0))
        backend.decoder = decoders.Sequence(steps)
    named = {i for i in (vocab.bos_id, vocab.eos_id, vocab.unk_id, vocab.pad_id) if i is not None}
    special = [
        AddedToken(t, special=True, normalized=False)
        for i, (t, typ) in enumerate(zip(vocab.tokens, vocab.token_types))
        if typ in (CONTROL, UNKNOWN) or i in named
    ]
    user = [
        AddedToken(t, special=False, normalized=False)
        for i, (t, typ) in enumerate(zip(vocab.tokens, vocab.token_types))
        if typ == USER_DEFINED and i not in named
    ]
    backend.add_special_tokens(special)
    backend.add_tokens(user)
    bos = vocab.tokens[vocab.bos_id] if vocab.add_bos and vocab.bos_id is not None else None
    eos = vocab.tokens[vocab.eos_id] if vocab.add_eos and vocab.eos_id is not None else None

    def template(seq: str, type_id: int) -> list[str]:
        return (
            [f"{t}:{type_id}" for t in (bos,) if t]
            + [seq]
            + [f"{t}:{type_id}" for t in (eos,) if t]
        )

    specials = [(t, i) for t, i in ((bos, vocab.bos_id), (eos, vocab.eos_id)) if t]
    backend.post_processor = processors.TemplateProcessing(
        single=template("$A:0", 0),
        pair=template("$A:0", 0) + template("$B:1", 1),
        special_tokens=specials,
    )
    return backend


def _pre_name(pre: Mapping[str, Any] | None, where: str) -> str:
    """The llama.cpp pre-tokenizer name of a byte-level ``tokenizer.json`` pre-tokenizer."""
    items = list(pre.get("pretokenizers", [])) if pre and pre.get("type") == "Sequence" else [pre]
    *splits, last = items or [None]
    regexes: list[str] = []
    ok = isinstance(last, Mapping) and last.get("type") == "ByteLevel"
    ok = ok and not last.get("add_prefix_space")
    for s in splits if ok else ():
        pattern = s.get("pattern") if isinstance(s.get("pattern"), Mapping) else {}
        if s.get("type") == "Digits" and s.get("individual_digits"):
            regexes.append(r"\p{N}")
        elif s.get("type") == "Split" and "Regex" in pattern and not s.get("invert"):
            ok = ok and s.get("behavior") == "Isolated"
            regexes.append(pattern["Regex"])
        else:
            ok = False
    if ok and last.get("use_regex", True):
        regexes.append(_GPT2)
    for name, (known, _) in PRE_TOKENIZERS.items():
        if ok and tuple(regexes) == known:
            return name
    raise TokenizerError(
        f"{where}: pre-tokenizer {one_line(json.dumps(pre))[:120]} has no llama.cpp equivalent "
        "(known: " + ", ".join(PRE_TOKENIZERS) + ")"
    )


def vocab_from_backend(
    backend: Any,
    *,
    special_ids: Mapping[str, int],
    chat_template: str | None,
    add_bos: bool,
    where: str,
) -> GGUFVocab:
    """The GGUF metadata of a ``tokenizers.Tokenizer`` whose model is BPE: byte-level (``gpt2``)
    or with byte fallback (``llama``, scores from the merge ranks: a token made by an earlier merge
    scores higher, which is the order llama.cpp's SentencePiece merging follows)."""
    data = json.loads(backend.to_str())
    model = data.get("model") or {}
    if model.get("type") != "BPE":
        raise TokenizerError(f"{where}: a {model.get('type')} model cannot be written to GGUF")
    n = backend.get_vocab_size(with_added_tokens=True)
    tokens = [f"[PAD{i}]" for i in range(n)]
    types = [UNUSED] * n
    for tok, i in backend.get_vocab(with_added_tokens=True).items():
        tokens[i], types[i] = tok, NORMAL
    for i, added in backend.get_added_tokens_decoder().items():
        types[i] = CONTROL if added.special else USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    ids = {k.removesuffix("_token") + "_id": v for k, v in special_ids.items()}
    ids = {k: v for k, v in ids.items() if k in ("bos_id", "eos_id", "unk_id", "pad_id")}
    common = dict(chat_template=chat_template, add_bos=add_bos, **ids)
    if not model.get("byte_fallback"):
        if data.get("normalizer") is not None:
            raise TokenizerError(f"{where}: a byte-level BPE with a normalizer has no GGUF form")
        pre = _pre_name(data.get("pre_tokenizer"), where)
        return GGUFVocab(
            "gpt2",
            tuple(tokens),
            tuple(types),
            pre=pre,
            merges=tuple(merges),
            add_space_prefix=False,
            **common,
        )
    first: dict[str, int] = {}
    for rank, m in enumerate(merges):
        first.setdefault(m.replace(" ", "", 1), rank)
    scores = [
        -float(first[t]) if t in first else (0.0 if len(t) == 1 else -float(len(merges) + 1))
        for t in tokens
    ]
    for i, t in enumerate(tokens):
        if types[i] == NORMAL and re.fullmatch(r"<0x[0-9A-F]{2}>", t):
            types[i], scores[i] = BYTE, 0.0
    if ids.get("unk_id") is not None:
        types[ids["unk_id"]] = UNKNOWN
    pre = data.get("pre_tokenizer") or {}
    prefix = pre.get("prepend_scheme", "always") != "never" if pre else True
    if pre and pre.get("type") != "Metaspace":
        raise TokenizerError(f"{where}: a byte-fallback BPE without Metaspace has no GGUF form")
    return GGUFVocab(
        "llama",
        tuple(tokens),
        tuple(types),
        merges=tuple(merges),
        scores=tuple(scores),
        add_space_prefix=prefix,
        **common,
    )


def vocab_from_sentencepiece(
    sp: Any, *, special_ids: Mapping[str, int], chat_template: str | None, add_bos: bool
) -> GGUFVocab:
    """The GGUF metadata (``llama``) of a ``sentencepiece.SentencePieceProcessor``."""
    n = sp.get_piece_size()
    try:  # the model proto: SentencePiece's piece types are llama.cpp's token types
        from sentencepiece import sentencepiece_model_pb2

        proto = sentencepiece_model_pb2.ModelProto.FromString(sp.serialized_model_proto())
        types = [int(p.type) for p in proto.pieces]
        prefix = bool(proto.normalizer_spec.add_dummy_prefix)
    except ImportError:  # no protobuf: the processor's flags (which cannot tell user-defined)
        flags = ((sp.is_unknown, UNKNOWN), (sp.is_control, CONTROL), (sp.is_byte, BYTE))
        types = [next((t for f, t in flags if f(i)), NORMAL) for i in range(n)]
        prefix = True
    ids = {k.removesuffix("_token") + "_id": v for k, v in special_ids.items()}
    ids = {k: v for k, v in ids.items() if k in ("bos_id", "eos_id", "unk_id", "pad_id")}
    return GGUFVocab(
        "llama",
        tuple(sp.id_to_piece(i) for i in range(n)),
        tuple(types),
        scores=tuple(float(sp.get_score(i)) for i in range(n)),
        add_space_prefix=prefix,
        chat_template=chat_template,
        add_bos=add_bos,
        **ids,
    )

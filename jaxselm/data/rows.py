"""Reading prompt files (JSONL, JSON, Parquet) into validated prompt records.

Users bring prompts in the layouts the alignment community uses, most often UltraFeedback-
binarized: a ``prompt`` string (or a chat ``messages`` list of {role, content}), a ``prompt_id``,
and optional ``chosen`` / ``rejected`` responses that are either strings or message lists whose
last assistant message is the response. This module turns each row into one canonical record::

    {"id": str, "prompt": str, "messages": [{"role", "content"}, ...], "chosen": str,
     "rejected": str}

``prompt`` is the last user message; ``messages`` is the prompt conversation (trailing
assistant turns removed, so it ends with the user turn the policy must answer). The id is the
row's ``prompt_id`` when given, else a stable hash of the conversation.

Malformed rows (missing field, wrong type, empty prompt, over-long prompt in characters or, with
a tokenizer, in tokens; a conversation the chat template refuses) are either counted
and skipped or raise a :class:`~jaxselm.errors.DataError` naming file and line, by the
``on_bad_row`` switch. A JSONL line that is not JSON means a damaged file and always raises,
naming file and line.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, Literal

from jaxselm.data.chat_template import one_line
from jaxselm.errors import DataError, TokenizerError

BAD_ROW_REASONS = ("missing_field", "wrong_type", "empty_prompt", "too_long", "template_error")


@dataclasses.dataclass(frozen=True)
class RowFormat:
    """Where the fields are and what counts as a bad row."""

    prompt_field: str = "prompt"
    messages_field: str = "messages"
    chosen_field: str = "chosen"
    rejected_field: str = "rejected"
    id_field: str = "prompt_id"
    max_prompt_chars: int = 16384
    max_prompt_tokens: int | None = None
    on_bad_row: Literal["skip", "error"] = "skip"


class BadRow(Exception):
    """A row failed validation; ``reason`` is one of BAD_ROW_REASONS."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def iter_raw_rows(path: str | os.PathLike) -> Iterator[tuple[str, Any]]:
    """Yields (location, row) for each row of a .jsonl/.json/.parquet file.

    The location is ``file:line`` for JSON lines, ``file:row N`` (1-based) otherwise.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        yield from _iter_json(path)
    elif suffix == ".parquet":
        yield from _iter_parquet(path)
    else:
        raise DataError(
            f"{path}: unsupported file type {suffix!r} (expected .jsonl, .json or .parquet)"
        )


def _iter_json(path: Path) -> Iterator[tuple[str, Any]]:
    with open(path, "rb") as fb:
        head = fb.read(4096).lstrip()
    if path.suffix.lower() == ".json" and head.startswith(b"["):  # one JSON array of rows
        try:
            rows = json.loads(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError:
            raise DataError(f"{path}: not valid UTF-8") from None
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
        for i, row in enumerate(rows, 1):
            yield f"{path}: row {i}", row
        return
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise DataError(f"{path}:{lineno}: not valid UTF-8") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(
                    f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno})"
                ) from None
            yield f"{path}:{lineno}", row


def _iter_parquet(path: Path) -> Iterator[tuple[str, Any]]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises ArrowInvalid / OSError subclasses
        raise DataError(f"{path}: not a readable Parquet file: {one_line(e)}") from None
    i = 0
    for batch in pf.iter_batches(batch_size=1024):
        for row in batch.to_pylist():
            i += 1
            yield f"{path}: row {i}", row


def _response(value: Any, field: str) -> str:
    """A chosen/rejected value: a string, or a message list ending in an assistant reply."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        for m in reversed(value):
            if not isinstance(m, Mapping):
                raise BadRow("wrong_type", f"field '{field}' has a non-dict message")
            if m.get("role") == "assistant":
                content = m.get("content")
                if not isinstance(content, str):
                    raise BadRow("wrong_type", f"field '{field}' assistant content is not a string")
                return content
        raise BadRow("missing_field", f"field '{field}' has no assistant message")
    raise BadRow(
        "wrong_type",
        f"field '{field}' must be a string or a list of messages, got {type(value).__name__}",
    )


def _messages(value: Any, field: str) -> list[dict[str, str]]:
    if not isinstance(value, list):
        raise BadRow(
            "wrong_type", f"field '{field}' must be a list of messages, got {type(value).__name__}"
        )
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, Mapping):
            raise BadRow("wrong_type", f"field '{field}[{i}]' must be a dict")
        role, content = m.get("role"), m.get("content")
        if role is None or content is None:
            raise BadRow("missing_field", f"field '{field}[{i}]' needs 'role' and 'content'")
        if not isinstance(role, str) or not isinstance(content, str):
            raise BadRow("wrong_type", f"field '{field}[{i}]' role and content must be strings")
        out.append({"role": role, "content": content})
    while out and out[-1]["role"] == "assistant":
        out.pop()
    if not out or out[-1]["role"] != "user":
        raise BadRow("empty_prompt", f"field '{field}' has no user message to answer")
    return out


def stable_id(messages: list[dict[str, str]]) -> str:
    """A hash of the conversation: the same prompt always gets the same id."""
    text = json.dumps(messages, ensure_ascii=False, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]


def parse_row(
    row: Any, fmt: RowFormat, count_tokens: Callable[[list[dict[str, str]]], int] | None = None
) -> dict[str, Any]:
    """Validates one raw row into a canonical record; raises BadRow.

    ``count_tokens(messages)`` (the prompt's length in tokens, as the policy will see it) is
    needed when ``fmt.max_prompt_tokens`` is set.
    """
    if not isinstance(row, Mapping):
        raise BadRow("wrong_type", f"row must be a JSON object, got {type(row).__name__}")
    prompt = row.get(fmt.prompt_field)
    if prompt is not None:
        if not isinstance(prompt, str):
            raise BadRow(
                "wrong_type",
                f"field '{fmt.prompt_field}' must be a string, got {type(prompt).__name__}",
            )
        messages = [{"role": "user", "content": prompt}]
    elif row.get(fmt.messages_field) is not None:
        messages = _messages(row[fmt.messages_field], fmt.messages_field)
    else:
        raise BadRow(
            "missing_field", f"neither '{fmt.prompt_field}' nor '{fmt.messages_field}' is present"
        )
    text = messages[-1]["content"]
    if not text.strip():
        raise BadRow("empty_prompt", "the prompt is empty")
    total = sum(len(m["content"]) for m in messages)
    if total > fmt.max_prompt_chars:
        raise BadRow(
            "too_long",
            f"the prompt has {total} characters, over max_prompt_chars {fmt.max_prompt_chars}",
        )
    if fmt.max_prompt_tokens is not None:
        if count_tokens is None:
            raise ValueError("parse_row: max_prompt_tokens needs count_tokens")
        try:
            n_tokens = count_tokens(messages)
        except TokenizerError as e:  # e.g. a template that refuses this conversation
            raise BadRow("template_error", str(e)) from None
        if n_tokens > fmt.max_prompt_tokens:
            raise BadRow(
                "too_long",
                f"the prompt has {n_tokens} tokens, over max_prompt_tokens {fmt.max_prompt_tokens}",
            )
    rid = row.get(fmt.id_field)
    if rid is None:
        rid = stable_id(messages)
    elif isinstance(rid, (str, int)) and not isinstance(rid, bool):
        rid = str(rid)
    else:
        raise BadRow("wrong_type", f"field '{fmt.id_field}' must be a string or an integer")
    return {
        "id": rid,
        "prompt": text,
        "messages": messages,
        "chosen": _response(row.get(fmt.chosen_field), fmt.chosen_field),
        "rejected": _response(row.get(fmt.rejected_field), fmt.rejected_field),
    }


def read_records(
    files: list[str | os.PathLike],
    fmt: RowFormat,
    bad_counts: Counter | None = None,
    count_tokens: Callable[[list[dict[str, str]]], int] | None = None,
) -> Iterator[dict[str, Any]]:
    """Canonical records of all rows of ``files``, in order.

    Bad rows raise DataError (``file:line: reason``) when ``fmt.on_bad_row == "error"``,
    otherwise they are skipped and counted by reason into ``bad_counts``.
    """
    for path in files:
        for where, row in iter_raw_rows(path):
            try:
                yield parse_row(row, fmt, count_tokens)
            except BadRow as e:
                if fmt.on_bad_row == "error":
                    raise DataError(f"{where}: {e.detail}") from None
                if bad_counts is not None:
                    bad_counts[e.reason] += 1


def read_prompt_texts(path: str | os.PathLike, fmt: RowFormat | None = None) -> list[str]:
    """The prompt texts of an evaluation file (for decontamination).

    ``.txt`` files hold one prompt per line; other files are read like prompt files (bad rows
    raise). The text of a chat is its messages' contents joined by newlines.
    """
    path = Path(path)
    if path.suffix.lower() == ".txt":
        if not path.is_file():
            raise DataError(f"{path}: file not found")
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError:
            raise DataError(f"{path}: not valid UTF-8") from None
        return [line for line in lines if line.strip()]
    fmt = dataclasses.replace(fmt or RowFormat(), on_bad_row="error", max_prompt_chars=1 << 62)
    return [conversation_text(r["messages"]) for r in read_records([path], fmt)]


def conversation_text(messages: list[dict[str, str]]) -> str:
    """The text hygiene looks at: all message contents, newline-joined."""
    return "\n".join(m["content"] for m in messages)

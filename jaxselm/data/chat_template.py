"""Chat templates: render a list of {role, content} messages to prompt text, as Hugging Face does.

Checkpoints in the Hugging Face layout carry a Jinja chat template (in ``chat_template.jinja`` or
under ``chat_template`` in ``tokenizer_config.json``). A policy must see its prompts formatted
exactly as in training, so we render templates with the same Jinja environment that
``transformers`` uses: a sandboxed, immutable environment with ``trim_blocks``, ``lstrip_blocks``
and the ``loopcontrols`` extension, a ``tojson`` filter that does not escape HTML and keeps
non-ASCII text, and the globals ``raise_exception``, ``strftime_now``, ``dict`` and ``namespace``.
Templates come from files users download, so they are untrusted code: the sandbox blocks
attribute tricks, and a namespace refuses underscore-prefixed names as transformers' does. The
``{% generation %}`` tag (assistant-token masks) is accepted and rendered as its body.

A template's own ``raise_exception(...)``, a syntax error and a malformed message all become a
:class:`~jaxselm.errors.TokenizerError` or :class:`~jaxselm.errors.DataError` with a one-line
message naming the template's source.
"""

from __future__ import annotations

import datetime
import functools
import json
from collections.abc import Mapping, Sequence
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.sandbox
import jinja2.utils

from jaxselm.errors import DataError, TokenizerError


def one_line(text: object) -> str:
    """Collapses whitespace so an error message from a library fits on one line."""
    return " ".join(str(text).split())


class _GenerationTag(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}``: renders its body (HF uses it for masks)."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller: Any) -> str:
        return caller()


class _TemplateRaise(Exception):
    """Carries a template's own ``raise_exception(message)`` out of the render."""


def _raise_exception(message: str) -> None:
    raise _TemplateRaise(message)


def _tojson(
    x: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: Any = None,
    sort_keys: bool = False,
) -> str:
    return json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(fmt: str) -> str:
    return datetime.datetime.now().strftime(fmt)


class _TemplateDict:
    """``dict(...)`` inside templates, without exposing the ``dict`` type itself."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict:
        return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(jinja2.utils.Namespace):
    """A ``namespace`` that refuses underscore-prefixed attribute names."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # noqa: N805 (Jinja's signature trick)
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(
                f"chat templates cannot set underscore-prefixed namespace attribute {name!r}"
            )


@functools.lru_cache(maxsize=32)
def _compile(template: str, source: str) -> jinja2.Template:
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = _TemplateNamespace
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise TokenizerError(
            f"{source}: chat template syntax error at template line {e.lineno}: "
            f"{one_line(e.message)}"
        ) from None


def _plain(value: Any) -> Any:
    """Rebuilds template inputs from plain JSON types: the sandbox sees only str/int/list/dict."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, bool):
        return bool(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return f"<{type(value).__name__}>"


def check_messages(messages: Any, where: str = "messages") -> list[dict[str, Any]]:
    """Validates a chat: a non-empty list of dicts with a string ``role`` and a ``content``.

    Keys whose value is None are dropped (as transformers does). Raises DataError naming
    ``where`` and the message index.
    """
    if not isinstance(messages, (list, tuple)) or not messages:
        raise DataError(f"{where}: expected a non-empty list of {{role, content}} messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise DataError(
                f"{where}[{i}]: expected a dict with 'role' and 'content', got {type(m).__name__}"
            )
        if not isinstance(m.get("role"), str):
            raise DataError(f"{where}[{i}]: missing or non-string 'role'")
        if "content" not in m or m["content"] is None:
            raise DataError(f"{where}[{i}]: missing 'content'")
        out.append({k: v for k, v in m.items() if v is not None})
    return out


def check_chat_template(template: str, source: str) -> None:
    """Compile ``template`` (cached): a syntax error is a one-line TokenizerError naming
    ``source``. Runs render nothing, so it is safe to call before any work starts."""
    _compile(template, source)


def render_chat_template(
    template: str,
    messages: Sequence[Mapping[str, Any]],
    *,
    add_generation_prompt: bool = False,
    special_tokens: Mapping[str, str] | None = None,
    source: str = "chat template",
    **kwargs: Any,
) -> str:
    """Renders ``messages`` with a Jinja chat ``template`` the way transformers does.

    Args:
      template: the Jinja source.
      messages: the chat, a list of {role, content} dicts.
      add_generation_prompt: append the header that starts an assistant turn.
      special_tokens: e.g. {"bos_token": "<s>", "eos_token": "</s>"}; visible to the template.
      source: where the template came from (a file name), used in error messages.
      **kwargs: extra template variables (``tools``, ``documents``, ...); they override
        ``special_tokens`` of the same name.
    Returns:
      The rendered prompt text.
    """
    compiled = _compile(template, source)
    chat = _plain(check_messages(messages))
    variables = {"tools": None, "documents": None}
    variables.update(_plain(dict(special_tokens or {})))
    variables.update(_plain(kwargs))
    try:
        return compiled.render(
            messages=chat, add_generation_prompt=add_generation_prompt, **variables
        )
    except _TemplateRaise as e:
        raise TokenizerError(
            f"{source}: chat template refused the messages: {one_line(e)}"
        ) from None
    except jinja2.TemplateError as e:
        raise TokenizerError(f"{source}: chat template failed: {one_line(e)}") from None

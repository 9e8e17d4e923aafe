"""The base of every config section: frozen, strict pydantic models whose errors name the key.

Every typed config of the package (``ModelConfig``, ``TrainConfig``, ``MeshConfig``, the judge
configs, the run config of the CLI) derives from :class:`FrozenConfig`. Ranges are pydantic field
constraints (``Annotated[int, Field(ge=1)]``, ``Literal[...]``); a bad value becomes ONE
:class:`~jaxselm.errors.ConfigError` line naming the full key path, e.g.
``online.iterations: must be >= 1 (got 0)`` or ``judge.base_url: must be an http(s) URL``.

Frozen models are hashable, so a config can be a static argument of ``jax.jit``.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from jaxselm.errors import ConfigError

# Reusable constrained types (the one-line range checks of the configs).
PositiveInt = Annotated[int, Field(ge=1)]
NonNegativeInt = Annotated[int, Field(ge=0)]
PositiveFloat = Annotated[float, Field(gt=0)]
NonNegativeFloat = Annotated[float, Field(ge=0)]
Probability = Annotated[float, Field(ge=0, le=1)]
UnitInterval = Annotated[float, Field(gt=0, le=1)]  # (0, 1], e.g. top_p

_TYPE_TAGS = {"int", "float", "str", "bool", "dict", "list", "none", "tuple"}
# pydantic constraint errors -> the package's wording ("must be >= 1").
_BOUNDS = {
    "greater_than_equal": (">=", "ge"),
    "greater_than": (">", "gt"),
    "less_than_equal": ("<=", "le"),
    "less_than": ("<", "lt"),
}


def _message(first: dict[str, Any]) -> str:
    kind = first.get("type")
    ctx = first.get("ctx") or {}
    if kind in _BOUNDS:
        op, key = _BOUNDS[kind]
        bound = ctx.get(key)
        if isinstance(bound, float) and bound.is_integer():
            bound = int(bound)
        return f"must be {op} {bound}"
    if kind == "extra_forbidden":
        return "unknown key"
    return first.get("msg", "invalid value").removeprefix("Value error, ")


def _describe(err: ValidationError) -> tuple[tuple[str, ...], str]:
    """(key path, message) of the first error of a pydantic ValidationError."""
    first = err.errors()[0]
    # Drop the type tags pydantic adds inside unions ("list[float]", "float", "function-after[..]").
    loc = tuple(
        str(p)
        for p in first.get("loc", ())
        if p != "__root__" and not (isinstance(p, str) and ("[" in p or p in _TYPE_TAGS))
    )
    inner = (first.get("ctx") or {}).get("error")
    if isinstance(inner, ConfigError) and inner.path is not None:  # a nested section's own error
        return loc + inner.path, inner.detail or str(inner)
    msg = _message(first)
    if not loc and ": " in msg:  # a cross-field check names its field as "field: message"
        field, msg = msg.split(": ", 1)
        loc = (field,)
    value = first.get("input")
    if first.get("type") not in ("extra_forbidden", "missing") and not isinstance(value, dict):
        msg = f"{msg} (got {value!r})"
    return loc, msg


def config_error(err: ValidationError, prefix: str) -> ConfigError:
    """A one-line ConfigError naming the offending key, e.g. ``model.num_heads: must be >= 1``."""
    path, msg = _describe(err)
    where = ".".join(p for p in (prefix, *path) if p) or "config"
    return ConfigError(f"{where}: {msg}", path=path, detail=msg)


class FrozenConfig(BaseModel):
    """Base of the package's config sections: frozen, strict types, unknown keys refused.

    Construction errors are re-raised as a one-line ConfigError naming the field; a section
    nested in another is named from the top (``train.optimizer.warmup_steps``).
    """

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)
    _error_prefix: ClassVar[str] = "config"

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as err:
            raise config_error(err, self._error_prefix) from None

    def replace(self, **changes: Any):
        """A validated copy with some fields changed."""
        return type(self)(**{**self.model_dump(), **changes})

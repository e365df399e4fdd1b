"""Click options that leave their defaults to the dataclass they feed.

An option made by :func:`default_option` has no default of its own: left out, it passes
``None`` (``()`` when repeatable), :func:`given` drops it, and the dataclass (onboarding
``Settings``, ``ServeConfig``) fills in its field's default. ``--help`` shows that default,
read from the field, so the dataclass is the one place a default is written.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import click

F = TypeVar("F", bound=Callable[..., Any])


def field_default(owner: type, name: str) -> Any:
    """Return the default of field ``name`` of dataclass ``owner``.

    Raises:
        TypeError: ``owner`` is not a dataclass, has no field ``name``, or the field has no
            default.
    """
    for field in dataclasses.fields(owner):
        if field.name != name:
            continue
        if field.default is not dataclasses.MISSING:
            return field.default
        if field.default_factory is not dataclasses.MISSING:
            return field.default_factory()
        raise TypeError(f"{owner.__name__}.{name} has no default")
    raise TypeError(f"{owner.__name__} has no field {name!r}")


def given(**values: Any) -> dict[str, Any]:
    """Return the ``values`` the command line gave: neither None nor an empty repeat."""
    return {name: value for name, value in values.items() if value is not None and value != ()}


class FieldOption(click.Option):
    """An option whose help shows the default of a dataclass field."""

    def __init__(
        self, param_decls: Sequence[str], *, owner: type, field: str | None, **attrs: Any
    ) -> None:
        super().__init__(param_decls, **attrs)
        # Read now, so that a misspelt field fails when the command is defined.
        self.field_default = field_default(owner, field or self.name or "")

    def get_help_extra(self, ctx: click.Context) -> click.types.OptionHelpExtra:
        extra = super().get_help_extra(ctx)
        value = self.field_default
        if value is not None:
            shown = value if isinstance(value, tuple) else (value,)
            extra["default"] = ", ".join(str(item) for item in shown)
        return extra


def default_option(
    owner: type, *decls: str, field: str | None = None, **attrs: Any
) -> Callable[[F], F]:
    """Return a click option for field ``field`` of dataclass ``owner`` (by default the
    field named like the option). It passes None when left out; ``--help`` shows the field's
    default.

    Raises:
        TypeError: when the command is defined, ``owner`` has no such field with a default.
    """
    return click.option(*decls, cls=FieldOption, owner=owner, field=field, **attrs)

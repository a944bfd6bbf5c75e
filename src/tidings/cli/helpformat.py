"""Help pages that show metavars (``APP``, ``URL``) instead of Typer's type placeholders.

Typer renders a parameter without a metavar as its Python type (``<bool>``, ``<str>``) and a
required argument as ``{name}`` in the usage line. :class:`HelpGroup` (the ``cls`` of every
``Typer`` of the ``tidings`` command) cleans each command before it is used: a flag shows no
metavar, an option without one shows its name in capitals, and an argument shows its metavar in
both the usage line (``APP``, ``[STREAM]`` when optional) and the arguments panel.
"""

from __future__ import annotations

from typing import Any

import typer.core

__all__ = ["HelpCommand", "HelpGroup"]


class _Argument(typer.core.TyperArgument):
    """An argument displayed by its metavar alone (no type placeholder, no braces)."""

    def display_type_rich(self, ctx: Any) -> str | None:
        return None

    def _usage_display_name(self) -> str:
        name = self.display_name_raw.upper()
        name = name if self.required else f"[{name}]"
        return name + ("..." if self.nargs != 1 else "")

    def _rich_display_name(self) -> str:
        return self.display_name_raw.upper()


def _is_flag(option: typer.core.TyperOption) -> bool:
    descriptor = getattr(option, "type_descriptor", None)  # absent from older Typer versions
    return bool(option.is_flag or option.count or (descriptor is not None and descriptor.annotation is bool))


def _clean(command: typer.core.TyperCommand | typer.core.TyperGroup, ctx: Any) -> None:
    params = list(command.params)
    help_option = command.get_help_option(ctx)
    if help_option is not None:
        params.append(help_option)
    for param in params:
        if isinstance(param, typer.core.TyperArgument) and not isinstance(param, _Argument):
            # Typer builds its argument objects itself and offers no hook for their class; the
            # subclass only changes how the argument is displayed, never how it is parsed.
            param.__class__ = _Argument
        elif isinstance(param, typer.core.TyperOption) and param.metavar is None:
            param.metavar = "" if _is_flag(param) else (param.name or "value").upper()


class HelpGroup(typer.core.TyperGroup):
    """A command group whose own help, and its commands', use metavars (see the module)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._cleaned: set[str] = set()

    def get_params(self, ctx: Any) -> Any:
        # Typer appends its completion options to the root group after creating it.
        _clean(self, ctx)
        return super().get_params(ctx)

    def get_command(self, ctx: Any, cmd_name: str) -> Any:
        command = super().get_command(ctx, cmd_name)
        if (
            isinstance(command, typer.core.TyperCommand | typer.core.TyperGroup)
            and cmd_name not in self._cleaned
        ):
            _clean(command, ctx)
            self._cleaned.add(cmd_name)
        return command


class HelpCommand(typer.core.TyperCommand):
    """A single command (an app of one command) whose help uses metavars, as :class:`HelpGroup`'s."""

    def get_params(self, ctx: Any) -> Any:
        _clean(self, ctx)
        return super().get_params(ctx)

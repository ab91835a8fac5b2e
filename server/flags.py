"""Building blocks of the ``mgm`` subcommands' options (standard library only: ``mgm --help`` stays fast).

:func:`add_flag` is the one way a subcommand declares an option that deployments may set from the environment:

* its default is read from an ``MGM_*`` variable when the parser is built (an empty variable counts as unset);
* that text is converted with the flag's ``type`` and checked against its ``choices`` when *that* subcommand parses,
  so a bad value is an argparse error (exit 2) that names the variable, and a bad variable that belongs to another
  subcommand is never an error;
* the flag given on the command line wins over the variable, which wins over the default;
* ``--help`` names the variable and the default.

Defaults themselves come from the config dataclasses (:func:`defaults`) rather than from literals repeated here.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Callable, Sequence
from types import SimpleNamespace
from typing import Any

#: What ``ArgumentParser.add_subparsers()`` returns (argparse has no public name for the class).
SubParsers = argparse._SubParsersAction
#: A subcommand module's registrar: adds its parser(s) to ``sub``, with ``common`` (the logging options) as parent.
Registrar = Callable[[SubParsers, argparse.ArgumentParser], None]

#: Spellings an environment variable may use for an on/off flag.
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def csv_list(value: str) -> list[str]:
    """``"a, b,,c"`` → ``["a", "b", "c"]``: the format of list-valued ``MGM_*`` variables and flags."""
    return [item.strip() for item in value.split(",") if item.strip()]


def boolean(value: str) -> bool:
    text = value.strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ValueError(f"expected one of {', '.join(_TRUE + _FALSE)}")


def defaults(config: type) -> SimpleNamespace:
    """The field defaults of a config dataclass as attributes (fields without a default are left out)."""
    values: dict[str, Any] = {}
    for f in dataclasses.fields(config):
        if f.default is not dataclasses.MISSING:
            values[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            values[f.name] = f.default_factory()
    return SimpleNamespace(**values)


class _FromEnv(str):
    """A default read from the environment: the raw text, plus the variable it came from (for error messages)."""

    variable: str

    def __new__(cls, value: str, variable: str) -> _FromEnv:
        self = super().__new__(cls, value)
        self.variable = variable
        return self


class _Append(argparse.Action):
    """``action="append"`` whose first use replaces the default instead of extending it (argparse's own appends to
    a list default), so ``--engine URL`` replaces ``$MGM_ENGINES`` rather than adding to it."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        items = getattr(namespace, self.dest, None)
        kept = [] if items is None or items is self.default else list(items)
        setattr(namespace, self.dest, [*kept, values])


def _converter(convert: Callable[[str], Any], choices: Sequence[Any] | None, many: bool) -> Callable[[str], Any]:
    """The flag's ``type``. argparse converts a command-line value with it (and checks ``choices`` itself), and also
    a string default when the flag is absent: that is where an environment value is converted and checked."""
    name = getattr(convert, "__name__", "value")

    def parse(text: str) -> Any:
        if not isinstance(text, _FromEnv):
            return convert(text)
        try:
            value = [convert(item) for item in csv_list(text)] if many else convert(text)
        except argparse.ArgumentTypeError as exc:
            raise argparse.ArgumentTypeError(f"${text.variable}={str(text)!r}: {exc}") from None
        except (TypeError, ValueError):
            raise argparse.ArgumentTypeError(f"invalid {name} value in ${text.variable}: {str(text)!r}") from None
        if choices is not None and any(v not in choices for v in (value if many else [value])):
            raise argparse.ArgumentTypeError(f"invalid choice in ${text.variable}: {str(text)!r} (choose from "
                                             f"{', '.join(map(str, choices))})")
        return value

    parse.__name__ = name  # argparse names the type in its own "invalid int value" message
    return parse


def _shown(value: Any) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (tuple, list)):
        return ",".join(map(str, value))
    return "" if value is None else str(value)


def _default_help(variables: Sequence[str], shown: str, many: bool) -> str:
    sources = [("comma-separated " if many else "") + f"${v}" for v in variables]
    if shown:
        sources.append(shown)
    return f"default: {' or '.join(sources)}" if sources else ""


def add_flag(parser: argparse.ArgumentParser, *names: str, env: str | Sequence[str] | None = None,
             default: Any = None, type: Callable[[str], Any] = str, choices: Sequence[Any] | None = None,
             action: str = "store", required: bool = False, help: str = "", shown_default: str | None = None,
             **kwargs: Any) -> argparse.Action:
    """Add an option whose default may come from ``env`` (the first set variable when several are given).

    ``action`` is ``"store"``, ``"append"`` (repeatable; the variable holds a comma-separated list) or
    ``"store_true"`` (the variable holds 1/0, true/false, yes/no, on/off). ``required`` only when no variable is
    set. ``shown_default`` replaces the default in ``--help`` (for one computed later, such as a cache path).
    """
    variables = (env,) if isinstance(env, str) else tuple(env or ())
    found = next((v for v in variables if os.environ.get(v)), None)
    value = _FromEnv(os.environ[found], found) if found else default
    text = _default_help(variables, _shown(default) if shown_default is None else shown_default, action == "append")
    full_help = f"{help} ({text.replace('%', '%%')})" if help and text else help or text.replace("%", "%%")
    if action == "store_true":
        flag = parser.add_argument(*names, action="store_true", default=value, help=full_help, **kwargs)
        flag.type = _converter(boolean, None, many=False)  # used for a string (env) default only
        return flag
    if action not in ("store", "append"):
        raise ValueError(f"unsupported action {action!r}")
    return parser.add_argument(
        *names, action=_Append if action == "append" else "store", type=_converter(type, choices, action == "append"),
        choices=choices, default=value, required=required and found is None, help=full_help, **kwargs)


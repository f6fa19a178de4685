"""Flags declared once: each program's configuration is a frozen dataclass whose fields carry their flag's help,
group, bounds and scope; the argument parser, the checks, the resume rule and the reference page derive from it.

Nothing here imports torch, so that parsing, and errors in it, are instant. Choices that live in modules that do
import torch (datasets, models, strategies) are given as functions, called when --help or the reference page
lists them and when a parsed value is checked.

A configuration is built from what the command line gave (`CommandLine.values`, nothing else: argparse
fills in no defaults) over the fields' defaults, and never written to afterwards; values that depend on others
(a strategy's learning rates, the number of rounds) are derived in objects of their own.
"""

import argparse
import dataclasses
import difflib
import shutil
import sys
import types
import typing
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

Choices = Sequence[str] | Callable[[], Sequence[str]]


@dataclass(frozen=True)
class Bounds:
    """The interval a number must lie in; either end may be open or absent."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def holds(self, value: float) -> bool:
        above = self.low is None or (value > self.low if self.low_open else value >= self.low)
        below = self.high is None or (value < self.high if self.high_open else value <= self.high)
        return above and below

    def __str__(self) -> str:
        if self.high is None:
            return f"{'>' if self.low_open else '>='} {_number(self.low)}"
        if self.low is None:
            return f"{'<' if self.high_open else '<='} {_number(self.high)}"
        low, high = _number(self.low), _number(self.high)
        return f"in {'(' if self.low_open else '['}{low}, {high}{')' if self.high_open else ']'}"


def _number(value: float | None) -> str:
    """A bound as help shows it: integers in full (a seed's 4294967295), other numbers short."""
    return str(value) if isinstance(value, int) else f"{value:g}"


POSITIVE = Bounds(0, low_open=True)
NOT_NEGATIVE = Bounds(0)
FRACTION = Bounds(0, 1, high_open=True)  # momenta, betas


@dataclass(frozen=True)
class Scope:
    """A flag that means something only for some values of another flag (the chooser, e.g. --strategy): those
    whose readers(value) name it. Given for another value, it is refused rather than ignored."""

    chooser: str
    readers: Callable[[str], Collection[str]]


class Lazy:
    """A default that lives in a module importing torch: resolved when a configuration is built."""

    def __init__(self, value: Callable[[], Any]) -> None:
        self.resolve = value


class Config:
    """Base of the configuration dataclasses: lazy defaults are resolved as the configuration is built."""

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):  # type: ignore[arg-type]
            if isinstance(value := getattr(self, field.name), Lazy):
                object.__setattr__(self, field.name, value.resolve())


@dataclass(frozen=True)
class Flag:
    """What a configuration field says of its command-line flag."""

    help: str
    group: str
    bounds: Bounds | Callable[[], Bounds] | None = None
    choices: Choices | None = None
    metavar: str | None = None
    trajectory: bool = False  # shapes the training trajectory: recorded in checkpoints, must match on resume
    scope: Scope | None = None
    # what an unset optional flag means, for help ("default: ..."); a function where the text lives in a module
    # importing torch (a strategy's own default)
    default_text: str | Callable[[], str] | None = None
    secret: bool = False  # never echoed (a token)
    # a trajectory flag's value for checkpoints that predate it, where that is not its default (the flag
    # changed what runs did before it existed)
    predated: Any = None


def option(default: Any, help: str, *, group: str, **flag: Any) -> Any:
    """A configuration field with its flag (see Flag for the keywords)."""
    return dataclasses.field(default=default, metadata={"flag": Flag(help, group, **flag)})


@dataclass(frozen=True)
class Field:
    """One flag of a configuration: its name (the field's), type, default and Flag."""

    name: str
    type: type  # the value's type (int for int | None: an optional flag may also be left unset)
    default: Any
    flag: Flag

    @property
    def option(self) -> str:
        return "--" + self.name.replace("_", "-")

    def choices(self) -> Sequence[str] | None:
        choices = self.flag.choices
        return tuple(choices()) if callable(choices) else choices

    def bounds(self) -> Bounds | None:
        bounds = self.flag.bounds
        return bounds() if callable(bounds) else bounds

    def default_value(self) -> Any:
        return self.default.resolve() if isinstance(self.default, Lazy) else self.default

    def predated_value(self) -> Any:
        """The value of a checkpoint that predates the flag."""
        return self.default_value() if self.flag.predated is None else self.flag.predated

    def default_description(self) -> str | None:
        """What --help and the reference say the default is; None where there is nothing to say (no default)."""
        text = self.flag.default_text
        if text is not None:
            return text() if callable(text) else text
        if self.default is None or self.type is bool or self.flag.secret:
            return None
        return str(self.default_value())


def fields(config_type: type) -> list[Field]:
    """The flags of a configuration dataclass, in declaration order."""
    hints = typing.get_type_hints(config_type)
    found = []
    for field in dataclasses.fields(config_type):
        found.append(Field(field.name, _base_type(hints[field.name]), field.default, field.metadata["flag"]))
    return found


def _base_type(hint: Any) -> type:
    """int for int, and for int | None."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return next(member for member in typing.get_args(hint) if member is not type(None))
    return hint


class HelpFormatter(argparse.HelpFormatter):
    """Help whose texts of several lines (the examples) keep their lines and the others are wrapped."""

    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=32, width=min(110, _terminal_width()))

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if "\n" in text:
            return "".join(indent + line for line in text.splitlines(keepends=True))
        return super()._fill_text(text, width, indent)


def _terminal_width() -> int:
    return shutil.get_terminal_size((100, 24)).columns


class Parser(argparse.ArgumentParser):
    """An argument parser whose errors are short: the problem, a guess at a misspelt flag, and where help is."""

    fields: list["Field"]  # the configuration's flags, for --help's notes on scopes

    def error(self, message: str) -> typing.NoReturn:
        known = [option for action in self._actions for option in action.option_strings]
        hint = ""
        if message.startswith("unrecognized arguments:"):
            wrong = message.split(":", 1)[1].split()[0].split("=")[0]
            close = difflib.get_close_matches(wrong, known, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
        self.exit(2, f"{self.prog}: error: {message}{hint}\n{self.prog}: see {self.prog} --help\n")


class _Help(argparse.Action):
    """--help: lists choices that live in other modules (importing them) before printing."""

    def __init__(self, option_strings: list[str], dest: str = argparse.SUPPRESS, **kwargs: Any) -> None:
        super().__init__(
            option_strings, argparse.SUPPRESS, nargs=0, default=argparse.SUPPRESS, help="show this help and exit"
        )

    def __call__(self, parser: argparse.ArgumentParser, *args: Any) -> None:
        for action in parser._actions:
            if isinstance(action.choices, _LazyChoices):
                action.choices = action.choices.resolve()
            if action.help and "%(choices_text)s" in action.help:
                action.help = action.help.replace("%(choices_text)s", ", ".join(action.choices or ()))
            field = getattr(action, "field", None)
            if field is not None and action.help and "%(default_text)s" in action.help:
                said = (field.default_description() or "").replace("%", "%%")
                action.help = action.help.replace("%(default_text)s", said)
            if field is not None and field.flag.scope is not None:
                action.help = f"{action.help} [{scope_text(field, parser.fields)}]"  # type: ignore[attr-defined]
        parser.print_help()
        parser.exit()


class _LazyChoices:
    """Choices resolved when first needed (listing them may import torch)."""

    def __init__(self, choices: Callable[[], Sequence[str]]) -> None:
        self.resolve = lambda: tuple(choices())

    def __contains__(self, value: object) -> bool:  # checked after parsing instead (see choice_problems)
        return True

    def __iter__(self) -> Iterator[str]:  # argparse's usage line iterates choices: show a placeholder, not an import
        return iter(())


Listings = dict[str, tuple[str, Callable[[], str]]]  # option: (help, the text it prints)


class _Listing(argparse.Action):
    """A flag that prints a listing (which may import torch) and exits, like --help."""

    def __init__(
        self, option_strings: list[str], dest: str, listing: Callable[[], str], help: str, **kwargs: Any
    ) -> None:
        super().__init__(option_strings, argparse.SUPPRESS, nargs=0, default=argparse.SUPPRESS, help=help)
        self.listing = listing

    def __call__(self, parser: argparse.ArgumentParser, *args: Any) -> None:
        print(self.listing())
        parser.exit()


def build_parser(
    config_type: type,
    description: str,
    epilog: str = "",
    prog: str | None = None,
    groups: dict[str, str] | None = None,
    role: str = "",
    listings: Listings | None = None,
) -> Parser:
    """An argument parser for a configuration dataclass: one flag per field, in groups (titled by groups,
    described by its values), no defaults filled in (so that a resume can tell what was given); listings are
    flags that print something and exit."""
    usage = " ".join(["%(prog)s [--help]", *(f"[{name}]" for name in listings or {}), "[--FLAG VALUE ...]"])
    parser = Parser(
        prog=prog,
        usage=usage,
        description=description,
        epilog=epilog,
        formatter_class=HelpFormatter,
        argument_default=argparse.SUPPRESS,
        add_help=False,
    )
    parser.fields = fields(config_type)
    parser.add_argument("-h", "--help", action=_Help)
    for option_string, (text, listing) in (listings or {}).items():
        parser.add_argument(option_string, action=_Listing, listing=listing, help=text)
    sections: dict[str, argparse._ArgumentGroup] = {}
    for name, text in (groups or {}).items():
        sections[name] = parser.add_argument_group(name, text or None)
    order = list(groups or {})
    for field in sorted(
        parser.fields,
        key=lambda field: order.index(field.flag.group) if field.flag.group in order else len(order),
    ):
        section = sections.get(field.flag.group) or sections.setdefault(
            field.flag.group, parser.add_argument_group(field.flag.group)
        )
        section.add_argument(field.option, **_argument(field, role)).field = field  # type: ignore[attr-defined]
    return parser


def scope_text(field: Field, others: list[Field]) -> str:
    """'only with --strategy fedprox': the values of the field's chooser under which it means something."""
    scope = field.flag.scope
    assert scope is not None
    chooser = next(other for other in others if other.name == scope.chooser)
    users = [value for value in chooser.choices() or () if field.name in scope.readers(value)]
    return f"only with {chooser.option} {', '.join(users[:-1]) + ' or ' if len(users) > 1 else ''}{users[-1]}"


def _argument(field: Field, role: str) -> dict[str, Any]:
    """add_argument's keywords for a field."""
    # argparse formats help with %: the texts are escaped, the placeholders --help fills in are not
    help_text = field.flag.help.replace("{role}", role).replace("%", "%%") + _default_text(field)
    if field.type is bool:
        return {"action": "store_true", "help": help_text}
    keywords: dict[str, Any] = {
        "type": _converter(field),
        "help": help_text,
        "metavar": field.flag.metavar or metavar(field),
    }
    choices = field.flag.choices
    if choices is not None:
        keywords["choices"] = _LazyChoices(choices) if callable(choices) else choices
        keywords["help"] = "one of %(choices_text)s: " + keywords["help"]
    return keywords


def metavar(field: Field) -> str:
    """What a flag's value is called in help: NAME for a choice, else N for integers, X for numbers, TEXT."""
    if field.flag.choices is not None:
        return "NAME"
    return {int: "N", float: "X"}.get(field.type, "TEXT")


def _default_text(field: Field) -> str:
    """The help's default note: said now, or (lazy, from a module importing torch) when --help prints."""
    if callable(field.flag.default_text) or isinstance(field.default, Lazy):
        return " (default: %(default_text)s)"
    text = field.default_description()
    return f" (default: {text.replace('%', '%%')})" if text is not None else ""


def _converter(field: Field) -> Callable[[str], Any]:
    """The field's type, checked against its bounds as argparse converts it."""

    def convert(text: str) -> Any:
        try:
            value = field.type(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected {'an integer' if field.type is int else 'a number'}, got {text!r}"
            ) from None
        bounds = field.flag.bounds  # bounds from torch modules (functions) are checked after parsing
        if isinstance(bounds, Bounds) and not bounds.holds(value):
            raise argparse.ArgumentTypeError(f"must be {bounds}, got {text}")
        return value

    convert.__name__ = field.type.__name__  # argparse names the type in some messages
    return convert


@dataclass(frozen=True)
class CommandLine:
    """What a command line gave: the values of the flags it named, and nothing else."""

    values: dict[str, Any]

    @property
    def given(self) -> frozenset[str]:
        return frozenset(self.values)


def parse(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> CommandLine:
    """The flags argv gives (sys.argv[1:] if None); exits with a short message when it gives something wrong."""
    return CommandLine(vars(parser.parse_args(sys.argv[1:] if argv is None else list(argv))))


def refuse(prog: str, problems: list[str], status: int = 2) -> typing.NoReturn:
    """Exit as argparse does on a bad flag (status 2 unless told), saying every problem and where help is."""
    sys.stderr.write(f"{prog}: error: {'; '.join(problems)}\n{prog}: see {prog} --help\n")
    raise SystemExit(status)


def choice_problems(config: Any) -> list[str]:
    """Values of flags whose choices are given as functions that are not among them."""
    problems = []
    for field in fields(type(config)):
        value = getattr(config, field.name)
        if callable(field.flag.choices) and value is not None and value not in (choices := field.choices() or ()):
            problems.append(f"{field.option} {str(value)[:40]!r} is not one of {', '.join(choices)}")
    return problems


def bounds_problems(config: Any) -> list[str]:
    """Values out of bounds that live in modules importing torch (the others were checked as they were parsed)."""
    problems = []
    for field in fields(type(config)):
        value = getattr(config, field.name)
        bounds = field.flag.bounds() if callable(field.flag.bounds) else None
        if bounds is not None and value is not None and not bounds.holds(value):
            problems.append(f"{field.option} must be {bounds}, got {value}")
    return problems


def scope_problems(config: Any, given: Iterable[str]) -> list[str]:
    """Flags named on the command line that mean nothing under the chosen values of their choosers (a resume
    passes only those given with a value other than its checkpoint's: repeating one changes nothing)."""
    by_name = {field.name: field for field in fields(type(config))}
    problems = []
    for name in given:
        scope = by_name[name].flag.scope
        if scope is not None and name not in scope.readers(getattr(config, scope.chooser)):
            chooser = by_name[scope.chooser]
            problems.append(
                f"{by_name[name].option} is {scope_text(by_name[name], list(by_name.values()))}, not "
                f"{chooser.option} {getattr(config, scope.chooser)}"
            )
    return problems


def trajectory(config: Any) -> dict[str, Any]:
    """The values of the flags that shape the training trajectory, as a checkpoint records them."""
    return {field.name: getattr(config, field.name) for field in fields(type(config)) if field.flag.trajectory}


def resume_values(config_type: type, given: dict[str, Any], saved: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """The flag values of a resumed run: the checkpoint's trajectory flags, then what the command line gave; and
    every trajectory flag given with a value other than the checkpoint's, described. A flag a checkpoint predates
    takes its predated value, or else its default: what runs before it existed did. A flag whose default changes
    must keep its old value for such checkpoints."""
    values, conflicts = {}, []
    for field in fields(config_type):
        if not field.flag.trajectory:
            continue
        recorded = saved[field.name] if field.name in saved else field.predated_value()
        values[field.name] = recorded
        if field.name in given and given[field.name] != recorded:
            conflicts.append(f"{field.option} {given[field.name]} (the checkpoint has {recorded})")
    return {**values, **given}, conflicts

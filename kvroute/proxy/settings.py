"""The proxy's settings from four layers: command line > environment > config file > defaults.

Every option of ``kvroute proxy`` is a key of the config file (``--config
FILE``, TOML or YAML), named as the option's argparse ``dest``: the
:class:`~kvroute.proxy.config.ProxyConfig` field it sets (``--read-timeout``
is ``read_timeout``, ``--worker`` is ``workers``), or the command's own
(``host``, ``port``, ``log_level``...). Nothing here lists the options: they
are read off the parser, so an option added to it is a key at once. A
``ProxyConfig`` field without a flag is a key too, typed by its annotation.
Keys may be spelled with ``-`` for ``_``.

A value goes through the option's own parser, so the file takes what the
flag takes (``max_body_size = "32M"``, ``workers = ["http://w:8000=tcp://w:5557"]``)
as well as typed values (``retries = 3``, ``scrape_metrics = false`` for the
flag ``--no-scrape-metrics``). A repeatable option takes a list; one whose
items are ``NAME=VALUE`` pairs (``model_map``, ``policy_params``, ``router``)
also takes a table. ``workers`` takes tables of
:class:`~kvroute.fleet.spec.WorkerSpec` fields (``[[workers]]``).

Layers: a value on the command line wins; then the environment, which
holds secrets (a ProxyConfig field made with
:func:`~kvroute.proxy.config.secret_field` is read from
``KVROUTE_<FIELD>``, e.g. ``KVROUTE_UPSTREAM_API_KEY``); then the file;
then the option's default. ``policy_params`` and ``router`` merge by name
across layers (``--policy-param`` overrides one parameter of the file's
table); every other option is replaced whole. The file may name
environment variables in its strings, ``${NAME}`` (``$${`` for a literal
``${``): a secret kept out of the file, or anything a container sets.

Errors name the file and the key, ``proxy.toml: workers[2].role: ...``
(:class:`ConfigError`, exit status 2): an unknown key (with the closest
known one), a value the option refuses, an unset variable.

:func:`render_toml` writes the effective settings back as a file
``--config`` accepts (``--print-config``), secrets as ``${KVROUTE_...}``.

>>> import argparse
>>> p = argparse.ArgumentParser()
>>> _ = p.add_argument("--retries", type=int, default=2)
>>> _ = p.add_argument("--model", dest="models", action="append", default=[])
>>> args = p.parse_args(["--retries", "5"])
>>> s = apply_layers(p, ["--retries", "5"], args, {"retries": 1, "models": ["m"]}, "x.toml", {})
>>> args.retries, args.models, s.sources["retries"], s.sources["models"]
(5, ['m'], 'command line', 'x.toml')
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import math
import os
import re
import sys
import typing
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from ..policies.params import coerce, parse_assignment
from .config import ProxyConfig, is_secret

__all__ = [
    "ENV_PREFIX",
    "MERGED",
    "ConfigError",
    "Settings",
    "apply_layers",
    "given_options",
    "load_file",
    "render_toml",
    "setting_actions",
]

#: Environment variables of secrets: ``KVROUTE_`` + the field name in capitals.
ENV_PREFIX: Final = "KVROUTE_"

#: Options whose ``NAME=VALUE`` items merge by name across layers.
MERGED: Final = frozenset({"policy_params", "router"})

# The command's own switches, never settings.
_NOT_SETTINGS: Final = frozenset({"help", "config", "print_config", "version"})
_VAR: Final = re.compile(r"\$\$\{|\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


class ConfigError(ValueError):
    """A config file (or environment variable) the proxy cannot use; the message names the key."""


@dataclass
class Settings:
    """What :func:`apply_layers` did.

    :param sources: option dest -> where its value came from (``"command
        line"``, ``"env KVROUTE_..."``, the file's path, ``"default"``).
    :param flagless: ProxyConfig fields without a flag, set from the file or
        the environment (``build_config`` applies them by name).
    :param file: the config file read, or None.
    """

    sources: dict[str, str] = field(default_factory=dict)
    flagless: dict[str, Any] = field(default_factory=dict)
    file: str | None = None

    def describe(self) -> str:
        """Where the settings came from, for the start line: ``proxy.toml + command line``."""
        used: list[str] = []
        for sources in self.sources.values():
            for source in sources.split(" + "):
                if source != "default" and source not in used:
                    used.append(source)
        order = {self.file: 0, "command line": 2}
        used.sort(key=lambda s: order.get(s, 1))
        if self.file is not None and self.file not in used:
            used.insert(0, self.file)
        return " + ".join(used) if used else "defaults"

    def blame(self, message: str) -> str:
        """``message`` (an error naming an option first) prefixed with where that option
        was set, unless on the command line or by default.

        >>> Settings({"retries": "proxy.toml"}).blame("retries must be >= 0")
        'proxy.toml: retries must be >= 0'
        """
        m = re.match(r"[A-Za-z_][A-Za-z0-9_]*", message)
        source = self.sources.get(m.group(0)) if m else None
        if source is None or source in ("default", "command line"):
            return message
        return f"{source}: {message}"


def setting_actions(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """The parser's options that are settings, by dest (help, --config and the like left out)."""
    out: dict[str, argparse.Action] = {}
    for action in parser._actions:
        if action.dest in _NOT_SETTINGS or action.dest is argparse.SUPPRESS:
            continue
        if not action.option_strings:  # positionals are not settings
            continue
        out.setdefault(action.dest, action)
    return out


def given_options(parser: argparse.ArgumentParser, argv: Sequence[str]) -> set[str]:
    """The dests the command line ``argv`` sets (whatever their values: a default given counts).

    :param parser: the command's parser.
    :param argv: its arguments (after the subcommand's name).
    """
    saved = [(a, a.default, a.required) for a in parser._actions]
    try:
        for a in parser._actions:
            a.default = argparse.SUPPRESS
            a.required = False
        ns, _ = parser.parse_known_args(list(argv))
    finally:
        for a, default, required in saved:
            a.default = default
            a.required = required
    return set(vars(ns))


# -- reading a file ----------------------------------------------------------------------


def load_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A config file's table: YAML for ``.yaml`` / ``.yml``, else TOML.

    :raises ConfigError: unreadable, malformed, or not a table at the top.
    """
    name = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"{name}: cannot read the config file: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{name}: not UTF-8 text: {e}") from None
    if name.endswith((".yaml", ".yml")):
        try:
            import yaml
        except ImportError:
            raise ConfigError(
                f"{name}: a YAML config file needs PyYAML (pip install pyyaml)"
            ) from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ConfigError(f"{name}: not valid YAML: {e}") from None
        if data is None:
            data = {}
    else:
        if sys.version_info >= (3, 11):
            import tomllib
        else:  # pragma: no cover - Python 3.10
            import tomli as tomllib
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{name}: not valid TOML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(
            f"{name}: the file must hold a table of settings, not {type(data).__name__}"
        )
    return data


def _interpolate(value: Any, where: str, env: Mapping[str, str]) -> Any:
    """``${NAME}`` replaced by the environment's value in every string of ``value``."""
    if isinstance(value, str):

        def sub(m: re.Match[str]) -> str:
            if m.group(0) == "$${":
                return "${"
            name = m.group(1)
            if name not in env:
                raise ConfigError(f"{where}: ${{{name}}} is not set in the environment")
            return env[name]

        return _VAR.sub(sub, value)
    if isinstance(value, dict):
        return {k: _interpolate(v, f"{where}.{k}", env) for k, v in value.items()}
    if isinstance(value, list):
        return [_interpolate(v, f"{where}[{i}]", env) for i, v in enumerate(value)]
    return value


def _field_types() -> dict[str, Any]:
    return typing.get_type_hints(ProxyConfig)


def _as_text(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _pairs(value: Mapping[str, Any], prefix: str = "") -> Iterable[str]:
    """A table as ``NAME=VALUE`` items (nested tables as ``outer.inner=VALUE``)."""
    for k, v in value.items():
        if isinstance(v, Mapping):
            yield from _pairs(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}={'none' if v is None else _as_text(v)}"


def _convert_one(action: argparse.Action, value: Any, where: str, element: Any) -> object:
    """One value through the option's own parser (or a mapping into ``element``)."""
    if isinstance(value, Mapping):
        from_mapping = getattr(element, "from_mapping", None)
        if from_mapping is None:
            raise ConfigError(f"{where}: expected a single value, not a table")
        return _from_mapping(element, value, where)
    if isinstance(value, list):
        raise ConfigError(f"{where}: expected a single value, not a list")
    convert = action.type
    if convert is None:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        result: object = value
    else:
        if value is None:
            raise ConfigError(f"{where}: expected a value, got none")
        try:
            result = convert(_as_text(value))  # type: ignore[operator]
        except (argparse.ArgumentTypeError, ValueError, TypeError) as e:
            raise ConfigError(f"{where}: {e}") from None
    if action.choices is not None and result not in action.choices:
        choices = ", ".join(repr(c) for c in action.choices)
        raise ConfigError(f"{where}: expected one of {choices}, got {value!r}")
    return result


def _from_mapping(cls: Any, data: Mapping[str, Any], where: str) -> object:
    """``cls.from_mapping(data)``, its error pinned to the key at fault (``workers[2].role``)."""
    try:
        return cls.from_mapping(data)
    except (TypeError, ValueError) as e:
        error = e
    known = {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set()
    required = {
        f.name: data[f.name]
        for f in (dataclasses.fields(cls) if dataclasses.is_dataclass(cls) else ())
        if f.default is dataclasses.MISSING and f.name in data
    }
    if known:
        for key in data:
            if key in required:
                continue
            try:
                cls.from_mapping({**required, key: data[key]})
            except (TypeError, ValueError) as e:
                message = str(e)
                if f"unknown key {key!r}" in message:
                    message = f"unknown key (known: {', '.join(sorted(known))})"
                else:  # from_mapping's own prefix names the worker: the path does here
                    message = message.split(": ", 1)[-1]
                raise ConfigError(f"{where}.{key}: {message}") from None
        for key in required:
            try:
                cls.from_mapping({key: data[key]})
            except (TypeError, ValueError) as e:
                raise ConfigError(f"{where}.{key}: {str(e).split(': ', 1)[-1]}") from None
    raise ConfigError(f"{where}: {str(error).split(': ', 1)[-1]}") from None


def _element_type(kind: Any) -> Any:
    """``X`` of ``Sequence[X]`` (and the like), else None."""
    args = typing.get_args(kind)
    if typing.get_origin(kind) in (Sequence, list, tuple, typing.Sequence) and args:
        return args[0]
    return None


def _convert(action: argparse.Action, value: Any, where: str, kind: Any) -> object:
    """A file's value for ``action``'s dest, as parsing the flag(s) would have made it."""
    if action.nargs == 0:  # store_true / store_false / store_const: the value itself
        if isinstance(action.const, bool):
            if not isinstance(value, bool):
                raise ConfigError(f"{where}: expected true or false, got {value!r}")
            return value
        if value != action.const and value != action.default:
            raise ConfigError(f"{where}: expected {action.const!r}, got {value!r}")
        return value
    many = isinstance(action, argparse._AppendAction) or action.nargs in ("*", "+")
    if not many:
        return _convert_one(action, value, where, None)
    element = _element_type(kind)
    if isinstance(value, Mapping) and not hasattr(element, "from_mapping"):
        value = list(_pairs(value))  # a table of NAME=VALUE items
    if isinstance(value, (str, int, float)) and not isinstance(value, bool):
        value = [value]  # one item: a list of one
    if not isinstance(value, list):
        raise ConfigError(f"{where}: expected a list, got {value!r}")
    return [_convert_one(action, item, f"{where}[{i}]", element) for i, item in enumerate(value)]


def _scalar(kind: Any) -> bool:
    """Whether ``kind`` is a bool, number, string or Literal (or one of them or None)."""
    if typing.get_origin(kind) is typing.Literal:
        return True
    options = typing.get_args(kind) if typing.get_origin(kind) is not None else (kind,)
    return all(o in (bool, int, float, str, type(None)) or typing.get_origin(o) is typing.Literal
               for o in options)  # fmt: skip


def _typed_field(value: Any, where: str, kind: Any) -> object:
    """A file's value for a ProxyConfig field without a flag, typed by its annotation
    (a structured one as it is: ProxyConfig checks it)."""
    if not _scalar(kind):
        return value
    try:
        return coerce(value, kind, where)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def read_layer(
    data: Mapping[str, Any],
    origin: str,
    actions: Mapping[str, argparse.Action],
    env: Mapping[str, str],
) -> tuple[dict[str, object], dict[str, object]]:
    """A file's table as option values and flagless field values.

    :param data: the file's table.
    :param origin: the file's path (for errors).
    :param actions: :func:`setting_actions` of the parser.
    :param env: for ``${NAME}``.
    :returns: ``(dest -> value, flagless field -> value)``.
    :raises ConfigError: an unknown key or a bad value, named.
    """
    types = _field_types()
    options: dict[str, object] = {}
    flagless: dict[str, object] = {}
    for raw_key, raw in data.items():
        key = str(raw_key).replace("-", "_")
        where = f"{origin}: {key}"
        value = _interpolate(raw, where, env)
        if key in actions:
            options[key] = _convert(actions[key], value, where, types.get(key))
        elif key in types and key not in _NOT_SETTINGS:
            flagless[key] = _typed_field(value, where, types[key])
        else:
            known = sorted(set(actions) | set(types))
            close = difflib.get_close_matches(key, known, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{where}: unknown key{hint}")
    return options, flagless


def _env_layer(
    actions: Mapping[str, argparse.Action], env: Mapping[str, str]
) -> tuple[dict[str, object], dict[str, object], dict[str, str]]:
    """Secrets from ``KVROUTE_<FIELD>``: option values, flagless values, their sources."""
    options: dict[str, object] = {}
    flagless: dict[str, object] = {}
    sources: dict[str, str] = {}
    for f in dataclasses.fields(ProxyConfig):
        if not is_secret(f):
            continue
        var = ENV_PREFIX + f.name.upper()
        if not env.get(var):
            continue
        where = f"${var}"
        if f.name in actions:
            options[f.name] = _convert_one(actions[f.name], env[var], where, None)
        else:
            flagless[f.name] = env[var]
        sources[f.name] = f"env {var}"
    return options, flagless, sources


def apply_layers(
    parser: argparse.ArgumentParser,
    argv: Sequence[str] | None,
    args: argparse.Namespace,
    data: Mapping[str, Any] | None,
    origin: str | None,
    env: Mapping[str, str],
) -> Settings:
    """Set ``args`` from the layers: command line > environment > file > defaults.

    :param parser: the command's parser (its actions are the options).
    :param argv: the command line ``args`` came from (None: unknown, then an
        option counts as given when it differs from its default).
    :param args: the parsed command line, updated in place.
    :param data: the config file's table, or None.
    :param origin: the file's path.
    :param env: the environment.
    :returns: where each value came from, and flagless fields to apply.
    :raises ConfigError: a bad key or value in the file or the environment.
    """
    actions = setting_actions(parser)
    if argv is None:
        given = {d for d, a in actions.items() if getattr(args, d, a.default) != a.default}
    else:
        given = given_options(parser, argv) & set(actions)
    from_file, flagless = ({}, {}) if data is None else read_layer(data, origin or "", actions, env)
    from_env, env_flagless, env_sources = _env_layer(actions, env)
    settings = Settings(file=origin if data is not None else None)
    for dest in actions:
        layers: list[tuple[str, object]] = []
        if dest in from_file:
            layers.append((origin or "config file", from_file[dest]))
        if dest in from_env:
            layers.append((env_sources[dest], from_env[dest]))
        if dest in given:
            layers.append(("command line", getattr(args, dest)))
        if not layers:
            settings.sources[dest] = "default"
            continue
        if dest in MERGED:  # NAME=VALUE items: later layers override by name
            merged: list[object] = []
            for _, items in layers:
                merged.extend(items if isinstance(items, list) else [items])
            setattr(args, dest, merged)
            settings.sources[dest] = " + ".join(source for source, _ in layers)
        else:
            source, value = layers[-1]
            setattr(args, dest, value)
            settings.sources[dest] = source
    settings.flagless = {**flagless, **env_flagless}
    for name in flagless:
        settings.sources[name] = origin or "config file"
    settings.sources.update({k: v for k, v in env_sources.items() if k in env_flagless})
    return settings


# -- writing the effective settings back ---------------------------------------------------

_BARE_KEY: Final = re.compile(r"[A-Za-z0-9_-]+\Z")


def _key(name: str) -> str:
    return name if _BARE_KEY.match(name) else _string(name)


def _string(text: str) -> str:
    # JSON's escapes are TOML basic-string escapes; DEL must be escaped in TOML too
    return json.dumps(text, ensure_ascii=False).replace("\x7f", "\\u007f")


def toml_value(value: object) -> str:
    """A TOML literal for a bool, number, string or list of them.

    >>> toml_value([1.5, "a", True]), toml_value(float("inf"))
    ('[1.5, "a", true]', 'inf')

    :raises TypeError: a value TOML cannot hold here (None, a table).
    """
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return _string(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    raise TypeError(f"no TOML literal for {value!r}")


def _table_lines(name: str, table: Mapping[str, object]) -> list[str]:
    """``[name]`` and its keys; nested tables as ``[name.inner]``; None values left out."""
    plain = {k: v for k, v in table.items() if v is not None and not isinstance(v, Mapping)}
    nested = {k: v for k, v in table.items() if isinstance(v, Mapping)}
    lines = [f"[{name}]"] + [f"{_key(k)} = {toml_value(v)}" for k, v in plain.items()]
    for k, v in nested.items():
        lines += ["", *_table_lines(f"{name}.{_key(k)}", v)]
    return lines


def render_toml(
    parser: argparse.ArgumentParser,
    args: argparse.Namespace,
    config: ProxyConfig,
    settings: Settings,
    *,
    tables: Mapping[str, Callable[[ProxyConfig], Mapping[str, object]]] | None = None,
) -> str:
    """The effective settings as a TOML config file (what ``--print-config`` prints).

    Options in the parser's order and groups; ``None`` values as comments;
    ``NAME=VALUE`` options and mappings as tables, workers as ``[[workers]]``;
    secrets as ``${KVROUTE_<FIELD>}`` (set that variable to reload the file).

    :param parser: the command's parser.
    :param args: the resolved options.
    :param config: the :class:`ProxyConfig` built from them (typed policy
        parameters and router settings come from it).
    :param settings: where the values came from (a header comment).
    :param tables: dest -> the table to print for it, read from ``config``
        (default: ``policy_params`` and ``router``).
    """
    secrets = {f.name for f in dataclasses.fields(ProxyConfig) if is_secret(f)}
    if tables is None:
        tables = {
            "policy_params": lambda c: dict(c.policy_params),
            "router": lambda c: _plain(dict(c.router)),
        }
    actions = setting_actions(parser)
    head = [
        "# kvroute proxy: the effective configuration (--print-config).",
        "# Precedence: command line > environment > config file > defaults.",
        f"# From: {settings.describe()}.",
    ]
    top: list[str] = []
    later: list[list[str]] = []
    seen: set[str] = set()
    groups = [g for g in parser._action_groups if g._group_actions]
    for group in groups:
        lines: list[str] = []
        for action in group._group_actions:
            dest = action.dest
            if dest not in actions or dest in seen:
                continue
            seen.add(dest)
            value = getattr(args, dest, None)
            if dest in secrets:
                var = ENV_PREFIX + dest.upper()
                if value:
                    lines.append(f'{dest} = "${{{var}}}"  # redacted; set ${var}')
                else:
                    lines.append(f"# {dest} =  (not set; a secret: ${var})")
                continue
            if dest in tables:
                table = tables[dest](config)
                later.append(_table_lines(dest, table) if table else [f"# [{dest}]  (empty)"])
                continue
            lines += _option_lines(dest, value, later)
        if lines:
            top += ["", f"# -- {group.title}", *lines]
    extra = [
        f"{name} = {toml_value(getattr(config, name))}"
        for name in settings.flagless
        if name not in secrets
    ]
    if extra:
        top += ["", "# -- settings without a flag", *extra]
    out = head + top
    for block in later:
        out += ["", *block]
    return "\n".join(out) + "\n"


def _plain(table: Mapping[str, object]) -> dict[str, object]:
    """Dataclass values (a BusyThreshold) as tables of their set fields."""
    out: dict[str, object] = {}
    for k, v in table.items():
        if dataclasses.is_dataclass(v) and not isinstance(v, type):
            out[k] = {f: x for f, x in dataclasses.asdict(v).items() if x is not None}
        else:
            out[k] = v
    return out


def _option_lines(dest: str, value: object, later: list[list[str]]) -> list[str]:
    """One option's line(s); tables and arrays of tables go to ``later``."""
    if value is None:
        return [f"# {dest} =  (not set)"]
    if isinstance(value, (list, tuple)) and value:
        if all(hasattr(v, "to_mapping") for v in value):
            for item in value:
                block = [f"[[{dest}]]"]
                block += [f"{_key(k)} = {toml_value(v)}" for k, v in item.to_mapping().items()]
                later.append(block)
            return []
        if all(isinstance(v, tuple) and len(v) == 2 for v in value):
            later.append(_table_lines(dest, {str(k): v for k, v in value}))
            return []
    try:
        return [f"{dest} = {toml_value(value)}"]
    except TypeError:
        return [f"{dest} = {toml_value(str(value))}"]


def parse_pairs(items: Iterable[object]) -> dict[str, object]:
    """``NAME=VALUE`` items (text or pairs) as a mapping; ``outer.inner`` names nest.

    >>> parse_pairs(["fresh_ttl=10", ("busy_threshold.max_active_requests", "8")])
    {'fresh_ttl': '10', 'busy_threshold': {'max_active_requests': '8'}}

    :raises ValueError: an item that is not ``NAME=VALUE``.
    """
    out: dict[str, Any] = {}
    for item in items:
        name: object
        value: object
        if isinstance(item, str):
            name, value = parse_assignment(item)
        else:
            name, value = item  # type: ignore[misc]
        outer, dot, inner = str(name).partition(".")
        if dot:
            table = out.get(outer)
            if not isinstance(table, dict):
                table = out[outer] = {}
            table[inner] = value
        else:
            out[str(name)] = value
    return out

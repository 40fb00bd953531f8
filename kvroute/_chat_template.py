"""The Jinja environment Hugging Face renders chat templates in (``apply_chat_template``).

Shared by the proxy's local tokenizer (:class:`kvroute.proxy.LocalTokenizer`)
and the mock worker's (:class:`kvroute.testing.MockTokenizer`): a sandbox
that refuses to change its inputs, ``trim_blocks`` and ``lstrip_blocks``,
``{% break %}`` / ``{% continue %}``, and what every template may call:
``tojson`` (plain JSON: no HTML escaping, non-ASCII kept, keys in the
order given), ``raise_exception(message)`` and ``strftime_now(format)``.

Only the environment is shared. What a template is given (the messages as
vLLM parses them, the tools as it dumps them, the content format it
detects) is written twice on purpose: the mock worker is the reference the
proxy's conversion is tested against. Needs ``jinja2``; the core never
imports this module.

>>> env = chat_template_environment()
>>> env.from_string("{{ messages | tojson }}").render(messages=[{"content": "<é>"}])
'[{"content": "<é>"}]'
"""

from __future__ import annotations

import datetime
import json
from typing import Any, NoReturn

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

__all__ = ["chat_template_environment"]


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # Hugging Face's tojson: json.dumps as it is, not Jinja's HTML-safe one.
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _raise_exception(message: str) -> NoReturn:
    raise jinja2.TemplateError(message)


def _strftime_now(fmt: str) -> str:
    return datetime.datetime.now().strftime(fmt)


def chat_template_environment() -> ImmutableSandboxedEnvironment:
    """A new environment to compile chat templates in (``env.from_string(source)``)."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env

"""kvroute._chat_template: the environment chat templates render in, as Hugging Face sets it up.

The proxy's local tokenizer and the mock worker share it, so the token-id
comparisons between them cannot catch a fault in it: these checks can.
"""

from __future__ import annotations

import datetime

import pytest

jinja2 = pytest.importorskip("jinja2")

from jinja2.sandbox import SecurityError  # noqa: E402

from kvroute._chat_template import chat_template_environment  # noqa: E402


def _render(source: str, **context: object) -> str:
    return chat_template_environment().from_string(source).render(**context)


def test_tojson_is_plain_json_not_jinjas_html_safe_one() -> None:
    value = {"b": "<tag> & 'quote'", "a": "é", "n": [1, None, True]}
    # No \u003c escapes, non-ASCII kept, keys in the order given.
    assert _render("{{ v | tojson }}", v=value) == (
        '{"b": "<tag> & \'quote\'", "a": "é", "n": [1, null, true]}'
    )
    assert _render("{{ v | tojson(indent=2) }}", v={"k": [1]}) == '{\n  "k": [\n    1\n  ]\n}'
    assert _render("{{ v | tojson(sort_keys=true) }}", v={"b": 1, "a": 2}) == '{"a": 2, "b": 1}'
    assert _render("{{ v | tojson(separators=(',', ':')) }}", v={"a": [1, 2]}) == '{"a":[1,2]}'
    assert _render("{{ v | tojson(ensure_ascii=true) }}", v="é") == '"\\u00e9"'


def test_raise_exception_and_strftime_now() -> None:
    with pytest.raises(jinja2.TemplateError, match="only user and assistant roles"):
        _render("{{ raise_exception('only user and assistant roles') }}")
    year = _render("{{ strftime_now('%Y') }}")
    assert year in {str(datetime.date.today().year), str(datetime.date.today().year + 1)}


def test_whitespace_control_and_loop_controls() -> None:
    # trim_blocks drops the newline after a block tag; lstrip_blocks the indent before it.
    source = "{% for x in xs %}\n  {% if x > 2 %}{% break %}{% endif %}\n{{ x }};{% endfor %}"
    assert _render(source, xs=[1, 2, 3, 4]) == "1;2;"
    assert _render("{% for x in xs %}{% if x % 2 %}{% continue %}{% endif %}{{ x }}{% endfor %}",
                   xs=[1, 2, 3, 4]) == "24"  # fmt: skip


def test_a_template_can_neither_change_its_inputs_nor_reach_python_internals() -> None:
    messages = [{"role": "user", "content": "hi"}]
    with pytest.raises(SecurityError):
        _render("{{ messages.append({'role': 'system'}) }}", messages=messages)
    assert messages == [{"role": "user", "content": "hi"}]
    with pytest.raises(SecurityError):
        _render("{{ ''.__class__.__mro__[1].__subclasses__() }}")


def test_every_call_gives_a_new_environment() -> None:
    first, second = chat_template_environment(), chat_template_environment()
    assert first is not second
    first.globals["extra"] = 1
    assert "extra" not in second.globals

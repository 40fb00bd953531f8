"""What a generation request is: its kind (the endpoint it came to) and its API.

A leaf of the proxy: it imports nothing of kvroute, so every part may import it.

>>> api_of("messages"), api_of("chat")
('anthropic', 'openai')
"""

from __future__ import annotations

from typing import Literal

__all__ = ["Api", "Kind", "api_of"]

#: The generation endpoints a prompt comes from.
Kind = Literal["completions", "chat", "messages"]
#: Which API's conventions a response follows.
Api = Literal["openai", "anthropic"]


def api_of(kind: Kind) -> Api:
    """The API whose conventions a request of ``kind`` is answered in."""
    return "anthropic" if kind == "messages" else "openai"

"""Every client protocol bridged to chat, one line each (the interface: ``translate/bridge.py``).

``proxy/web.py`` registers, for each protocol here, its route's Blueprint and
its error shape for the paths it owns; the generic runner
(``proxy/routes/bridged.py``) serves any of them. Adding a protocol is its folder
under ``translate/`` and one line in ``PROTOCOLS``.
"""
from __future__ import annotations

from .anthropic.bridge import MESSAGES
from .bridge import Protocol
from .gemini.bridge import GEMINI
from .responses.bridge import RESPONSES

PROTOCOLS: tuple[Protocol, ...] = (
    MESSAGES,   # Anthropic Messages: /v1/messages
    RESPONSES,  # OpenAI Responses: /v1/responses
    GEMINI,     # the Gemini API: /v1beta/models/{model}:generateContent, :streamGenerateContent
)


def protocol(name: str) -> Protocol:
    """The registered protocol called ``name`` (a KeyError names a typo at start, not per request)."""
    for found in PROTOCOLS:
        if found.name == name:
            return found
    raise KeyError(name)

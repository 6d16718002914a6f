"""The per-request map between a client's Responses tools and the function names the upstream sees.

A chat upstream only knows flat function tools. Codex's freeform ``custom``
tools (``apply_patch``) and ``namespace`` tools go up as functions; the
answer's calls must come back as what the client declared: a
``custom_tool_call`` with its raw ``input``, or a ``function_call`` with
``name`` and ``namespace`` split again.
"""
from __future__ import annotations

from ..tools import ToolNames

NAMESPACE_SEPARATOR = "__"  # what CPA uses to qualify namespace tools; the model sees ``ns__name``


class ToolMap:
    __slots__ = ("names", "custom", "spaces")

    def __init__(self) -> None:
        self.names = ToolNames()                      # long names shortened for the upstream, and back
        self.custom: set[str] = set()                 # qualified names of custom (freeform) tools
        self.spaces: dict[str, tuple[str, str]] = {}  # "ns__name" -> (ns, name)

    def upstream(self, name: str, namespace: str | None = None) -> str:
        """The function name the upstream gets for a client tool (or a call of it in history)."""
        if namespace:
            full = f"{namespace}{NAMESPACE_SEPARATOR}{name}"
            self.spaces[full] = (namespace, name)
            name = full
        return self.names.to_upstream(name)

    def client(self, upstream_name: str) -> tuple[str, str | None, bool]:
        """``(name, namespace, is_custom)`` for a function name the upstream called."""
        full = self.names.to_client(upstream_name)
        custom = full in self.custom
        split = self.spaces.get(full)
        if split is not None:
            return split[1], split[0], custom
        return full, None, custom

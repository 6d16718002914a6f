"""``reasoning_effort`` for a chat upstream, from what Anthropic and Responses clients ask (README "Reasoning effort").

Two steps: the client's request gives a level of ``LEVELS`` (or none: the
field is left out), the same for every target; then ``for_provider`` maps it
onto the values the provider accepts (its ``reasoning-efforts``, default
low/medium/high: what vLLM, SGLang and llama.cpp take for gpt-oss and what
most chat servers document), the nearest one, the lower on a tie. So
``minimal`` and ``none`` become ``low`` and ``xhigh`` becomes ``high``
unless the provider lists them.

Anthropic (translation.md §1.1, A8): ``thinking: disabled`` leaves it out;
``output_config.effort`` (Claude Code's effort setting: low/medium/high, and
``max``) wins when given; else ``thinking: enabled`` buckets its
``budget_tokens`` (< 2048 low, < 16384 medium, else high) and
adaptive thinking is medium; no thinking and no effort: left out.

Gemini (``generationConfig.thinkingConfig``): ``thinkingLevel`` (Gemini 3:
MINIMAL/LOW/MEDIUM/HIGH) is that level; else ``thinkingBudget`` 0 (thinking
off) leaves it out, -1 (dynamic) is medium, and a budget is bucketed as
Anthropic's ``budget_tokens`` are; no thinkingConfig: left out.
"""
from __future__ import annotations

from typing import Any

LEVELS = ("none", "minimal", "low", "medium", "high", "xhigh")
DEFAULT_LEVELS = ("low", "medium", "high")
_ANTHROPIC = {"low": "low", "medium": "medium", "high": "high", "max": "xhigh"}
_BUDGET = ((2048, "low"), (16384, "medium"))  # thinking.budget_tokens upper bounds (exclusive)


def from_anthropic(thinking: Any, output_config: Any) -> str | None:
    """The level an Anthropic request asks for (see the module docstring), or None."""
    kind = thinking.get("type") if isinstance(thinking, dict) else None
    if kind == "disabled":
        return None
    effort = output_config.get("effort") if isinstance(output_config, dict) else None
    stated = _ANTHROPIC.get(effort.lower()) if isinstance(effort, str) else None
    if stated is not None or kind is None:
        return stated
    if kind == "enabled":
        budget = thinking.get("budget_tokens")
        if type(budget) is not int:
            return "medium"
        return _bucket(budget)
    return "medium" if kind in ("adaptive", "auto") else None


def from_gemini(config: Any) -> str | None:
    """The level a Gemini ``thinkingConfig`` asks for (see the module docstring), or None."""
    if not isinstance(config, dict):
        return None
    level = config.get("thinkingLevel", config.get("thinking_level"))
    if isinstance(level, str) and level.lower() in LEVELS:
        return level.lower()
    budget = config.get("thinkingBudget", config.get("thinking_budget"))
    if type(budget) is not int or budget == 0:
        return None
    if budget < 0:
        return "medium"
    return _bucket(budget)


def _bucket(budget: int) -> str:
    return next((level for limit, level in _BUDGET if budget < limit), "high")


def from_responses(reasoning: Any) -> str | None:
    """``reasoning.effort`` as a level, or None (absent, or a value no level matches: left out)."""
    effort = reasoning.get("effort") if isinstance(reasoning, dict) else None
    if isinstance(effort, str) and effort.lower() in LEVELS:
        return effort.lower()
    return None


def for_provider(level: str, accepted: tuple[str, ...]) -> str:
    """``level`` as the nearest value the provider accepts (the lower one on a tie)."""
    if level in accepted:
        return level
    at = LEVELS.index(level)
    return min(accepted, key=lambda value: (abs(LEVELS.index(value) - at), LEVELS.index(value)))

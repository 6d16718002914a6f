"""Anthropic Messages <-> chat completions: request, response and stream translators (pure)."""

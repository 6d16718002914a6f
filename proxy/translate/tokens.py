"""Input tokens of a request body by characters, for every protocol (``body_tokens``, ``text_tokens``).

Anthropic's ``count_tokens`` estimate (``translate/anthropic/tokens.py``) adds
its per-message and per-tool costs to the same rule.

Pure and cheap: no tokenizer ships with the proxy (tiktoken would need a
download, and the upstream's own vocabulary is unknown anyway).

- ASCII text: ``CHARS_PER_TOKEN`` characters per token. Measured against
  OpenAI's o200k_base BPE (README "Claude Code with your own models" has the
  table): Markdown prose 3.6-4.0, Python 4.4, SSE/JSON 3.1, tool schemas 3.7.
  3.6 leans towards over-counting (-14 % .. +23 % per sample, +12 % on a
  Claude-Code-shaped request): Claude Code compacts a little early rather
  than overflowing the context.
- Other characters: one token each (CJK runs about one token per character
  in BPE vocabularies; not measured here), ``NON_ASCII_PER_TOKEN``.
- Fixed costs a chat template adds: the assistant prefix, per image.
"""
from __future__ import annotations

import re

CHARS_PER_TOKEN = 3.6
NON_ASCII_PER_TOKEN = 1.0
PER_IMAGE = 1600     # Anthropic's cap for one image; vision encoders of local models are in this range
BASE = 3             # the assistant prefix the template appends


def text_tokens(text: str) -> int:
    """Tokens of plain text by the character rule above."""
    if not text:
        return 0
    if text.isascii():
        return int(len(text) / CHARS_PER_TOKEN + 0.999)
    ascii_chars = len(text.encode("ascii", "ignore"))
    other = len(text) - ascii_chars
    return int(ascii_chars / CHARS_PER_TOKEN + other / NON_ASCII_PER_TOKEN + 0.999)


_IMAGE_FIELDS = frozenset(("url", "image_url", "data"))  # chat image_url.url, Responses input_image, Anthropic source
_BASE64 = re.compile(r"[A-Za-z0-9+/_-]*=*")


def _image_payload(text: str) -> bool:
    """Whether ``text`` looks like an encoded image: a base64 ``data:`` URL, or a long base64 run."""
    if text.startswith("data:"):
        head, comma, payload = text.partition(",")
        return bool(comma) and head.endswith(";base64") and _BASE64.fullmatch(payload) is not None
    return len(text) > 4096 and _BASE64.fullmatch(text) is not None


def body_tokens(body: object) -> int:
    """Input tokens of any JSON request body (chat, completions, Responses, Anthropic), roughly: every string
    by the character rule, except an image payload in an image field (``url``, ``image_url``, ``data``: a
    base64 ``data:`` URL or a long base64 run), which counts as one image. Any other string counts by its
    length however it looks, so a prompt without spaces is not an image. For charging an answer that came
    without usage; a walk with a stack, however deep the body, linear in its size."""
    texts: list[str] = []
    fixed, stack = BASE, [("", body)]
    while stack:
        key, node = stack.pop()
        if isinstance(node, str):
            if key in _IMAGE_FIELDS and _image_payload(node):
                fixed += PER_IMAGE
            else:
                texts.append(node)
        elif isinstance(node, dict):
            stack.extend(node.items())
        elif isinstance(node, list):
            stack.extend((key, item) for item in node)
    return fixed + text_tokens("".join(texts))

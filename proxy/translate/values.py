"""Type checks of JSON values, shared by every bridge's ``validate.py``.

Pure. JSON ``true`` decodes to a Python ``bool``, which is an ``int``: a field
that takes a number refuses it.
"""
from __future__ import annotations

from typing import Any


def is_int(value: Any) -> bool:
    """An int that is not a bool (JSON ``true`` is not a token count)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """An int or a float that is not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)

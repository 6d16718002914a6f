"""The data that crosses modules on a request's way: what a view asks for, how one target is asked, what came back.

Like requests' ``models.py`` (Request, PreparedRequest, Response): plain
slotted classes with no behaviour of their own, so the executor, the relay,
the bridges (``translate/<protocol>/bridge.py``) and the routes share them
without importing each other. ``Call`` is built by a view (or the generic
bridge runner), ``Plan`` by a bridge per target, ``Outcome`` by the
executor. Nothing here imports Flask, requests or urllib3 at run time.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:  # names for the annotations only: translate/ imports this module and must not reach urllib3
    from .routing import Target


@dataclass(frozen=True, slots=True)
class Plan:
    """How one target is asked, when that depends on the provider (``Call.adapt``).

    A bridged route (Anthropic or Responses clients) talks to a provider that
    serves its protocol natively by passing the request through, and to any
    other by translating it to chat; the executor only sends what the plan
    says and hands the plan back on the ``Outcome``, never knowing which
    client protocol asked.
    """

    path: str                                 # appended to the provider's base-url
    body: dict                                # the upstream body, model already rewritten
    fold: Callable[..., dict] | None = None   # how to fold a stream on this path, None = never
    usage_option: bool = True                 # a forced request also asks for include_usage
    headers: dict[str, str] | None = None     # client headers to send instead of Call.client_headers
    native: bool = True                       # False: the route must translate the answer back
    key_header: str | None = None             # also send the provider key in this header (x-api-key)
    check: Callable[[bytes], None] | None = None  # raises for a 200 JSON answer of the wrong shape (native)


@dataclass(slots=True)
class Call:
    """What the view asks for: the client's body and how the answer must come back."""

    path: str                      # appended to the provider's base-url, e.g. "/chat/completions"
    body: dict
    client_stream: bool
    request_id: str
    client_headers: dict[str, str]
    fold: Callable[..., dict] | None = None  # how to fold a stream for this route, None = never
    usage_option: bool = True  # a forced request also asks for stream_options.include_usage
    log: dict[str, Any] = field(default_factory=dict)
    adapt: Callable[[Target], Plan] | None = None  # per-target request (bridged routes), else the above
    check: Callable[[bytes], None] | None = None  # raises for a relayed 200 JSON answer of the wrong shape


@dataclass(slots=True)
class Outcome:
    """What the executor got: a complete body (relayed, folded, or an upstream error) or a live stream."""

    status: int
    content_type: str
    body: bytes = b""
    stream: Any = None  # a live stream (urllib3 ``HTTPResponse``): relay ``first`` then the rest; None = a body
    first: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    plan: Plan | None = None  # the plan that produced this outcome (bridged routes)
    strip_usage: bool = False  # the proxy asked for the stream's usage chunk; the client did not
    usage_limit: int = 64 * 1024 * 1024  # max-aggregate-bytes: the longest stream event read for its usage

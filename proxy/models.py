"""The data that crosses modules on a request's way: what a view asks for, how one target is asked, what came back.

Like requests' ``models.py`` (Request, PreparedRequest, Response): plain
slotted classes with no behaviour of their own, so the executor, the relay,
the bridges (``translate/<protocol>/bridge.py``) and the routes share them
without importing each other. ``Call`` is built by a view (or the generic
bridge runner), ``Plan`` by a bridge per target, ``Outcome`` by the
executor. Nothing here imports Flask, requests or urllib3 at run time.

``Record`` is the one per-request record (``g.record``): who asked, what it was
routed to, how it ended. The app's first hook makes it, the view fills in who
and which model, the executor the target, attempts and timings, the end of the
answer its status, result and tokens. ``finish`` runs exactly once, when the
answer is over; what it does (the access log line, the request metrics, the
operator page's record, and the settlement of usage and client-key limits) is
the ``Ledger``'s (``proxy/ledger.py``), so this module still imports nothing
of the package at run time.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:  # names for the annotations only: translate/ imports this module and must not reach urllib3
    from .config.model import ClientKey
    from .routing import Target
    from .state.limits import Ticket
    from .state.usage import Tokens


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
    bearer: bool = True                       # the key as Authorization: Bearer (False: key_header only; Google
                                              # refuses an API key sent as a bearer token)
    check: Callable[[bytes], Any] | None = None  # raises for a 200 JSON answer of the wrong shape (native)


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
    record: Record | None = None   # the request's record: the executor writes the target, attempts, timings
    adapt: Callable[[Target], Plan] | None = None  # per-target request (bridged routes), else the above
    check: Callable[[bytes], Any] | None = None  # raises for a relayed 200 JSON answer of the wrong shape
    raw: bytes | None = None  # the body as the client sent it (the fleet's prefix index keys it)


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
    usage: Tokens | None = None  # the answer's token counts when already read (a fold's, a checked answer's)


# What the end of an answer's body calls: ``Record.answered(status, result, tokens=None, body=b"")`` or a
# wrapper of it (the relay, the padded answer and the bridges' event streams call it once).
AnswerEnd = Callable[..., None]
_SETTLING = threading.Lock()  # guards every record's count of what its settlement waits for (held briefly)


@dataclass(frozen=True, slots=True)
class Client:
    """Who sent the request (``Record.client``)."""

    key: ClientKey | None  # None: an open proxy (no api-keys)
    identity: str          # the key's keyed hash (state/identity.py): what every per-tenant record is keyed by
    label: str             # for display only (logs, metrics, the page): the key's name or key-<8 digits>


class Record:
    """One request, from the app's first hook to its settlement."""

    __slots__ = ("request_id", "route", "rule", "client", "who", "model", "body_bytes",
                 "provider", "replica", "model_label", "attempts", "keys", "forced", "folded", "sent", "received",
                 "started", "upstream_ms", "upstream_seconds", "status", "result", "tokens", "streamed", "quiet",
                 "ticket", "release", "ledger", "_waiting", "_unread")

    def __init__(self, request_id: str, route: str, rule: str, ledger: Any) -> None:
        self.request_id = request_id
        self.route = route                     # the path asked for
        self.rule = rule                       # the URL rule that matched it ("unmatched": none did)
        self.client: Client | None = None      # set by authentication
        self.who = "-"                         # the client in the log and metrics: a key's label, "management"
        self.model = "-"                       # the model the client asked for, made safe for a log line
        self.body_bytes = 0                    # the request body's size
        # the target, set by the executor per attempt (the last one's stay)
        self.provider = "-"
        self.replica = "-"
        self.model_label = "-"                 # the configured alias served (a glob stays the glob): a label
        self.attempts = 0
        self.keys: list[str] = []              # the provider keys tried, redacted
        self.forced = False                    # a stream was asked for a non-stream request
        self.folded = False                    # ... and folded into one JSON answer
        self.sent: dict | None = None          # the body sent upstream (an answer without usage: the estimate)
        self.received: tuple | None = None     # (upstream response, its first bytes): ditto
        # timings
        self.started: float | None = None      # perf_counter when the answering attempt was sent
        self.upstream_ms: float | None = None  # until the upstream's response headers
        self.upstream_seconds: float | None = None  # until its answer was complete (set once it is counted)
        # the end
        self.status: int | None = None
        self.result: str | None = None         # "complete", "client closed", an error code, ...
        self.tokens: Tokens | None = None      # (prompt, completion, cached, reasoning) from the answer's usage
        self.streamed = False                  # the body outlives the view: its end calls finish, not the app
        self.quiet = False                     # not logged at all (the demo upstream's own hop)
        self.ticket: Ticket | None = None      # the client key's limits taken on admission
        self.release: Callable[[], None] | None = None  # the replica's in-flight count, given back at finish
        self.ledger = ledger                   # a ledger.Ledger (not imported: it imports this module)
        self._waiting = 0                      # settled when this drops to 0 (0 from the start: not settled)
        self._unread: bytes = b""              # an answer body whose usage is read at settlement if needed

    def account(self, client: Client) -> None:
        """This request's usage is recorded and its limits settled under ``client`` once it is over."""
        self.client, self.who = client, client.label
        self._waiting = 1  # the answer itself

    def answered(self, status: int, result: str, tokens: Tokens | None = None, body: bytes = b"") -> None:
        """The answer's body is out or cut: its status, result and tokens (read from a JSON ``body`` when
        ``tokens`` is None); a streamed body's end finishes the request here."""
        self.ledger.answered(self, status, result, tokens, body)

    def finish(self) -> None:
        """The answer is over (sent, cut, or an error): log and count the request once, and settle it once the
        upstream work it started (``hold``) has ended too."""
        self.ledger.close(self)

    def hold(self) -> Callable[[bytes], None] | None:
        """Say that upstream work for this request starts now (a fold in a helper thread, a stream's reader):
        call what this returns exactly once when it has ended, with the answer's body if any. None when
        the request is not settled (nothing to wait for)."""
        with _SETTLING:
            if not self._waiting:
                return None
            self._waiting += 1
        return self._work_ended

    def over(self) -> bool:
        """The answer is over: whether the settlement is due now (nothing else holds it)."""
        return self._release()

    def unread_body(self) -> bytes:
        """An answer body that came after the client left (its usage was never read), else b""."""
        return self._unread

    def _work_ended(self, body: bytes = b"") -> None:
        if body:
            self._unread = body  # the client may have left before the answer had it
        if self._release():
            self.ledger.settle(self)

    def _release(self) -> bool:
        with _SETTLING:
            if not self._waiting:
                return False
            self._waiting -= 1
            return not self._waiting


"""What one client protocol bridged to chat provides: the interface every ``translate/<protocol>/bridge.py`` implements.

A client protocol (Anthropic Messages, OpenAI Responses, Gemini ...) is served
by ONE generic runner (``proxy/routes/bridged.py``) that authenticates, admits, runs
the executor and writes the answer; the protocol only says how its bodies,
answers, events and errors look. Like CLIProxyAPI's translator pairs
(``internal/translator/<to>/<from>/init.go`` registers request/response
functions per pair), but with one pair per protocol (the upstream side is
always chat completions or the protocol itself, passed through) and an
explicit registry (``proxy/translate/registry.py``) instead of registration
by import.

Three objects, all pure (dicts and bytes; no Flask, requests or urllib3):

``Protocol`` (one instance, registered): the routes' constants, the start
of a request (``open``: validate and parse the client's body), and the
protocol's error shape (``client_error`` maps any ``ProxyError`` to the
protocol's status and type, ``error_body`` renders it: the ONE place this
protocol's error body is built).

``Exchange`` (one per request, made by ``Protocol.open``): ``plan`` says per
target how it is asked (a ``models.Plan``: passed through to a provider
whose ``native-apis`` lists ``Protocol.native_api``, or translated to
``/chat/completions`` with ``native=False``); ``answer`` turns a complete
outcome (a folded or JSON ``chat.completion``, or an upstream error) into
the client's; ``writer`` gives the state machine that turns a live chat
stream into the protocol's event bytes.

``EventWriter`` (one per translated stream): ``start`` / ``feed`` /
``close`` / ``fail``, fed with the events of the one chat-stream reader
(``translate/chat_reads.py`` frames a read and batches it, its
``chat_events`` turns a batch into ``chat_stream.ChatStream`` events):

    ("reasoning", text)        ("text", text)
    ("tool_start", tool)       ("tool_args", tool, fragment)    tool: fold/tool_calls.ToolCall
    ("finish", reason, stop)   ("usage", usage)                 stop: vLLM's matched stop string, else None
    ("run", TextRun)           a run of plain "text"/"reasoning" deltas as JSON string-literal bodies,
                               still escaped and without quotes (the measured fast path; a writer
                               without one reads ``plain_events(events)`` and sees (kind, text))

Within one chunk the order is reasoning, text, tools, finish; usage
whenever it comes. Tool names and ids are complete at ``tool_start`` (the
reader holds arguments that came first and replays them after it); calls
that never got a name or id are started at ``close``. Surrogate halves are
already joined, text is valid for ``orjson.dumps``.

What the runner does with them, in order (``proxy/routes/bridged.py``,
its stream loop ``proxy/pump.py``):

1. ``protocol.open(body, incoming)`` (a ``BadRequest`` is a 400 in the
   protocol's shape), then the key's policy (``admit``), then
   ``exchange.targets(targets)`` (after admission, before any upstream: it
   may narrow the targets or raise a 4xx).
2. ``execute`` with a ``Call`` whose ``adapt`` is ``exchange.plan``.
3. Not a client stream: ``exchange.answer(outcome)`` (a native answer comes
   back as it is), relayed, padded with blank lines while a fold runs
   (``nonstream-keepalive-interval``). A ``ProxyError`` on the way is
   rendered through ``protocol.client_error``.
4. A client stream of a native target: relayed byte for byte
   (``exchange.relay`` may watch the bytes). A translated one: the 200
   goes out with the first upstream event (or earlier when
   ``Protocol.keepalive`` is set: then its bytes are sent every
   ``pump.KEEPALIVE_INTERVAL`` of upstream silence, the first with
   ``writer.start()``); each upstream read becomes one client write of
   what ``writer.feed(out, events)`` appended; the end
   ``writer.close(out, events, ended_early)``; a failure after the commit
   ``writer.fail(protocol.client_error(exc))`` (``failed_answer`` for an
   upstream error answer after a keep-alive committed the stream).
5. ``exchange.usage`` (the upstream's chat usage, when it had one) is what
   the request is charged with.

To add a protocol: ``translate/<protocol>/`` with ``validate.py``,
``request.py``, ``response.py``, ``stream.py``, ``errors.py`` (the error
body) and ``bridge.py`` (a ``Protocol`` subclass instance tying them, see
``anthropic/bridge.py`` and ``responses/bridge.py``), then one line in
``translate/registry.py`` and a route module like ``routes/anthropic.py``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterable, Iterator

from ..errors import ProxyError
from .chat_reads import TextRun

if TYPE_CHECKING:
    from ..models import Outcome, Plan
    from ..routing import Target

__all__ = ["EventWriter", "Exchange", "Incoming", "MachineWriter", "Protocol", "TextRun", "plain_events"]


@dataclass(slots=True)
class Incoming:
    """What the runner knows of a request besides its body (all plain data, read before any generator runs)."""

    headers: dict[str, str]            # the client headers that may go upstream (executor.client_headers)
    request_id: str
    identity: str                      # the client key's keyed hash (state/identity.py); "-" on an open proxy
    path_args: dict[str, str] = field(default_factory=dict)  # the route's URL variables (Gemini's model)
    settings: Any = None               # config.model.Settings of this request
    store: Any = None                  # the state store (stored conversations); None when unused
    body_bytes: int = 0                # the request body's size as received


class EventWriter:
    """One translated stream: ``chat_stream`` events in, the protocol's event bytes out.

    ``feed`` and ``close`` append to the runner's ``out`` list (one client
    write per upstream read is joined from it): what a writer appended before
    it raised still goes out, so a protocol that numbers its events keeps
    them contiguous. ``ended`` is True once a terminal event was produced
    (``close`` or ``fail``). Methods must not raise for anything the upstream
    sent; a ``ProxyError`` they raise (a bound, a broken stream) is turned
    into ``fail`` by the runner, any other exception too (logged, with the
    generic internal-error message).
    """

    ended: bool = False

    def start(self) -> bytes:
        """The opening event(s), once (``message_start``, ``response.created`` ...)."""
        raise NotImplementedError

    def feed(self, out: list[bytes], events: Iterable[tuple]) -> None:
        """Append the protocol's events for one batch of reader events to ``out``.

        ``("run", TextRun)`` events carry plain deltas undecoded: write their
        bodies between quotes where the protocol puts a JSON string (they are
        what ``orjson.dumps`` gives), or take ``run.kind`` and ``run.text()``
        as a ``(kind, text)`` event (``plain_events`` does that for a batch).
        """
        raise NotImplementedError

    def close(self, out: list[bytes], events: Iterable[tuple], ended_early: bool) -> None:
        """Append the last events (the reader's ``close``) and the terminal event; ``ended_early``: the upstream
        stopped without ``[DONE]`` or a finish reason (an error ending, not a clean one)."""
        raise NotImplementedError

    def fail(self, error: ProxyError) -> bytes:
        """The protocol's terminal error event for a failure after the 200 went out (``error`` already mapped
        by ``Protocol.client_error``); ``b""`` when a terminal event went out already. Must not raise."""
        raise NotImplementedError


class MachineWriter(EventWriter):
    """An ``EventWriter`` over a protocol's stream state machine shaped like ``anthropic/stream.py``'s
    ``MessageStream`` (and ``gemini/stream.py``'s): ``start() -> bytes``, ``feed(events) -> bytes``,
    ``close(events, ended_early) -> bytes``, ``fail(status, message) -> bytes`` and ``ended`` (and, when it
    has one, ``feed_into(out, events)``, ``feed`` appending to ``out``). A machine of another shape
    subclasses it (``responses/bridge.py``)."""

    __slots__ = ("stream",)

    def __init__(self, stream: Any) -> None:
        self.stream = stream
        into = getattr(stream, "feed_into", None)
        if into is not None:  # the machine appends to the runner's list itself: one call and one join less per read
            self.feed = into

    @property
    def ended(self) -> bool:  # type: ignore[override]
        return self.stream.ended

    def start(self) -> bytes:
        return self.stream.start()

    def feed(self, out: list[bytes], events: Iterable[tuple]) -> None:
        data = self.stream.feed(events)
        if data:
            out.append(data)

    def close(self, out: list[bytes], events: Iterable[tuple], ended_early: bool) -> None:
        out.append(self.stream.close(events, ended_early))

    def fail(self, error: ProxyError) -> bytes:
        return self.stream.fail(error.status, error.message)


def plain_events(events: Iterable[tuple]) -> Iterator[tuple]:
    """``events`` with each ``("run", TextRun)`` as the one ``(kind, text)`` event it stands for: for a
    writer without a fast path of its own."""
    for event in events:
        if event[0] == "run":
            yield (event[1].kind, event[1].text())
        else:
            yield event


class Exchange:
    """One request of a protocol: per-target plans, the answer, the stream writer."""

    model: str = ""            # the model the client named (what answers say back to it)
    stream: bool = False       # the client asked for a stream
    stream_type: str = "text/event-stream"  # the Content-Type of a translated stream (Gemini's array: JSON)
    usage: dict | None = None  # the upstream's chat usage of a translated answer (accounting reads it)

    def targets(self, targets: tuple[Target, ...]) -> tuple[Target, ...]:
        """The admitted targets this request may use (e.g. only native ones to continue their conversation)."""
        return targets

    def plan(self, target: Target) -> Plan:
        """How ``target`` is asked: ``Plan(path, body, ...)``; ``native=False`` when translated to chat."""
        raise NotImplementedError

    def answer(self, outcome: Outcome) -> Outcome:
        """The client's answer for a complete outcome: a 2xx JSON ``chat.completion`` translated (set
        ``usage``), an upstream error in the protocol's shape; a native answer or a stream as it came."""
        raise NotImplementedError

    def writer(self) -> EventWriter:
        """A fresh writer for a translated stream."""
        raise NotImplementedError

    def relay(self, body: Iterator[bytes]) -> Iterator[bytes]:
        """A native stream's bytes on their way to the client (to watch them); as they are by default."""
        return body

    def head(self) -> int:
        """The prompt's token estimate a stream's opening event needs before the upstream answers (0: none)."""
        return 0


class Protocol:
    """One client protocol bridged to chat (registered once in ``translate/registry.py``)."""

    name: str = ""                 # the registry key ("anthropic"), the logger's and the Blueprint's name
    native_api: str = ""           # the ``native-apis`` entry of a provider serving this protocol itself
    error_paths: tuple[str, ...] = ()  # path prefixes whose errors come in this shape when no view renders them
    keepalive: bytes | None = None  # an event to commit the stream early with and repeat in silences
    key_query: str | None = None   # a query parameter that may carry the client key (Gemini's ``key``)

    def open(self, body: dict, incoming: Incoming) -> Exchange:
        """Validate the client's body (``errors.BadRequest`` naming the field) and start its exchange."""
        raise NotImplementedError

    def model_of(self, body: dict, incoming: Incoming) -> Any:
        """The model the client names (``body["model"]`` unless the protocol puts it elsewhere), unchecked."""
        return body.get("model")

    def client_error(self, error: ProxyError) -> ProxyError:
        """``error`` mapped to this protocol's status and type; its ``body()`` is this protocol's error body."""
        raise NotImplementedError

    def error_body(self, error: ProxyError) -> bytes:
        """The body for an error no view rendered (404, 405, what the worker writes itself)."""
        return self.client_error(error).body()

    def failed_answer(self, outcome: Outcome) -> ProxyError:
        """An upstream's error answer (``outcome.status`` >= 400, its body) that came after a keep-alive
        committed the stream, as the error ``EventWriter.fail`` ends it with (keep-alive protocols)."""
        return self.client_error(ProxyError(f"upstream returned HTTP {outcome.status}", status=outcome.status))

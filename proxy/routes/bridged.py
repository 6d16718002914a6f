"""The one runner for every bridged client protocol (``translate/registry.py``): body in, answer out.

A route module only names its protocol: ``bp.post(path)(partial(serve,
PROTOCOL))`` with ``errors(bp, PROTOCOL)``. ``serve`` does the rest, the
same for every protocol (``translate/bridge.py`` says what each hook must
do):

    authenticate -> read the body -> protocol.open (validate) -> admit (the key's policy)
      -> exchange.targets -> execute (Call.adapt = exchange.plan)
      -> not a stream:      exchange.answer, padded while a fold runs
      -> a native stream:   relayed byte for byte (exchange.relay)
      -> a translated one:  the one chat-stream reader (translate/chat_reads.py, chat_stream.py)
                            -> exchange.writer(): one client write per upstream read

Commit point (SPEC): the 200 goes out with the first upstream event, so
failures before it are ordinary errors (after failover). A protocol with a
``keepalive`` event whose targets are all translated commits anyway after
``pump.KEEPALIVE_INTERVAL`` of silence (its opening event, then the
keep-alive every interval): the upstream is then read on helper threads
(``pump.Pump``), inline otherwise (``pump.Direct``); ``pump.events`` writes
the protocol's events either way. A failure after the commit ends the
stream with the protocol's terminal error event (``EventWriter.fail``),
never a cut body.
"""
from __future__ import annotations

from typing import Callable

from flask import Blueprint, Response, current_app, g, request

from .. import pump
from ..errors import ProxyError, loggable
from ..executor import client_headers, execute
from ..models import AnswerEnd, Call, Outcome, Record
from ..relay import SSE_HEADERS, padded_answer, to_response
from ..routing import Target
from ..state.usage import Tokens, counts
from ..translate.bridge import Exchange, Incoming, Protocol
from .common import admit, authenticate, holder, read_json

JSON = {"Content-Type": "application/json"}


def errors(bp: Blueprint, protocol: Protocol) -> None:
    """Render every ``ProxyError`` raised under ``bp`` in ``protocol``'s shape (``Protocol.client_error``)."""
    def render(exc: ProxyError) -> Response:
        mapped = protocol.client_error(exc)
        g.record.status = mapped.status
        g.record.result = exc.code or mapped.type
        return Response(mapped.body(), mapped.status, {**JSON, **mapped.headers})
    bp.register_error_handler(ProxyError, render)


def serve(protocol: Protocol, **path_args: str) -> Response:
    """One request of ``protocol``, start to end (the view; ``path_args`` are the route's URL variables)."""
    config = holder()
    runtime = config.current()
    settings = runtime.settings
    record: Record = g.record
    authenticate(runtime, query=protocol.key_query)
    body, raw = read_json(settings.max_request_bytes)
    incoming = Incoming(client_headers(request.environ), record.request_id, record.client.identity, path_args, settings,
                        current_app.extensions["streamfold.state"], record.body_bytes)
    model = protocol.model_of(body, incoming)
    if isinstance(model, str) and model:
        record.model = loggable(model)
    exchange = protocol.open(body, incoming)
    # the key's policy: allowed targets, rpm, tpm, concurrency
    targets = exchange.targets(admit(exchange.model, runtime.router.resolve(exchange.model), body))
    call = Call("/chat/completions", body, exchange.stream, record.request_id, incoming.headers, record=record,
                adapt=exchange.plan, raw=raw)

    def run() -> Outcome:
        return execute(settings, config.sessions, config.keys, targets, call, config.balancer)

    on_end = _charged(record, exchange)
    if exchange.stream:
        return _stream(protocol, exchange, run, targets, settings.max_aggregate_bytes, on_end)

    def answered() -> Outcome:
        try:
            return exchange.answer(run())
        except ProxyError as exc:
            raise protocol.client_error(exc) from None

    if settings.nonstream_keepalive_interval > 0:
        return padded_answer(settings.nonstream_keepalive_interval, answered, on_end, record)
    return _answer(answered(), exchange, on_end)


def _answer(outcome: Outcome, exchange: Exchange, on_end: AnswerEnd) -> Response:
    """A complete answer, or a native stream relayed as it comes."""
    response = to_response(outcome, on_end)
    if outcome.stream is not None:
        g.record.streamed = True  # logged when the relayed stream ends
        response.response = exchange.relay(response.response)
    return response


def _charged(record: Record, exchange: Exchange) -> AnswerEnd:
    """``record.answered``, counting the upstream's CHAT usage when the answer was translated (the counts, no
    JSON written and read back)."""
    def end(status: int, result: str, tokens: Tokens | None = None, body: bytes = b"") -> None:
        chat = exchange.usage
        if chat:
            record.answered(status, result, counts(chat))
        else:
            record.answered(status, result, tokens, body)
    return end


def _translated(outcome: Outcome) -> bool:
    return outcome.stream is not None and outcome.plan is not None and not outcome.plan.native


def _stream(protocol: Protocol, exchange: Exchange, run: Callable[[], Outcome], targets: tuple[Target, ...],
            max_bytes: int, on_end: AnswerEnd) -> Response:
    """A streamed answer: translated (with keep-alives in silences, for a protocol that has them), or relayed.

    Only an all-translated target list may commit before the upstream's first
    event: a native stream is relayed byte for byte, so nothing of ours may
    precede it.
    """
    keepalive = protocol.keepalive
    if keepalive is not None:
        early = not any(protocol.native_api in t.provider.native_apis for t in targets)
        source = pump.Pump(run, max_bytes, g.record.hold())
        try:
            outcome, pending = pump.first_items(source, pump.KEEPALIVE_INTERVAL if early else None)
        except BaseException:
            source.cancel()
            raise
        if outcome is not None:
            return _answer(exchange.answer(outcome), exchange, on_end)
    else:
        outcome = run()
        if not _translated(outcome):
            return _answer(exchange.answer(outcome), exchange, on_end)
        source, pending = pump.Direct(pump.batches(outcome, max_bytes), max_bytes, outcome.stream), []
    g.record.streamed = True
    body = pump.events(protocol, exchange, exchange.writer(), source, pending, on_end,
                       silent=keepalive is not None and not pending)
    response = Response(body, 200, {"Content-Type": exchange.stream_type, **SSE_HEADERS}, direct_passthrough=True)
    response.call_on_close(source.cancel)  # also when the body never started (the client left first)
    return response

"""Run one client request against its upstreams: attempts, failover, cooldowns, fold or relay.

Nothing here has reached the client yet, so every failure before the first
byte may move on to the next key or provider (up to ``request-retry`` extra
attempts). What comes back is an ``Outcome``: either a live upstream stream to
relay (its first bytes already read, so an empty stream could still fail over)
or a complete body: relayed JSON, a folded ``chat.completion``, or an
upstream error passed through.
"""
from __future__ import annotations

import email.utils
import logging
import math
import threading
import time
import weakref
from contextlib import closing
from functools import partial
from typing import TYPE_CHECKING, Any, Callable

import orjson
from urllib3 import HTTPResponse

from . import hop, metrics, upstream
from .config.model import KeyEntry, Settings, redact
from .errors import BadRequest, ProxyError, RateLimited, StreamError, UpstreamUnavailable, error_body, loggable
from .keys import RATE_LIMIT_DEFAULT, REFUSED_KEY_COOLDOWN, KeyPool
from .models import Call, Outcome
from .routing import Target
from .state.usage import answer_counts

if TYPE_CHECKING:
    from .balance.balancer import Balancer

log = logging.getLogger(__name__)
RETRY_STATUSES = frozenset((429, 500, 502, 503, 504))
REFUSED_STATUSES = frozenset((401, 403))
BACK_OFF_STATUSES = frozenset((429, 503))  # whose Retry-After the client gets (RFC 9110 10.2.3, RFC 6585)
ERROR_BODY_LIMIT = 1024 * 1024
# Client headers never sent upstream (nginx-like): the client's credentials and
# cookies; hop-by-hop headers (RFC 9110 section 7.6.1, plus those the client's
# Connection header names); anything describing the client's body, which the
# proxy re-serialises (Content-Encoding, digests); Expect, Via, Range and
# conditionals, which make no sense on a re-issued POST; and what the proxy
# sets itself.
DROP_HEADERS = frozenset((
    "authorization", "x-api-key", "api-key", "cookie", "cookie2", "host", "content-length", "content-type",
    "content-encoding", "content-md5", "digest", "content-digest", "repr-digest", "want-digest",
    "accept", "accept-encoding", "connection", "keep-alive", "proxy-authenticate",
    "proxy-authorization", "proxy-connection", "te", "trailer", "transfer-encoding", "upgrade",
    "expect", "via", "max-forwards", "range", "if-range", "if-match", "if-none-match",
    "if-modified-since", "if-unmodified-since",
    "x-management-key", "x-request-id", "forwarded", "x-forwarded-for", "x-forwarded-host",
    "x-forwarded-proto", "x-real-ip", "streamfold-hop", "streamfold-demo",
))
# Credential-looking names, whatever their prefix: X-Goog-Api-Key, X-Auth-Token,
# X-Amz-Security-Token, X-Client-Secret, X-Proxy-Authorization, ...
CREDENTIAL_SUFFIXES = ("api-key", "apikey", "-token", "-secret", "-password", "-credential",
                       "-credentials", "-authorization", "-cookie", "-session")


def execute(settings: Settings, sessions: upstream.Sessions, keys: KeyPool,
            targets: tuple[Target, ...], call: Call, balancer: Balancer | None = None) -> Outcome:
    """Try the targets' keys in turn until one answers; raise the last failure otherwise.

    With a ``balancer``, the replica set is ordered for this request first, and
    each attempt counts as in flight at its replica until its answer is complete
    (a stream: until the access log is written, ``Record.release``).
    """
    retry = targets[0].provider.request_retry
    budget = 1 + (settings.request_retry if retry < 0 else retry)
    record = call.record
    failure: ProxyError | Outcome | None = None
    choice = None
    raw, call.raw = call.raw, None  # the body's bytes are kept no longer than the request is being routed
    if balancer is not None:
        client = record.client
        choice = balancer.route(targets, call.body, call.client_headers, keys, settings.fleet, raw,
                                client.identity if client is not None else "")
        targets = choice.targets
    for target, entry in keys.plan(targets):
        if record.attempts >= budget:
            break
        record.attempts += 1
        record.provider = target.provider.name
        record.replica = target.replica_name
        # the metrics' model label: the configured alias (a glob stays the glob), never the client's string
        record.model_label = (target.spec.alias or target.spec.name) if target.spec else target.model
        record.keys.append(redact(entry.api_key, short=True) or "-")
        column = balancer.begin(target) if balancer is not None else -1
        try:
            outcome = _attempt(settings, sessions, keys, target, entry, call)
        except ProxyError as exc:
            if balancer is not None:
                balancer.end(target, column)
            if exc.detail is not None:  # every failed attempt's upstream and setting, for the operator (only the
                # last failure reaches the client; a redirect's Location is in the detail alone)
                log.warning("request_id=%s attempt=%d %s", call.request_id, record.attempts, loggable(exc.detail, 400))
            if not getattr(exc, "retryable", True):
                raise
            failure = exc
            metrics.RETRIES.labels(target.provider.name, metrics.reason(exc.code or exc.status)).inc()
            continue
        except BaseException:
            if balancer is not None:
                balancer.end(target, column)
            raise
        if outcome.status in RETRY_STATUSES or outcome.status in REFUSED_STATUSES:
            if balancer is not None:
                balancer.end(target, column)
            failure = outcome
            metrics.RETRIES.labels(target.provider.name, metrics.reason(outcome.status)).inc()
            continue
        if balancer is not None:
            if outcome.status < 400:
                balancer.served(choice, target, settings.fleet, settings.max_request_bytes)
            if outcome.stream is None:
                balancer.end(target, column)
            else:  # in flight until the stream is over: the access log releases it (or, failing that, GC)
                record.release = release = Release(partial(balancer.end, target, column))
                weakref.finalize(outcome.stream, release)
        return outcome
    if failure is None:
        wait = keys.soonest_recovery(targets)
        raise RateLimited("every upstream key for this model is cooling down after rate limits; retry later",
                          headers={"Retry-After": str(int(wait + 0.999))})
    if isinstance(failure, ProxyError):
        raise failure
    if failure.status in REFUSED_STATUSES:
        raise UpstreamUnavailable(f"provider {record.provider!r} refused its API key "
                                  f"(upstream HTTP {failure.status}); check api-key-entries",
                                  code="upstream_auth_failed")
    if failure.status == 429 and "Retry-After" not in failure.headers:
        failure.headers["Retry-After"] = str(int(keys.soonest_recovery(targets) + 0.999))
    return failure


class Release:
    """Runs its function once, whoever calls first (the access log, or the stream's finaliser)."""

    __slots__ = ("_function", "_lock")

    def __init__(self, function: Callable[[], None]) -> None:
        self._function: Callable[[], None] | None = function
        self._lock = threading.Lock()

    def __call__(self) -> None:
        with self._lock:
            function, self._function = self._function, None
        if function is not None:
            function()


def _attempt(settings: Settings, sessions: upstream.Sessions, keys: KeyPool,
             target: Target, entry: KeyEntry, call: Call) -> Outcome:
    provider = target.provider
    if call.adapt is None:
        plan = None
        path, fold, usage_option, client = call.path, call.fold, call.usage_option, call.client_headers
        body = dict(call.body)
        body["model"] = target.model
    else:
        plan = call.adapt(target)
        path, fold, usage_option, body = plan.path, plan.fold, plan.usage_option, plan.body
        client = call.client_headers if plan.headers is None else plan.headers
    forced = fold is not None and not call.client_stream and provider.force_upstream_stream
    record = call.record
    record.forced = forced
    if forced:
        body["stream"] = True
        if usage_option:
            options = body.get("stream_options")
            body["stream_options"] = {**(options if isinstance(options, dict) else {}), "include_usage": True}
    # A streamed chat answer carries usage only when asked; ask (usage is
    # recorded), and the relay removes it again unless the client asked too.
    strip_usage = False
    if call.client_stream and call.adapt is None and path == "/chat/completions" and provider.stream_usage:
        options = body.get("stream_options")
        if not (isinstance(options, dict) and options.get("include_usage") is True):
            body["stream_options"] = {**(options if isinstance(options, dict) else {}), "include_usage": True}
            strip_usage = True
    headers = dict(client)
    headers.update(provider.headers)
    headers["Content-Type"] = "application/json"
    headers["Accept"] = "text/event-stream" if (forced or call.client_stream) else "application/json"
    headers["Accept-Encoding"] = "identity"  # relay bytes as sent; no decompression per chunk
    headers["X-Request-Id"] = call.request_id
    if hop.is_demo_url(provider.base_url):
        headers[hop.DEMO_HEADER] = hop.demo_secret()
    if entry.api_key:
        if plan is None or plan.bearer:
            headers["Authorization"] = f"Bearer {entry.api_key}"
        if plan is not None and plan.key_header:
            headers[plan.key_header] = entry.api_key
    record.sent = body
    try:
        payload = orjson.dumps(body)
    except orjson.JSONEncodeError:
        # orjson reads 1024 levels but writes 254: such a body is the client's doing, not the upstream's
        refused = BadRequest("The request body nests JSON too deeply to forward (at most 254 levels).")
        refused.retryable = False
        raise refused from None
    started = time.perf_counter()
    try:
        response = upstream.post(sessions, provider, target.base_url + path,
                                 payload, headers, entry, settings.timeouts)
    except UpstreamUnavailable:
        keys.connect_failed(target.replica_name)
        raise
    finally:
        record.upstream_ms = round((time.perf_counter() - started) * 1000, 1)
    metrics.child(metrics.UPSTREAM_TTFB, provider.name).observe(time.perf_counter() - started)
    keys.connected(target.replica_name)
    status = response.status
    if status < 200 or 300 <= status < 400:
        # Like nginx: a redirect is never followed with the key nor relayed as
        # an answer; an API client cannot use an upstream's internal redirect.
        with closing(response):
            raise _not_final(provider.name, response)
    if status >= 400:
        with closing(response):
            if status == 429:
                keys.cool(target.replica_name, entry, retry_after(response.headers.get("Retry-After"),
                                                                  settings.max_cooldown))
                metrics.COOLDOWNS.labels(provider.name, "rate_limited").inc()
            elif status in REFUSED_STATUSES:
                keys.cool(target.replica_name, entry, REFUSED_KEY_COOLDOWN, "refused")
                metrics.COOLDOWNS.labels(provider.name, "key_refused").inc()
            failed = passthrough_error(response, settings.max_cooldown)
            failed.plan = plan
            return failed
    try:
        outcome = _success(settings, response, call, fold, forced, call.check if plan is None else plan.check)
        outcome.plan = plan
        outcome.strip_usage = strip_usage and outcome.stream is not None
        outcome.usage_limit = settings.max_aggregate_bytes
    except BaseException:
        response.close()
        raise
    record.started = started
    if outcome.stream is None:
        record.upstream_seconds = seconds = time.perf_counter() - started  # counted here, once
        metrics.child(metrics.UPSTREAM_SECONDS, provider.name).observe(seconds)
    return outcome


def _success(settings: Settings, response: HTTPResponse, call: Call, fold: Callable[..., dict] | None,
             forced: bool, check: Callable[[bytes], Any] | None) -> Outcome:
    content_type = upstream.header_value(response.headers.get("Content-Type")) or ""
    first = upstream.read_first(response)
    call.record.received = (response, first)  # what an answer without usage is charged by (Ledger.settle)
    if not first.strip():
        raise UpstreamUnavailable("upstream answered 200 and closed without sending anything")
    if call.client_stream:
        return Outcome(200, content_type or "text/event-stream", stream=response, first=first)
    head = first.lstrip()[:5]
    is_sse = ("text/event-stream" in content_type or head == b"data:" or head[:1] == b":"
              or (forced and "json" not in content_type))
    if fold is not None and is_sse:
        call.record.folded = True
        provider = call.record.provider
        try:
            with closing(response):  # on a failure; a complete answer is finished, its connection kept
                folded = fold(upstream.read_chunks(response, first), settings.max_aggregate_bytes)
                upstream.finish(response)
            body = _serialise(folded)
        except ProxyError as exc:
            metrics.FOLDS.labels(provider, metrics.reason(exc.code or exc.status)).inc()
            raise
        metrics.child(metrics.FOLDS, provider, "ok").inc()
        return Outcome(200, "application/json", body, usage=answer_counts(folded))
    with closing(response):
        body = upstream.read_body(response, first, settings.max_aggregate_bytes)
    if check is not None and response.status == 200:  # parsed once: its shape, then its usage
        return Outcome(200, content_type or "application/json", body, usage=answer_counts(check(body)))
    return Outcome(response.status, content_type or "application/json", body)


def _not_final(provider: str, response: HTTPResponse) -> UpstreamUnavailable:
    """The 502 for a status that is no answer: a redirect names its ``Location`` to the operator only (its
    ``detail``), as a connect failure names the host: where the upstream sends it is no business of the client's."""
    status = response.status
    if status < 300:
        return UpstreamUnavailable(f"upstream {provider!r} answered HTTP {status}, which is not a final answer",
                                   code="upstream_bad_status")
    location = upstream.header_value(response.headers.get("Location"), 300) or "(none)"
    head, advice = f"upstream {provider!r} answered HTTP {status}", ("the proxy does not follow upstream "
                                                                      "redirects: point base-url at the final address")
    return UpstreamUnavailable(f"{head}, a redirect; {advice}", code="upstream_redirect",
                               detail=f"{head} redirecting to {location}; {advice}")


def passthrough_error(response: HTTPResponse, max_cooldown: float = 3600.0) -> Outcome:
    """An upstream error answer, relayed with its status; non-JSON bodies are wrapped OpenAI-style."""
    status = response.status
    try:
        body = upstream.read_body(response, b"", ERROR_BODY_LIMIT)
    except ProxyError:
        body = b""
    content_type = upstream.header_value(response.headers.get("Content-Type")) or ""
    if "json" not in content_type or not body.lstrip().startswith(b"{"):
        text = body[:300].decode("utf-8", "replace").strip()
        body = error_body(f"upstream returned HTTP {status}" + (f": {text}" if text else ""),
                          "rate_limit_error" if status == 429 else "upstream_error", status)
    headers = {}
    wait = _seconds(response.headers.get("Retry-After")) if status in BACK_OFF_STATUSES else None
    if wait is not None:
        # normalised: the client gets whole seconds within max-cooldown, never the upstream's "inf" or garbage
        # (an unreadable one is dropped; a 429 then gets its key's cooldown from execute)
        headers["Retry-After"] = str(math.ceil(min(wait, max_cooldown)))
    return Outcome(status, "application/json", body, headers=headers)


def _serialise(folded: dict) -> bytes:
    """The folded answer as JSON; what orjson cannot write (nesting over 255 levels) is the upstream's fault."""
    try:
        return orjson.dumps(folded)
    except orjson.JSONEncodeError as exc:
        raise StreamError(f"upstream sent an answer that cannot be written as JSON ({exc})",
                          code="upstream_bad_chunk") from None


def retry_after(value: str | None, cap: float = 3600.0) -> float:
    """Seconds from a ``Retry-After`` header (delta-seconds or HTTP date), within ``[0, cap]``.

    The upstream is not trusted: a value that is no number or date (``nan``,
    garbage) counts as absent (30 s), ``inf`` or a date in 2100 as ``cap``.
    """
    seconds = _seconds(value)
    return min(RATE_LIMIT_DEFAULT if seconds is None else seconds, cap)


def _seconds(value: str | None) -> float | None:
    """A ``Retry-After`` value in seconds, at least 0 (``inf`` stays), or None when absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            seconds = email.utils.parsedate_to_datetime(value).timestamp() - time.time()
        except (TypeError, ValueError, IndexError, OverflowError):
            return None
    return None if math.isnan(seconds) else max(0.0, seconds)


def client_headers(environ: dict) -> dict[str, str]:
    """The client's headers that may go upstream, from the WSGI environ, with this instance's hop added."""
    named = environ.get("HTTP_CONNECTION")  # hop-by-hop headers the client declared
    declared = {n.strip().lower() for n in named.split(",")} if named else ()
    out = {}
    known = _FORWARDED
    for key, value in environ.items():
        name = known.get(key, False)
        if name is False:
            name = _forwarded_name(key)
        if name is not None and name not in declared:
            out[name] = value
    out["streamfold-hop"] = hop.forward(environ.get(hop.ENVIRON_KEY))
    return out


_FORWARDED: dict[str, str | None] = {}  # environ key -> the header name sent upstream, or None (never sent)
FORWARDED_NAMES = 4096  # keys remembered; past that, a client sending ever new header names has them worked out


def _forwarded_name(key: str) -> str | None:
    """The upstream name of the client header in environ ``key``, or None when it is not a header (no
    ``HTTP_`` prefix) or never forwarded (``DROP_HEADERS``, credential-looking names, ``proxy-*``)."""
    name = None
    if key.startswith("HTTP_"):
        name = key[5:].replace("_", "-").lower()
        if name in DROP_HEADERS or name.endswith(CREDENTIAL_SUFFIXES) or name.startswith("proxy-"):
            name = None
    if len(_FORWARDED) < FORWARDED_NAMES:
        _FORWARDED[key] = name
    return name

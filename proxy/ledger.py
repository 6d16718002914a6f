"""The end of every request: its access log line, request metrics and operator-page record, and for a proxied
request its usage and client-key limits settled (``Record.finish`` and ``Record.answered`` land here).

Also how a value is written into a ``key=value`` log line (``logfmt``).
No Flask: the app factory makes one ``Ledger`` and hands it to every request's record.
"""
from __future__ import annotations

import logging
import re
import time

from . import activity, metrics
from .logline import AccessLog
from .models import Record
from .state.limits import Limiter
from .state.usage import Recorder, Tokens, estimate_tokens, usage_counts

log = logging.getLogger(__name__)
access_log = AccessLog("streamfold.access")  # written directly while only the proxy's own handler takes it
LOG_VALUE_LIMIT = 256  # characters per logged value; longer ones are cut and end in "..."
# A value made only of these goes out bare; anything else is quoted and escaped (logfmt).
_BARE = re.compile(r"[A-Za-z0-9_./:,+*@%?&~^!#$()\[\]{}|<>;'-]+")
BARE_VALUES = 4096  # values remembered as safe to log bare (see logfmt)
_bare_seen: dict[str, None] = {}
_ESCAPE = re.compile(r'["\\]|[^\x20-\x7e\xa0-\U0010ffff]|[\u2028\u2029\u200b-\u200f\u202a-\u202e\ud800-\udfff]')


class Ledger:
    """What a request's end does, for one app: its usage ``recorder`` and client-key ``limiter``."""

    def __init__(self, recorder: Recorder, limiter: Limiter) -> None:
        self.recorder, self.limiter = recorder, limiter

    def answered(self, record: Record, status: int, result: str, tokens: Tokens | None, body: bytes) -> None:
        """The answer's body is out or cut (``Record.answered``): token metrics, and a streamed body's finish."""
        record.status = status
        if record.result is None:
            record.result = result
        if tokens is None and body:
            tokens = usage_counts(body)
        if tokens is not None:
            record.tokens = tokens
            metrics.count_tokens(record.who, tokens[:2])
        if record.streamed:
            if record.upstream_seconds is None and record.started is not None and record.provider != "-":
                # a stream's upstream time ends with it (a complete body's was counted by the executor)
                record.upstream_seconds = seconds = time.perf_counter() - record.started
                metrics.child(metrics.UPSTREAM_SECONDS, record.provider).observe(seconds)
            self.close(record)

    def close(self, record: Record) -> None:
        """The one log line per request (no keys, no content), its metrics, and its settlement when due."""
        release, record.release = record.release, None
        if release is not None:
            release()  # the request no longer counts as in flight at its replica
        if record.over():
            self.settle(record)
        provider = record.provider
        status = "-" if record.status is None else record.status
        metrics.child(metrics.REQUESTS, record.rule, record.model_label if provider != "-" else "-", provider,
                      str(status)).inc()
        access_log.info(
            "request_id=%s route=%s model=%s provider=%s status=%s upstream_ms=%s forced_stream=%s "
            "folded=%s attempts=%s keys=%s client=%s result=%s",
            logfmt(record.request_id, remember=False), logfmt(record.route), logfmt(record.model), logfmt(provider),
            logfmt(status), "-" if record.upstream_ms is None else record.upstream_ms,
            "yes" if record.forced else "no", "yes" if record.folded else "no", record.attempts,
            logfmt(",".join(record.keys) or "-"), logfmt(record.who),
            logfmt("-" if record.result is None else record.result))
        activity.record_request(record)  # the operator page's traffic and recent requests

    def settle(self, record: Record) -> None:
        """A proxied request is over and no upstream work for it remains: record its usage, give back its
        concurrency slot, charge its tokens in place of its reservation.

        An answer that reached the client only in part (it left, the upstream
        broke off) or carried no usage is charged by estimate: the prompt from
        the body sent upstream, the completion from the bytes received.
        """
        try:
            status = 500 if record.status is None else record.status
            error = status >= 400 or (record.result or "").startswith(("upstream", "error"))
            tokens = record.tokens
            if tokens is None and record.unread_body():
                tokens = usage_counts(record.unread_body())
            if tokens is None and record.received is not None:
                response, first = record.received
                tokens = estimate_tokens(record.sent, response.tell(), first)
            provider = record.provider
            # Like the metrics: a model only for routed requests, and the routed name (a glob alias itself)
            # rather than whatever a client sent, so the table stays bounded.
            model = record.model_label if provider != "-" else "-"
            self.recorder.add(record.client.identity, model, provider, error, tokens)
            ticket, record.ticket = record.ticket, None
            if ticket is not None:
                self.limiter.finish(ticket, tokens[0] + tokens[1] if tokens is not None else 0)
        except Exception:  # noqa: BLE001 - accounting must never break an answer (streams end here)
            log.exception("usage accounting failed")


def logfmt(value: object, limit: int = LOG_VALUE_LIMIT, remember: bool = True) -> str:
    """One value for a ``key=value`` log line: bare when safe, else ``"quoted"`` with escapes, bounded.

    Newlines, ANSI escapes and other control characters, quotes and
    backslashes are escaped, so a value can neither start a line of its own
    nor add a field (``status=...``) to this one. Values found safe are
    remembered (``BARE_VALUES`` at most; ``remember=False`` for one-off values
    such as request ids): routes, models, providers, statuses and results
    recur on every line and skip the pattern.
    """
    text = value if type(value) is str else str(value)
    if text in _bare_seen and len(text) <= limit:
        return text
    if len(text) <= limit and _BARE.fullmatch(text):
        if remember and len(_bare_seen) < BARE_VALUES:
            _bare_seen[text] = None
        return text
    if len(text) > limit:
        text = text[:limit] + "..."
    return '"' + _ESCAPE.sub(_escape_one, text) + '"'


def _escape_one(match: re.Match) -> str:
    char = match.group()
    if char in '"\\':
        return "\\" + char
    return {"\n": "\\n", "\r": "\\r", "\t": "\\t"}.get(char) or char.encode("unicode_escape").decode("ascii")

"""What every proxied route shares: the config holder, client auth, body parsing, the access log.

The OpenAI routes use these directly; the bridged protocols (Anthropic,
Responses) use the same functions so auth, limits, usage and logging are the
same whichever protocol a client speaks.
"""
from __future__ import annotations

import logging
import re
import threading
import time
from dataclasses import dataclass
from functools import partial
from typing import Callable

import orjson
from flask import current_app, g, request

from .. import activity, metrics
from ..config.live import ConfigHolder, Runtime
from ..config.model import ClientKey
from ..errors import BadRequest, PayloadTooLarge, Unauthorized
from ..head import NO_KEY, WRONG_KEY, find_key
from ..routing import Target
from ..state import owners
from ..state.identity import OPEN, label
from ..state.limits import Limiter, Ticket
from ..state.usage import Recorder, estimate_tokens, usage_counts
from ..translate.anthropic.tokens import body_tokens

access_log = logging.getLogger("streamfold.access")
DEFAULT_OUTPUT_RESERVE = 1024  # tokens reserved for the answer of a request that names no output bound (tpm)
LOG_VALUE_LIMIT = 256  # characters per logged value; longer ones are cut and end in "..."
# A value made only of these goes out bare; anything else is quoted and escaped (logfmt).
_BARE = re.compile(r"[A-Za-z0-9_./:,+*@%?&~^!#$()\[\]{}|<>;'-]+")
_ESCAPE = re.compile(r'["\\]|[^\x20-\x7e\xa0-\U0010ffff]|[\u2028\u2029\u200b-\u200f\u202a-\u202e\ud800-\udfff]')


def holder() -> ConfigHolder:
    return current_app.extensions["streamfold"]


@dataclass(frozen=True, slots=True)
class Client:
    """Who sent the request (``g.client``)."""

    key: ClientKey | None  # None: an open proxy (no api-keys)
    identity: str          # the key's keyed hash (state/identity.py): what every per-tenant record is keyed by
    label: str             # for display only (logs, metrics, the page): the key's name or key-<8 digits>


OPEN_CLIENT = Client(None, OPEN, "-")


def authenticate(runtime: Runtime, *, account: bool = True) -> str:
    """The client key's label (its name or ``key-`` plus 8 digits of its identity), or ``-`` for an open proxy.

    Also keeps who the client is for ``admit`` and the stored responses
    (``g.client``) and, with ``account`` (every proxied route; not
    ``/v1/models``), sets ``g.log["client"]`` and arranges for the request's
    usage to be recorded under the key's identity once its answer has gone out.
    """
    keys: tuple[ClientKey, ...] = runtime.settings.api_keys
    if not keys:
        g.client = OPEN_CLIENT
        if account:
            _account_at_close(OPEN_CLIENT)
        return "-"
    auth = request.headers.get("Authorization", "")
    token = auth[7:].strip() if auth[:7].lower() == "bearer " else request.headers.get("x-api-key", "")
    if not token:
        raise Unauthorized(NO_KEY)
    found = find_key(keys, token)
    if found is None:
        raise Unauthorized(WRONG_KEY)
    identity = current_app.extensions["streamfold.identity"].of(found.key)
    client = g.client = Client(found, identity, label(found.name, found.named, identity))
    if account:
        _account_at_close(client)
    return client.label


def admit(model: str, targets: tuple[Target, ...], body: dict | None = None,
          answers: bool = True) -> tuple[Target, ...]:
    """Apply the client key's policy to a request for ``model``: the targets it may be served by (raises 403 /
    429); free without a policy.

    Every proxied route calls this once it has resolved the model: the
    allow-list is decided on the targets that would serve it, whatever the
    client typed. The concurrency slot it may take is given back when the
    answer has gone out or failed and the upstream work it started has ended.
    With a ``tpm``, the request's ``body`` is estimated and that many tokens are
    reserved in the window until its real usage is known (``reservation``; an
    embeddings request, ``answers=False``, reserves no output).
    """
    client: Client = g.client
    key = client.key
    if key is None or not key.limited:
        return targets
    limiter: Limiter = current_app.extensions["streamfold.limits"]
    reserve = reservation(body, targets, answers) if key.tpm and body is not None else 0
    targets, g.log["ticket"] = limiter.admit(key, client.identity, client.label, model, targets, reserve)
    return targets


def reservation(body: dict, targets: tuple[Target, ...], answers: bool = True) -> int:
    """The tokens a request may use, reserved against its key's tpm on admission: its prompt by the character
    rule plus its output bound (the body's max_tokens / max_completion_tokens / max_output_tokens, clamped
    to the model's max-output-tokens; without one, the model's max-output-tokens or DEFAULT_OUTPUT_RESERVE)."""
    limit = max((t.spec.max_output_tokens for t in targets if t.spec is not None), default=0)
    output = 0
    for name in ("max_tokens", "max_completion_tokens", "max_output_tokens"):
        value = body.get(name)
        if type(value) is int and value > 0:
            output = value
            break
    if not output:
        output = limit or DEFAULT_OUTPUT_RESERVE
    elif limit:
        output = min(output, limit)
    return body_tokens(body) + (output if answers else 0)


def _account_at_close(client: Client) -> None:
    fields = g.log
    fields["client"] = client.label
    extensions = current_app.extensions
    # Run once the request is over: write_access_log runs exactly once per
    # request (after the last byte of a stream or the client leaving, or when a
    # non-stream answer or an error response is ready), and any upstream work
    # a helper thread still does for it must have ended too (``Settlement``).
    fields["settle"] = Settlement(partial(account, extensions["streamfold.usage"], extensions["streamfold.limits"],
                                          client.identity), fields)


class Settlement:
    """A request's accounting, run once when its answer is over AND the upstream work it started has ended.

    A fold in a helper thread (``nonstream-keepalive-interval``) or the
    Anthropic stream's reader can outlive the client's connection; its
    concurrency slot stays taken until the upstream is done with it, and its
    tokens are then charged from what the work produced.
    """

    def __init__(self, run: Callable[[dict], None], fields: dict) -> None:
        self._run, self._fields = run, fields
        self._waiting = 1  # the answer itself
        self._lock = threading.Lock()

    def hold(self) -> Callable[[bytes], None]:
        """Say that upstream work starts now; call what this returns (with the answer's usage bytes, if any)
        exactly once when it has ended."""
        with self._lock:
            self._waiting += 1
        return self._work_ended

    def answer_over(self) -> None:
        self._release()

    def _work_ended(self, usage_bytes: bytes = b"") -> None:
        if usage_bytes and self._fields.get("usage") is None:
            self._fields["usage"] = usage_counts(usage_bytes)  # the client left before the answer had it
        self._release()

    def _release(self) -> None:
        with self._lock:
            self._waiting -= 1
            if self._waiting:
                return
        try:
            self._run(self._fields)
        except Exception:  # noqa: BLE001 - accounting must never break an answer (streams end here)
            logging.getLogger(__name__).exception("usage accounting failed")


def hold(fields: dict) -> Callable[[bytes], None] | None:
    """``Settlement.hold`` for a request whose usage is accounted (None for one that is not)."""
    settle: Settlement | None = fields.get("settle")
    return None if settle is None else settle.hold()


def account(recorder: Recorder, limiter: Limiter, identity: str, fields: dict) -> None:
    """A proxied request is over: give back its concurrency slot, record its usage, charge its tokens.

    An answer that reached the client only in part (it left, the upstream
    broke off) or carried no usage is charged by estimate: the prompt from
    the body sent upstream, the completion from the bytes received.
    """
    status = fields.get("status", 500)
    error = status >= 400 or str(fields.get("result", "")).startswith(("upstream", "error"))
    tokens = fields.get("usage")
    if tokens is None and "received" in fields:
        response, first = fields["received"]
        tokens = estimate_tokens(fields.get("sent"), response.tell(), first)
    provider = fields.get("provider", "-")
    # Like the metrics: a model only for routed requests, and the routed name (a glob alias itself,
    # where the executor sets model_label) rather than whatever a client sent, so the table stays bounded.
    model = fields.get("model_label", fields.get("model", "-")) if provider != "-" else "-"
    recorder.add(identity, model, provider, error, tokens)
    ticket: Ticket | None = fields.pop("ticket", None)
    if ticket is not None:
        limiter.finish(ticket, tokens[0] + tokens[1] if tokens is not None else 0)


def openai_request(runtime: Runtime) -> tuple[dict, str]:
    """The start of every OpenAI-shaped route: authenticate, read the JSON body, check and log its ``model``."""
    g.log["client"] = authenticate(runtime)
    body = read_json_body(runtime.settings.max_request_bytes)
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise BadRequest("you must provide a model parameter" if model is None
                         else "model must be a non-empty string", param="model")
    g.log["model"] = loggable(model)
    return body, model


def stream_flag(body: dict) -> bool:
    """The body's ``stream`` (absent = false); anything but a boolean is the client's mistake."""
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise BadRequest("stream must be a boolean", param="stream")
    return bool(stream)


def read_json_body(limit: int) -> dict:
    length = request.content_length
    if length is not None and length > limit:
        raise PayloadTooLarge(f"Request body is {length} bytes; the limit is {limit} bytes.")
    raw = request.stream.read(limit + 1)
    if len(raw) > limit:
        raise PayloadTooLarge(f"Request body exceeds the limit of {limit} bytes.")
    g.body_bytes = len(raw)  # what the request weighs, chunked or not (a continued conversation adds its history)
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise BadRequest("We could not parse the JSON body of your request. "
                         "(HINT: This likely means you aren't using your HTTP library correctly.)") from None
    if not isinstance(body, dict):
        raise BadRequest("The request body must be a JSON object.")
    return body


def previous_response(body: dict, store) -> tuple[str | None, bool]:
    """The request's ``previous_response_id`` (None when absent), and whether a provider serving /responses
    itself created it for this client's identity (state/owners.py); a malformed one is a 400."""
    previous = body.get("previous_response_id")
    if previous is None:
        return None, False
    if not isinstance(previous, str) or not previous:
        raise BadRequest("previous_response_id must be a non-empty string", param="previous_response_id")
    return previous, owners.owns(store, g.client.identity, previous)


def previous_not_found(previous: str) -> BadRequest:
    """What an id this client may not continue gets: exactly what an id that never existed gets."""
    return BadRequest(f"Previous response with id '{loggable(previous)}' not found.",
                      code="previous_response_not_found", param="previous_response_id")


def loggable(text: str, limit: int = 128) -> str:
    """A client-supplied string made safe for one log line: no control characters, bounded length."""
    if text.isprintable() and len(text) <= limit:
        return text
    return text[:limit].encode("unicode_escape").decode("ascii")[:limit * 4]


def logfmt(value: object, limit: int = LOG_VALUE_LIMIT) -> str:
    """One value for a ``key=value`` log line: bare when safe, else ``"quoted"`` with escapes, bounded.

    Newlines, ANSI escapes and other control characters, quotes and
    backslashes are escaped, so a value can neither start a line of its own
    nor add a field (``status=...``) to this one.
    """
    text = value if type(value) is str else str(value)
    if len(text) <= limit and _BARE.fullmatch(text):
        return text
    if len(text) > limit:
        text = text[:limit] + "..."
    return '"' + _ESCAPE.sub(_escape_one, text) + '"'


def _escape_one(match: re.Match) -> str:
    char = match.group()
    if char in '"\\':
        return "\\" + char
    return {"\n": "\\n", "\r": "\\r", "\t": "\\t"}.get(char) or char.encode("unicode_escape").decode("ascii")


def end_logger(fields: dict):
    """A callback for when the answer has gone out: token metrics, and the deferred log line of a stream."""
    def on_end(status: int, result: str, usage_bytes: bytes) -> None:
        fields["status"] = status
        fields.setdefault("result", result)
        if usage_bytes:
            tokens = fields["usage"] = usage_counts(usage_bytes)
            if tokens is not None:
                metrics.count_tokens(fields.get("client", "-"), tokens[:2])
        if fields.get("deferred"):
            started = fields.get("started")
            if started is not None and fields.get("provider"):
                metrics.child(metrics.UPSTREAM_SECONDS, fields["provider"]).observe(time.perf_counter() - started)
            write_access_log(fields)
    return on_end


def write_access_log(fields: dict) -> None:
    """The one log line per request (no keys, no content), the request counter, and usage accounting."""
    release = fields.pop("release", None)
    if release is not None:
        release()  # the request no longer counts as in flight at its replica
    settle: Settlement | None = fields.pop("settle", None)
    if settle is not None:
        settle.answer_over()
    provider = fields.get("provider", "-")
    metrics.child(metrics.REQUESTS, fields.get("rule", "unmatched"),
                  fields.get("model_label", "-") if provider != "-" else "-", provider,
                  str(fields.get("status", "-"))).inc()
    access_log.info(
        "request_id=%s route=%s model=%s provider=%s status=%s upstream_ms=%s forced_stream=%s "
        "folded=%s attempts=%s keys=%s client=%s result=%s",
        logfmt(fields.get("request_id")), logfmt(fields.get("route")), logfmt(fields.get("model", "-")),
        logfmt(provider), logfmt(fields.get("status", "-")), fields.get("upstream_ms", "-"),
        "yes" if fields.get("forced") else "no", "yes" if fields.get("folded") else "no",
        fields.get("attempts", 0), logfmt(",".join(fields.get("keys", ())) or "-"),
        logfmt(fields.get("client", "-")), logfmt(fields.get("result", "-")))
    activity.record_request(fields)  # the operator page's traffic and recent requests

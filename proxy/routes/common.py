"""What every proxied route shares: the config holder, client auth, body parsing, the access log.

The OpenAI routes use these directly; the bridged protocols (Anthropic,
Responses) use the same functions so auth, limits, usage and logging are the
same whichever protocol a client speaks.
"""
from __future__ import annotations

import orjson
from flask import current_app, g, request

from ..config.live import ConfigHolder, Runtime
from ..config.model import ClientKey
from ..errors import BadRequest, PayloadTooLarge, Unauthorized, loggable
from ..head import NO_KEY, WRONG_KEY, client_token, find_key
from ..models import Client, Record
from ..routing import Target
from ..state.identity import OPEN, label
from ..state.limits import Limiter
from ..translate.openai import requested_model
from ..translate.tokens import body_tokens

DEFAULT_OUTPUT_RESERVE = 1024  # tokens reserved for the answer of a request that names no output bound (tpm)
OPEN_CLIENT = Client(None, OPEN, "-")


def holder() -> ConfigHolder:
    return current_app.extensions["streamfold"]


def authenticate(runtime: Runtime, *, account: bool = True, query: str | None = None) -> None:
    """Check the client key (401 without a known one, unless the proxy is open) and keep who the client is on
    the request's record (``Record.client``: its label, the key's name or ``key-`` plus 8 digits of its identity).

    ``query``: the name of a query parameter that may carry the key instead (Gemini clients' ``?key=``).
    The record's client serves ``admit`` and the stored responses and, with ``account`` (every
    proxied route; not ``/v1/models``), logs it and arranges for the request's
    usage to be recorded under the key's identity once its answer has gone out.
    """
    keys: tuple[ClientKey, ...] = runtime.settings.api_keys
    if keys:
        token = client_token(request.headers, request.args if query else None, query)
        if not token:
            raise Unauthorized(NO_KEY)
        found = find_key(keys, token)
        if found is None:
            raise Unauthorized(WRONG_KEY)
        identity = current_app.extensions["streamfold.identity"].of(found.key)
        client = Client(found, identity, label(found.name, found.named, identity))
    else:
        client = OPEN_CLIENT
    record: Record = g.record
    record.client = client
    if account:
        record.account(client)


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
    record: Record = g.record
    client: Client = record.client
    key = client.key
    if key is None or not key.limited:
        return targets
    limiter: Limiter = current_app.extensions["streamfold.limits"]
    reserve = reservation(body, targets, answers) if key.tpm and body is not None else 0
    targets, record.ticket = limiter.admit(key, client.identity, client.label, model, targets, reserve)
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


def openai_request(runtime: Runtime) -> tuple[dict, str, bytes]:
    """The start of every OpenAI-shaped route: authenticate, read the JSON body, check and log its ``model``;
    the body parsed, its model, and the body as sent."""
    authenticate(runtime)
    body, raw = read_json(runtime.settings.max_request_bytes)
    model = requested_model(body)
    g.record.model = loggable(model)
    return body, model, raw


def read_capped(limit: int) -> bytes:
    """The request's body, read at most ``limit`` bytes, else 413: by its Content-Length before reading,
    and by reading one byte past the limit (a chunked body has no length to check first)."""
    length = request.content_length
    if length is not None and length > limit:
        raise PayloadTooLarge(f"Request body is {length} bytes; the limit is {limit} bytes.")
    raw = request.stream.read(limit + 1)
    if len(raw) > limit:
        raise PayloadTooLarge(f"Request body exceeds the limit of {limit} bytes.")
    return raw


def read_json_body(limit: int) -> dict:
    return read_json(limit)[0]


def read_json(limit: int) -> tuple[dict, bytes]:
    """The request's JSON object, and its bytes as sent (the fleet's prefix index keys those)."""
    raw = read_capped(limit)
    # what the request weighs, chunked or not (a continued conversation adds its history)
    g.record.body_bytes = len(raw)
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise BadRequest("We could not parse the JSON body of your request. "
                         "(HINT: This likely means you aren't using your HTTP library correctly.)") from None
    if not isinstance(body, dict):
        raise BadRequest("The request body must be a JSON object.")
    return body, raw

"""The Flask app factory: config holder, blueprints, request hooks and the one error renderer."""
from __future__ import annotations

import logging
import os
import re
from http import HTTPStatus
from typing import Any, Mapping

import orjson
from flask import Flask, Response, current_app, g, request
from werkzeug.exceptions import HTTPException, NotFound
from werkzeug.serving import WSGIRequestHandler

from . import activity, hop, instances, logline
from .balance.balancer import Balancer
from .balance.remote import RemoteLink
from .config.live import ConfigHolder
from .config.load import settings_path
from .config.model import Settings
from .errors import SLASHES, BadRequest, ErrorShapes, LoopDetected, ProxyError, loggable, request_path
from .ledger import Ledger, logfmt
from .lockout import Lockout
from .models import Record
from .routes import anthropic, demo, gemini, metrics_api, openai, page, responses
from .routes.manage import client_keys, fleet, providers, status, traffic
from .routes.manage import usage as usage_api
from .state import Store, open_store
from .state.identity import Identities
from .state.limits import Limiter
from .state.usage import Recorder
from .translate.registry import PROTOCOLS

log = logging.getLogger(__name__)


class _App(Flask):
    def make_default_options_response(self) -> Response:
        """``OPTIONS``: the methods the path allows, as JSON like every other answer (Flask's is an empty
        text/html page)."""
        allowed = sorted(super().make_default_options_response().allow)
        return Response(orjson.dumps({"allow": allowed}), 200,
                        {"Content-Type": "application/json", "Allow": ", ".join(allowed)})


def create_app(test_config: Mapping[str, Any] | None = None) -> Flask:
    """Build the WSGI app.

    ``test_config`` may set ``SETTINGS`` (a ``Settings`` object, no file),
    ``PROXY_SETTINGS`` (a path) and ``ENVIRON`` (the mapping ``${VAR}`` reads).
    """
    app = _App(__name__, static_folder=None)  # the operator page serves its own files, only when it is on
    app.url_map.merge_slashes = False  # /v1//models: a JSON 404 that names the path, not an HTML 308
    app.config.from_mapping(PROXY_SETTINGS=None, SETTINGS=None, ENVIRON=None)
    if test_config:
        app.config.update(test_config)
    # The environment is read here, once: no request reads the process environment (a reload's ${VAR} too).
    environ = app.config["ENVIRON"] if app.config["ENVIRON"] is not None else dict(os.environ)
    given: Settings | None = app.config["SETTINGS"]
    path = None if given is not None else (app.config["PROXY_SETTINGS"] or settings_path(environ))
    logline.configure()  # first: the holder may already log (Redis unreachable, ...)
    app.extensions["streamfold"] = config = ConfigHolder(path, environ, settings=given)
    # Usage, limit windows, stored responses, the identity secret and, when instances share it (Redis), what
    # they tell each other. Chosen once: changing state-path or redis-url needs a restart.
    store = app.extensions["streamfold.state"] = open_store(config.runtime.settings)
    if store.shares:
        config.share(store)  # the shared provider list and cooldowns (shared.py), before the first request
    settings = config.runtime.settings
    config.balancer = balancer(settings, store)
    identities = app.extensions["streamfold.identity"] = Identities(store)  # who each client key is
    recorder = app.extensions["streamfold.usage"] = Recorder(store, identities.settled)
    limiter = app.extensions["streamfold.limits"] = Limiter(store)
    app.extensions["streamfold.ledger"] = Ledger(recorder, limiter)  # what every request's end does
    app.extensions["streamfold.lockout"] = Lockout(store)  # failed management secrets (routes/manage/guard.py)
    _warn_about(settings)
    log.info("streamfold ready: %d providers, settings %s", len(settings.providers), path or "(in memory)")

    app.register_blueprint(openai.bp)
    app.register_blueprint(responses.bp)
    app.register_blueprint(anthropic.bp)
    app.register_blueprint(gemini.bp)
    for management in (providers, client_keys, status, traffic, fleet, usage_api):  # behind the management guard
        app.register_blueprint(management.bp)
    app.register_blueprint(metrics_api.bp)
    app.register_blueprint(demo.bp)  # answers 404 unless demo-upstream is on (checked per request)
    app.register_blueprint(page.bp)
    app.extensions["streamfold"].keys.observe = activity.record_cooldown  # the page's instance-wide key state
    activity.recorder()  # this worker's start goes on record before its first request (reads the environment)
    hop.read_secret()  # the instance secret from the environment now, not on a request
    if app.extensions["streamfold"].shared is not None:
        instances.start(app.extensions["streamfold"].shared)  # the page lists the instances sharing Redis
    app.before_request(_start_request)
    app.after_request(_finish_request)
    shapes = app.extensions["streamfold.errors"] = ErrorShapes()  # errors no view rendered, per route family
    for protocol in PROTOCOLS:  # each bridged protocol's errors where no view answers (404, 405, the worker's)
        for prefix in protocol.error_paths:
            shapes.register(prefix, protocol.error_body)
    app.register_error_handler(ProxyError, _render_proxy_error)
    app.register_error_handler(HTTPException, _render_http_error)
    app.register_error_handler(Exception, _render_unexpected)
    return app


def balancer(settings: Settings, store: Store) -> Balancer:
    """The instance's balancer: state shared by the workers in the activity directory, by instances in Redis.

    Its sizes (``fleet.max-sessions``, ``max-prefix-blocks``) are fixed here: changing them takes a restart.
    """
    folder = activity.directory()
    found = Balancer(os.path.join(folder, "fleet.shm") if folder else None, settings.fleet)
    if store.shares:
        found.remote = RemoteLink(store, instances.instance_id())
        found.remote.counts = found.table.mine
        found.remote.start()
    return found


def run_dev_server() -> None:
    """``python app.py``: werkzeug's threaded server on the settings gunicorn would use."""
    from .config.exposure import refuse_or_exit
    from .config.load import load_or_exit

    settings = load_or_exit()
    port = int(os.environ.get("PORT", "8317"))
    host = "0.0.0.0" if os.environ.get("PORT") else "127.0.0.1"
    refuse_or_exit(settings, [(host, port)])
    create_app().run(host=host, port=port, threaded=True, request_handler=DevRequestHandler)


# a client key in a query string, for the log: its name as werkzeug reads it (``k%65y`` is ``key``), which
# it logs decoded
QUERY_KEY = re.compile(r"([?&](?:k|%6b)(?:e|%65)(?:y|%79)=)[^&\s#]*", re.IGNORECASE)


class DevRequestHandler(WSGIRequestHandler):
    """werkzeug's development server, with the errors it answers itself (a malformed request line, a line
    over 64 KB, too many headers) in the route family's JSON shape instead of an HTML page."""

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        """werkzeug's request line, with a client key in the query (Gemini's ``?key=``) replaced."""
        line, path = self.requestline, getattr(self, "path", None)
        self.requestline = QUERY_KEY.sub(r"\1[redacted]", line)
        if path is not None:
            self.path = QUERY_KEY.sub(r"\1[redacted]", path)
        try:
            super().log_request(code, size)
        finally:
            self.requestline = line
            if path is not None:
                self.path = path

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        try:
            shapes: ErrorShapes = self.server.app.extensions["streamfold.errors"]
        except (AttributeError, KeyError):
            shapes = ErrorShapes()
        status = HTTPStatus(code)
        error = ProxyError(message or status.phrase, status=code,
                           type="invalid_request_error" if code < 500 else "server_error",
                           code=status.phrase.lower().replace(" ", "_"))
        body = shapes.body(request_path(getattr(self, "raw_requestline", b"")), error)
        self.log_error("code %d, message %s", code, message)
        self.request_version = "HTTP/1.0"  # a line it could not read is taken as 0.9, which gets no status line
        self.send_response(code, status.phrase)
        self.send_header("Connection", "close")
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.close_connection = True
        if self.command != "HEAD":
            self.wfile.write(body)


def _start_request() -> None:
    given = request.headers.get("X-Request-Id", "")
    # echoed and logged: accept a sane id only, else make one
    request_id = given if 0 < len(given) <= 128 and given.isprintable() else os.urandom(12).hex()
    rule = request.url_rule
    g.record = Record(request_id, request.path, rule.rule if rule else "unmatched",
                      current_app.extensions["streamfold.ledger"])
    if hop.ENVIRON_KEY in request.environ and request.blueprint != "demo" \
            and hop.looped(request.environ[hop.ENVIRON_KEY]):
        raise LoopDetected(hop.LOOP_MESSAGE)


def _finish_request(response: Response) -> Response:
    record: Record = g.record
    response.headers["X-Request-Id"] = record.request_id
    if record.status is None:
        record.status = response.status_code
    if not record.streamed and not record.quiet:
        record.finish()  # a streamed body finishes it when it ends
    return response


def _render_proxy_error(exc: ProxyError) -> Response:
    """A ProxyError no blueprint rendered (one raised before routing found a view): the route family's shape."""
    g.record.status = exc.status
    g.record.result = exc.code or exc.type
    return _error(exc, exc.headers)


def _error(error: ProxyError, headers: dict | None = None) -> Response:
    """An error no view rendered, in the shape of the request's route family (``ErrorShapes``)."""
    shapes: ErrorShapes = current_app.extensions["streamfold.errors"]
    return Response(shapes.body(request.path, error), error.status,
                    {"Content-Type": "application/json", **(headers or {})})


def _render_http_error(exc: HTTPException) -> Response:
    status = exc.code or 500
    if status == 405 and request.path.startswith("/demo") and not g.record.quiet and not demo.is_open():
        # a method no demo route lists (TRACE, PROPFIND): while the demo does not answer, /demo is unknown
        g.record.rule = "unmatched"
        status, exc = 404, NotFound()
    path = request.path
    messages = {404: f"Unknown request URL: {request.method} {path}.",
                405: f"Method {request.method} is not allowed for {path}.",
                413: "Request body too large."}
    message = messages.get(status, exc.description or exc.name)
    if status == 404 and "//" in path:  # a base URL with a trailing slash, or a mistyped path
        message += f" Did you mean {SLASHES.sub('/', path)}?"
    valid = getattr(exc, "valid_methods", None)
    headers = {"Allow": ", ".join(valid)} if status == 405 and valid else None
    return _error(ProxyError(message, status=status, type="invalid_request_error" if status < 500 else "server_error",
                             code=exc.name.lower().replace(" ", "_")), headers)


def _render_unexpected(exc: Exception) -> Response:
    if isinstance(exc, ConnectionError) or type(exc).__module__.startswith("gunicorn.http"):
        # The client's request broke while the view read it (it hung up, ran
        # out of client-timeout, or sent a malformed chunked body): its fault.
        log.info("request body not read: %s in %s", type(exc).__name__, loggable(request.path))
        return _error(BadRequest("The request body could not be read.", code="invalid_request_body"))
    # Log the type and where, never the request body (it holds message content).
    log.error("unhandled %s in %s", type(exc).__name__, logfmt(request.path), exc_info=exc)
    return _error(ProxyError("The proxy hit an internal error; see its log for details."))


def _warn_about(settings: Settings) -> None:
    if not settings.api_keys:
        log.warning("api-keys is empty: this proxy is open to anyone who can reach it")
    for provider in settings.providers:
        if not provider.verify_tls:
            log.warning("provider %s: verify-tls is false, upstream certificates are not checked",
                        provider.name)

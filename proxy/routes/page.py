"""The operator page: ``GET /manage`` (a Jinja template) and its static files, under the management guard.

The page is a shell: it holds no data and no secret. Its script signs in with
the management secret (kept in ``sessionStorage``, sent as a Bearer token on
every ``fetch``) and draws every panel from the management API
(``routes/manage/``). No cookie, so no CSRF; the risk left is
script injection, hence a strict Content-Security-Policy (only this origin's
script and style files, nothing inline), DOM text set with ``textContent``
only (``static/manage.js``), and no caching.
"""
from __future__ import annotations

from flask import Blueprint, Response, render_template

from .manage.guard import guard

bp = Blueprint("page", __name__, template_folder="../templates", static_folder="../static",
               static_url_path="/manage/static")

HEADERS = {
    "Content-Security-Policy": ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; "
                                "connect-src 'self'; object-src 'none'; frame-ancestors 'none'; "
                                "base-uri 'none'; form-action 'self'"),
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-store",
    "Referrer-Policy": "no-referrer",
}


@bp.before_request
def _guard() -> None:
    # Off, remote or locked out as the API is; the secret is checked on each API call.
    guard(require_secret=False)


@bp.after_request
def _headers(response: Response) -> Response:
    response.headers.update(HEADERS)
    return response


@bp.get("/manage")
def manage() -> Response:
    return Response(render_template("manage.html"), 200, {"Content-Type": "text/html; charset=utf-8"})

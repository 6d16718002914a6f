"""``GET /v0/management/usage``: recorded usage per day, client, model and provider, as JSON or CSV.

Behind the management guard, so the secret, the loopback rule and
the lockout apply. Query: ``from`` / ``to`` (UTC days, ``YYYY-MM-DD``, both
included, default today), ``group-by`` (``client``, ``model``, ``provider``,
``day``, or several joined by commas; default all four: one row per day,
client, model and provider), ``format`` (``json`` default, or ``csv``).

Rows are stored per client identity (``state/identity.py``) and shown by the
key's label; rows written before identities existed (keyed by the label) are
kept as they are and shown under that label (the README's usage section).
"""
from __future__ import annotations

import csv
import datetime
import io
import re

import orjson
from flask import Response, current_app, request

from ...errors import BadRequest, StateStoreDown
from ...state import COUNTERS, Store, StoreUnavailable
from ...state.identity import IDENTITY_HEX, Identities, label
from ...state.usage import Recorder
from .guard import management_blueprint

bp = management_blueprint("manage_usage", __name__)

DIMENSIONS = ("day", "client", "model", "provider")
_IDENTITY = re.compile(f"[0-9a-f]{{{IDENTITY_HEX}}}")
MAX_DAYS = 400


@bp.get("/usage")
def usage() -> Response:
    args = request.args
    today = datetime.datetime.now(datetime.timezone.utc).date()
    first = _day(args.get("from"), "from", today)
    last = _day(args.get("to"), "to", today)
    if first > last:
        raise BadRequest("'from' must not be after 'to'", param="from")
    if (last - first).days >= MAX_DAYS:
        raise BadRequest(f"at most {MAX_DAYS} days per query", param="from")
    group_by = _group_by(args.get("group-by"))
    kind = args.get("format", "json")
    if kind not in ("json", "csv"):
        raise BadRequest("format must be json or csv", param="format")

    recorder: Recorder = current_app.extensions["streamfold.usage"]
    store: Store = current_app.extensions["streamfold.state"]
    recorder.flush()  # this worker's last second too; other workers flush within ~1 s
    try:
        rows = store.usage(first.isoformat(), last.isoformat())
    except StoreUnavailable:
        raise StateStoreDown("the state store is unavailable; usage is kept in memory and will be written "
                        "when it is back") from None
    grouped = _group(_shown(rows), group_by)
    if kind == "csv":
        return _csv(grouped, group_by, first, last)
    total = dict.fromkeys(COUNTERS, 0)
    for row in grouped:
        for counter in COUNTERS:
            total[counter] += row[counter]
    body = {"object": "usage", "from": first.isoformat(), "to": last.isoformat(), "group_by": list(group_by),
            "store": store.kind, "data": grouped, "total": total}
    return Response(orjson.dumps(body), 200, {"Content-Type": "application/json"})


def _day(value: str | None, name: str, default: datetime.date) -> datetime.date:
    if value is None or value == "":
        return default
    try:
        if len(value) != 10:
            raise ValueError
        return datetime.date.fromisoformat(value)
    except ValueError:
        raise BadRequest(f"{name} must be a date as YYYY-MM-DD", param=name) from None


def _group_by(value: str | None) -> tuple[str, ...]:
    if not value:
        return DIMENSIONS
    names = tuple(part.strip() for part in value.split(","))
    unknown = [name for name in names if name not in DIMENSIONS]
    if unknown or len(set(names)) != len(names):
        raise BadRequest("group-by must be client, model, provider or day (or several, comma-separated)",
                         param="group-by")
    return names


def _shown(rows: list[tuple]) -> list[tuple]:
    """Rows with each client identity replaced by how it is shown: the configured key's label, ``key-`` and
    8 digits for a key no longer configured; rows written before identities keep their label as it was."""
    identities: Identities = current_app.extensions["streamfold.identity"]
    names = {}
    for key in current_app.extensions["streamfold"].current().settings.api_keys:
        identity = identities.of(key.key)
        names[identity] = label(key.name, key.named, identity)
    return [(row[0], names.get(row[1]) or (label("", False, row[1]) if _IDENTITY.fullmatch(row[1]) else row[1]),
             *row[2:]) for row in rows]


def _group(rows: list[tuple], group_by: tuple[str, ...]) -> list[dict]:
    positions = [DIMENSIONS.index(name) for name in group_by]
    sums: dict[tuple, list[int]] = {}
    for row in rows:
        key = tuple(row[i] for i in positions)
        counts = sums.setdefault(key, [0] * len(COUNTERS))
        for i, value in enumerate(row[len(DIMENSIONS):]):
            counts[i] += value
    return [{**dict(zip(group_by, key, strict=True)), **dict(zip(COUNTERS, counts, strict=True))}
            for key, counts in sorted(sums.items())]


def _csv(grouped: list[dict], group_by: tuple[str, ...], first: datetime.date, last: datetime.date) -> Response:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerow([*group_by, *COUNTERS])
    for row in grouped:
        writer.writerow([*(_cell(row[name]) for name in group_by), *(row[c] for c in COUNTERS)])
    filename = f"streamfold-usage-{first.isoformat()}-{last.isoformat()}.csv"
    return Response(out.getvalue(), 200, {"Content-Type": "text/csv; charset=utf-8",
                                          "Content-Disposition": f'attachment; filename="{filename}"'})


def _cell(text: str) -> str:
    # Model names can come from clients (glob aliases): a spreadsheet must not run one as a formula.
    if text[:1] in ("=", "+", "@", "\t", "\r") or (text[:1] == "-" and len(text) > 1):
        return "'" + text
    return text

"""The instance's last good settings: what every worker gunicorn boots starts from.

gunicorn boots workers at start, again whenever one dies (OOM, SIGKILL, a
crash) and on ``kill -HUP``; each imports the app and so loads the settings.
Reading settings.yaml there directly would skip every guard of the hot
reload: an invalid file halts gunicorn ("Worker failed to boot"), a file
without ``api-keys`` opens the proxy, a file being rewritten (truncate, then
write) may be read cut short.

So there is one guarded load. The master reads the file at start until it
reads the same twice, validates it (an invalid file stops gunicorn there: there
is no last good config yet) and keeps a copy of the document it took in the
instance's run directory (``STREAMFOLD_LAST_GOOD``, set by ``gunicorn.conf.py``;
mode 0600, it holds what the file holds). Every later version a worker takes
(a hot reload, a management write) replaces the copy, newest file first. A
worker that boots builds its config from the copy, then looks at the file
through the hot reload's own check (``ConfigHolder.check_file``): a file that
is still changing, does not validate, would turn client auth off or would
drop every provider is refused with an ERROR line, and the worker serves the
last good config (or, if the copy is gone, the config the master started
with, which workers inherit through fork). Whatever the copy says, a worker
uses the state store the instance started with (``state-path``, ``redis-url``,
``redis-namespace``): changing it needs a restart. Without ``STREAMFOLD_LAST_GOOD``
(``python app.py``, tests) there is one process and no respawn: the file is
read as before.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import sys
import time
from dataclasses import replace
from typing import Any, Mapping

import yaml

from .file import locked, to_yaml, write_atomically
from .load import build_settings, parse_document, print_problems, settings_path
from .model import STORE_FIELDS, Settings, SettingsError

log = logging.getLogger(__name__)
ENV = "STREAMFOLD_LAST_GOOD"
STABLE_DELAY = 0.2    # the file must read the same again after this long (as the hot reload wants)
STABLE_WAIT = 10.0    # a fresh start gives up on a file that keeps changing for this long
_HEADER = b"# streamfold last good settings, taken from a file with mtime_ns size sha256: "
_STARTED: tuple[Any, tuple] | None = None  # set in the master by ``keep``; its workers inherit it through fork
_STARTED_STORE: dict[str, str] | None = None  # the store the master started with (``STORE_FIELDS``), inherited too


def take(environ: Any = os.environ) -> tuple[Settings, Any, tuple]:
    """Fresh start (the gunicorn master): read the file until stable and validate it, or exit 1 naming why.

    Returns the settings, the document and the file's fingerprint, for ``keep``.
    """
    path = settings_path(environ)
    try:
        raw, fingerprint = read_stable(path)
        if not raw.strip():  # as the reload says: an empty file is a write in progress or a mistake
            raise SettingsError([f"{path}: the file is empty"])
        document = parse_document(raw, path)
        return build_settings(document, environ), document, fingerprint
    except SettingsError as exc:
        print_problems(exc.problems)
        sys.exit(1)


def keep(copy_path: str, settings: Settings, document: Any, fingerprint: tuple, environ: Any = os.environ) -> None:
    """Make ``copy_path`` the instance's last good copy, starting from what ``take`` read."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(copy_path)  # a run directory the operator gave may hold an earlier run's copy
    save(copy_path, document, fingerprint)
    environ[ENV] = copy_path
    global _STARTED, _STARTED_STORE
    _STARTED = (document, fingerprint)
    _STARTED_STORE = {name: getattr(settings, name) for name, _ in STORE_FIELDS}


def read_stable(path: str) -> tuple[bytes, tuple]:
    """The file's bytes and fingerprint (mtime_ns, size, sha256), once two reads STABLE_DELAY apart agree."""
    deadline = time.monotonic() + STABLE_WAIT
    seen = _read(path)
    while True:
        time.sleep(STABLE_DELAY)
        again = _read(path)
        if again == seen:
            return seen
        if time.monotonic() > deadline:
            raise SettingsError([f"{path}: the file kept changing for {STABLE_WAIT:.0f} s; "
                                 "start again once it is written"])
        seen = again


def _read(path: str) -> tuple[bytes, tuple]:
    try:
        with open(path, "rb") as fh:
            raw = fh.read()
            stat = os.fstat(fh.fileno())
    except OSError as exc:
        raise SettingsError([f"{path}: cannot read settings file ({exc.strerror})"]) from None
    return raw, (stat.st_mtime_ns, stat.st_size, hashlib.sha256(raw).digest())


def load(environ: Mapping[str, str]) -> tuple[Any, tuple] | None:
    """The copy's document and the fingerprint of the file it came from, or None (no copy, or unreadable)."""
    copy_path = environ.get(ENV)
    if not copy_path:
        return None
    try:
        with open(copy_path, "rb") as fh:
            header, _, body = fh.read().partition(b"\n")
        mtime, size, digest = header[len(_HEADER):].split()
        return yaml.safe_load(body), (int(mtime), int(size), bytes.fromhex(digest.decode()))
    except (OSError, ValueError, yaml.YAMLError) as exc:
        # Deleted (a /tmp cleaner), say: the config the master started with, inherited through fork, stands in.
        log.error("the last good settings copy %s cannot be read (%s); starting from the config the instance "
                  "started with", copy_path, type(exc).__name__)
        return _STARTED


def build(document: Any, environ: Mapping[str, str]) -> Settings:
    """The settings of the copy (or of the start's document) ``load`` gave, for a worker that boots.

    It validated when it was taken, but a file it names may have gone since
    (a provider's ``ca-bundle`` deleted): refusing it would fail the boot,
    and gunicorn halts on a worker that fails to boot. So it is built without
    the file checks, with an ERROR line per problem: the worker serves the
    copy's policy (client keys, limits) as the workers already running do,
    and that provider's HTTPS requests fail with a 502 naming the missing
    file (``upstream.py``). Any other problem still fails the boot (there is
    no config left that is known to be safe).
    """
    try:
        settings = build_settings(document, environ)
    except SettingsError as exc:
        settings = build_settings(document, environ, check_files=False)
        for problem in exc.problems:
            log.error("the last good settings no longer validate: %s; booting from them anyway (the files they "
                      "name are not checked again); fix it in the settings file", problem)
    return on_started_store(settings)


def on_started_store(settings: Settings) -> Settings:
    """``settings`` with the state store the instance started with: a reload that changed it (it needs a restart)
    took the copy along, and a worker booted from that copy would keep limits, usage and the provider list
    apart from its siblings."""
    if _STARTED_STORE is None:
        return settings
    changed = [label for name, label in STORE_FIELDS if getattr(settings, name) != _STARTED_STORE[name]]
    if changed:
        log.warning("%s changed since the instance started: NEEDS A RESTART; this worker uses the instance's "
                    "running store, as the others do", ", ".join(changed))
    return replace(settings, **_STARTED_STORE)


def save_taken(environ: Mapping[str, str], document: Any, fingerprint: tuple) -> None:
    """A process took this version of the file: it becomes the last good copy (when there is one to keep)."""
    copy_path = environ.get(ENV)
    if copy_path:
        save(copy_path, document, fingerprint)


def save(copy_path: str, document: Any, fingerprint: tuple) -> None:
    """Replace the copy, unless it already holds a newer version of the file (two workers racing)."""
    mtime, size, digest = fingerprint
    try:
        with locked(copy_path):
            held = _held_mtime(copy_path)
            if held is not None and held > mtime:
                return
            header = _HEADER + b"%d %d %s\n" % (mtime, size, digest.hex().encode())
            write_atomically(copy_path, header + to_yaml(document))
    except OSError as exc:
        log.error("the last good settings copy %s cannot be written (%s); a worker booted now starts from an "
                  "older one", copy_path, exc.strerror or type(exc).__name__)


def _held_mtime(copy_path: str) -> int | None:
    try:
        with open(copy_path, "rb") as fh:
            return int(fh.readline()[len(_HEADER):].split()[0])
    except (OSError, ValueError, IndexError):
        return None

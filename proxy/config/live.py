"""The running configuration of one worker, and how it follows the settings file.

``Runtime`` is one immutable snapshot (settings, router, the unresolved YAML
document for management writes). ``ConfigHolder`` hands the current snapshot
to each request without a lock or a look at the file. Off the request path, a
background thread (``CHECKS``, one per process) checks the file's mtime, size
and hash every ``POLL_INTERVAL``; a changed file that validates is swapped in
(requests already running keep the snapshot they started with), one that
doesn't is logged and ignored. The file is read, parsed and validated with no
lock held that a request waits on; only the swap is made under the lock.
Each gunicorn worker does this on its own, so a write by one worker or a hand
edit reaches all of them within about a second, without a restart, whether or
not they have traffic. A management request checks the file itself first
(``check_file``), so it never shows or edits an older config.

A reload never opens or empties the proxy. ``cp``, ``>`` and some editors
truncate the file and then write it, so a check can see it empty or cut. A
changed file is therefore taken only when it reads the same twice,
``STABLE_DELAY`` apart (same mtime, size and bytes), and is not empty; and a
reload that would turn client auth off (api-keys non-empty -> empty) or remove
every provider is refused with an ERROR line: that takes a restart, where the
operator sees the startup warning. An unreadable file is logged once.

A worker gunicorn boots (at start, after one died, on HUP) runs the same
check: it starts from the instance's last good file (``last_good.py``), then
takes the file on disk only if it passes the guards above.
"""
from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
import weakref
from dataclasses import dataclass, field, replace
from typing import Any, Mapping

import yaml

from ..keys import KeyPool
from ..routing import Router
from ..shared import Shared
from ..state import Store
from ..state.limits import unmatched_patterns
from ..state.ticker import Ticker
from ..upstream import Sessions
from . import last_good
from .exposure import EXPOSED_ENV, published_key_refusal
from .file import redact_url
from .load import build_settings
from .model import STORE_FIELDS, Settings, SettingsError

log = logging.getLogger(__name__)
POLL_INTERVAL = 0.25  # seconds between checks of the file (a stat; the file is read only when it changed)
CHECK_INTERVAL = 1.0  # a change is taken within this long: POLL_INTERVAL + STABLE_DELAY + the parse, with room
STABLE_DELAY = 0.2  # a changed file must read the same again after this long before it is taken
LOG_DETAIL_LIMIT = 2000  # characters of "what changed" in one log line; the rest is counted


@dataclass(frozen=True, slots=True)
class Runtime:
    settings: Settings
    router: Router
    document: Any  # the effective document as written (${VAR} unresolved): what management edits
    sources: dict[str, str] = field(default_factory=dict)  # provider name -> "file" or "runtime"


class ConfigHolder:
    """The worker's current ``Runtime``, plus state that outlives reloads (sessions, key pool)."""

    def __init__(self, path: str | None, environ: Mapping[str, str],
                 settings: Settings | None = None, document: Any = None) -> None:
        self.path = path
        self.environ = environ
        self.sessions = Sessions()
        # Pooled upstream sockets are closed when the holder goes (tests build many apps).
        weakref.finalize(self, self.sessions.close)
        self.keys = KeyPool()
        self.balancer = None  # the instance's balance.Balancer, set by the app factory
        self.shared: Shared | None = None
        self.file_document = document
        self.runtime_providers: list | None = None  # the shared runtime list (Redis), when there is one
        # No request ever waits while the file is read, parsed or validated: requests take no lock (they read
        # ``runtime``), the file is checked by the background thread or a management request, and ``_lock``
        # is held only to swap a judged config in.
        self._lock = threading.Lock()
        self._checking = threading.Lock()  # one check of the file at a time (no proxied request takes it)
        self._applying = threading.Lock()  # shared provider lists are applied one at a time, in order
        self._fingerprint: tuple | None = None
        self.reloaded_at: float | None = None  # wall clock of the last config installed after start
        self.reload_error: tuple[float, str] | None = None  # (when, problems) of the last refused file
        self._unreadable: str | None = None  # the error last logged for an unreadable file
        good = None
        if settings is None:
            # Under gunicorn a booting worker starts from the instance's last good file (last_good.py),
            # then looks at the file itself through the reload's guards, below.
            good = last_good.load(environ)
            if good is not None:
                self.file_document, self._fingerprint = good
                settings = last_good.build(self.file_document, environ)
            else:
                raw = self._read()
                self.file_document = yaml.safe_load(raw) if raw is not None else None
                settings = build_settings(self.file_document, environ)
        self.runtime = Runtime(settings, _router(settings), self.file_document, _sources(self.file_document, None))
        if good is not None:
            self.check_file()
        self.keys.max_cooldown = settings.max_cooldown
        if path is not None:
            CHECKS.add(self)

    def share(self, store: Store) -> None:
        """Follow the provider list and cooldowns other instances share through ``store`` (``shared.py``)."""
        self.shared = Shared(store, self.apply_runtime_providers, self.keys.apply_remote)
        self.keys.publish = self.shared.publish_cooldown
        self.shared.start()

    def current(self) -> Runtime:
        """The running config (the file is followed off the request path: ``CHECKS``)."""
        return self.runtime

    def check_file(self) -> bool:
        """Reload if the file changed and validates; True when a new config was installed.

        Called by the background thread, by a management request (which must
        not show or edit an older config than the file's) and when a worker
        boots. Checks are made one at a time; proxied requests never wait for
        one (they read ``runtime``), and only the swap is made under the lock.
        """
        with self._checking:
            return self._check_file()

    def _check_file(self) -> bool:
        while True:
            judged = self._fingerprint  # what the running config was judged from; a swap requires it unchanged
            seen = self._stat_and_read()
            if seen is None:
                return False
            fingerprint, raw = seen
            if self._fingerprint is not None and self._fingerprint[2] == fingerprint[2]:
                with self._lock:
                    if self._fingerprint == judged:
                        self._fingerprint = fingerprint  # rewritten with the same bytes: nothing to do
                return False
            # Maybe half-written (truncate, then write): take it only if it reads the same a moment later.
            time.sleep(STABLE_DELAY)
            again = self._stat_and_read()
            if again is None or again[0] != fingerprint:
                return False  # still changing; judged at a later check, once it has settled
            taken = self._take(judged, fingerprint, raw)
            if taken is not None:
                return taken
            # A management write in this worker took a newer file meanwhile: look at the file again.

    def _take(self, judged: tuple | None, fingerprint: tuple, raw: bytes) -> bool | None:
        """Judge the file's bytes with no lock held, then swap them in under it; None if the file was taken
        meanwhile (by a management write: the running config is no longer the one judged against)."""
        while True:
            providers = self.runtime_providers
            document, settings, problem = self._judge(raw, providers)  # outside the lock: requests go on
            with self._lock:
                if self._fingerprint != judged:
                    return None
                if self.runtime_providers is not providers:
                    continue  # the shared provider list changed meanwhile: judge again over the new one
                self._fingerprint = fingerprint  # judged now, whatever the verdict: each version is logged once
                if problem is None:  # against the config running now (cheap, so under the lock)
                    problem = reload_refusal(self.runtime.settings, settings)
                    exposed = published_key_refusal(settings, self.environ.get(EXPOSED_ENV, ""))
                    problem = problem or (exposed and f"cannot be taken: {exposed} (RELOAD REFUSED)")
                if problem is not None:
                    log.error("settings file %s changed but %s; keeping the running config",
                              self.path, bounded(problem))
                    self.reload_error = (time.time(), bounded(problem))
                    return False
                self.file_document = document
                self._install(settings, layer(document, providers), fingerprint)
                return True

    def _judge(self, raw: bytes, providers: list | None) -> tuple[Any, Settings | None, str | None]:
        """The file's bytes parsed and validated (over the shared providers): document, settings, problem."""
        try:
            if not raw.strip():
                raise SettingsError(["(top level): the file is empty"])
            document = yaml.safe_load(raw)
            return document, build_settings(layer(document, providers), self.environ), None
        except yaml.YAMLError as exc:
            return None, None, "is not valid YAML: " + yaml_problem(exc)
        except SettingsError as exc:
            return None, None, "does not validate: " + "; ".join(exc.problems)

    def _stat_and_read(self) -> tuple[tuple, bytes] | None:
        """The file's fingerprint (mtime, size, sha256) and bytes, or None when it cannot be read.

        When only the stamp is needed to see that nothing changed, the file is
        not read at all (the common case, every ``POLL_INTERVAL``).
        """
        try:
            stat = os.stat(self.path)
            stamp = (stat.st_mtime_ns, stat.st_size)
            if self._fingerprint is not None and self._fingerprint[:2] == stamp:
                self._readable()
                return None
            with open(self.path, "rb") as fh:
                raw = fh.read()
        except OSError as exc:
            error = f"{type(exc).__name__}: {exc.strerror or exc}"
            if error != self._unreadable:
                self._unreadable = error
                log.error("settings file %s cannot be read (%s); keeping the running config", self.path, error)
            return None
        self._readable()
        return (*stamp, hashlib.sha256(raw).digest()), raw

    def _readable(self) -> None:
        if self._unreadable is not None:
            self._unreadable = None
            log.warning("settings file %s is readable again", self.path)

    def apply_runtime_providers(self, version: int, providers: list | None) -> None:
        """A new shared provider list (or none): layer it over the file and install it if it validates."""
        with self._applying:
            while True:
                file_document = self.file_document
                document = layer(file_document, providers)
                try:
                    settings = build_settings(document, self.environ)  # outside the lock: requests go on
                except SettingsError as exc:
                    log.error("shared providers version %d does not validate here; keeping the running config: %s",
                              version, bounded("; ".join(exc.problems)))
                    return
                with self._lock:
                    if self.file_document is not file_document:
                        continue  # the file was taken meanwhile: validate again over it
                    self.runtime_providers = providers
                    self._install(settings, document)
                    return

    def install(self, settings: Settings, document: Any, fingerprint: tuple | None = None) -> None:
        """Swap in a validated config and log what changed.

        ``fingerprint`` is given when the config comes from the file (a
        check, or a writer that just wrote it, so the next check does not load
        the same content again): that version becomes the last good copy.
        """
        with self._lock:
            if fingerprint is not None and fingerprint == self._fingerprint:
                return  # a check took this very file meanwhile
            self._install(settings, document, fingerprint)

    def _install(self, settings: Settings, document: Any, fingerprint: tuple | None = None) -> None:
        old = self.runtime.settings
        changes = describe_changes(old, settings)
        # The store and the shared state were opened at start: the running ones stay in force (and /config
        # shows them) until a restart; the log line says the change waits for one.
        settings = replace(settings, **{name: getattr(old, name) for name, _ in STORE_FIELDS})
        self.runtime = Runtime(settings, _router(settings), document,
                               _sources(self.file_document, self.runtime_providers))
        self.keys.max_cooldown = settings.max_cooldown
        if fingerprint is not None:
            self._fingerprint = fingerprint
            last_good.save_taken(self.environ, self.file_document, fingerprint)
        self.reloaded_at, self.reload_error = time.time(), None
        log.info("settings reloaded: %s", bounded(changes))

    def _read(self) -> bytes | None:
        try:
            with open(self.path, "rb") as fh:
                raw = fh.read()
        except OSError:
            return None
        if self._fingerprint is None:
            stat = os.stat(self.path)
            self._fingerprint = (stat.st_mtime_ns, stat.st_size, hashlib.sha256(raw).digest())
        return raw


def reload_refusal(old: Settings, new: Settings) -> str | None:
    """Why a valid new config must not be taken by a reload (a restart may take it), or None."""
    if old.api_keys and not new.api_keys:
        return ("would turn client authentication off (api-keys is now empty): RELOAD REFUSED; "
                "restart the proxy if an open proxy is really meant")
    if old.providers and not new.providers:
        return "would remove every provider: RELOAD REFUSED; restart the proxy if that is really meant"
    return None


def yaml_problem(exc: yaml.YAMLError) -> str:
    """What is wrong and where, without PyYAML's snippet of the file (it could show a key)."""
    mark = getattr(exc, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"{getattr(exc, 'problem', None) or type(exc).__name__}{where}"


def bounded(text: str, limit: int = LOG_DETAIL_LIMIT) -> str:
    """A log detail cut to ``limit`` characters, saying how much was left out."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text) - limit} more characters)"


def layer(file_document: Any, providers: list | None) -> Any:
    """The file's document with its provider list replaced by the shared runtime list, if any."""
    if providers is None:
        return file_document
    document = dict(file_document) if isinstance(file_document, dict) else {}
    document["openai-compatibility"] = providers
    return document


def _sources(file_document: Any, providers: list | None) -> dict[str, str]:
    """Where each provider comes from: "file", or "runtime" when the shared list changed or added it."""
    in_file = {}
    if isinstance(file_document, dict) and isinstance(file_document.get("openai-compatibility"), list):
        in_file = {p.get("name"): p for p in file_document["openai-compatibility"] if isinstance(p, dict)}
    if providers is None:
        return {name: "file" for name in in_file}
    return {p.get("name"): "file" if in_file.get(p.get("name")) == p else "runtime"
            for p in providers if isinstance(p, dict)}


def describe_changes(old: Settings, new: Settings) -> str:
    """One line: providers added/removed and which fields of the others changed (never key values)."""
    before = {p.name: p for p in old.providers}
    after = {p.name: p for p in new.providers}
    parts = [f"+provider {name}" for name in after if name not in before]
    parts += [f"-provider {name}" for name in before if name not in after]
    for name in after:
        if name in before and before[name] != after[name]:
            parts.append(f"{name}: {', '.join(_provider_diff(before[name], after[name]))}")
    if len(old.api_keys) != len(new.api_keys) or old.api_keys != new.api_keys:
        parts.append(f"api-keys: {len(old.api_keys)} -> {len(new.api_keys)}")
    for attribute, label in (("request_retry", "request-retry"), ("timeouts", "timeouts"),
                         ("max_request_bytes", "max-request-bytes"),
                         ("max_aggregate_bytes", "max-aggregate-bytes"),
                         ("nonstream_keepalive_interval", "nonstream-keepalive-interval"),
                         ("max_inflight_bytes", "max-inflight-bytes"),
                         ("responses_store_max_bytes", "responses-store-max-bytes"),
                         ("responses_store_max_count", "responses-store-max-count")):
        if getattr(old, attribute) != getattr(new, attribute):
            parts.append(f"{label} changed")
    if old.management != new.management:
        parts.append("remote-management changed")
    for attribute, label in STORE_FIELDS:
        if getattr(old, attribute) != getattr(new, attribute):
            parts.append(f"{label} changed: NEEDS A RESTART (the running one stays in use until then)")
    return "; ".join(parts) or "no effective change"


def _provider_diff(old, new) -> list[str]:
    out = []
    for attribute in ("base_url", "disabled", "prefix", "request_retry", "verify_tls", "force_upstream_stream",
                      "balance"):
        a, b = getattr(old, attribute), getattr(new, attribute)
        if a != b:
            label = attribute.replace("_", "-")
            # booleans as YAML writes them: "false -> true"
            if attribute == "base_url":  # credentials in a URL never reach the log
                a, b = redact_url(a), redact_url(b)
            out.append(f"{label}: {str(a).lower()} -> {str(b).lower()}" if isinstance(a, bool)
                       else f"{label}: {a} -> {b}")
    if old.models != new.models:
        added = len(set(new.models) - set(old.models))
        removed = len(set(old.models) - set(new.models))
        out.append(f"models: +{added} -{removed}")
    if old.api_key_entries != new.api_key_entries:
        out.append(f"api-key-entries: {len(old.api_key_entries)} -> {len(new.api_key_entries)}"
                   + (" (changed)" if len(old.api_key_entries) == len(new.api_key_entries) else ""))
    if old.base_urls != new.base_urls:
        out.append(f"base-urls: {len(old.replicas)} -> {len(new.replicas)} replicas")
    if old.replicas_off != new.replicas_off:
        out.append(f"disabled replicas: {_numbers(old)} -> {_numbers(new)}")
    if old.headers != new.headers:
        out.append("headers changed")
    if old.ca_bundle != new.ca_bundle:
        out.append("ca-bundle changed")
    return out or ["changed"]


def _router(settings: Settings) -> Router:
    """The router for ``settings``; an allow-list pattern that admits none of its models is logged."""
    router = Router(settings)
    for line in unmatched_patterns(settings.api_keys, list(router.targets())):
        log.warning("settings: %s", line)
    return router


def _numbers(provider) -> str:
    return ", ".join(f"#{n}" for n in sorted(provider.replicas_off)) or "none"


CHECKS = Ticker("streamfold-config", POLL_INTERVAL, ConfigHolder.check_file)

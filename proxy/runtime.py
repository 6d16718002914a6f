"""The running configuration of one worker, and how it follows the settings file.

``Runtime`` is one immutable snapshot (settings, router, the unresolved YAML
document for management writes). ``ConfigHolder`` hands the current snapshot
to each request, and at most once a second checks the file's mtime, size and
hash; a changed file that validates is swapped in (requests already running
keep the snapshot they started with), one that doesn't is logged and ignored.
Each gunicorn worker does this on its own, so a write by one worker or a hand
edit reaches all of them within about a second, without a restart.
"""
from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from dataclasses import dataclass
from typing import Any, Mapping

import yaml

from .keys import KeyPool
from .routing import Router
from .settings import Settings, SettingsError, build_settings
from .upstream import Sessions

log = logging.getLogger(__name__)
CHECK_INTERVAL = 1.0


@dataclass(frozen=True, slots=True)
class Runtime:
    settings: Settings
    router: Router
    document: Any  # the file as written, ${VAR} unresolved: what management writes back


class ConfigHolder:
    """The worker's current ``Runtime``, plus state that outlives reloads (sessions, key pool)."""

    def __init__(self, path: str | None, environ: Mapping[str, str],
                 settings: Settings | None = None, document: Any = None) -> None:
        self.path = path
        self.environ = environ
        self.sessions = Sessions()
        self.keys = KeyPool()
        self._lock = threading.Lock()
        self._next_check = time.monotonic() + CHECK_INTERVAL
        self._fingerprint: tuple | None = None
        if settings is None:
            raw = self._read()
            document = yaml.safe_load(raw) if raw is not None else None
            settings = build_settings(document, environ)
        self.runtime = Runtime(settings, Router(settings), document)

    def current(self) -> Runtime:
        if self.path is not None and time.monotonic() >= self._next_check:
            self.check_file(force=False)
        return self.runtime

    def check_file(self, force: bool = True) -> bool:
        """Reload if the file changed and validates; True when a new config was installed.

        Threads that arrive while another one is reloading wait for it, so no
        request that starts after the check is served by the old config.
        """
        with self._lock:
            if not force and time.monotonic() < self._next_check:
                return False  # another thread checked while we waited
            return self._check_file()

    def _check_file(self) -> bool:
        self._next_check = time.monotonic() + CHECK_INTERVAL
        try:
            stat = os.stat(self.path)
        except OSError:
            return False
        stamp = (stat.st_mtime_ns, stat.st_size)
        if self._fingerprint is not None and self._fingerprint[:2] == stamp:
            return False
        raw = self._read()
        if raw is None:
            return False
        digest = hashlib.sha256(raw).digest()
        unchanged = self._fingerprint is not None and self._fingerprint[2] == digest
        self._fingerprint = (*stamp, digest)
        if unchanged:
            return False
        try:
            document = yaml.safe_load(raw)
            settings = build_settings(document, self.environ)
        except yaml.YAMLError as exc:
            log.error("settings file %s changed but is not valid YAML; keeping the running config: %s",
                      self.path, str(exc).replace("\n", " "))
            return False
        except SettingsError as exc:
            log.error("settings file %s changed but does not validate; keeping the running config: %s",
                      self.path, "; ".join(exc.problems))
            return False
        self.install(settings, document)
        return True

    def install(self, settings: Settings, document: Any, fingerprint: tuple | None = None) -> None:
        """Swap in a validated config and log what changed.

        ``fingerprint`` is given by a writer that just wrote the file, so the
        next file check does not load the same content again.
        """
        old = self.runtime.settings
        self.runtime = Runtime(settings, Router(settings), document)
        if fingerprint is not None:
            self._fingerprint = fingerprint
        log.info("settings reloaded: %s", describe_changes(old, settings))

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
    for field, label in (("request_retry", "request-retry"), ("timeouts", "timeouts"),
                         ("max_request_bytes", "max-request-bytes"),
                         ("max_aggregate_bytes", "max-aggregate-bytes"),
                         ("nonstream_keepalive_interval", "nonstream-keepalive-interval")):
        if getattr(old, field) != getattr(new, field):
            parts.append(f"{label} changed")
    if old.management != new.management:
        parts.append("remote-management changed")
    return "; ".join(parts) or "no effective change"


def _provider_diff(old, new) -> list[str]:
    out = []
    for field in ("base_url", "disabled", "prefix", "request_retry", "verify_tls", "force_upstream_stream"):
        a, b = getattr(old, field), getattr(new, field)
        if a != b:
            out.append(f"{field.replace('_', '-')}: {a} -> {b}".lower() if isinstance(a, bool)
                       else f"{field.replace('_', '-')}: {a} -> {b}")
    if old.models != new.models:
        added = len(set(new.models) - set(old.models))
        removed = len(set(old.models) - set(new.models))
        out.append(f"models: +{added} -{removed}")
    if old.api_key_entries != new.api_key_entries:
        out.append(f"api-key-entries: {len(old.api_key_entries)} -> {len(new.api_key_entries)}"
                   + (" (changed)" if len(old.api_key_entries) == len(new.api_key_entries) else ""))
    if old.headers != new.headers:
        out.append("headers changed")
    if old.ca_bundle != new.ca_bundle:
        out.append("ca-bundle changed")
    return out or ["changed"]

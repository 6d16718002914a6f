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
import weakref
from dataclasses import dataclass, field
from typing import Any, Mapping

import yaml

from .keys import KeyPool
from .routing import Router
from .settings import Settings, SettingsError, build_settings
from .shared import Shared
from .upstream import Sessions

log = logging.getLogger(__name__)
CHECK_INTERVAL = 1.0


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
        self.shared: Shared | None = None
        self.file_document = document
        self.runtime_providers: list | None = None  # the shared runtime list (Redis), when there is one
        self._lock = threading.Lock()
        self._next_check = time.monotonic() + CHECK_INTERVAL
        self._fingerprint: tuple | None = None
        self.reloaded_at: float | None = None  # wall clock of the last config installed after start
        self.reload_error: tuple[float, str] | None = None  # (when, problems) of the last refused file
        if settings is None:
            raw = self._read()
            self.file_document = yaml.safe_load(raw) if raw is not None else None
            settings = build_settings(self.file_document, environ)
        self.runtime = Runtime(settings, Router(settings), self.file_document, _sources(self.file_document, None))
        if settings.redis_url:
            self.shared = Shared(settings.redis_url, self.apply_runtime_providers, self.keys.apply_remote)
            self.keys.publish = self.shared.publish_cooldown
            self.shared.start()

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
            try:
                return self._check_file()
            finally:
                # Only now: a thread arriving mid-check must wait for it, not
                # skip it and serve the old config.
                self._next_check = time.monotonic() + CHECK_INTERVAL

    def _check_file(self) -> bool:
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
            settings = build_settings(layer(document, self.runtime_providers), self.environ)
        except yaml.YAMLError as exc:
            log.error("settings file %s changed but is not valid YAML; keeping the running config: %s",
                      self.path, str(exc).replace("\n", " "))
            self.reload_error = (time.time(), "not valid YAML: " + str(exc).replace("\n", " "))
            return False
        except SettingsError as exc:
            log.error("settings file %s changed but does not validate; keeping the running config: %s",
                      self.path, "; ".join(exc.problems))
            self.reload_error = (time.time(), "; ".join(exc.problems))
            return False
        self.file_document = document
        self.install(settings, layer(document, self.runtime_providers))
        return True

    def apply_runtime_providers(self, version: int, providers: list | None) -> None:
        """A new shared provider list (or none): layer it over the file and install it if it validates."""
        with self._lock:
            document = layer(self.file_document, providers)
            try:
                settings = build_settings(document, self.environ)
            except SettingsError as exc:
                log.error("shared providers version %d does not validate here; keeping the running config: %s",
                          version, "; ".join(exc.problems))
                return
            self.runtime_providers = providers
            self.install(settings, document)

    def install(self, settings: Settings, document: Any, fingerprint: tuple | None = None) -> None:
        """Swap in a validated config and log what changed.

        ``fingerprint`` is given by a writer that just wrote the file, so the
        next file check does not load the same content again.
        """
        old = self.runtime.settings
        self.runtime = Runtime(settings, Router(settings), document,
                               _sources(self.file_document, self.runtime_providers))
        if fingerprint is not None:
            self._fingerprint = fingerprint
        self.reloaded_at, self.reload_error = time.time(), None
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
                         ("nonstream_keepalive_interval", "nonstream-keepalive-interval")):
        if getattr(old, attribute) != getattr(new, attribute):
            parts.append(f"{label} changed")
    if old.management != new.management:
        parts.append("remote-management changed")
    return "; ".join(parts) or "no effective change"


def _provider_diff(old, new) -> list[str]:
    out = []
    for attribute in ("base_url", "disabled", "prefix", "request_retry", "verify_tls", "force_upstream_stream"):
        a, b = getattr(old, attribute), getattr(new, attribute)
        if a != b:
            label = attribute.replace("_", "-")
            # booleans as YAML writes them: "false -> true"
            out.append(f"{label}: {str(a).lower()} -> {str(b).lower()}" if isinstance(a, bool)
                       else f"{label}: {a} -> {b}")
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

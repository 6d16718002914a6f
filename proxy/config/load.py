"""Load and validate ``settings.yaml`` into one frozen ``Settings`` object (``model.py``).

The file uses kebab-case keys (like CLIProxyAPI's config). Every string may
hold ``${VAR}`` (or ``${VAR:-default}``) references that are replaced from the
environment. Validation collects *every* problem with its key path, e.g.
``openai-compatibility[1].base-url: required``, so an operator fixes a file in
one go; ``SettingsError`` carries that list. The request path only ever reads
the resulting immutable objects: nothing here runs per request.
"""
from __future__ import annotations

import os
import re
import sys
from typing import Any, Mapping

import yaml

from ..balance.settings import fleet_settings
from .model import DEFAULT_STATE_PATH, Settings, SettingsError
from .validate import TOP_KEYS, Validator, join_path

DEFAULT_PATH = "settings.yaml"
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def settings_path(environ: Mapping[str, str] | None = None) -> str:
    environ = os.environ if environ is None else environ
    return environ.get("PROXY_SETTINGS") or DEFAULT_PATH


def read_document(path: str) -> Any:
    """Parse the YAML file as written (``${VAR}`` references unresolved)."""
    try:
        with open(path, "rb") as fh:
            text = fh.read()
    except OSError as exc:
        raise SettingsError([f"{path}: cannot read settings file ({exc.strerror})"]) from None
    return parse_document(text, path)


def parse_document(text: bytes, path: str) -> Any:
    """The file's bytes as a document (``${VAR}`` unresolved); YAML errors name the line, not the text."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise SettingsError([f"{path}: {problem}{where}"]) from None


def load_settings(path: str | None = None, environ: Mapping[str, str] | None = None) -> Settings:
    """Read, substitute and validate a settings file; raise ``SettingsError`` listing every problem."""
    environ = os.environ if environ is None else environ
    path = path or settings_path(environ)
    return build_settings(read_document(path), environ)


def build_settings(document: Any, environ: Mapping[str, str] | None = None, check_files: bool = True) -> Settings:
    """Validate a parsed (unresolved) settings document into ``Settings``; without ``check_files`` the files it
    names (a provider's ``ca-bundle``) need not exist (``last_good.build``: a copy validated when taken)."""
    environ = os.environ if environ is None else environ
    problems: list[str] = []
    doc = _substitute(document, "", environ, problems)
    if doc is None:
        doc = {}
    v = Validator(problems, check_files)
    if not isinstance(doc, dict):
        raise SettingsError(["(top level): must be a mapping of settings"])
    v.unknown(doc, "", TOP_KEYS)
    settings = Settings(
        api_keys=v.client_keys(doc.get("api-keys"), "api-keys"),
        request_retry=v.integer(doc, "", "request-retry", 2, minimum=0),
        timeouts=v.timeouts(doc.get("timeouts"), "timeouts"),
        max_request_bytes=v.integer(doc, "", "max-request-bytes", 10 * 1024 * 1024, minimum=1),
        max_aggregate_bytes=v.integer(doc, "", "max-aggregate-bytes", 64 * 1024 * 1024, minimum=1),
        nonstream_keepalive_interval=v.number(doc, "", "nonstream-keepalive-interval", 0.0, minimum=0),
        management=v.management(doc.get("remote-management"), "remote-management", environ),
        redis_url=v.string(doc, "", "redis-url", "") or environ.get("REDIS_URL", ""),
        redis_namespace=v.redis_namespace(doc, "", "redis-namespace"),
        providers=v.providers(doc.get("openai-compatibility"), "openai-compatibility"),
        state_path=v.string(doc, "", "state-path", DEFAULT_STATE_PATH) or DEFAULT_STATE_PATH,
        responses_store_ttl=v.integer(doc, "", "responses-store-ttl", 3600, minimum=1),
        demo_upstream=v.boolean(doc, "", "demo-upstream", False),
        client_timeout=v.number(doc, "", "client-timeout", 30.0, 0, exclusive=True),
        max_cooldown=v.number(doc, "", "max-cooldown", 3600.0, 0, exclusive=True),
        max_inflight_bytes=v.integer(doc, "", "max-inflight-bytes", 128 * 1024 * 1024, minimum=65536),
        responses_store_max_bytes=v.integer(doc, "", "responses-store-max-bytes", 256 * 1024 * 1024,
                                            minimum=65536),
        responses_store_max_count=v.integer(doc, "", "responses-store-max-count", 10_000, minimum=1),
        fleet=fleet_settings(v, doc.get("fleet"), "fleet"),
    )
    if problems:
        raise SettingsError(problems)
    return settings


def _substitute(node: Any, path: str, environ: Mapping[str, str], problems: list[str]) -> Any:
    """Replace ``${VAR}`` in every string of the document; report unset variables by path."""
    if isinstance(node, str):
        if "${" not in node:
            return node

        def repl(match: re.Match) -> str:
            name, default = match.group(1), match.group(2)
            value = environ.get(name)
            if value is None or (value == "" and default is not None):
                if default is not None:
                    return default
                problems.append(f"{path or '(top level)'}: environment variable {name} is not set")
                return ""
            return value

        return _VAR.sub(repl, node)
    if isinstance(node, dict):
        return {k: _substitute(v, join_path(path, k), environ, problems) for k, v in node.items()}
    if isinstance(node, list):
        return [_substitute(v, f"{path}[{i}]", environ, problems) for i, v in enumerate(node)]
    return node


def load_or_exit(path: str | None = None) -> Settings:
    """Load the settings or stop the process with one line per problem (exit status 1, no traceback)."""
    try:
        return load_settings(path)
    except SettingsError as exc:
        print_problems(exc.problems)
        sys.exit(1)


def print_problems(problems: list[str]) -> None:
    print("streamfold: invalid settings, not starting:", file=sys.stderr)
    for problem in problems:
        print(f"  {problem}", file=sys.stderr)

"""Settings: schema, ${VAR} substitution, defaults, and problems reported by key path."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from proxy.config.load import build_settings, load_settings
from proxy.config.model import SettingsError, redact

ROOT = Path(__file__).resolve().parent.parent


def problems_of(doc, environ=None) -> list[str]:
    with pytest.raises(SettingsError) as info:
        build_settings(doc, environ or {})
    return info.value.problems


def test_shipped_settings_file_loads_on_a_fresh_machine():
    settings = load_settings(str(ROOT / "settings.yaml"), environ={})
    assert settings.api_keys[0].key == "sk-streamfold-local"
    assert settings.providers[0].force_upstream_stream is True
    assert settings.providers[0].base_url == "http://127.0.0.1:8000/v1"


def test_defaults_fill_what_is_absent():
    settings = build_settings({"openai-compatibility": [{"name": "a", "base-url": "http://h/v1/"}]}, {})
    assert settings.request_retry == 2
    assert (settings.timeouts.connect, settings.timeouts.read) == (5.0, 600.0)
    assert settings.max_request_bytes == 10485760 and settings.max_aggregate_bytes == 67108864
    assert settings.nonstream_keepalive_interval == 0
    assert settings.management.secret_key == "" and settings.management.allow_remote is False
    provider = settings.providers[0]
    assert provider.base_url == "http://h/v1"  # trailing slash dropped
    assert provider.request_retry == -1 and provider.verify_tls and not provider.force_upstream_stream


def test_empty_file_is_an_empty_open_config():
    settings = build_settings(None, {})
    assert settings.providers == () and settings.api_keys == ()


def test_every_problem_is_reported_at_once_with_its_key_path():
    doc = {
        "api-keys": [123],
        "request-retry": "two",
        "timeouts": {"connect": 0, "read": "long"},
        "typo-key": True,
        "openai-compatibility": [
            {"name": "ok", "base-url": "http://x/v1", "models": [{"alias": "q"}]},
            {"name": "Bad Name", "verify-tls": "no"},
            {"name": "ok", "base-url": "ftp://x", "headers": {"X": ["list"]}, "extra": 1,
             "api-key-entries": [{"api-key": "k", "proxy-url": "gopher://p"}]},
        ],
    }
    problems = problems_of(doc)
    expected = [
        "api-keys[0]: must be a key string or {key, name, ...}",
        "request-retry: must be an integer, not a string",
        "timeouts.connect: must be > 0",
        "timeouts.read: must be a number, not a string",
        "typo-key: unknown key",
        "openai-compatibility[0].models[0].name: required",
        "openai-compatibility[1].name: use only a-z, 0-9, '-' and '_'",
        "openai-compatibility[1].base-url: required",
        "openai-compatibility[1].verify-tls: must be true or false, not a string",
        "openai-compatibility[2].extra: unknown key",
        "openai-compatibility[2].base-url: must be an http:// or https:// URL",
        "openai-compatibility[2].api-key-entries[0].proxy-url: must be an http, https or socks5 URL",
        "openai-compatibility[2].headers.X: header names and values must be strings",
        "openai-compatibility[2].name: duplicate provider name 'ok'",
    ]
    assert sorted(problems) == sorted(expected)


def test_unset_variable_is_named_with_its_path():
    doc = {"openai-compatibility": [{"name": "a", "base-url": "http://h",
                                     "api-key-entries": [{"api-key": "${SECRET_KEY_X}"}]}]}
    assert problems_of(doc) == [
        "openai-compatibility[0].api-key-entries[0].api-key: environment variable SECRET_KEY_X is not set"]


def test_variables_and_defaults_are_substituted():
    doc = {"api-keys": ["${CK}", "${MISSING:-fallback-key}"],
           "openai-compatibility": [{"name": "a", "base-url": "http://${HOST}:9000/v1"}]}
    settings = build_settings(doc, {"CK": "client-key", "HOST": "10.0.0.5"})
    assert [k.key for k in settings.api_keys] == ["client-key", "fallback-key"]
    assert settings.providers[0].base_url == "http://10.0.0.5:9000/v1"


def test_named_client_keys():
    settings = build_settings({"api-keys": [{"key": "sk-abcdefgh1234", "name": "team-a"}, "sk-zzzzzzzz9876"]}, {})
    assert [k.name for k in settings.api_keys] == ["team-a", "...9876"]


def test_management_secret_from_environment():
    settings = build_settings({}, {"MANAGEMENT_SECRET": "s3cret-value"})
    assert settings.management.secret_key == "s3cret-value"


def test_invalid_yaml_names_the_line(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("api-keys: [a\nopenai-compatibility: {\n")
    with pytest.raises(SettingsError) as info:
        load_settings(str(path), {})
    assert "line" in info.value.problems[0]


def test_top_level_must_be_a_mapping():
    assert problems_of(["a", "b"]) == ["(top level): must be a mapping of settings"]


def test_redaction_keeps_only_a_hint():
    assert redact("sk-abcdefghijklmnop1234") == "sk-...1234"
    assert redact("short") == "..."
    assert redact("") == ""


def run_startup(command: list[str], settings: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PROXY_SETTINGS=str(settings))
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=30)


@pytest.mark.parametrize("command", [
    [sys.executable, "-m", "gunicorn", "app:app", "--bind", "127.0.0.1:0"],
    [sys.executable, "app.py"],
], ids=["gunicorn", "python-app"])
def test_invalid_settings_stop_startup_with_lines_not_a_traceback(tmp_path, command):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"openai-compatibility": [{"base-url": "http://x"},
                                                            {"name": "b", "base-url": "${UNSET_VAR_Q}"}]}))
    result = run_startup(command, bad)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert "openai-compatibility[0].name: required" in result.stderr
    assert "openai-compatibility[1].base-url: environment variable UNSET_VAR_Q is not set" in result.stderr


def test_part2_settings_are_validated_with_their_key_paths():
    doc = {
        "api-keys": [{"key": "k", "rpm": -1, "models": "qwen*", "max-concurrent": "2", "bogus": 1}],
        "state-path": 5,
        "responses-store-ttl": 0,
        "demo-upstream": "yes",
        "openai-compatibility": [
            {"name": "raw\n", "base-url": "http://x/v1", "native-apis": ["chat", "soap"], "tokenizer": "bpe",
             "models": [{"name": "q", "max-output-tokens": -5, "context-length": "big", "vision": "no"}]},
            {"name": "", "base-url": "http://y/v1"},
        ],
    }
    assert sorted(problems_of(doc)) == sorted([
        "api-keys[0].bogus: unknown key",
        "api-keys[0].models: must be a list",
        "api-keys[0].rpm: must be >= 0",
        "api-keys[0].max-concurrent: must be an integer, not a string",
        "state-path: must be a string, not an integer",
        "responses-store-ttl: must be >= 1",
        "demo-upstream: must be true or false, not a string",
        "openai-compatibility[0].name: use only a-z, 0-9, '-' and '_'",
        "openai-compatibility[0].native-apis[1]: must be one of chat, completions, embeddings, responses, messages, "
        "gemini",
        "openai-compatibility[0].tokenizer: must be one of none, vllm, llama.cpp",
        "openai-compatibility[0].models[0].max-output-tokens: must be >= 0",
        "openai-compatibility[0].models[0].context-length: must be an integer, not a string",
        "openai-compatibility[0].models[0].vision: must be true or false, not a string",
        "openai-compatibility[1].name: must not be empty",
    ])


def test_client_key_policy_and_model_limits_are_loaded():
    settings = build_settings({
        "api-keys": [{"key": "k1", "name": "team-a", "models": ["qwen*"], "rpm": 60, "tpm": 1000,
                      "max-concurrent": 2}, "k2"],
        "openai-compatibility": [{"name": "p", "base-url": "http://x/v1", "native-apis": ["chat"],
                                  "models": [{"name": "q", "alias": "claude-*", "max-output-tokens": 8,
                                              "context-length": 64, "vision": False}, {"name": "v"}]}],
    }, {})
    team, plain = settings.api_keys
    assert (team.models, team.rpm, team.tpm, team.max_concurrent, team.limited) == (("qwen*",), 60, 1000, 2, True)
    assert not plain.limited
    provider = settings.providers[0]
    assert provider.native_apis == {"chat"} and provider.models[0].alias_is_glob
    assert (provider.models[0].max_output_tokens, provider.models[0].context_length) == (8, 64)
    assert (provider.models[0].vision, provider.models[1].vision) == (False, True)

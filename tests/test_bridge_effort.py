"""Reasoning effort through both bridges (issue 22, defect 4): Anthropic ``output_config.effort`` and
``thinking``, and Responses ``reasoning.effort``, reach the chat upstream as a ``reasoning_effort`` the
provider accepts (README "Reasoning effort": the table these cases follow)."""
from __future__ import annotations

import json

import pytest
import requests

from proxy.config.load import build_settings
from proxy.config.model import SettingsError
from tests.conftest import AUTH, CLIENT_KEY, make_app, provider, settings_doc
from tests.upstream import Reply, completion

ANTHROPIC_TABLE = [  # (thinking, output_config, reasoning_effort sent; None: left out)
    (None, None, None),
    (None, {"effort": "low"}, "low"),
    (None, {"effort": "max"}, "high"),
    ({"type": "disabled"}, {"effort": "high"}, None),
    ({"type": "enabled", "budget_tokens": 1024}, None, "low"),
    ({"type": "enabled", "budget_tokens": 2048}, None, "medium"),
    ({"type": "enabled", "budget_tokens": 31999}, None, "high"),
    ({"type": "enabled", "budget_tokens": 31999}, {"effort": "low"}, "low"),
    ({"type": "adaptive"}, None, "medium"),
    ({"type": "adaptive"}, {"effort": "low"}, "low"),  # Claude Code's /effort with adaptive thinking
    ({"type": "adaptive"}, {"effort": "high"}, "high"),
]
RESPONSES_TABLE = [  # (reasoning.effort, sent by default, sent with reasoning-efforts: [none .. xhigh])
    (None, None, None), ("none", "low", "none"), ("minimal", "low", "minimal"), ("low", "low", "low"),
    ("medium", "medium", "medium"), ("High", "high", "high"), ("xhigh", "high", "xhigh"), ("turbo", None, None),
]
EVERY_LEVEL = ["none", "minimal", "low", "medium", "high", "xhigh"]


@pytest.fixture
def plain(upstream, serve):
    """A bridged provider with the default reasoning-efforts."""
    upstream.handler = lambda rec: Reply(body=json.dumps(completion()).encode())
    return serve(make_app(settings_doc(provider(upstream, **{"native-apis": ["chat"]}))))


@pytest.fixture
def every(upstream, serve):
    """A bridged provider that lists every level."""
    upstream.handler = lambda rec: Reply(body=json.dumps(completion()).encode())
    return serve(make_app(settings_doc(provider(upstream, **{"native-apis": ["chat"],
                                                             "reasoning-efforts": EVERY_LEVEL}))))


def sent_effort(upstream) -> str | None:
    return upstream.requests[-1].body.get("reasoning_effort", None)


@pytest.mark.parametrize("thinking,output_config,expected", ANTHROPIC_TABLE)
def test_anthropic_effort_and_thinking_map_by_the_table(plain, upstream, thinking, output_config, expected):
    body = {"model": "m", "max_tokens": 32000, "messages": [{"role": "user", "content": "hi"}]}
    if thinking is not None:
        body["thinking"] = thinking
    if output_config is not None:
        body["output_config"] = output_config
    response = requests.post(plain.url + "/v1/messages", json=body, timeout=10,
                             headers={"x-api-key": CLIENT_KEY, "anthropic-version": "2023-06-01"})
    assert response.status_code == 200, response.text
    assert sent_effort(upstream) == expected


def test_anthropic_max_effort_passes_as_xhigh_to_a_provider_that_lists_it(every, upstream):
    body = {"model": "m", "max_tokens": 100, "messages": [{"role": "user", "content": "hi"}],
            "thinking": {"type": "adaptive"}, "output_config": {"effort": "max"}}
    requests.post(every.url + "/v1/messages", json=body, timeout=10,
                  headers={"x-api-key": CLIENT_KEY, "anthropic-version": "2023-06-01"})
    assert sent_effort(upstream) == "xhigh"


def responses_effort(server, upstream, effort: str | None) -> str | None:
    body = {"model": "m", "input": "hi"}
    if effort is not None:
        body["reasoning"] = {"effort": effort, "summary": "auto"}
    response = requests.post(server.url + "/v1/responses", json=body, headers=AUTH, timeout=10)
    assert response.status_code == 200, response.text
    assert response.json()["reasoning"]["effort"] == effort  # the echo is what the client asked
    return sent_effort(upstream)


@pytest.mark.parametrize("effort,expected", [(effort, default) for effort, default, _ in RESPONSES_TABLE])
def test_responses_effort_maps_onto_the_default_levels(plain, upstream, effort, expected):
    assert responses_effort(plain, upstream, effort) == expected


@pytest.mark.parametrize("effort,expected", [(effort, listed) for effort, _, listed in RESPONSES_TABLE])
def test_responses_effort_passes_what_the_provider_lists(every, upstream, effort, expected):
    assert responses_effort(every, upstream, effort) == expected


@pytest.mark.parametrize("value,problem", [
    (["low", "extreme"], "reasoning-efforts[1]"), ([], "reasoning-efforts"), ("high", "reasoning-efforts"),
])
def test_reasoning_efforts_setting_is_validated(upstream, value, problem):
    with pytest.raises(SettingsError) as info:
        build_settings(settings_doc(provider(upstream, **{"reasoning-efforts": value})), {})
    assert any(problem in p for p in info.value.problems), info.value.problems

"""Response ids of a provider serving /v1/responses itself belong to the key they were relayed to (issue 21).

Such a provider keeps every conversation under the one provider key, so a
``previous_response_id`` passed through as typed let any client key continue
(and read back, through the model) another tenant's conversation. The proxy
records who each relayed id belongs to and refuses every other id exactly
like an unknown one, before the upstream is asked.
"""
from __future__ import annotations

import itertools
import json

import requests

from tests.conftest import make_app, provider, settings_doc
from tests.test_identity import ALICE, BOB
from tests.upstream import Reply, sse

_ids = itertools.count(1)


def native(rec) -> Reply:
    """A provider's /v1/responses: a Response object, or its events when asked to stream."""
    answer = {"id": f"resp_up{next(_ids)}", "object": "response", "status": "completed", "model": "upstream-model",
              "output": [{"type": "message", "role": "assistant", "id": "msg_1", "status": "completed",
                          "content": [{"type": "output_text", "text": "noted", "annotations": []}]}],
              "usage": {"input_tokens": 5, "output_tokens": 1, "total_tokens": 6}}
    if rec.path.endswith("/compact"):
        return Reply(body=json.dumps({"id": "cmp_1", "object": "response.compaction", "output": []}).encode())
    if rec.body.get("stream"):
        events = sse({"type": "response.created", "response": dict(answer, status="in_progress", output=[])},
                     {"type": "response.completed", "response": answer}, done=False)
        half = len(events[0]) // 2  # the id's event comes in two reads: the proxy joins its line
        return Reply(events=[b": ok\n\n", events[0][:half], events[0][half:], *events[1:]], delay=0.05)
    return Reply(body=json.dumps(answer).encode())


def post(url: str, key: str, path: str = "/v1/responses", **body) -> requests.Response:
    return requests.post(url + path, json={"model": "m", "input": "hi", **body}, timeout=20,
                         headers={"Authorization": f"Bearer {key}", "Connection": "close"})


def streamed_id(answer: requests.Response) -> str:
    for line in answer.text.splitlines():
        if line.startswith("data:") and "response.created" in line:
            return json.loads(line[5:])["response"]["id"]
    raise AssertionError(answer.text[:300])


def test_a_native_response_id_is_continued_and_compacted_only_by_the_key_it_was_relayed_to(upstream, serve):
    upstream.handler = native
    live = serve(make_app(settings_doc(provider(upstream, **{"native-apis": ["chat", "responses"]}),
                                       **{"api-keys": [ALICE, BOB]})))
    plain = post(live.url, ALICE, input="alice's secret plan")
    streamed = post(live.url, ALICE, input="more of it", stream=True)
    assert plain.status_code == streamed.status_code == 200
    ids = [plain.json()["id"], streamed_id(streamed)]
    calls = len(upstream.requests)
    unknown = post(live.url, BOB, previous_response_id="resp_never_existed")
    assert unknown.status_code == 400 and unknown.json()["error"]["code"] == "previous_response_not_found"
    for stolen in ids:
        for path in ("/v1/responses", "/v1/responses/compact"):
            refused = post(live.url, BOB, path, previous_response_id=stolen)
            assert refused.status_code == 400, (path, refused.text[:200])
            assert refused.json() == json.loads(unknown.text.replace("resp_never_existed", stolen))
    # an id the proxy never relayed (made at the upstream directly) is nobody's: refused for Alice too
    assert post(live.url, ALICE, previous_response_id="resp_made_elsewhere").status_code == 400
    assert len(upstream.requests) == calls  # the upstream was never asked for any of these
    for own in ids:
        assert post(live.url, ALICE, previous_response_id=own).status_code == 200
        assert upstream.requests[-1].body["previous_response_id"] == own
        assert post(live.url, ALICE, "/v1/responses/compact", previous_response_id=own).status_code == 200
    # a continuation's own id is Alice's too, and still not Bob's
    chained = post(live.url, ALICE, previous_response_id=ids[0]).json()["id"]
    assert post(live.url, ALICE, previous_response_id=chained).status_code == 200
    assert post(live.url, BOB, previous_response_id=chained).status_code == 400

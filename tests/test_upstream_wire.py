"""How the proxy speaks HTTP to upstreams: a request written in one piece, answers' headers read as http.client does.

Property: an upstream answer's header section is read into exactly the message http.client's email parser makes.

proxy/upstream.py reads plain ``Name: value`` lines itself (the email parser
costs a tenth of a relayed request) and hands every other section to the
email parser; whichever way, the message (its headers in order, payload,
defects), the bytes left on the connection and the errors must be the same.
An HTTP test shows the same through the proxy: headers the fast reader does
not take (a folded line, Latin-1 bytes) still reach the client as before.
"""
from __future__ import annotations

import http.client
import io
import json
import socket
import threading

import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.upstream import _parse_headers
from tests.conftest import AUTH, CHAT, make_app, provider, settings_doc
from tests.upstream import Reply, completion

# mostly what servers send (every line a plain token, a colon and printable ASCII), sometimes anything else
TOKEN = st.from_regex(rb"[!-9;-~]{1,12}", fullmatch=True) | st.sampled_from([b"Content-Type", b"From", b"Via"])
PRINTABLE = st.from_regex(rb"[\t -~]{0,20}", fullmatch=True)
TYPES = st.sampled_from([b"application/json", b"text/event-stream; charset=utf-8", b"multipart/mixed; boundary=x",
                         b"Message/rfc822", b"message/delivery-status"])
ODD_VALUE = st.sampled_from([b"caf\xe9", b"\x85", b"a\rb", b"\x0b", b"\x00", b" x"]) | st.binary(max_size=10)


@st.composite
def sections(draw) -> bytes:
    lines = []
    for _ in range(draw(st.integers(0, 8))):
        kind = draw(st.integers(0, 29))
        if kind == 0:  # a folded continuation line
            lines.append(draw(st.sampled_from([b" ", b"\t"])) + draw(PRINTABLE) + b"\r\n")
        elif kind == 1:
            lines.append(b"From " + draw(PRINTABLE) + b"\r\n")
        elif kind == 2:  # anything
            lines.append(draw(st.binary(max_size=6)) + draw(st.sampled_from([b": ", b":", b"", b" : "]))
                         + draw(ODD_VALUE) + draw(st.sampled_from([b"\r\n", b"\n", b"\r", b""])))
        elif kind == 3:
            lines.append(b"Content-Type: " + draw(TYPES) + b"\r\n")
        else:
            lines.append(draw(TOKEN) + draw(st.sampled_from([b": ", b":", b":\t "])) + draw(PRINTABLE)
                         + draw(st.sampled_from([b"\r\n", b"\r\n", b"\n"])))
    ending = draw(st.sampled_from([b"\r\n", b"\r\n", b"\n", b"", b"\r\n\r\n"]))
    return b"".join(lines) + ending + draw(st.sampled_from([b"", b"body", b"{\"x\": 1}\n"]))


def outcome(parse, data: bytes):
    fp = io.BytesIO(data)
    try:
        message = parse(fp)
    except Exception as exc:  # noqa: BLE001 - compared: the same error either way
        return type(exc), str(exc), fp.read()
    return type(message), state(message), fp.read()


def state(message) -> dict:
    """A message's attributes, comparable: defects by kind and text, parts (message/, multipart) by state."""
    found = dict(vars(message))
    found["defects"] = [(type(d), str(d)) for d in found["defects"]]
    if isinstance(found["_payload"], list):
        found["_payload"] = [state(part) for part in found["_payload"]]
    return found


@settings(max_examples=3000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sections())
def test_a_header_section_reads_as_the_email_parser_reads_it(data):
    assert outcome(_parse_headers, data) == outcome(http.client.parse_headers, data)


def test_limits_and_usual_sections_read_as_the_email_parser_reads_them():
    usual = (b"Server: nginx/1.24.0\r\nDate: Mon, 07 Dec 2026 03:50:00 GMT\r\nContent-Type: application/json\r\n"
             b"Content-Length: 300\r\nConnection: keep-alive\r\n\r\n{}")
    for data in (usual, b"\r\n", b"\n", b"", b"X: 1\r\n" * 100 + b"\r\n", b"X: 1\r\n" * 101 + b"\r\n",
                 b"X: " + b"a" * 65533 + b"\r\n\r\n", b"X: " + b"a" * 65534 + b"\r\n\r\n",
                 b"Content-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\n"):
        assert outcome(_parse_headers, data) == outcome(http.client.parse_headers, data)
    assert outcome(_parse_headers, usual)[1]["_headers"][2] == ("Content-Type", "application/json")


def test_headers_the_fast_reader_leaves_to_the_email_parser_still_reach_the_client(upstream, live):
    """An answer with a folded header line and a Latin-1 value: the proxy relays it as it did, through the email
    parser."""
    upstream.handler = lambda rec: Reply(body=json.dumps(completion("hi")).encode(),
                                         headers={"X-Folded": "one\r\n two", "X-Latin": "caf\xe9"})
    response = requests.post(live.url + "/v1/chat/completions", json=CHAT, headers=AUTH, timeout=10)
    assert response.status_code == 200 and response.headers["Content-Type"] == "application/json"
    assert response.json()["choices"][0]["message"]["content"] == "hi"


def test_a_request_reaches_the_upstream_in_one_write(serve):
    """Head and body in one send: an upstream that answers from a single read of each request gets it whole
    every time (urllib3 alone writes the head, then the body: the read often held the head only)."""
    answer = json.dumps(completion("hi")).encode()
    listener = socket.create_server(("127.0.0.1", 0))
    whole: list[bool] = []

    def serve_connection(conn: socket.socket) -> None:
        with conn:
            while True:
                got = conn.recv(1 << 20)  # one read per request
                if not got:
                    return
                head, _, body = got.partition(b"\r\n\r\n")
                length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
                whole.append(len(body) == length)
                while len(body) < length:
                    body += conn.recv(1 << 20)
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%b"
                             % (len(answer), answer))

    def accept() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=serve_connection, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{listener.getsockname()[1]}/v1"
        live = serve(make_app(settings_doc(provider(url))))
        for i in range(20):
            body = dict(CHAT, messages=[{"role": "user", "content": "x" * (i * 500)}])
            response = requests.post(live.url + "/v1/chat/completions", json=body, headers=AUTH, timeout=10)
            assert response.status_code == 200
        assert whole == [True] * 20
    finally:
        listener.close()

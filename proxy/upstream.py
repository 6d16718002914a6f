"""Transport to upstream servers: pooled sessions, one POST, raw reads.

This is the one place where ``requests``/``urllib3`` exceptions become ours
(``UpstreamUnavailable`` 502, ``UpstreamTimeout`` 504), like requests'
``HTTPAdapter.send`` does for socket errors.

Sessions: one per provider, shared by the worker's threads, ``trust_env``
off (otherwise every request re-reads proxy variables and ``.netrc``; a key's
``proxy-url`` is passed per request instead, never through the environment).

Reads: ``raw.read1`` returns whatever bytes have arrived (for chunked and
close-delimited bodies alike), so nothing is held back waiting for a fixed
``chunk_size`` and nothing waits for the end of a close-delimited body.
"""
from __future__ import annotations

import threading
from typing import Iterator

import requests
import urllib3
from requests.adapters import HTTPAdapter

from .errors import UpstreamTimeout, UpstreamUnavailable
from .settings import KeyEntry, Provider, Timeouts

READ_SIZE = 65536
# Connections kept per provider; above this, extra connections are opened and
# closed per request rather than blocking a thread (pool_block=False).
POOL_SIZE = 64


class Sessions:
    """A pooled ``requests.Session`` per provider, rebuilt only when its TLS settings change."""

    def __init__(self) -> None:
        self._sessions: dict[tuple, requests.Session] = {}
        self._lock = threading.Lock()

    def get(self, provider: Provider) -> requests.Session:
        key = (provider.name, provider.verify_tls, provider.ca_bundle)
        session = self._sessions.get(key)
        if session is None:
            with self._lock:
                session = self._sessions.get(key)
                if session is None:
                    session = self._sessions[key] = _new_session(provider)
        return session


def _new_session(provider: Provider) -> requests.Session:
    session = requests.Session()
    session.trust_env = False
    session.verify = provider.ca_bundle or provider.verify_tls
    adapter = HTTPAdapter(pool_connections=4, pool_maxsize=POOL_SIZE, max_retries=0)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    session.headers.clear()  # no default User-Agent/Accept; we set what goes upstream
    return session


def post(session: requests.Session, url: str, body: bytes, headers: dict,
         entry: KeyEntry, timeouts: Timeouts) -> requests.Response:
    """POST ``body`` and return the response with its body unread."""
    proxies = {"http": entry.proxy_url, "https": entry.proxy_url} if entry.proxy_url else None
    try:
        return session.post(url, data=body, headers=headers, stream=True, proxies=proxies,
                            timeout=(timeouts.connect, timeouts.read), allow_redirects=False)
    except (requests.ConnectTimeout, requests.ReadTimeout):
        raise UpstreamTimeout(f"upstream timed out ({_host(url)})") from None
    except requests.RequestException as exc:
        raise UpstreamUnavailable(f"could not reach upstream ({_host(url)}): {type(exc).__name__}") from None


def read_chunks(response: requests.Response, first: bytes = b"") -> Iterator[bytes]:
    """Yield the body as it arrives; a silence longer than the read timeout becomes ``UpstreamTimeout``."""
    if first:
        yield first
    read = response.raw.read1
    try:
        while True:
            data = read(READ_SIZE)
            if not data:
                return
            yield data
    except urllib3.exceptions.ReadTimeoutError:
        raise UpstreamTimeout("upstream went silent for longer than the read timeout") from None
    except (urllib3.exceptions.HTTPError, OSError) as exc:
        raise UpstreamUnavailable(f"upstream connection dropped mid-response: {type(exc).__name__}") from None


def read_first(response: requests.Response) -> bytes:
    """The first bytes of the body (``b""`` when it is empty)."""
    for data in read_chunks(response):
        return data
    return b""


def read_body(response: requests.Response, first: bytes, limit: int) -> bytes:
    """The rest of a (JSON) body after ``first``; over ``limit`` bytes is an upstream failure."""
    parts, size = [first], len(first)
    for data in read_chunks(response):
        parts.append(data)
        size += len(data)
        if size > limit:
            raise UpstreamUnavailable(f"upstream answer exceeds max-aggregate-bytes ({limit} bytes)")
    return b"".join(parts)


def _host(url: str) -> str:
    return urllib3.util.parse_url(url).host or url

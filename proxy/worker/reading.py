"""Tell when an HTTP/1.1 request held in a buffer is complete: head, then body by its framing.

The worker (``proxy.worker``) reads requests in its event loop, non-blocking,
and hands one to a thread only once this says it is whole, so a slow client
costs a buffer instead of a thread. This is not a parser: anything it does
not recognise as plainly well-formed (two Content-Lengths, an unknown
transfer coding, a bad chunk size, an over-long line) is handed over as is,
and gunicorn's own parser then rejects it with the right status. Pure: bytes
in, an answer out; no sockets.
"""
from __future__ import annotations

HEX = frozenset(b"0123456789abcdefABCDEF")


class RequestReader:
    """The bytes of one request as they arrive; ``feed`` says when to hand them over.

    ``body_limit``: a body larger than this is handed over as soon as that is
    known (the app answers 413 from what it has, without reading the rest).
    ``line_limit``/``head_limit``: past these, the head can only be rejected.
    """

    __slots__ = ("buf", "body_limit", "line_limit", "head_limit", "_body_start", "_length", "_chunk_at",
                 "_chunked_total", "_scanned", "_line_start", "_trailer_at", "continue_needed", "error",
                 "oversized", "wanted", "method", "path", "headers", "gated")

    def __init__(self, body_limit: int, line_limit: int = 8192, head_limit: int = 1024 * 1024,
                 wanted: frozenset[bytes] = frozenset()) -> None:
        self.buf = bytearray()
        self.body_limit = body_limit
        self.line_limit = line_limit
        self.head_limit = head_limit
        self._body_start = -1       # index of the first body byte, once the head is complete
        self._length = -1           # Content-Length, or -1 for chunked
        self._chunk_at = -1         # chunked: where the next chunk-size line starts
        self._chunked_total = 0
        self._scanned = 0           # bytes already searched for the terminator awaited now
        self._line_start = 0        # head: where its last (incomplete) line starts
        self._trailer_at = -1       # chunked: where the trailer section starts, once the last chunk is in
        self.continue_needed = False  # the client waits for "100 Continue" before its body
        self.error = ""             # set when the chunked framing is broken: answer 400, don't parse
        self.oversized = False      # handed over before the end of a body over body_limit
        self.wanted = wanted        # header names (lower case) whose values to keep in ``headers``
        self.method = ""            # from the request line, once the head is complete
        self.path = ""              # the target without its query
        self.headers: dict[bytes, list[bytes]] = {}
        self.gated = False          # the worker has judged the head (``proxy.head``)

    @property
    def head_done(self) -> bool:
        """The head is complete and its framing known (a body may follow)."""
        return self._body_start >= 0

    @property
    def held(self) -> int:
        """Bytes this request holds or will hold: what is buffered, or the head and the announced body."""
        if self._body_start >= 0 and self._length > 0 and not self.oversized:
            return max(len(self.buf), self._body_start + self._length)
        return len(self.buf)

    @property
    def started(self) -> bool:
        return bool(self.buf)

    def feed(self, data: bytes) -> bool:
        """Add bytes; True once the request is complete (or can only be rejected) and may go to a thread."""
        self.buf += data
        if self._body_start < 0:
            return self._head()
        return self._body()

    def _find(self, pattern: bytes, start: int) -> int:
        """``buf.find(pattern, start)``, resuming where the last failed search stopped.

        A client trickling a byte at a time must not make every read rescan
        everything it sent before (quadratic work in the event loop).
        """
        buf = self.buf
        found = buf.find(pattern, max(start, self._scanned - len(pattern) + 1))
        self._scanned = len(buf) if found < 0 else 0
        return found

    def _head(self) -> bool:
        buf = self.buf
        searched = self._scanned
        end = self._find(b"\r\n\r\n", 0)
        if end < 0:
            if len(buf) > self.head_limit or buf.find(b"\n\n", max(0, searched - 1)) >= 0:
                return True  # the parser rejects it (431, bare LF) from what is here
            newline = buf.rfind(b"\n", max(0, searched - 1))
            if newline >= 0:
                self._line_start = newline + 1
            return len(buf) - self._line_start > self.line_limit  # an over-long line: 414 or 431
        framing = self._framing(bytes(buf[:end]))
        if framing is None:
            return True
        self._body_start = end + 4
        self._length = framing
        self._chunk_at = self._body_start
        if framing == 0:
            return True
        if framing > self.body_limit:
            self.oversized = True
            return True
        return self._body()

    def _framing(self, head: bytes) -> int | None:
        """Content-Length, -1 for chunked, 0 for no body; None when only the parser can judge."""
        lengths, codings, expect = [], [], False
        lines = head.split(b"\r\n")
        request = lines[0].split(b" ")
        if len(request) == 3:
            self.method = request[0].decode("latin-1")
            self.path = request[1].split(b"?", 1)[0].decode("latin-1")
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            name = name.lower()
            if name in self.wanted:
                self.headers.setdefault(name, []).append(value.strip())
            if name == b"content-length":
                lengths.append(value.strip())
            elif name == b"transfer-encoding":
                codings += [c.strip().lower() for c in value.split(b",")]
            elif name == b"expect" and value.strip().lower() == b"100-continue":
                expect = True
        if codings:
            if lengths or codings != [b"chunked"]:
                return None
            framing = -1
        elif not lengths:
            return 0
        elif len(lengths) > 1 or not lengths[0].isdigit() or len(lengths[0]) > 18:
            return None
        else:
            framing = int(lengths[0])
        self.continue_needed = expect and framing != 0 and head.split(b"\r\n", 1)[0].endswith(b"HTTP/1.1")
        return framing

    def _body(self) -> bool:
        if self._length >= 0:
            return len(self.buf) - self._body_start >= self._length
        buf, at = self.buf, self._chunk_at
        if self._trailer_at >= 0:
            return self._trailers()
        while True:
            eol = self._find(b"\r\n", at)
            if eol < 0:
                return len(buf) - at > self.line_limit
            size, extension, _ = bytes(buf[at:eol]).partition(b";")
            if extension:  # as gunicorn: blanks only before an extension
                size = size.rstrip(b" \t")
            if not size or len(size) > 16 or not HEX.issuperset(size):
                self.error = "invalid chunk size"
                return True
            size = int(size, 16)
            if size == 0:  # last chunk, then trailer lines up to an empty one
                self._trailer_at = eol
                return self._trailers()
            # Hand over once more than body_limit bytes of body are here (the
            # app answers 413 from them), not merely announced.
            available = len(buf) - eol - 2
            if self._chunked_total + min(size, available) > self.body_limit:
                self.oversized = True
                return True
            following = eol + 2 + size + 2
            if len(buf) < following:
                return False
            if buf[following - 2:following] != b"\r\n":
                self.error = "chunk data not followed by CRLF"
                return True
            self._chunked_total += size
            at = self._chunk_at = following

    def _trailers(self) -> bool:
        buf, at = self.buf, self._trailer_at  # at: the CRLF ending the last-chunk line
        if len(buf) < at + 4:
            return False
        if buf[at + 2:at + 4] == b"\r\n":
            return True
        return self._find(b"\r\n\r\n", at) >= 0 or len(buf) - at > 4 * self.line_limit

    def take(self) -> bytes:
        """The bytes read so far, for the parser."""
        data, self.buf = bytes(self.buf), bytearray()
        return data

"""streamfold's gunicorn worker: gthread that reads each request whole before it takes a thread.

Stock gthread hands a connection to a thread as soon as its first byte
arrives; the thread then reads headers and body with no time limit, so a
client that sends one header and then nothing (slowloris) holds a thread, and
a few hundred of them freeze a worker. This worker reads requests in its event
loop instead, non-blocking, as nginx does: until its head and body are in
(``reading.py`` says when), a connection costs a buffer, not a thread, and
does not count against ``worker_connections``. A client that has not
delivered its whole request within ``client-timeout`` seconds is answered 408
and closed. Requests then reach the thread already in memory; any read the
parser still makes (a body over ``max-request-bytes``) ends at the same
deadline.

After a connection's last answer, the wait for the client to close its side
(RFC 9112 section 9.6) is watched by the event loop; gthread waited inside
it, so a client that never closed froze the worker for 2 s each time.

gunicorn's own parse errors, HTML pages in stock gunicorn, are answered as
OpenAI JSON errors here (``replies.py``: 400, 414, 431, ...), and a client
that goes away before its request is complete is not an error.

TLS and HTTP/2 cleartext connections keep stock gthread behaviour: terminate
TLS in a front proxy (README, "Deploying").
"""
from .gthread import StreamfoldWorker

__all__ = ["StreamfoldWorker"]

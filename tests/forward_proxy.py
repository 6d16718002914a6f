"""Minimal HTTP and SOCKS5 proxies on loopback, to check that a key's proxy-url is used."""
from __future__ import annotations

import http.client
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit


class ForwardProxy:
    def __init__(self) -> None:
        self.seen: list[str] = []
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def do_POST(self) -> None:
                proxy.seen.append(self.path)  # absolute URI, as clients send to a proxy
                target = urlsplit(self.path)
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                conn = http.client.HTTPConnection(target.hostname, target.port, timeout=10)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("proxy-connection", "host")}
                conn.request("POST", target.path, body=body, headers=headers)
                answer = conn.getresponse()
                data = answer.read()
                self.send_response(answer.status)
                for k, v in answer.getheaders():
                    if k.lower() not in ("transfer-encoding", "content-length", "connection"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
                conn.close()

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class Socks5Proxy:
    """A minimal SOCKS5 server (no auth, CONNECT only) that records where clients asked to go."""

    def __init__(self) -> None:
        import socket
        import struct

        self.seen: list[tuple[str, int]] = []
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"socks5://127.0.0.1:{self.sock.getsockname()[1]}"
        self._closed = False

        def pipe(src, dst) -> None:
            try:
                while data := src.recv(65536):
                    dst.sendall(data)
            except OSError:
                pass
            finally:
                for s in (src, dst):
                    try:
                        s.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass

        def handle(client) -> None:
            try:
                greeting = client.recv(2)  # VER, NMETHODS
                client.recv(greeting[1])  # METHODS
                client.sendall(b"\x05\x00")  # no authentication
                head = client.recv(4)  # VER CMD RSV ATYP
                if head[3] == 1:
                    host = socket.inet_ntoa(client.recv(4))
                elif head[3] == 3:
                    host = client.recv(client.recv(1)[0]).decode()
                else:
                    host = socket.inet_ntop(socket.AF_INET6, client.recv(16))
                port = struct.unpack("!H", client.recv(2))[0]
                self.seen.append((host, port))
                upstream = socket.create_connection((host, port), timeout=10)
                upstream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                client.sendall(b"\x05\x00\x00\x01" + socket.inet_aton("0.0.0.0") + struct.pack("!H", 0))
                back = threading.Thread(target=pipe, args=(upstream, client), daemon=True)
                back.start()
                pipe(client, upstream)
                back.join(10)
                upstream.close()
            except OSError:
                pass
            finally:
                client.close()

        def serve() -> None:
            while not self._closed:
                try:
                    client, _ = self.sock.accept()
                except OSError:
                    return
                threading.Thread(target=handle, args=(client,), daemon=True).start()

        threading.Thread(target=serve, daemon=True).start()

    def stop(self) -> None:
        self._closed = True
        self.sock.close()

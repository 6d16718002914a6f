"""gunicorn settings for streamfold (`gunicorn app:app` reads this file).

Every value can be overridden on the command line or by the environment
variables named below. Capacity: each in-flight request, and so each open
stream, holds one thread, so concurrent streams = workers x threads.
"""
import os

# Heroku-style: bind the platform's $PORT on all interfaces, else loopback only.
bind = f"0.0.0.0:{os.environ['PORT']}" if os.environ.get("PORT") else "127.0.0.1:8317"

# gthread: a thread per request, so long streams don't block other clients.
worker_class = "gthread"
workers = int(os.environ.get("WEB_CONCURRENCY", "2"))
# Sized for long-lived streams (a 2-core box relays 1,000 slow streams at once
# with 2 x 512); raise it if you hold more streams open than that.
threads = int(os.environ.get("GUNICORN_THREADS", "512"))
# Connections a worker accepts at once; beyond threads they wait for a thread.
worker_connections = int(os.environ.get("GUNICORN_WORKER_CONNECTIONS", str(threads * 2)))
backlog = 2048

# The worker heartbeat, not a request limit: gthread workers keep beating
# while threads stream, so a 10-minute stream is fine.
timeout = 30
# On SIGTERM, stop accepting and let running requests (streams included)
# finish for up to this many seconds before they are cut.
graceful_timeout = int(os.environ.get("GUNICORN_GRACEFUL_TIMEOUT", "30"))
keepalive = 5

# gunicorn 27 opens a control socket at one fixed path (~/.gunicorn/gunicorn.ctl)
# by default; several instances on one host (tests, benches, scale-out) would
# fight over it. streamfold needs none of its commands, so it is off.
control_socket_disable = True

accesslog = None  # streamfold writes its own one-line-per-request log
errorlog = "-"
loglevel = os.environ.get("LOG_LEVEL", "info")


def on_starting(server):
    """Validate the settings file in the master, before any worker forks.

    A worker whose app import fails prints a traceback and is retried forever;
    this prints one line per problem instead and stops with exit status 1.
    """
    from proxy.settings import load_or_exit

    load_or_exit()

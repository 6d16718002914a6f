"""gunicorn settings for streamfold (`gunicorn app:app` reads this file).

Every value can be overridden on the command line or by the environment
variables named below. Capacity: each in-flight request, and so each open
stream, holds one thread, so concurrent streams = workers x threads.
"""
import os
import shutil
import tempfile

# Heroku-style: bind the platform's $PORT on all interfaces, else loopback only.
bind = f"0.0.0.0:{os.environ['PORT']}" if os.environ.get("PORT") else "127.0.0.1:8317"

# gthread (a thread per request, so long streams don't block other clients),
# subclassed to read each request whole in the event loop first: a slow client
# costs a buffer, not a thread, and is dropped after `client-timeout` (settings
# file, default 30 s). Parse errors are answered as OpenAI JSON. See proxy/worker/.
worker_class = "proxy.worker.StreamfoldWorker"
# Default cores + 1: measured by bench/ on 2 cores, 3 workers beat 2 (a worker
# whose threads wait for the GIL leaves its core idle) and 4 (more switching).
workers = int(os.environ.get("WEB_CONCURRENCY", str((os.cpu_count() or 1) + 1)))
# Sized for long-lived streams (a 2-core box relays 1,000 slow streams at once
# with 3 x 512, ~200 MB RSS); raise it if you hold more streams open than that.
threads = int(os.environ.get("GUNICORN_THREADS", "512"))
# Connections a worker holds at once. gthread parks idle keep-alive
# connections beyond its threads; only 128 of those, so a burst of streams
# spreads over the workers instead of queueing behind one worker's threads.
# (Equal to threads would turn keep-alive off altogether.)
worker_connections = int(os.environ.get("GUNICORN_WORKER_CONNECTIONS", str(threads + 128)))
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
    """Prepare the instance's run directory and take the settings in the master, before workers fork.

    An invalid file stops gunicorn here with one line per problem (status 1):
    there is no last good config yet. A valid one is kept as the last good
    copy that every worker booted later (respawn, HUP) starts from, so a file
    broken, opened or half-written since then never reaches a worker
    unguarded (proxy/config/last_good.py).
    """
    from proxy.config import last_good
    from proxy.config.exposure import refuse_or_exit
    from proxy.hop import SECRET_ENV

    settings, document, fingerprint = last_good.take()
    # The README's development key on a public address (PORT set binds 0.0.0.0) stops here.
    refuse_or_exit(settings, server.cfg.address)
    # One secret for the instance, shared by every worker forked from here: the hop id that
    # detects a provider pointing back at the proxy, and the demo upstream's secret (proxy/hop.py).
    # Always fresh: an instance started from another's environment must not share its id.
    os.environ[SECRET_ENV] = os.urandom(32).hex()
    # prometheus-client's multiprocess mode: every worker writes its values
    # under this directory and /metrics sums them. It must be set before a
    # worker imports prometheus_client, and start empty.
    directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if directory:
        os.makedirs(directory, exist_ok=True)
        for name in os.listdir(directory):
            if name.endswith(".db"):
                os.unlink(os.path.join(directory, name))
        # the operator page's per-worker activity files (proxy/activity.py) start empty too
        shutil.rmtree(os.path.join(directory, "activity"), ignore_errors=True)
    else:
        made = tempfile.mkdtemp(prefix="streamfold-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = made
        # In the environment, not a global: a HUP re-reads this file.
        os.environ["STREAMFOLD_METRICS_DIR_MADE"] = made
    last_good.keep(os.path.join(os.environ["PROMETHEUS_MULTIPROC_DIR"], "settings.last-good.yaml"),
                   settings, document, fingerprint)


def child_exit(server, worker):
    """A dead worker's live gauges (active streams) must stop counting."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)


def on_exit(server):
    made = os.environ.get("STREAMFOLD_METRICS_DIR_MADE")
    if made:
        shutil.rmtree(made, ignore_errors=True)


def worker_exit(server, worker):
    """Graceful stop (SIGTERM): write the usage this worker still holds (it is flushed ~1/s otherwise)."""
    from proxy.state.ticker import flush_all

    flush_all()

#!/usr/bin/env bash
# System tools the tests use, from Debian's packages, installed only if missing:
# redis-server (the Redis tests start real ones), wrk and nginx-light (the
# benchmark smoke test), chromium + chromium-driver + fonts (the operator
# page's browser tests; driver and browser come from one source package, so
# they always match), openssl (a self-signed certificate for the TLS upstream
# test). The tests start and stop their own processes on free
# loopback ports; the packages' own services are not needed.
set -euo pipefail
missing=()
command -v redis-server >/dev/null || missing+=(redis-server)
command -v wrk >/dev/null || missing+=(wrk)
command -v nginx >/dev/null || missing+=(nginx-light)
command -v chromium >/dev/null || missing+=(chromium)
command -v chromedriver >/dev/null || missing+=(chromium-driver)
[ -e /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf ] || missing+=(fonts-dejavu-core)
command -v openssl >/dev/null || missing+=(openssl)
[ ${#missing[@]} -eq 0 ] && exit 0
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
$sudo apt-get update -q
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q --no-install-recommends "${missing[@]}"

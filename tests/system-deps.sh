#!/usr/bin/env bash
# System tools the tests use, from Debian's packages, installed only if missing:
# redis-server (the Redis tests start real ones), wrk and nginx-light (the
# benchmark smoke test), chromium + chromium-driver + fonts (the operator
# page's browser tests; driver and browser come from one source package, so
# they always match), openssl (a self-signed certificate for the TLS upstream
# test), nodejs + npm (the agent tests' CLIs). The tests start and stop their
# own processes on free loopback ports; the packages' own services are not
# needed.
#
# Then the real Claude Code, Codex and Gemini CLIs the agent tests drive, pinned in
# tests/agents/package-lock.json, from the npm registry (their native
# binaries come inside platform packages npm picks from the lockfile; nothing
# else is downloaded; Gemini CLI is one bundled JavaScript package); installed again only when the
# lockfile changed.
set -euo pipefail
missing=()
command -v redis-server >/dev/null || missing+=(redis-server)
command -v wrk >/dev/null || missing+=(wrk)
command -v nginx >/dev/null || missing+=(nginx-light)
command -v chromium >/dev/null || missing+=(chromium)
command -v chromedriver >/dev/null || missing+=(chromium-driver)
[ -e /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf ] || missing+=(fonts-dejavu-core)
command -v openssl >/dev/null || missing+=(openssl)
command -v node >/dev/null || missing+=(nodejs)
command -v npm >/dev/null || missing+=(npm)
if [ ${#missing[@]} -ne 0 ]; then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -q
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

agents="$(cd "$(dirname "$0")/agents" && pwd)"
stamp="$agents/node_modules/.installed-from-lock"
if ! cmp -s "$agents/package-lock.json" "$stamp" || [ ! -x "$agents/node_modules/.bin/claude" ] \
    || [ ! -x "$agents/node_modules/.bin/codex" ] || [ ! -x "$agents/node_modules/.bin/gemini" ]; then
  (cd "$agents" && npm ci --no-audit --no-fund --loglevel=error)
  # Claude Code's postinstall puts the platform's binary in place of a stub; an npm that
  # held back install scripts left the stub, so run it (it only links a file npm installed).
  "$agents/node_modules/.bin/claude" --version >/dev/null 2>&1 \
    || node "$agents/node_modules/@anthropic-ai/claude-code/install.cjs"
  "$agents/node_modules/.bin/claude" --version >/dev/null
  "$agents/node_modules/.bin/codex" --version >/dev/null
  "$agents/node_modules/.bin/gemini" --version >/dev/null
  cp "$agents/package-lock.json" "$stamp"
fi

#!/usr/bin/env bash
# Browser test of the web UI: Debian's chromium, driven by playwright-core,
# against an aggregator filled with known data through its ingress
# (aggregator/examples/ui_fixture.rs). Screenshots go to artifacts/.
#
# Usage: bash aggregator/ui/tests/run.sh   (as root on Debian 12; CI runs it)
# Prints `N passed, M failed` last and exits non-zero when anything failed.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../../.." && pwd)"
export DEBIAN_FRONTEND=noninteractive

fail() {
  echo "ui tests: $*" >&2
  echo "0 passed, 1 failed"
  exit 1
}

apt_updated=""
apt_install() {
  [ -n "$apt_updated" ] || { apt-get update -qq; apt_updated=1; }
  apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}
[ -x /usr/bin/chromium ] || apt_install chromium || fail "installing chromium failed"
command -v npm >/dev/null || apt_install nodejs npm || fail "installing node and npm failed"

echo "== npm ci"
(cd "$here" && npm ci --no-audit --no-fund --loglevel=error) || fail "npm ci failed"

echo "== building the fixture aggregator"
fixture="$(cd "$root" && cargo build --locked --workspace --example ui_fixture --message-format=json-render-diagnostics \
  | sed -n 's/.*"executable":"\([^"]*ui_fixture\)".*/\1/p' | tail -n 1)" || fail "building the ui_fixture example failed"
[ -x "$fixture" ] || fail "the ui_fixture example did not build"

token="ui-test-$RANDOM-$RANDOM"
log="$(mktemp)"
"$fixture" --port 0 --token "$token" >"$log" 2>&1 &
pid=$!
cleanup() {
  kill "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  rm -f "$log"
}
trap cleanup EXIT

url=""
for _ in $(seq 1 600); do
  url="$(sed -n 's/^ready //p' "$log")"
  [ -n "$url" ] && break
  kill -0 "$pid" 2>/dev/null || { cat "$log" >&2; fail "the fixture aggregator exited before it was ready"; }
  sleep 0.2
done
[ -n "$url" ] || { cat "$log" >&2; fail "the fixture aggregator was not ready within 120 s"; }
echo "== fixture aggregator at $url"

mkdir -p "$here/artifacts"
APERTURE_UI_URL="$url" APERTURE_UI_TOKEN="$token" node "$here/ui.test.mjs"

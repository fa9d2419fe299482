#!/usr/bin/env bash
# What the tests need from the system beyond the venv: Debian's headless Chromium and its
# WebDriver (tests/suite/serve_page.rs drives the chat page of `llmlab serve` in it through
# tests/reference/browser_chat.py). `make test` (and so .ci/run) runs this first.
# Idempotent: quiet when everything is installed; installs what is missing with apt-get as root;
# without root or apt-get it says what is missing (the tests that need it then fail) and goes on.
# The tests start their own processes (servers, the browser): no service runs in the background.
set -euo pipefail
PACKAGES=(chromium chromium-driver)

missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0

if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
  echo "test_services: ${missing[*]} not installed and no root/apt-get here to install them;" \
    "the browser tests (serve_page::) will fail: apt-get install ${missing[*]}" >&2
  exit 0
fi
echo "test_services: apt-get install ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
log="$(mktemp)"
# The package lists may be missing or stale on a fresh machine: update once, then install.
if ! apt-get install -y -q "${missing[@]}" >"$log" 2>&1; then
  apt-get update -q >>"$log" 2>&1 || true
  apt-get install -y -q "${missing[@]}" >>"$log" 2>&1 || { tail -20 "$log" >&2; rm -f "$log"; exit 1; }
fi
rm -f "$log"
/usr/bin/chromium --version

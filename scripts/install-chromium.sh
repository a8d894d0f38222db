#!/usr/bin/env bash
# Install headless Chromium (Debian's package) for the web page test (tests/it/web_browser.rs), which
# skips without it unless MMRUN_REQUIRE_CHROMIUM=1. Idempotent.
set -euo pipefail
if command -v chromium >/dev/null 2>&1; then
  exit 0
fi
SUDO=""
[ "$(id -u)" = 0 ] || SUDO=sudo
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium

#!/usr/bin/env bash
# What the browser tests (tests/test_web_panel.py) need; for `.ci/run` (the lead adds these lines there).
# Debian's chromium and node, and playwright-core from npm (pinned by package-lock.json). Never a browser download:
# playwright-core has no browser and the tests launch /usr/bin/chromium.
set -euo pipefail
cd "$(dirname "$0")"
if ! command -v chromium >/dev/null || ! command -v node >/dev/null; then
  apt-get update -qq && apt-get install -y -qq chromium nodejs npm
fi
[ -d node_modules/playwright-core ] || PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 npm ci --no-audit --no-fund

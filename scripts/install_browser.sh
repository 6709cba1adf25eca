#!/usr/bin/env bash
# Installs what the browser test (tests/integration/test_page_browser.py) drives: Debian's
# chromium (Playwright's own browser download is not used: it fetches from a CDN) and the
# Playwright Python package pinned in pyproject.toml's test extras.  Idempotent; scripts/test.sh
# calls it.  Needs root (or sudo) for apt-get when chromium is missing.
set -euo pipefail
if ! command -v chromium >/dev/null 2>&1; then
  SUDO=""
  if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
  $SUDO apt-get update -q
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q chromium
fi
python3 -c "import playwright" 2>/dev/null || python3 -m pip install -q "playwright==1.65.2"
echo "chromium: $(command -v chromium)"

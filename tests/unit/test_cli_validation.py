"""Every wrong CLI option or DELF_ES_* value is a one-line typed error before the model loads
(issue 15 item 6); limits and counts that used to be silently ignored are refused."""

from __future__ import annotations

import os

import pytest
from hypothesis import given, settings as hsettings, strategies as st
from typer.testing import CliRunner

from delf_es.cli import app
from delf_es.errors import InvalidRequest
from delf_es.validation import InvalidSetting, load_settings, preflight, unknown_variables

pytestmark = pytest.mark.timeout(120)
runner = CliRunner()


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("DELF_ES_DATA_DIR", str(tmp_path / "index"))
    for name in ("DELF_ES_ES_URL", "DELF_ES_REDIS_URL"):
        monkeypatch.delenv(name, raising=False)
    return tmp_path


def _one_line_error(result) -> str:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and result.exception is None or isinstance(result.exception, SystemExit)
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.output
    return errors[0]


BAD_OPTIONS = [
    (["--max-features", "-5", "stats"], "--max-features -5"),
    (["--max-features", "0", "stats"], "--max-features 0"),  # was silently ignored
    (["--scales", "a,b", "stats"], "--scales"),
    (["--scales", "0,1", "stats"], "--scales"),
    (["--scales", "nan", "stats"], "--scales"),
    (["--scales", "", "stats"], "--scales"),
    (["--device", "cuda", "extract", "x.jpg"], "no CUDA GPU"),
    (["--device", "tpu", "extract", "x.jpg"], "not a device"),
    (["--backbone", "bogus", "extract", "x.jpg"], "unknown backbone"),
    (["--scoring", "bogus", "extract", "x.jpg"], "scoring must be"),
    (["--pca", "/nonexistent.npz", "extract", "x.jpg"], "--pca"),
    (["--attention-weights", "/dev/zero", "extract", "x.jpg"], "not a regular file"),
    (["index", "@missing.txt"], "not found"),
    (["index", "--metadata", "nope", "x.jpg"], "--metadata"),
    (["index", "--metadata", "[1, 2]", "x.jpg"], "JSON object"),
    (["index", "--metadata", '{"": 1}', "x.jpg"], "non-empty string keys"),
    (["index", "--metadata", '{"a": NaN}', "x.jpg"], "JSON"),
    (["search", "x.jpg", "--filter", "nope"], "--filter"),
    (["search", "x.jpg", "--filter", '{"wildcard": {"a": "b*"}}'], "wildcard"),
    (["search", "x.jpg", "--filter", '{"term": {}}'], "term"),
    (["match", "a.jpg", "b.jpg", "--model", "bogus"], "ransac_model"),
]


@pytest.mark.parametrize("args, expected", BAD_OPTIONS, ids=[" ".join(a) for a, _ in BAD_OPTIONS])
def test_a_wrong_option_is_one_typed_line(args, expected):
    line = _one_line_error(runner.invoke(app, args))
    assert expected in line


BAD_VARIABLES = [
    ("DELF_ES_SHORTLIST_MODE", "bogus", "shortlist_mode must be"),
    ("DELF_ES_MAX_FEATURE_NUM", "-1", "DELF_ES_MAX_FEATURE_NUM"),
    ("DELF_ES_SCALES", "abc", "JSON list"),
    ("DELF_ES_RANSAC_PX", "-3", "DELF_ES_RANSAC_PX"),
    ("DELF_ES_ID_FROM", "name", "id_from must be"),
    ("DELF_ES_COMMIT_SECONDS", "-1", "DELF_ES_COMMIT_SECONDS"),
    ("DELF_ES_DATA_DIR", "/proc/nope/index", "cannot create"),
    ("DELF_ES_DATA_DIR", "/dev/null", "not a folder"),
    ("DELF_ES_ES_URL", "localhost:9200", "scheme"),
    ("DELF_ES_REDIS_URL", "http://127.0.0.1:6379", "scheme"),
    ("DELF_ES_ES_URL", "http://127.0.0.1:99999", "not a URL"),
]


@pytest.mark.parametrize("name, value, expected", BAD_VARIABLES, ids=[f"{n}={v}" for n, v, _ in BAD_VARIABLES])
def test_a_wrong_variable_is_one_typed_line_naming_it(monkeypatch, name, value, expected):
    monkeypatch.setenv(name, value)
    line = _one_line_error(runner.invoke(app, ["search", "x.jpg"]))
    assert expected in line


def test_an_unknown_variable_is_reported_with_a_suggestion():
    assert unknown_variables({"DELF_ES_MAX_FEATURES": "3", "DELF_ES_ES_PORT": "9260", "HOME": "/root"}) == [
        "DELF_ES_MAX_FEATURES is not a delf-es setting (did you mean DELF_ES_MAX_FEATURE_NUM?)"]


def test_search_limit_below_one_is_refused_in_the_cli_and_the_sdk():
    result = runner.invoke(app, ["search", "x.jpg", "--limit", "-1"])
    assert result.exit_code == 2 and "--limit" in result.output
    from delf_es.sdk import DelfEs

    engine = DelfEs(load_settings())
    for limit in (-1, 0, "5", 2.5, True):
        with pytest.raises(InvalidRequest, match="limit"):
            engine.search_image("x.jpg", limit=limit)


def test_preflight_accepts_the_defaults(tmp_path):
    settings = preflight(load_settings({"data_dir": tmp_path / "i"}), model=True, index=True)
    assert (tmp_path / "i").is_dir() and settings.device == "cpu"


@hsettings(max_examples=60, deadline=None)
@given(st.text(max_size=12))
def test_any_max_features_text_is_a_clean_outcome(value):
    result = runner.invoke(app, ["--max-features", value, "--device", "tpu", "extract", "x.jpg"])
    # typer refuses non-integers (usage error, exit 2); integers reach validation: exit 2, one line
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert isinstance(result.exception, SystemExit)


@hsettings(max_examples=60, deadline=None)
@given(st.text(max_size=16))
def test_any_scales_text_is_accepted_only_when_it_is_positive_numbers(value):
    result = runner.invoke(app, ["--scales", value, "--device", "tpu", "extract", "x.jpg"])
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit), result.output
    try:
        valid = all(float(v) > 0 and float(v) < float("inf") for v in value.split(","))
    except ValueError:
        valid = False
    # a valid --scales gets as far as the --device check; an invalid one is named
    assert ("--device" in result.output) == valid, result.output


def test_invalid_setting_pickles():
    import pickle

    error = InvalidSetting("must be >= 1", "--max-features -5")
    assert str(pickle.loads(pickle.dumps(error))) == "--max-features -5: must be >= 1"
    assert os.environ.get("DELF_ES_DATA_DIR")


def test_elasticsearch_down_is_one_line_with_the_url_and_what_to_do(tmp_path):
    """A closed port is what a stopped server looks like (issue 15 item 9: ~60 lines of urllib3
    retry tracebacks used to come first).  A real subprocess: logging as users get it."""
    import subprocess
    import sys

    env = {**os.environ, "DELF_ES_ES_URL": "http://127.0.0.1:9", "DELF_ES_ES_TIMEOUT": "3", "COLUMNS": "80"}
    done = subprocess.run([sys.executable, "-m", "delf_es.cli", "stats"], env=env, capture_output=True, text=True,
                          timeout=120)
    lines = [line for line in (done.stdout + done.stderr).splitlines() if line.strip()]
    assert done.returncode == 2 and len(lines) == 1, lines
    assert "http://127.0.0.1:9" in lines[0] and "is it running" in lines[0] and "Traceback" not in lines[0]

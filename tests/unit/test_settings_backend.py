"""The backend choice is one explicit setting ('auto' by default) and the embedded index's knobs
are reachable from Settings (and so from DELF_ES_* variables)."""

from __future__ import annotations

import pytest
from delf_es.errors import InvalidSetting

from delf_es.errors import ConfigurationError
from delf_es.index.embedded import EmbeddedBackend
from delf_es.sdk import open_backend
from delf_es.settings import Settings


def test_auto_picks_elasticsearch_only_when_a_url_is_set():
    assert Settings(es_url=None).index_backend() == "embedded"
    assert Settings(es_url="http://127.0.0.1:1").index_backend() == "elasticsearch"
    assert Settings(es_url="http://127.0.0.1:1", backend="embedded").index_backend() == "embedded"


def test_the_search_plan_follows_the_chosen_backend():
    forced = Settings(es_url="http://127.0.0.1:1", backend="embedded")
    assert forced.search_plan() == Settings(es_url=None).search_plan() == ("hybrid", "knn")


def test_an_unknown_backend_is_refused():
    with pytest.raises(InvalidSetting, match="backend=sqlite: backend must be"):
        Settings(backend="sqlite")


def test_elasticsearch_without_a_url_is_a_configuration_error():
    with pytest.raises(ConfigurationError, match="DELF_ES_ES_URL"):
        open_backend(Settings(backend="elasticsearch", es_url=None))


def test_embedded_knobs_reach_the_backend(tmp_path, monkeypatch):
    monkeypatch.setenv("DELF_ES_EMBEDDED_NPROBE", "4")
    settings = Settings(data_dir=tmp_path, es_url=None, embedded_exact_limit=0)
    backend = open_backend(settings, model_id="m@1")
    try:
        assert isinstance(backend, EmbeddedBackend)
        assert (backend.exact_limit, backend.nprobe) == (0, 4)
    finally:
        backend.close()


def test_an_embedded_backend_is_used_even_with_a_url_when_asked(tmp_path):
    backend = open_backend(Settings(data_dir=tmp_path, es_url="http://127.0.0.1:1", backend="embedded"))
    try:
        assert isinstance(backend, EmbeddedBackend)
    finally:
        backend.close()


def test_settings_built_in_code_refuse_a_bad_value_with_one_typed_line(monkeypatch):
    # the SDK's users build Settings themselves: they get what the command line gets
    with pytest.raises(InvalidSetting) as bad:
        Settings(max_feature_num=-1)
    assert str(bad.value) == "max_feature_num=-1: Input should be greater than or equal to 1"
    assert bad.value.field == "max_feature_num" and isinstance(bad.value, ValueError)
    with pytest.raises(InvalidSetting, match=r"max_features=3: not a setting \(did you mean max_feature_num\?\)"):
        Settings(max_features=3)
    monkeypatch.setenv("DELF_ES_SCALES", "not json")
    with pytest.raises(InvalidSetting, match="DELF_ES_SCALES='not json': cannot parse the value"):
        Settings()

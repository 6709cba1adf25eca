"""The model a worker task names: a ModelSpec's JSON from the submitter, None for the worker's own,
or (messages queued by a release before the spec) a dict of Settings overrides.  No broker: the
submitter is wired to a FAKE app that records the messages it would send."""

from __future__ import annotations

import contextlib
import json
from types import SimpleNamespace

import pytest

from delf_es.errors import InvalidRequest, InvalidSetting, ModelMismatch, UnknownBackbone
from delf_es.model.spec import SPEC_FORMAT, ModelSpec
from delf_es.settings import Settings
from delf_es.workers.app import WorkerContext
from delf_es.workers.reindex import Reindexer
from delf_es.workers.submit import Submitter


@pytest.fixture()
def settings() -> Settings:
    return Settings(redis_url="redis://127.0.0.1:1/3", backbone="efficientnet-lite0", max_feature_num=200)


def test_a_task_without_a_model_runs_the_workers_own(settings):
    ctx = WorkerContext(settings)
    assert ctx.model_spec(None) == ctx.spec == ModelSpec.from_settings(settings)
    assert ctx.spec.model_id.startswith("efficientnet-lite0.expand-norm-pca40-")


def test_a_task_with_a_spec_runs_exactly_that_model_whatever_the_workers_settings(settings):
    spec = ModelSpec(backbone="mobilenetv2", scales=(0.5, 1.0), max_feature_num=300)
    message = json.loads(json.dumps(spec.to_json()))
    chosen = WorkerContext(settings).model_spec(message)
    assert chosen == spec and chosen.model_id == spec.model_id
    assert chosen.max_feature_num == 300  # the sender's sampling too, not the worker's 200


def test_an_old_message_of_settings_overrides_still_applies_over_the_workers_settings(settings):
    legacy = {"backbone": "mobilenetv2", "use_pca": False}  # what `delf-es reindex` sent before the spec
    chosen = WorkerContext(settings).model_spec(legacy)
    assert chosen == ModelSpec.from_settings(settings.model_copy(update=legacy))
    assert chosen.model_id == "mobilenetv2.expand-norm-raw576@2f518e77" and chosen.max_feature_num == 200


@pytest.mark.parametrize("message, error", [
    ({"max_feature_num": -1}, InvalidSetting),                    # a bad legacy override
    ({"backbone": "vgg16"}, UnknownBackbone),
    ({"format": SPEC_FORMAT, "backbone": "vgg16"}, UnknownBackbone),
    ({"format": "delf-es-model/9"}, InvalidSetting),              # a newer release's message
])
def test_a_model_the_worker_cannot_build_is_a_typed_error_the_image_fails_with(settings, message, error):
    with pytest.raises(error):
        WorkerContext(settings).model_spec(message)


def test_a_spec_whose_files_differ_on_the_worker_fails_as_a_model_mismatch(settings):
    message = ModelSpec(backbone="mobilenetv2").to_json()
    message["model_id"] = "mobilenetv2.expand-norm-pca40-ffffffff@2f518e77"  # the sender's PCA
    with pytest.raises(ModelMismatch):
        WorkerContext(settings).model_spec(message)


def test_the_extractor_of_a_spec_message_has_the_senders_model_id(settings):
    spec = ModelSpec(backbone="mobilenetv2")
    ctx = WorkerContext(settings)
    extractor = ctx.extractor(spec.to_json())
    assert extractor.model_id == spec.model_id and extractor.settings.max_feature_num == spec.max_feature_num
    assert ctx.extractor(json.loads(json.dumps(spec.to_json()))) is extractor  # kept loaded
    assert extractor.settings.redis_url == settings.redis_url  # the worker's own process settings


class FakeStore:
    """FAKE workers.store.Store: counts jobs in memory."""

    prefix = "unit:"

    def __init__(self) -> None:
        self.jobs: dict[str, int] = {}

    def start_job(self, job_id: str, total: int) -> None:
        self.jobs[job_id] = total

    def fail(self, job_id: str, image_id: str, error: str) -> None:
        raise AssertionError(f"{image_id} refused: {error}")


class FakeApp:
    """FAKE Celery app: records send_task calls instead of talking to a broker."""

    def __init__(self, settings: Settings) -> None:
        self.delf = SimpleNamespace(settings=settings, store=FakeStore())
        self.sent: list[dict] = []

    def producer_or_acquire(self):
        return contextlib.nullcontext(None)

    def send_task(self, name, args, **options) -> None:
        self.sent.append({"name": name, "args": args, **options})


def test_the_submitter_sends_the_specs_json_form_in_every_message(settings):
    app = FakeApp(settings)
    spec = ModelSpec(backbone="mobilenetv2")
    Submitter(app).submit(["/photos/a.jpg", "/photos/b.jpg"], alias="build-g1", model=spec)
    messages = [sent["args"][0] for sent in app.sent]
    assert len(messages) == 2 and all(m["alias"] == "build-g1" for m in messages)
    assert all(m["model"] == spec.to_json() for m in messages)
    json.dumps(messages)  # a Celery message: JSON-serialisable
    Submitter(app).submit(["/photos/c.jpg"])
    assert app.sent[-1]["args"][0]["model"] is None  # the workers' own model


def test_the_submitter_and_the_reindexer_refuse_a_loose_dict_of_overrides(settings):
    with pytest.raises(InvalidRequest, match="ModelSpec"):
        Submitter(FakeApp(settings)).submit(["/photos/a.jpg"], model={"backbone": "mobilenetv2"})
    with pytest.raises(InvalidRequest, match="ModelSpec"):
        Reindexer(settings.model_copy(update={"es_url": "http://127.0.0.1:1"}), None, {"backbone": "mobilenetv2"})


@pytest.mark.parametrize("arguments, words", [
    (["reindex", "--backbone", "mobilenetv2", "--pca", "PCA_LITE2"], "fitted for efficientnet-lite2/expand"),
    (["--backbone", "resnet50", "reindex"], "no weight file given"),
    (["reindex", "--backbone", "vgg16"], "unknown backbone 'vgg16'"),
])
def test_reindex_refuses_a_target_model_it_cannot_name_before_contacting_any_service(arguments, words, monkeypatch):
    """The target spec (this run's settings + the reindex options) is built first: a bad one is a
    one-line error, with no worker, Redis or Elasticsearch reached (none runs at these URLs)."""
    from typer.testing import CliRunner

    from delf_es.cli import app
    from delf_es.model.weights import PROJECT_WEIGHTS_DIR

    monkeypatch.setenv("DELF_ES_ES_URL", "http://127.0.0.1:1")
    monkeypatch.setenv("DELF_ES_REDIS_URL", "redis://127.0.0.1:1/0")
    pca = str(PROJECT_WEIGHTS_DIR / "pca-efficientnet-lite2-expand-norm-40.npz")
    result = CliRunner().invoke(app, [pca if a == "PCA_LITE2" else a for a in arguments])
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and words in errors[0], result.output

"""Check every setting and option before any work starts, with one-line typed errors.

Entry points (CLI, workers, HTTP server) build their :class:`Settings` through
:func:`load_settings` and call :func:`preflight` before loading the model, so a wrong value is
reported in a second, naming where it came from (``--max-features -5`` or
``DELF_ES_SHORTLIST_MODE=bogus``), and never as a pydantic or torch traceback after ~9 s of
extraction.  Checks beyond the field validators of :class:`Settings`:

* the device exists (``cuda`` needs a visible CUDA GPU);
* weight and PCA files named by the settings are regular, readable files (a FIFO would hang
  ``torch.load``);
* the embedded index folder can be created and written;
* service URLs have a usable scheme and host;
* ``DELF_ES_*`` variables that are not settings are reported (a typo would otherwise be
  silently ignored), except the ones the service tooling reads.
"""

from __future__ import annotations

import difflib
import json
import os
import stat
from pathlib import Path
from typing import Any, Mapping
from urllib.parse import urlsplit

from delf_es.errors import InvalidSetting  # re-exported: callers import it from here too
from delf_es.settings import ENV_PREFIX, Settings, setting_source

__all__ = ["InvalidSetting", "SERVICE_VARIABLES", "load_settings", "parse_json_object", "preflight",
           "unknown_variables"]

#: ``DELF_ES_*`` variables that are not :class:`Settings` fields: what ``delf-es services start``
#: prints (``*_STARTED``), the test fixture's switch and docker-compose's.  (The services' own
#: ports, heap, home... are settings.)
SERVICE_VARIABLES = frozenset({
    "DELF_ES_ES_STARTED", "DELF_ES_REDIS_STARTED", "DELF_ES_ES_VERSION", "DELF_ES_KEEP_SERVICES", "DELF_ES_IMAGES_DIR",
})


def _source(field: str, options: Mapping[str, str], overrides: Mapping[str, Any]) -> str:
    return setting_source(field, overrides, options)


def load_settings(overrides: Mapping[str, Any] | None = None, options: Mapping[str, str] | None = None) -> Settings:
    """``Settings(**overrides)`` (the environment fills the rest) with a one-line typed error.

    Args:
        overrides: field -> value from command-line options or code.
        options: field -> option name (``{"max_feature_num": "--max-features"}``), for messages.

    Raises:
        InvalidSetting: the first invalid value, named by option or variable.
    """
    overrides = dict(overrides or {})
    options = dict(options or {})
    try:
        return Settings(**overrides)
    except InvalidSetting as error:  # named by the command line's option where there is one
        if error.field in options and error.field in overrides:
            raise InvalidSetting(error.message, _source(error.field, options, overrides), error.field) from None
        raise


def unknown_variables(environ: Mapping[str, str] | None = None) -> list[str]:
    """``DELF_ES_*`` variables that are neither settings nor service variables, each with a
    suggestion when one is close (``DELF_ES_MAX_FEATURES -> DELF_ES_MAX_FEATURE_NUM?``)."""
    environ = os.environ if environ is None else environ
    known = {ENV_PREFIX + f.upper() for f in Settings.model_fields} | SERVICE_VARIABLES
    out = []
    for name in sorted(environ):
        if name.upper().startswith(ENV_PREFIX) and name.upper() not in known:
            close = difflib.get_close_matches(name.upper(), sorted(known), n=1)
            out.append(f"{name} is not a delf-es setting" + (f" (did you mean {close[0]}?)" if close else ""))
    return out


def parse_json_object(text: str | None, option: str, example: str = '{"city": "paris"}') -> dict[str, Any] | None:
    """The JSON object given to ``option`` (``--metadata``, ``--filter``), or None when unset.

    Raises:
        InvalidSetting: not JSON, or not an object.
    """
    if text is None:
        return None
    try:
        value = json.loads(text)
    except (ValueError, RecursionError) as error:
        raise InvalidSetting(f"not valid JSON ({error}); e.g. {example}", option) from None
    if not isinstance(value, dict):
        raise InvalidSetting(f"must be a JSON object {{...}}, got {type(value).__name__}", option)
    return value


def _check_file(path: Path | None, field: str, options: Mapping[str, str], overrides: Mapping[str, Any]) -> None:
    if path is None:
        return
    where = _source(field, options, overrides)
    try:
        info = os.stat(path)
    except OSError as error:
        raise InvalidSetting(f"cannot read {path}: {error.strerror or error}", where) from None
    if not stat.S_ISREG(info.st_mode):
        raise InvalidSetting(f"{path} is not a regular file", where)
    if not os.access(path, os.R_OK):
        raise InvalidSetting(f"{path} is not readable", where)


def _check_device(device: str, where: str) -> None:
    import torch

    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        raise InvalidSetting("not a device; use cpu, cuda or cuda:N", where) from None
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise InvalidSetting("no CUDA GPU is available here (torch.cuda.is_available() is False); use cpu", where)
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise InvalidSetting(f"only {torch.cuda.device_count()} CUDA device(s)", where)
    elif parsed.type != "cpu":
        raise InvalidSetting(f"unsupported device type {parsed.type!r}; use cpu or cuda", where)


def _check_url(url: str | None, schemes: tuple[str, ...], where: str) -> None:
    if not url:
        return
    try:
        parts = urlsplit(url)
        port = parts.port  # raises ValueError on a bad port
    except ValueError as error:
        raise InvalidSetting(f"not a URL ({error})", where) from None
    if parts.scheme not in schemes:
        raise InvalidSetting(f"the scheme must be {' or '.join(schemes)}, e.g. {schemes[0]}://127.0.0.1", where)
    if parts.scheme != "unix" and not parts.hostname:
        raise InvalidSetting("the URL has no host", where)
    del port


def _check_data_dir(folder: Path, where: str, create: bool) -> None:
    target = Path(folder)
    if target.exists() and not target.is_dir():
        raise InvalidSetting(f"{target} exists and is not a folder", where)
    if create:
        try:
            target.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise InvalidSetting(f"cannot create {target}: {error.strerror or error}", where) from None
    if target.exists() and not os.access(target, os.W_OK | os.X_OK):
        raise InvalidSetting(f"{target} is not writable", where)


def preflight(
    settings: Settings,
    *,
    model: bool = True,
    index: bool = False,
    overrides: Mapping[str, Any] | None = None,
    options: Mapping[str, str] | None = None,
) -> Settings:
    """Check what the field validators cannot, before anything heavy runs; returns ``settings``.

    Args:
        model: the command will load the model (device, backbone, weights and PCA files).
        index: the command opens the index (URLs; the embedded folder is created).
        overrides, options: as given to :func:`load_settings`, to name the source in messages.

    Raises:
        InvalidSetting: the first problem found.
    """
    overrides = dict(overrides or {})
    options = dict(options or {})
    if model:
        from delf_es.model.registry import get_preset  # light: no torch model is built
        from delf_es.errors import UnknownBackbone

        try:
            get_preset(settings.backbone)
        except (UnknownBackbone, KeyError) as error:
            raise InvalidSetting(str(error).strip("'\""), _source("backbone", options, overrides)) from None
        _check_device(settings.device, _source("device", options, overrides))
        for field in ("backbone_weights", "attention_weights", "pca_path"):
            _check_file(getattr(settings, field), field, options, overrides)
    if index:
        for url in (settings.es_url or "").split(","):  # one URL per node of a cluster
            _check_url(url.strip(), ("http", "https"), _source("es_url", options, overrides))
        _check_url(settings.redis_url, ("redis", "rediss", "unix"), _source("redis_url", options, overrides))
        _check_url(settings.worker_redis_url, ("redis", "rediss", "unix"), _source("worker_redis_url", options, overrides))
        if not settings.es_url:
            _check_data_dir(settings.data_dir, _source("data_dir", options, overrides), create=True)
    return settings

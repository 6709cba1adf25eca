"""Load the delf-es saved objects (``mappings/kibana/delf-es.ndjson``: data views on the image alias
and on its failures index, the operations dashboard) into Kibana through its saved-objects API."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import urllib3

from delf_es.errors import KibanaUnavailable
from delf_es.index.es.templates import MAPPINGS_DIR
from delf_es.index.es.failures import failures_index

SAVED_OBJECTS = MAPPINGS_DIR / "kibana" / "delf-es.ndjson"
#: The data views' titles in the file, replaced by ``alias`` / its failures index on import.
DEFAULT_ALIAS = "delf-images"


def saved_objects(path: Path = SAVED_OBJECTS, alias: str = DEFAULT_ALIAS) -> list[dict[str, Any]]:
    """The objects of ``path``, with the data views pointed at ``alias`` and ``<alias>-failures``."""
    titles = {DEFAULT_ALIAS: alias, failures_index(DEFAULT_ALIAS): failures_index(alias)}
    objects = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    for obj in objects:
        if obj["type"] == "index-pattern":
            obj["attributes"]["title"] = titles.get(obj["attributes"]["title"], obj["attributes"]["title"])
    return objects


def import_saved_objects(
    kibana_url: str, alias: str = DEFAULT_ALIAS, path: Path = SAVED_OBJECTS, overwrite: bool = True,
    timeout: float = 30.0, auth: tuple[str, str] | None = None,
) -> dict[str, Any]:
    """POST the objects to ``<kibana_url>/api/saved_objects/_import`` (multipart ``file``); returns
    Kibana's answer.  Raises KibanaUnavailable when Kibana refuses them or cannot be reached."""
    body = "".join(json.dumps(obj) + "\n" for obj in saved_objects(path, alias)).encode()
    fields = {"file": ("delf-es.ndjson", body, "application/ndjson")}
    data, content_type = urllib3.encode_multipart_formdata(fields)
    headers = {"kbn-xsrf": "delf-es", "Content-Type": content_type}
    if auth:
        headers.update(urllib3.make_headers(basic_auth=f"{auth[0]}:{auth[1]}"))
    url = kibana_url.rstrip("/") + "/api/saved_objects/_import" + ("?overwrite=true" if overwrite else "")
    try:
        response = urllib3.request("POST", url, body=data, headers=headers, timeout=timeout, retries=False)
    except urllib3.exceptions.HTTPError as exc:
        raise KibanaUnavailable(f"Kibana at {kibana_url} unreachable: {exc}") from exc
    try:
        answer = json.loads(response.data or b"{}")
    except ValueError:
        answer = {"raw": response.data[:500].decode(errors="replace")}
    if response.status >= 300 or not answer.get("success", False):
        raise KibanaUnavailable(f"Kibana refused the saved objects (HTTP {response.status}): {json.dumps(answer)[:2000]}")
    return answer

"""Metadata filters for the embedded backend: the Elasticsearch query subset term / terms /
range / exists / bool (filter, must, must_not, should, minimum_should_match) / match_all /
match_none, compiled to a predicate over an image's metadata mapping.  Field names are
``metadata.<key>`` (as on the Elasticsearch index) or the bare key; dots walk nested objects."""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping

from delf_es.errors import UnsupportedFilter
from delf_es.index.base import MetadataFilter

__all__ = ["Predicate", "compile_filter"]


Predicate = Callable[[Mapping[str, Any]], bool]
_Scalar = (str, int, float, bool)


def compile_filter(metadata_filter: MetadataFilter | None) -> Predicate:
    """Turn an Elasticsearch query on ``metadata`` into a predicate on a metadata mapping.

    Supported (anything else raises :class:`~delf_es.errors.UnsupportedFilter`):

    * ``term``: ``{"term": {field: value}}`` or ``{field: {"value": v}}``;
    * ``terms``: ``{"terms": {field: [v, ...]}}``;
    * ``range``: ``{"range": {field: {"gt"|"gte"|"lt"|"lte": bound, ...}}}``;
    * ``exists``: ``{"exists": {"field": field}}`` (a null or empty value does not exist);
    * ``bool`` with ``filter``, ``must`` (all), ``must_not`` (none), ``should`` (at least
      ``minimum_should_match``: 1 when there is no must/filter, else 0);
    * ``match_all``, ``match_none``; ``boost`` is accepted and ignored everywhere.

    Fields are ``metadata.<key>`` (as on the Elasticsearch index) or the bare ``<key>``;
    dots walk into nested objects.  As in Elasticsearch, an array matches when any of its
    elements does, strings compare exactly (keywords) and numbers numerically, and a
    query value is coerced to the stored value's type ("2020" matches 2020, 2020 matches
    "2020", "true" matches True).  Ranges on strings compare lexicographically.

    Args:
        metadata_filter: the query, or None for "every image".

    Returns:
        A function ``metadata -> bool``.  Validation happens here, once, not per image.
    """
    if metadata_filter is None:
        return _always
    return _compile(metadata_filter, "filter")


def _always(metadata: Mapping[str, Any]) -> bool:
    return True


def _never(metadata: Mapping[str, Any]) -> bool:
    return False


def _compile(clause: Any, where: str) -> Predicate:
    if not isinstance(clause, Mapping) or len(clause) != 1:
        raise UnsupportedFilter(f"{where}: expected an object with exactly one query clause, got {clause!r}", where)
    ((kind, body),) = clause.items()
    compiler = _COMPILERS.get(kind)
    if compiler is None:
        raise UnsupportedFilter(
            f"{where}: query clause {kind!r} is not supported by the embedded index "
            f"(supported: {', '.join(sorted(_COMPILERS))})",
            str(kind),
        )
    return compiler(body, f"{where}.{kind}")


def _options(body: Any, where: str, allowed: set[str]) -> Mapping[str, Any]:
    if not isinstance(body, Mapping):
        raise UnsupportedFilter(f"{where}: expected an object, got {body!r}", where)
    unknown = set(body) - allowed - {"boost"}
    if unknown:
        raise UnsupportedFilter(f"{where}: unsupported option(s) {sorted(unknown)}", where)
    return body


def _single_field(body: Any, where: str) -> tuple[list[str], Any]:
    if not isinstance(body, Mapping):
        raise UnsupportedFilter(f"{where}: expected {{field: ...}}, got {body!r}", where)
    fields = [key for key in body if key != "boost"]
    if len(fields) != 1:
        raise UnsupportedFilter(f"{where}: expected exactly one field, got {fields}", where)
    return _field_path(fields[0], where), body[fields[0]]


def _field_path(field: Any, where: str) -> list[str]:
    if not isinstance(field, str) or not field or field == "metadata":
        raise UnsupportedFilter(f"{where}: invalid field name {field!r}", where)
    if field.startswith("metadata."):
        field = field[len("metadata.") :]
    parts = field.split(".")
    if any(not part for part in parts):
        raise UnsupportedFilter(f"{where}: invalid field name {field!r}", where)
    return parts


def _check_scalar(value: Any, where: str) -> Any:
    if not isinstance(value, _Scalar) or (isinstance(value, float) and not math.isfinite(value)):
        raise UnsupportedFilter(f"{where}: expected a string, number or boolean, got {value!r}", where)
    return value


def _lookup(obj: Any, parts: list[str]) -> list[Any]:
    """Raw values at a dotted path; arrays of objects are walked, dotted keys honoured."""
    if not parts:
        return [obj]
    if isinstance(obj, list):
        return [found for item in obj for found in _lookup(item, parts)]
    if not isinstance(obj, Mapping):
        return []
    found: list[Any] = []
    for cut in range(1, len(parts) + 1):
        key = ".".join(parts[:cut])
        if key in obj:
            found.extend(_lookup(obj[key], parts[cut:]))
    return found


def _leaves(values: list[Any]) -> list[Any]:
    """Flatten arrays; drop nulls and objects (which have no value of their own)."""
    out: list[Any] = []
    for value in values:
        if isinstance(value, list):
            out.extend(_leaves(value))
        elif value is not None and not isinstance(value, Mapping):
            out.append(value)
    return out


def _has_value(value: Any) -> bool:
    if value is None:
        return False
    if isinstance(value, list):
        return any(_has_value(item) for item in value)
    if isinstance(value, Mapping):
        return any(_has_value(item) for item in value.values())
    return True


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _as_bool(value: Any) -> bool | None:
    if isinstance(value, bool):
        return value
    if value in ("true", "false"):
        return value == "true"
    return None


def _as_float(value: Any) -> float | None:
    if _is_number(value):
        return float(value)
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _as_keyword(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _term_equal(stored: Any, query: Any) -> bool:
    """Elasticsearch-like equality: the stored value's type decides how the query is read."""
    if isinstance(stored, bool):
        return _as_bool(query) is stored
    if _is_number(stored):
        number = _as_float(query) if not isinstance(query, bool) else None
        return number is not None and float(stored) == number
    return stored == _as_keyword(query)


def _compare(stored: Any, bound: Any) -> int | None:
    """sign(stored - bound) in the stored value's type, or None when incomparable."""
    if isinstance(stored, bool) or isinstance(bound, bool):
        return None
    if _is_number(stored):
        number = _as_float(bound)
        if number is None:
            return None
        return (stored > number) - (stored < number)
    keyword = _as_keyword(bound)
    return (stored > keyword) - (stored < keyword)


def _compile_term(body: Any, where: str) -> Predicate:
    parts, value = _single_field(body, where)
    if isinstance(value, Mapping):
        value = _options(value, where, {"value"}).get("value")
    query = _check_scalar(value, where)
    return lambda metadata: any(_term_equal(v, query) for v in _leaves(_lookup(metadata, parts)))


def _compile_terms(body: Any, where: str) -> Predicate:
    parts, values = _single_field(body, where)
    if not isinstance(values, (list, tuple)):
        raise UnsupportedFilter(f"{where}: expected a list of values (terms lookup is not supported)", where)
    queries = [_check_scalar(v, where) for v in values]
    return lambda metadata: any(
        _term_equal(v, q) for v in _leaves(_lookup(metadata, parts)) for q in queries
    )


_RANGE_TESTS: dict[str, Callable[[int], bool]] = {
    "gt": lambda sign: sign > 0,
    "gte": lambda sign: sign >= 0,
    "lt": lambda sign: sign < 0,
    "lte": lambda sign: sign <= 0,
}


def _compile_range(body: Any, where: str) -> Predicate:
    parts, spec = _single_field(body, where)
    spec = _options(spec, where, set(_RANGE_TESTS))
    bounds = [(_RANGE_TESTS[op], _check_scalar(v, where)) for op, v in spec.items() if op in _RANGE_TESTS]

    def within(value: Any) -> bool:
        for test, bound in bounds:
            sign = _compare(value, bound)
            if sign is None or not test(sign):
                return False
        return True

    return lambda metadata: any(within(v) for v in _leaves(_lookup(metadata, parts)))


def _compile_exists(body: Any, where: str) -> Predicate:
    parts = _field_path(_options(body, where, {"field"}).get("field"), where)
    return lambda metadata: any(_has_value(v) for v in _lookup(metadata, parts))


def _clause_list(value: Any, where: str) -> list[Predicate]:
    clauses = value if isinstance(value, (list, tuple)) else [value]
    return [_compile(clause, f"{where}[{i}]") for i, clause in enumerate(clauses)]


def _compile_bool(body: Any, where: str) -> Predicate:
    body = _options(body, where, {"must", "filter", "must_not", "should", "minimum_should_match"})
    required = _clause_list(body.get("must", []), f"{where}.must") + _clause_list(
        body.get("filter", []), f"{where}.filter"
    )
    excluded = _clause_list(body.get("must_not", []), f"{where}.must_not")
    optional = _clause_list(body.get("should", []), f"{where}.should")
    minimum = body.get("minimum_should_match", 0 if required else 1 if optional else 0)
    if isinstance(minimum, str) and minimum.lstrip("-").isdigit():
        minimum = int(minimum)
    if isinstance(minimum, bool) or not isinstance(minimum, int):
        raise UnsupportedFilter(f"{where}: minimum_should_match must be an integer, got {minimum!r}", where)
    if minimum < 0:  # Elasticsearch: "-1" = all but one
        minimum = max(len(optional) + minimum, 0)

    def matches(metadata: Mapping[str, Any]) -> bool:
        if not all(p(metadata) for p in required) or any(p(metadata) for p in excluded):
            return False
        if minimum == 0:
            return True
        hits = 0
        for p in optional:
            hits += p(metadata)
            if hits >= minimum:
                return True
        return False

    return matches


def _compile_match_all(body: Any, where: str) -> Predicate:
    _options(body, where, set())
    return _always


def _compile_match_none(body: Any, where: str) -> Predicate:
    _options(body, where, set())
    return _never


_COMPILERS: dict[str, Callable[[Any, str], Predicate]] = {
    "term": _compile_term,
    "terms": _compile_terms,
    "range": _compile_range,
    "exists": _compile_exists,
    "bool": _compile_bool,
    "match_all": _compile_match_all,
    "match_none": _compile_match_none,
}

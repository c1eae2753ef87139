"""JSON Schema of wire types, for the published contracts (OpenAPI for ingress's HTTP routes,
AsyncAPI for the bus): generated from the msgspec Structs themselves, so that neither can drift
from the code."""

from __future__ import annotations

from typing import Any

import msgspec
import msgspec.inspect as mi


def _ecma(node: Any) -> Any:
    """The schema with Python's end-of-string anchor ``\\Z`` written as ECMA-262's ``$`` (JSON
    Schema's regular expressions are ECMA's, where ``$`` without the ``m`` flag is the very end)."""
    if isinstance(node, dict):
        out = {k: _ecma(v) for k, v in node.items()}
        if isinstance(out.get("pattern"), str):
            out["pattern"] = out["pattern"].replace(r"\Z", "$")
        return out
    if isinstance(node, list):
        return [_ecma(v) for v in node]
    return node


def _has_datetime(info: Any) -> bool:
    if isinstance(info, mi.DateTimeType):
        return True
    if isinstance(info, mi.UnionType):
        return any(_has_datetime(t) for t in info.types)
    if isinstance(info, mi.Metadata):
        return _has_datetime(info.type)
    return False


def _date_time(schema: dict[str, Any]) -> dict[str, Any]:
    if schema.get("type") == "string":
        return {**schema, "format": "date-time"}
    if "anyOf" in schema:
        return {**schema, "anyOf": [_date_time(s) for s in schema["anyOf"]]}
    return schema


def _mark_datetimes(types: list[Any], named: dict[str, dict[str, Any]]) -> None:
    """msgspec writes a datetime as a plain string (it also reads one without an offset);
    boxoffice writes RFC 3339 with an offset, and that is what clients should send: say so."""
    seen: set[type] = set()
    todo = list(mi.multi_type_info(types))
    while todo:
        info = todo.pop()
        if isinstance(info, (mi.UnionType,)):
            todo += info.types
        elif isinstance(info, mi.Metadata):
            todo.append(info.type)
        elif isinstance(info, (mi.ListType, mi.SetType, mi.FrozenSetType, mi.VarTupleType)):
            todo.append(info.item_type)
        elif isinstance(info, mi.DictType):
            todo.append(info.value_type)
        elif isinstance(info, mi.StructType) and info.cls not in seen:
            seen.add(info.cls)
            props = named.get(info.cls.__name__, {}).get("properties", {})
            for f in info.fields:
                if _has_datetime(f.type) and f.encode_name in props:
                    props[f.encode_name] = _date_time(props[f.encode_name])
                todo.append(f.type)


def components(types: list[Any], ref_template: str) -> tuple[list[dict[str, Any]],
                                                             dict[str, dict[str, Any]]]:
    """The schema of each of ``types`` (a ``$ref`` for a Struct) and the named schemas they use."""
    refs, named = msgspec.json.schema_components(types, ref_template=ref_template)
    _mark_datetimes(types, named)
    return [_ecma(r) for r in refs], {k: _ecma(v) for k, v in sorted(named.items())}


def field_schemas(struct: type[msgspec.Struct], ref_template: str) -> dict[str, dict[str, Any]]:
    """The schema of each field of ``struct`` (query parameters are a Struct's fields), with
    ``null`` taken out of the alternatives: an absent parameter is how a query says none."""
    _, named = components([struct], ref_template)
    props = named[struct.__name__].get("properties", {})
    out = {}
    for name, schema in props.items():
        alts = schema.get("anyOf")
        if alts is not None:
            alts = [a for a in alts if a.get("type") != "null"]
            schema = alts[0] if len(alts) == 1 else {**schema, "anyOf": alts}
        out[name] = schema
    return out

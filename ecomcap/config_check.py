"""Config mistakes answered in one line, the same through the `ecomcap` CLI and `zenml pipeline run
-c`: an unknown key names its dotted path and the closest valid key, a wrong type names the path and
the type expected, and a renamed key is still accepted for one release with a warning naming its new
key. Pydantic's own report (several lines per problem, type tags in the path) is for developers."""
from __future__ import annotations

import difflib
import logging
import sys
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ValidationError

from ecomcap.errors import EcomcapError

log = logging.getLogger("ecomcap.config")

# Keys renamed since a release: old dotted path -> (new dotted path, the release that drops the old
# name). Applies to any run model that has the new path (the captioning and the retrieval run).
RENAMED: dict[str, tuple[str, str]] = {
    "registry.cider_floor": ("registry.floor", "0.2"),  # 8f3d279: the gate's rewrite (any primary metric)
}

# pydantic error types that mean "a value of another type" (the rest are bounds and rules)
_TYPE_ERRORS = {"literal_error", "model_type", "model_attributes_type", "none_required", "enum",
                "int_from_float", "dict_type", "list_type", "tuple_type", "is_instance_of"}


def parse_config(model: type[BaseModel], data: dict[str, Any], where: str) -> Any:
    """Validate `data` into `model`; every problem becomes part of one EcomcapError line."""
    data, renamed = apply_renames(model, data, where)
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise EcomcapError(f"invalid config in {where}: {describe(model, exc, renamed)}") from None


def pipeline_input(model: type[BaseModel]) -> Any:
    """The annotation of a pipeline's config parameter: the dict `zenml pipeline run -c` passes is
    checked here, so a mistake stops the compile with one EcomcapError line instead of ZenML's
    "Only JSON serializable inputs are allowed" under pydantic's report."""
    def check(value: Any) -> Any:
        return parse_config(model, value, _run_config_file()) if isinstance(value, dict) else value

    return Annotated[model, BeforeValidator(check)]


def _run_config_file() -> str:
    """Where the pipeline's settings came from: the `-c`/`--config` file of this command line."""
    argv = sys.argv[1:]
    for i, arg in enumerate(argv):
        if arg in ("-c", "--config") and i + 1 < len(argv):
            return f"{argv[i + 1]} (parameters.config)"
        if arg.startswith("--config="):
            return f"{arg.split('=', 1)[1]} (parameters.config)"
    return "parameters.config"


def apply_renames(model: type[BaseModel], data: dict[str, Any], where: str) -> tuple[dict, dict[str, str]]:
    """`data` with every old key moved to its new name (a warning each); {new path: old path}."""
    renamed: dict[str, str] = {}
    for old, (new, until) in RENAMED.items():
        if _field(model, new.split("."))[1] is None or not _has(data, old):
            continue
        if _has(data, new):
            raise EcomcapError(f"invalid config in {where}: both {old} and {new} are set: {old} is the old "
                               f"name of {new}, keep {new} only")
        data = _moved(data, old.split("."), new.split("."))
        renamed[new] = old
        log.warning("config %s: %s is renamed %s (the old name is accepted until ecomcap %s): write %s",
                    where, old, new, until, new)
    return data, renamed


def describe(model: type[BaseModel], exc: ValidationError, renamed: dict[str, str] | None = None) -> str:
    """One line for pydantic's errors: one clause per field (a union's several errors are one)."""
    by_path: dict[str, list[dict]] = {}
    for err in exc.errors():
        loc = err["loc"]
        if err["type"] == "extra_forbidden":  # the path of the key itself, not of its section
            path, ann = ".".join(p for p in (_field(model, loc[:-1])[0], str(loc[-1])) if p), None
        else:
            path, ann = _field(model, loc)
        by_path.setdefault(path, []).append({**err, "annotation": ann})
    clauses = []
    for path, errs in by_path.items():
        shown = f"{path} (written {renamed[path]}, renamed)" if renamed and path in renamed else path
        clauses.append(_clause(model, shown, errs))
    return "; ".join(clauses)


def _clause(model: type[BaseModel], path: str, errs: list[dict]) -> str:
    err = errs[0]
    if err["type"] == "extra_forbidden":
        return f"unknown key {path}{_suggestion(model, err['loc'])}"
    kind = err["type"]
    if len(errs) > 1 or kind in _TYPE_ERRORS or kind.endswith(("_type", "_parsing")):
        return f"{path}: expected {type_name(err['annotation'])}, got {_short(err['input'])}"
    msg = err["msg"].removeprefix("Value error, ").removeprefix("Assertion failed, ")
    if kind.startswith(("greater_than", "less_than", "multiple_of", "too_", "string_")):
        msg += f", got {_short(err['input'])}"
    return f"{path}: {msg}" if path and not msg.startswith(path) else msg


def _suggestion(model: type[BaseModel], loc: tuple) -> str:
    """": did you mean registry.floor?" - the same key in another section, else the closest sibling."""
    parent_path, _ = _field(model, loc[:-1])
    parent = _section(model, loc[:-1])
    key = str(loc[-1])
    names = {n: n for n in parent.model_fields} if parent else {}
    for old, (new, _) in RENAMED.items():  # a misspelt old name points at the new one
        if old.rsplit(".", 1)[0] == parent_path and new.rsplit(".", 1)[0] == parent_path:
            names[old.rsplit(".", 1)[-1]] = new.rsplit(".", 1)[-1]
    elsewhere = [p for p in _all_paths(model) if p.rsplit(".", 1)[-1] == key]  # in the wrong section
    if elsewhere:
        return f": did you mean {elsewhere[0]}?"
    close = difflib.get_close_matches(key, list(names), n=1, cutoff=0.6)
    if close:
        return f": did you mean {'.'.join(p for p in (parent_path, names[close[0]]) if p)}?"
    return f" ({parent_path or 'the run config'} takes: {', '.join(parent.model_fields)})" if parent else ""


def type_name(ann: Any) -> str:
    """A reader's name of a field type: 'an integer', "one of 'lora', 'full'", 'a number or null'."""
    origin, args = typing.get_origin(ann), typing.get_args(ann)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        named = [type_name(a) for a in args if a is not type(None)]
        return " or ".join(named + (["null"] if type(None) in args else []))
    if origin is list:
        return f"a list (each {type_name(args[0])})" if args else "a list"
    if origin is tuple:
        return f"a list of {len(args)} ({', '.join(type_name(a) for a in args)})"
    if origin is dict:
        return f"a mapping of {type_name(args[0])} to {type_name(args[1])}" if args else "a mapping"
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return "a mapping (a section of settings)"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string",
            Path: "a path (a string)"}.get(ann, getattr(ann, "__name__", str(ann)))


def _field(model: type[BaseModel], loc: typing.Sequence) -> tuple[str, Any]:
    """(dotted path, annotation) of the deepest settings field `loc` names; pydantic's union tags in
    a loc ('tuple[int, int]') are skipped, a list index narrows to the item type."""
    path: list[str] = []
    ann: Any = None
    cur: type[BaseModel] | None = model
    for part in loc:
        if isinstance(part, str) and cur is not None and part in cur.model_fields:
            ann = cur.model_fields[part].annotation
            path.append(part)
            cur = _model_in(ann)
        elif isinstance(part, str) and path and typing.get_origin(ann) is dict:  # a mapping's own key
            ann = typing.get_args(ann)[1] if typing.get_args(ann) else Any
            path.append(part)
            cur = _model_in(ann)
        elif isinstance(part, int) and path and typing.get_origin(ann) in (list, tuple):
            items = typing.get_args(ann)
            ann = items[min(part, len(items) - 1)] if items else Any
            path[-1] += f"[{part}]"
            cur = _model_in(ann)
        else:
            break
    return ".".join(path), ann


def _section(model: type[BaseModel], loc: typing.Sequence) -> type[BaseModel] | None:
    cur: type[BaseModel] | None = model
    for part in loc:
        field = cur.model_fields.get(part) if cur is not None and isinstance(part, str) else None
        cur = _model_in(field.annotation) if field else None
    return cur


def _model_in(ann: Any) -> type[BaseModel] | None:
    """The settings section a field holds (also through `X | None`)."""
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return ann
    models = [a for a in typing.get_args(ann) if isinstance(a, type) and issubclass(a, BaseModel)]
    return models[0] if len(models) == 1 else None


def _all_paths(model: type[BaseModel], prefix: str = "") -> list[str]:
    out = []
    for name, field in model.model_fields.items():
        out.append(prefix + name)
        sub = _model_in(field.annotation)
        if sub is not None:
            out += _all_paths(sub, f"{prefix}{name}.")
    return out


def _has(data: Any, dotted: str) -> bool:
    for part in dotted.split("."):
        if not isinstance(data, dict) or part not in data:
            return False
        data = data[part]
    return True


def _moved(data: dict, old: list[str], new: list[str]) -> dict:
    """A copy of `data` (its dicts along both paths copied, the caller's left alone) with the value
    at `old` moved to `new`."""
    out = dict(data)
    node = out
    for part in old[:-1]:
        node[part] = dict(node[part])
        node = node[part]
    value = node.pop(old[-1])
    node = out
    for part in new[:-1]:
        node[part] = dict(node.get(part) or {})
        node = node[part]
    node[new[-1]] = value
    return out


def _short(value: Any, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 1] + "…"

"""Config errors said the Keras way: the key path, what is allowed, and
`Received: x=...` (shortened when long).

`format_errors` turns pydantic's `ValidationError` into one message per
problem, with "did you mean" for unknown keys and one line for a union
(the tagged forms of `trainable`, schedules, optimizers) instead of one per
member.
"""

from __future__ import annotations

import re
import typing
from typing import Any, Optional

from pydantic import BaseModel
from pydantic import ValidationError

from finetune_cli.errors import did_you_mean
from finetune_cli.errors import short as _short
from finetune_cli.config.schema import Config
from finetune_cli.config.schema import _KeyError


# What a union-typed key accepts, in words (pydantic would name its types).
_UNION_EXPECTED = {
    "trainable": "'none', 'all' or a mapping {top: N}, {from_layer: NAME} "
    "or {regex: PATTERN}",
    "class_weight": "null, 'auto' or a mapping {class_name: weight}",
    "xla": "'auto', true or false",
}


# Parts of a pydantic error location that name a union member, not a key:
# our tags ("trainable:name") and pydantic's ("literal['auto']",
# "dict[str,float]", "function-before[...]").
_TAG = re.compile(r"^[a-z-]+[:\[]|^(int|float|str|bool|none)$")


def _is_tag(part) -> bool:
    return isinstance(part, str) and bool(_TAG.match(part))


def _model_at(loc) -> Optional[type]:
    """The schema class that owns the keys at `loc` (None if not a section)."""
    cls: Any = Config
    for part in loc:
        if _is_tag(part):
            continue
        if isinstance(part, int):
            continue  # list items: the element type was taken already
        field = cls.model_fields.get(part) if _is_model(cls) else None
        if field is None:
            return None
        cls = _model_in(field.annotation)
        if cls is None:
            return None
    return cls if _is_model(cls) else None


def _is_model(cls) -> bool:
    return isinstance(cls, type) and issubclass(cls, BaseModel)


def _model_in(annotation):
    """The BaseModel inside Optional[...], list[...], Union[...] if any."""
    if _is_model(annotation):
        return annotation
    for arg in typing.get_args(annotation):
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def _clean(loc) -> tuple:
    return tuple(p for p in loc if not _is_tag(p))


def _path(loc) -> str:
    return ".".join(str(p) for p in _clean(loc)) or "(top level)"


# pydantic's wording, in the words of a YAML file.
_PHRASES = [
    (re.compile(r"a valid dictionary( or instance of \w+)?"), "a mapping (key: value)"),
    (re.compile(r"a valid list"), "a list"),
    (re.compile(r"a valid tuple"), "a list"),
    (
        re.compile(
            r"tuple should have at most (\d+) items after validation, "
            r"not (\d+)"
        ),
        r"expected at most \1 items, not \2",
    ),
    (
        re.compile(r"a valid integer, unable to parse string as an integer"),
        "an integer",
    ),
    (re.compile(r"a valid number, unable to parse string as a number"), "a number"),
    (re.compile(r"input should be"), "expected"),
]


_PHRASES = [(re.compile(p.pattern, re.I), r) for p, r in _PHRASES]


def _plain(msg: str) -> str:
    for pattern, repl in _PHRASES:
        msg = pattern.sub(repl, msg)
    return msg


def _union_errors(errors):
    """Errors of one union-typed key become one: the branch that matched the
    input's shape, or a single "expected ..." line."""
    groups: dict[tuple, list] = {}
    out = []
    for err in errors:
        loc = tuple(err["loc"])
        tags = [i for i, p in enumerate(loc) if _is_tag(p)]
        if not tags:
            out.append(err)
            continue
        groups.setdefault(loc[: tags[0]], []).append(err)
    for prefix, errs in groups.items():
        deeper = [e for e in errs if len(_clean(e["loc"])) > len(prefix)]
        if deeper:
            out.extend(deeper)
            continue
        key = next((p for p in reversed(prefix) if isinstance(p, str)), "")
        expected = _UNION_EXPECTED.get(key)
        if expected is None or len(errs) == 1:
            out.extend(errs[:1])
            continue
        out.append(
            {
                "loc": prefix,
                "type": "union",
                "input": errs[0]["input"],
                "msg": f"expected {expected}",
                "ctx": {},
            }
        )
    return out


def format_errors(error: ValidationError, source: str) -> str:
    """One readable message from pydantic errors: key path, expectation, value."""
    lines = []
    for err in _union_errors(error.errors(include_url=False)):
        loc = tuple(err["loc"])
        kind = err["type"]
        ctx_error = (err.get("ctx") or {}).get("error")
        if isinstance(ctx_error, _KeyError):
            lines.append(f"{_path(ctx_error.loc)}: {ctx_error.message}")
            continue
        if kind == "extra_forbidden":
            parent = _model_at(loc[:-1])
            key = str(loc[-1])
            known = list(parent.model_fields) if parent else []
            hint = did_you_mean(key, known)
            allowed = f" Allowed here: {', '.join(known)}." if known else ""
            lines.append(
                f"{_path(loc)}: unknown key{hint}.{allowed} "
                f"Received: {key}={_short(err['input'])}"
            )
            continue
        msg = err["msg"]
        msg = msg.removeprefix("Value error, ")
        if kind == "missing":
            lines.append(f"{_path(loc)}: required key is missing")
            continue
        if kind == "literal_error":
            expected = (err.get("ctx") or {}).get("expected", "")
            options = re.findall(r"'([^']*)'", expected)
            hint = (
                did_you_mean(str(err["input"]), options)
                if isinstance(err["input"], str)
                else ""
            )
            key = next((p for p in reversed(_clean(loc)) if isinstance(p, str)), "")
            if any(str(p).startswith("trainable:") for p in loc):
                expected = _UNION_EXPECTED["trainable"]
            lines.append(
                f"{_path(loc)}: expected one of {expected}{hint}. "
                f"Received: {_path(loc)}={_short(err['input'])}"
            )
            continue
        msg = _plain(msg)
        if "image_size" in loc and kind != "value_error":
            msg = "expected a size N or [height, width] of positive integers"
        if "Received" in msg:
            lines.append(f"{_path(loc)}: {msg}")
        else:
            lines.append(
                f"{_path(loc)}: {msg[:1].lower() + msg[1:]}. "
                f"Received: {_path(loc)}={_short(err['input'])}"
            )
    head = f"invalid config {source}:"
    if len(lines) == 1:
        return f"{head} {lines[0]}"
    return "\n  ".join([head, *lines])

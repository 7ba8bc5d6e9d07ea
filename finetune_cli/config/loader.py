"""Loading a config: safe YAML, bounds, `--set` overrides, validation.

`load_config(path, overrides)` reads YAML (floats like `1e-3` are floats,
duplicate keys are errors, size and depth are bounded), applies `--set
key.path=value` overrides, validates against the schema (`schema.py`) and
checks the `search:` spaces (`spaces.py`) for `tune`; every problem is one
`ConfigError` naming the key path (`messages.py`). `to_yaml` writes the
resolved config every run saves; `json_schema` is `config schema`.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from finetune_cli.errors import ConfigError
from finetune_cli.errors import short as _short
from finetune_cli.errors import short
from finetune_cli.config.messages import format_errors
from finetune_cli.config.schema import Config
from finetune_cli.config.spaces import Space
from finetune_cli.config.spaces import apply
from finetune_cli.config.spaces import lookup
from finetune_cli.config.spaces import parse
from finetune_cli.config.spaces import resolved_with


class _Loader(yaml.SafeLoader):
    """SafeLoader that reads `1e-3` as a float and rejects duplicate keys.

    PyYAML follows YAML 1.1, where a float needs a dot, so `1e-3` would
    arrive as the string "1e-3"; users write learning rates exactly so.
    """

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    f"duplicate key {key!r}",
                    key_node.start_mark,
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


# A config is a few hundred values; these bounds stop documents that
# explode (YAML alias "bombs", runaway nesting) before anything walks them.
MAX_BYTES = 1 << 20


MAX_VALUES = 100_000


MAX_DEPTH = 32


def parse_yaml(text: str, source: str = "<string>") -> Any:
    """Parse YAML text safely; errors name the source, line and column.

    Raises:
        ConfigError: invalid YAML, or a document larger than MAX_BYTES, that
            expands (through aliases) to more than MAX_VALUES values, nests
            deeper than MAX_DEPTH, or refers to itself.
    """
    if len(text) > MAX_BYTES:
        raise ConfigError(
            f"{source}: {len(text):,} characters; a config is at most {MAX_BYTES:,}"
        )
    try:
        value = yaml.load(text, Loader=_Loader)  # noqa: S506 (safe subclass)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(e, "problem", None) or str(e)
        raise ConfigError(f"{source}{where}: invalid YAML: {problem}") from None
    except RecursionError:
        raise ConfigError(
            f"{source}: nested more than Python can read; a "
            f"config nests at most {MAX_DEPTH} levels"
        ) from None
    _check_bounds(value, source)
    return value


def _check_bounds(value, source: str) -> None:
    """Count values as if aliases were expanded, without expanding them."""
    sizes: dict[int, tuple[int, int]] = {}  # id -> (values, depth)
    active: set[int] = set()

    def walk(v) -> tuple[int, int]:
        if not isinstance(v, (dict, list)):
            return 1, 0
        key = id(v)
        if key in sizes:
            return sizes[key]
        if key in active:
            raise ConfigError(
                f"{source}: a YAML alias refers to itself; a "
                "config cannot contain itself"
            )
        active.add(key)
        children = list(v.keys()) + list(v.values()) if isinstance(v, dict) else v
        total, depth = 1, 0
        for child in children:
            n, d = walk(child)
            total += n
            depth = max(depth, d + 1)
            if depth > MAX_DEPTH:
                raise ConfigError(
                    f"{source}: nested deeper than {MAX_DEPTH} "
                    "levels; a config is a few levels deep"
                )
            if total > MAX_VALUES:
                raise ConfigError(
                    f"{source}: expands to more than {MAX_VALUES:,} values "
                    "(through YAML aliases, &anchor/*alias); a config has a "
                    "few hundred"
                )
        active.discard(key)
        sizes[key] = (total, depth)
        return sizes[key]

    walk(value)


def load_config(path, overrides=()) -> Config:
    """Read, override and validate a config file.

    Args:
        path: the YAML file.
        overrides: `key.path=value` strings (values parsed as YAML), applied
            in order on top of the file; list items by index (`phases.1.epochs=3`).

    Raises:
        ConfigError: naming the file, the key path and what was expected.
    """
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"config file {path} is a folder; expected a YAML file")
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    if path.stat().st_size > MAX_BYTES:
        raise ConfigError(
            f"config file {path} is {path.stat().st_size:,} "
            f"bytes; a config is at most {MAX_BYTES:,}"
        )
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read config file {path}: {e}") from None
    raw = parse_yaml(text, str(path))
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(
            f"{path}: the top level must be a mapping of sections "
            f"(experiment, data, model, ...). Received: {type(raw).__name__}"
        )
    raw = apply_overrides(raw, overrides)
    return validate(raw, source=str(path))


RUN_CONFIG_TODO = (
    "it is the config the run ran; restore it from a backup (an unfinished "
    "run's resume.npz holds a copy), or start a new run from your own config"
)


def load_run_config(run_dir) -> Config:
    """A run folder's own `config.yaml`.

    Raises:
        DamagedFile: it is missing, empty, garbled or no longer a valid
            config (a run's config was valid when the run wrote it).
    """
    from finetune_cli.files import damaged

    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise damaged(path, "missing", RUN_CONFIG_TODO)
    if path.stat().st_size == 0:
        raise damaged(path, "empty", RUN_CONFIG_TODO)
    try:
        return load_config(path)
    except ConfigError as e:
        raise damaged(
            path, f"not a valid config ({short(str(e), 200)})", RUN_CONFIG_TODO
        ) from None


def validate(raw: dict, source: str = "config") -> Config:
    """Validate a raw mapping into a `Config`, or raise one `ConfigError`."""
    try:
        cfg = Config.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(format_errors(e, source)) from None
    if cfg.search:
        try:
            check(cfg)
        except ConfigError as e:
            raise ConfigError(f"invalid config {source}: {e}") from None
    return cfg


def apply_overrides(raw: dict, overrides) -> dict:
    """Apply `key.path=value` overrides to a raw config mapping (a copy)."""
    import copy

    raw = copy.deepcopy(raw)
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"--set expects key.path=value. Received: {_short(item)}")
        value = parse_yaml(text, f"--set {key}")
        parts = key.split(".")
        node: Any = raw
        for depth, part in enumerate(parts):
            last = depth == len(parts) - 1
            where = ".".join(parts[:depth]) or "the config"
            if isinstance(node, list):
                if not part.isdigit():
                    raise ConfigError(
                        f"--set {key}: {where} is a list; use an index from 0 "
                        f"to {len(node) - 1} (negative indices are not "
                        f"supported). Received: {_short(part)}"
                    )
                index = int(part)
                if not index < len(node):
                    raise ConfigError(
                        f"--set {key}: {where} has {len(node)} entries "
                        f"(indices 0-{len(node) - 1}). Received: {index}"
                    )
                if last:
                    node[index] = value
                else:
                    node = node[index]
            elif isinstance(node, dict):
                if last:
                    node[part] = value
                else:
                    if node.get(part) is None:
                        node[part] = {}
                    node = node[part]
            else:
                raise ConfigError(
                    f"--set {key}: {where} is a value, not a section. "
                    f"Received: {_short(node)}"
                )
    return raw


def to_yaml(config: Config) -> str:
    """The resolved config as YAML that reloads to it: every key with its
    default (null included), except the per-type options of head layers,
    augmentation layers, optimizers and `trainable`, shown only when set
    (unset, they take Keras' default for that type)."""
    data = config.model_dump(mode="json")

    def set_only(d):
        return {k: v for k, v in d.items() if v is not None}

    data["head"] = [set_only(layer) for layer in data["head"]]
    data["augmentation"] = [set_only(layer) for layer in data["augmentation"]]
    for phase in data["phases"]:
        phase["optimizer"] = set_only(phase["optimizer"])
        if isinstance(phase["trainable"], dict):
            phase["trainable"] = set_only(phase["trainable"])
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=None)


def json_schema() -> dict:
    """JSON Schema of the config file, for editor completion."""
    schema = Config.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "finetune-cli experiment config"
    return schema


def check(cfg) -> list[Space]:
    """Every key exists and every candidate value gives a valid config.

    Raises a ConfigError that names `search.<key>`, the value and why.
    """
    spaces = parse(cfg.search)
    base = resolved_with(cfg, {})
    for space in spaces:
        try:
            lookup(base, space.key)
        except KeyError as e:
            raise ConfigError(
                f"search.{space.key}: no such key in the config: {e.args[0]}"
            ) from None
        for value in space.candidates():
            try:
                validate(apply(base, {space.key: value}))
            except ConfigError as e:
                why = str(e).removeprefix("invalid config config: ")
                raise ConfigError(
                    f"search.{space.key}: the config is not valid with "
                    f"{space.key}={short(value)}: {why}"
                ) from None
    return spaces


def current_schema(saved: dict) -> dict:
    """A saved config in this version's form: keys added since, at their
    defaults (a run started before them resumes)."""
    try:
        return validate(saved).model_dump(mode="json")
    except ConfigError:
        return saved

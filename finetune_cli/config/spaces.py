"""The `search:` section of a config: what `finetune-cli tune` may change.

    search:
      phases.0.learning_rate: {log_uniform: [1e-4, 1e-2]}
      head.0.rate: {choice: [0.0, 0.2, 0.5]}
      phases.1.trainable.top: {int: [20, 120, 20]}    # [low, high, step]
      phases.0.label_smoothing: {uniform: [0.0, 0.2]}

Keys are key paths of the resolved config (`finetune-cli config show`);
each must exist, and the config must stay valid at each end of a range and
for every choice, so a search is checked before anything runs. `finetune`
ignores the section. Nothing here imports TensorFlow.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from finetune_cli.errors import ConfigError
from finetune_cli.errors import did_you_mean
from finetune_cli.errors import short


KINDS = {
    "log_uniform": "[low, high], 0 < low < high (a float, sampled on a log scale)",
    "uniform": "[low, high], low < high (a float)",
    "int": "[low, high] or [low, high, step] (integers, low < high, step >= 1)",
    "choice": "a list of values of one type (numbers, strings or booleans)",
}


@dataclasses.dataclass(frozen=True)
class Space:
    key: str  # a key path of the config
    kind: str  # one of KINDS
    args: tuple

    def candidates(self) -> list:
        """The values the config is checked with."""
        if self.kind == "choice":
            return list(self.args)
        return list(self.args[:2])

    def register(self, hp):
        """Declare this space on KerasTuner `HyperParameters`."""
        if self.kind == "choice":
            return hp.Choice(self.key, list(self.args))
        if self.kind == "int":
            lo, hi, step = (*self.args, 1)[:3]
            return hp.Int(self.key, lo, hi, step=step)
        lo, hi = self.args
        sampling = "log" if self.kind == "log_uniform" else "linear"
        return hp.Float(self.key, lo, hi, sampling=sampling)


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def parse(search: dict) -> list[Space]:
    """The spaces of a `search:` mapping; a ConfigError names the first bad one."""
    spaces = []
    for key, spec in search.items():
        where = f"search.{key}"
        if not isinstance(spec, dict) or len(spec) != 1:
            raise ConfigError(
                f"{where}: expected one of {{{', '.join(KINDS)}: ...}}. "
                f"Received: {short(spec)}"
            )
        ((kind, args),) = spec.items()
        if kind not in KINDS:
            raise ConfigError(
                f"{where}: unknown space {kind!r}{did_you_mean(kind, list(KINDS))}. "
                f"Allowed: {', '.join(KINDS)}. Received: {short(spec)}"
            )
        if not _valid(kind, args):
            raise ConfigError(
                f"{where}.{kind}: expected {KINDS[kind]}. Received: {short(args)}"
            )
        spaces.append(Space(key, kind, tuple(args)))
    return spaces


def _valid(kind: str, args) -> bool:
    if not isinstance(args, list) or not args:
        return False
    if kind == "choice":
        types = {
            bool if isinstance(a, bool) else str if isinstance(a, str) else float
            for a in args
        }
        return (
            len(types) == 1
            and (
                all(isinstance(a, (str, bool)) for a in args) or all(map(_number, args))
            )
            and len(set(args)) == len(args)
        )
    if kind == "int":
        return (
            len(args) in (2, 3)
            and all(isinstance(a, int) and not isinstance(a, bool) for a in args)
            and args[0] < args[1]
            and (len(args) == 2 or args[2] >= 1)
        )
    return (
        len(args) == 2
        and all(map(_number, args))
        and args[0] < args[1]
        and (kind != "log_uniform" or args[0] > 0)
    )


def lookup(tree, key: str):
    """The value at a key path of a resolved config dump (KeyError if none)."""
    node: Any = tree
    for depth, part in enumerate(key.split(".")):
        here = ".".join(key.split(".")[:depth]) or "the config"
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise KeyError(
                    f"{here} is a list of {len(node)}; use an index from 0 to "
                    f"{len(node) - 1}. Received: {short(part)}"
                )
            node = node[int(part)]
        elif isinstance(node, dict):
            if part not in node:
                raise KeyError(
                    f"{here} has no key {part!r}"
                    f"{did_you_mean(part, list(node))}. Allowed here: "
                    f"{', '.join(node)}"
                )
            node = node[part]
        else:
            raise KeyError(f"{here} is a value, not a section. Received: {short(node)}")
    return node


def apply(tree: dict, values: dict) -> dict:
    """A copy of a resolved config dump with `values` set at their key paths."""
    import copy

    tree = copy.deepcopy(tree)
    for key, value in values.items():
        *parents, last = key.split(".")
        node: Any = tree
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node[part]
        node[int(last) if isinstance(node, list) else last] = value
    return tree


def resolved_with(cfg, values: dict) -> dict:
    """The resolved config (without `search:`) with `values` set."""
    return apply(cfg.model_dump(mode="json", exclude={"search"}), values)

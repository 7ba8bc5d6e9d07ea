"""The `extract` command: the frozen base over a config's data, features
streamed to disk (`features.py`), reusing what still matches.
"""

from __future__ import annotations

from pathlib import Path

from finetune_cli import remote


from finetune_cli.data import index as data_lib
from finetune_cli.data import preflight as preflight_lib
from finetune_cli.cache import features
from finetune_cli.cache.features import ExtractResult
from finetune_cli.cache.features import build_extractor
from finetune_cli.cache.features import get_features


def extract_command(cfg, out, split: str = "all", out_dir=None) -> list[ExtractResult]:
    """`finetune-cli extract`: features of one or all splits to disk."""
    from finetune_cli.runtime import environment
    from finetune_cli.errors import ConfigError

    from finetune_cli.config import checks

    checks.check(cfg)
    if cfg.data.batch_size == "auto":  # no training: inference batches
        cfg = cfg.model_copy(
            update={"data": cfg.data.model_copy(update={"batch_size": 32})}
        )
        out.info("data.batch_size: auto is for training; extract uses 32")
    index = data_lib.index_config(cfg)
    # The same pre-flight check as finetune, so both see the same files
    # (and a bad image is a data error naming it, not a crash).
    index, _, save_verdicts = preflight_lib.scan_images(index, cfg, out)
    splits = list(index.splits) if split == "all" else [split]
    for s in splits:
        if s not in index.splits:
            raise ConfigError(
                f"--split {s}: the data has no {s} split (it has "
                f"{', '.join(index.splits)})"
            )
    environment.configure_runtime(cfg, environment.has_gpu())
    extractor = build_extractor(cfg)
    save_verdicts()  # every check passed: now files may be written
    root = Path(out_dir) if out_dir is not None else cache_root(cfg)
    results = []
    for s in splits:
        _, r = get_features(cfg, extractor, index, s, root / s, out)
        results.append(r)
    features.evict(cfg, out)
    return results


def cache_root(cfg) -> Path:
    return remote.local_dir(cfg.feature_cache.dir) / cfg.experiment.name

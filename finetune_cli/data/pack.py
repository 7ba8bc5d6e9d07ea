"""`finetune-cli pack`: a folder or CSV of images into TFRecord shards.

The data is indexed and split as `finetune` would (`data.split`, the
seed, the task) and every image passes the pre-flight check first (bad
images stop it, or are left out and listed with `on_bad_image: skip`);
then `records.pack` writes the shards and the manifest. A local `--out`
is filled under a temporary name and renamed into place, so it appears
whole or not at all; a remote one (`gs://...`) is complete when its
`manifest.json`, written last, is there.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from finetune_cli.data import index as data_lib
from finetune_cli.data import preflight
from finetune_cli.data import records
from finetune_cli.errors import ConfigError


def pack_data(
    data,
    out_dir,
    *,
    seed: int,
    multi_label: bool,
    shard_size: int,
    out,
    force: bool = False,
) -> dict:
    """Index `data` (a `config.Data` section), check every image, and
    write the shards and manifest to `out_dir`. Returns the manifest.

    Raises:
        ConfigError: `out_dir` exists (without `force`).
        DataError: bad data, named, before anything is written.
    """
    remote = "://" in str(out_dir)
    import tensorflow as tf

    if tf.io.gfile.exists(str(out_dir)) and not force:
        raise ConfigError(f"--out {out_dir} already exists; pass --force to replace it")
    index = data_lib.index_data(data, seed, multi_label=multi_label)
    paths = [p for v in index.splits.values() for p, _ in v]
    with out.counter(len(paths), "pre-flight") as progress:
        verdicts, _ = preflight.image_verdicts(paths, None, progress)
    index, skipped = preflight.preflight(index, data.on_bad_image, verdicts=verdicts)
    total = sum(len(v) for v in index.splits.values())
    if remote:
        if tf.io.gfile.exists(str(out_dir)):
            tf.io.gfile.rmtree(str(out_dir))
        with out.counter(total, "pack") as progress:
            return records.pack(
                index,
                out_dir,
                shard_size=shard_size,
                skipped=skipped,
                progress=progress,
            )
    target = Path(out_dir)
    tmp = target.with_name(f".{target.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    with out.counter(total, "pack") as progress:
        manifest = records.pack(
            index, tmp, shard_size=shard_size, skipped=skipped, progress=progress
        )
    if target.exists():
        shutil.rmtree(target)
    tmp.rename(target)
    return manifest

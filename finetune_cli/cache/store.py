"""The feature cache on disk: content keys and the stored feature sets.

A cache entry is a folder of shards and a `meta.json` whose key fields
(model, weights identity, image size, preprocessing, augmentation, data
files) decide reuse; `explain_mismatch` says why an entry is not reused.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import zipfile
import shutil
from pathlib import Path
from typing import Optional

import keras
import numpy as np

from finetune_cli.model import applications
from finetune_cli.data import preflight as preflight_lib
from finetune_cli import faults
from finetune_cli.run import folder as rundir
from finetune_cli.files import atomic_path
from finetune_cli.files import damaged
from finetune_cli.files import write_json


FORMAT = "finetune-cli-features/1"


def _weights_identity(cfg) -> str:
    w = cfg.model.weights
    if w == "imagenet":
        return f"imagenet (keras {keras.__version__})"
    if w == "none":
        return f"none (random, seed {cfg.experiment.seed})"
    from finetune_cli import remote

    return f"sha256:{preflight_lib.sha256_file(remote.fetch(w))}"


def key_fields(
    cfg, samples, *, views: int = 1, augmentation=None, dtype: str = "float32"
) -> dict:
    """Everything the features depend on, as a JSON-able dict."""
    app = applications.get(cfg.model.name)
    files = []
    if getattr(samples, "digest", None) is not None:  # shards: the manifest
        files.append(["records", samples.digest, len(samples)])
    else:
        for path, _ in samples:
            st = os.stat(path)
            files.append([path, st.st_size, st.st_mtime_ns])
    return {
        "application": app.name,
        "weights": _weights_identity(cfg),
        "image_size": list(cfg.data.image_size),
        "pooling": cfg.model.pooling,
        "preprocess": app.preprocess,
        "options": cfg.model.options,
        "dtype": dtype,
        "views": views,
        "augmentation": (
            [a.model_dump(exclude_none=True) for a in augmentation]
            if views > 1 and augmentation
            else None
        ),
        "seed": cfg.experiment.seed if views > 1 else None,
        # A view's augmentation is drawn per batch (pipeline.reseed), so the
        # batch size decides which copy of an image a view holds.
        "augment_batch_size": cfg.data.batch_size if views > 1 else None,
        "files": files,
    }


def content_key(fields: dict) -> str:
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


def explain_mismatch(old: dict, new: dict) -> str:
    """Why a cache no longer fits, in words."""
    reasons = []
    for name in (
        "application",
        "weights",
        "image_size",
        "pooling",
        "preprocess",
        "options",
        "dtype",
        "views",
        "augmentation",
        "seed",
        "augment_batch_size",
        "derived_from",
    ):
        if old.get(name) != new.get(name):
            reasons.append(f"{name} changed ({old.get(name)} -> {new.get(name)})")
    old_files = {f[0]: f[1:] for f in old.get("files", [])}
    new_files = {f[0]: f[1:] for f in new.get("files", [])}
    added = sorted(set(new_files) - set(old_files))
    removed = sorted(set(old_files) - set(new_files))
    edited = sorted(
        p for p in set(old_files) & set(new_files) if old_files[p] != new_files[p]
    )
    for label, items in (("added", added), ("removed", removed), ("modified", edited)):
        if items:
            shown = ", ".join(Path(p).name for p in items[:3])
            more = f" and {len(items) - 3} more" if len(items) > 3 else ""
            reasons.append(f"{len(items)} image(s) {label}: {shown}{more}")
    return "; ".join(reasons) or "the cache format changed"


@dataclasses.dataclass
class FeatureSet:
    """A split's cached features, as a manifest and shard files."""

    folder: Path
    manifest: dict

    @property
    def num_rows(self) -> int:
        return self.manifest["num_images"] * self.manifest["views"]

    def load(self):
        """(features [views, n, d], labels [n], paths [n]) in data order."""
        feats, labels, paths = [], [], []
        for shard in self.manifest["shards"]:
            try:
                with np.load(self.folder / shard) as z:
                    feats.append(z["features"])
                    labels.append(z["labels"])
                    paths.append(z["paths"])
            except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
                raise damaged(
                    self.folder / shard,
                    "unreadable cached features",
                    f"delete the cache folder {self.folder}; the next run rebuilds it",
                ) from None
        v, n = self.manifest["views"], self.manifest["num_images"]
        f = np.concatenate(feats).reshape(v, n, -1)
        return (
            f,
            np.concatenate(labels)[:n],
            [str(p) for p in np.concatenate(paths)[:n]],
        )


def open_cache(folder, fields) -> tuple[Optional[FeatureSet], Optional[str]]:
    """The cached set when its key matches, else (None, why it was not used)."""
    folder = Path(folder)
    manifest_path = folder / "manifest.json"
    if not manifest_path.is_file():
        return None, "no cache yet"
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, ValueError):
        return None, "the manifest is unreadable"
    if manifest.get("format") != FORMAT:
        return None, "the cache format changed"
    if manifest.get("key") != content_key(fields):
        return None, explain_mismatch(manifest.get("key_fields", {}), fields)
    missing = [s for s in manifest["shards"] if not (folder / s).is_file()]
    if missing:
        return None, f"shard files are missing ({missing[0]})"
    sizes = manifest.get("shard_bytes") or []
    for shard, size in zip(manifest["shards"], sizes, strict=False):
        if (folder / shard).stat().st_size != size:
            return None, f"shard {shard} is damaged (truncated or overwritten)"
    return FeatureSet(folder, manifest), None


def write_features(
    batches,
    folder,
    fields,
    *,
    class_names,
    num_images: int,
    views: int,
    shard_size: int = 1024,
    progress=None,
) -> FeatureSet:
    """Stream (features, labels, paths, view) batches, view-major in data
    order, into shards of a new cache folder `folder` (replaced atomically;
    at most one shard is held in memory)."""
    folder = Path(folder)
    # A full disk, a signal, a bug: the half-written cache goes, and the
    # folder keeps the cache it had (or none).
    with rundir.staged_folder(folder, "make room and run it again") as tmp:
        manifest = _write(
            batches,
            folder,
            tmp,
            fields,
            class_names,
            num_images,
            views,
            shard_size,
            progress,
        )
    return FeatureSet(folder, manifest)


def _write(
    batches, folder, tmp, fields, class_names, num_images, views, shard_size, progress
):
    total = num_images * views
    shards, buf_f, buf_l, buf_p, buf_v = [], [], [], [], []
    dim = None
    done = 0

    def flush():
        nonlocal buf_f, buf_l, buf_p, buf_v
        if not buf_f:
            return
        name = f"shard-{len(shards):05d}.npz"
        with atomic_path(tmp / name) as t:
            with open(t, "wb") as f:
                np.savez(
                    f,
                    features=np.concatenate(buf_f).astype("float32"),
                    labels=np.concatenate(buf_l).astype("int64"),
                    paths=np.concatenate(buf_p).astype(str),
                    views=np.concatenate(buf_v).astype("int32"),
                )
        shards.append(name)
        buf_f, buf_l, buf_p, buf_v = [], [], [], []

    for feats, labels, paths, view in batches:
        feats = np.asarray(feats, dtype="float32")
        dim = feats.shape[1]
        buf_f.append(feats)
        buf_l.append(np.asarray(labels))
        buf_p.append(np.array(paths))
        buf_v.append(np.full(len(feats), view))
        done += len(feats)
        if sum(len(b) for b in buf_f) >= shard_size:
            flush()
        if progress is not None:
            progress(done, total)
        faults.point("extract")
    flush()
    if done != total:
        raise RuntimeError(f"{folder}: wrote {done} rows, expected {total}")
    manifest = {
        "format": FORMAT,
        "num_images": num_images,
        "views": views,
        "feature_dim": int(dim or 0),
        "dtype": "float32",
        "class_names": list(class_names),
        "shards": shards,
        "shard_bytes": [(tmp / s).stat().st_size for s in shards],
        "key": content_key(fields),
        "key_fields": fields,
    }
    write_json(tmp / "manifest.json", manifest)
    return manifest


# Several entries per slot. `<root>/<split>` holds the newest entry of a
# split; when a config with another key needs that slot, the entry there
# steps aside to `<root>/<split>.<key12>` instead of being replaced, and a
# later config with that key finds it there. The whole cache folder is
# bounded by `feature_cache.max_size`: the entries used least recently (a
# reuse touches its manifest) go first.


def entry_for(folder, fields) -> Path:
    """Where the entry for `fields` of the slot `folder` waits when it is
    not the slot's newest."""
    folder = Path(folder)
    return folder.with_name(f"{folder.name}.{content_key(fields)[:12]}")


def lookup(folder, fields) -> tuple[Optional[FeatureSet], Optional[str]]:
    """The cached set for `fields`: in the slot, else stepped aside."""
    cached, why = open_cache(folder, fields)
    if cached is None:
        aside, _ = open_cache(entry_for(folder, fields), fields)
        if aside is not None:
            cached, why = aside, None
    if cached is not None:
        used(cached.folder)
    return cached, why


def set_aside(folder, fields) -> None:
    """Move the slot's entry to its own name, out of the way of the entry
    for `fields` about to be written there (an entry of that same key is
    a damaged copy: it is replaced instead)."""
    folder = Path(folder)
    try:
        manifest = json.loads((folder / "manifest.json").read_text())
        key = manifest["key"]
    except (OSError, ValueError, KeyError, TypeError):
        return  # nothing there, or nothing worth keeping: replaced
    if key == content_key(fields):
        return
    target = folder.with_name(f"{folder.name}.{key[:12]}")
    shutil.rmtree(target, ignore_errors=True)
    with contextlib.suppress(OSError):
        folder.rename(target)


# Entries this process used or wrote: eviction leaves them alone.
USED: set = set()


def used(folder) -> None:
    """Mark an entry as just used (its manifest's mtime), for eviction."""
    USED.add(Path(folder))
    with contextlib.suppress(OSError):
        os.utime(Path(folder) / "manifest.json")


def enforce_limit(root, max_bytes: int, keep=()) -> list[Path]:
    """Remove the least recently used cache entries under `root` (feature
    sets and activation caches: folders holding a manifest.json) until
    they take at most `max_bytes`; `keep` is never removed. Returns the
    removed folders."""
    root = Path(root)
    keep = {Path(k).resolve() for k in keep}
    entries = []
    for manifest in root.rglob("manifest.json"):
        folder = manifest.parent
        if any(part.startswith(".") for part in folder.relative_to(root).parts):
            continue  # a temporary being written
        try:
            size = sum(p.stat().st_size for p in folder.iterdir() if p.is_file())
            entries.append((manifest.stat().st_mtime, size, folder))
        except OSError:
            continue
    total = sum(size for _, size, _ in entries)
    removed = []
    for _, size, folder in sorted(entries, key=lambda e: e[0]):
        if total <= max_bytes:
            break
        if folder.resolve() in keep:
            continue
        shutil.rmtree(folder, ignore_errors=True)
        total -= size
        removed.append(folder)
    return removed

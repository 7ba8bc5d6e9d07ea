"""The pre-flight check: every image decoded before anything trains.

`scan_images` runs `preflight` over a config's index with a progress bar,
leaving bad images out (`data.on_bad_image: skip`) or stopping on the
first (`error`, the default). Verdicts are cached by path, size and mtime
(`PREFLIGHT_CACHE` in the feature cache folder), so a rerun decodes only
new or changed files. Pillow, then TensorFlow's decoder (imported when
needed, not at import).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
import contextlib
import hashlib

from finetune_cli import faults
from finetune_cli.errors import DataError
from finetune_cli.data.index import DataIndex


def scan_images(index, cfg, out):
    """The pre-flight check of every image (`data.preflight`), with a
    progress bar, warning about the images left out under
    `data.on_bad_image: skip`. Verdicts are cached in the feature cache
    folder (when the cache is enabled), so a rerun decodes only new or
    changed files. Returns (the index without them, [(path, why)], a
    function that saves the verdicts): the caller saves them once every
    other check has passed, so bad input leaves no file behind."""
    if index.records is not None:  # every image was checked when packed
        return index, [], lambda: None
    verdicts, save = scan_verdicts(index, cfg, out)
    index, skipped = preflight(index, cfg.data.on_bad_image, verdicts=verdicts)
    if skipped:
        out.warn(
            f"skipping {len(skipped)} bad image(s) (data.on_bad_image: "
            f"skip), e.g. {skipped[0][0]}: {skipped[0][1]}"
        )
    return index, skipped, save


def scan_verdicts(index, cfg, out):
    """`image_verdicts` of every image of `index`, with a progress bar and
    the verdicts cached in the feature cache folder (when it is enabled):
    (path -> (why it cannot be used or None, SHA-256), save function)."""
    if index.records is not None:  # checked when packed
        return {p: (None, None) for v in index.splits.values() for p, _ in v}, (
            lambda: None
        )
    paths = list(dict.fromkeys(p for v in index.splits.values() for p, _ in v))
    with out.counter(len(paths), "pre-flight") as progress:
        return image_verdicts(paths, cache_file(cfg), progress, rehash=cfg.data.rehash)


def cache_file(cfg):
    """Where `cfg`'s verdicts are cached (None with the cache off)."""
    if not cfg.feature_cache.enabled:
        return None
    from finetune_cli import remote

    return remote.local_dir(cfg.feature_cache.dir) / PREFLIGHT_CACHE


def read_cache(cache_file) -> dict:
    """The cached verdicts by path ({} when there are none)."""
    import json

    if cache_file is None:
        return {}
    try:
        files = json.loads(Path(cache_file).read_text()).get("files", {})
    except (OSError, ValueError, AttributeError):
        return {}  # no cache yet, or unreadable: start again
    return files if isinstance(files, dict) else {}


def cached_digest(path, entry) -> str | None:
    """The SHA-256 a verdict cache `entry` recorded for `path`, when the
    file still has the size and modification time it had then (None
    otherwise: it must be hashed)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    if (
        isinstance(entry, dict)
        and entry.get("size") == st.st_size
        and entry.get("mtime_ns") == st.st_mtime_ns
        and isinstance(entry.get("sha256"), str)
    ):
        return entry["sha256"]
    return None


def check_image(path: str) -> str | None:
    """Why an image cannot be used, or None when it decodes completely:
    Pillow decodes every byte (a truncated file fails), and then the
    decoder training uses (`decode.verdict`, TensorFlow) must read it too,
    so what passes here never fails later in the pipeline."""
    reason = pillow_verdict(path)
    if reason is None:
        from finetune_cli.data.decode import verdict

        reason = verdict(path)
    return reason


def pillow_verdict(path: str) -> str | None:
    from PIL import Image

    try:
        if os.path.getsize(path) == 0:
            return "empty file (0 bytes)"
        with Image.open(path) as im:
            im.load()  # decodes every byte: truncated files fail here
            if im.width < 1 or im.height < 1:
                return "image has no pixels"
    except OSError as e:
        msg = str(e).strip() or type(e).__name__
        if "cannot identify image file" in msg:
            return "not a readable image (unknown or corrupt format)"
        return f"cannot decode: {msg}"
    except Exception as e:  # noqa: BLE001 - any decoder failure is a bad image
        return f"cannot decode: {type(e).__name__}: {e}"
    return None


def sha256_file(path, chunk: int = 1 << 20) -> str:
    """The SHA-256 of a file's bytes (hex): its identity, wherever it lies."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


PREFLIGHT_CACHE = "preflight.json"


def image_verdicts(paths, cache_file=None, progress=None, *, rehash: bool = False):
    """For each path: (why it cannot be used or None, SHA-256 of its bytes),
    and a function that saves the verdicts to `cache_file` (called by the
    caller once it is content with them).

    Decoding is the slow part (a quarter of a second for a 12-megapixel
    JPEG), so verdicts are kept in `cache_file`, keyed by path with the
    file's size, mtime and content hash: a rerun decodes only new or
    changed files. A file whose size and modification time are those
    cached is not read at all (its cached hash is trusted), so a rerun on
    an unchanged folder costs a `stat` per file; `rehash` reads and hashes
    every file again (a file changed in place with its mtime kept). Files
    are hashed and decoded in parallel threads (PIL and hashlib release
    the GIL while they work).
    """
    import concurrent.futures

    cache = read_cache(cache_file)

    def one(path):
        entry = cache.get(path)
        known = None if rehash else cached_digest(path, entry)
        if known is not None:
            return path, entry, (entry.get("reason"), known)
        try:
            st = os.stat(path)
            digest = sha256_file(path)
        except OSError as e:
            return path, None, (f"cannot read: {e.strerror or e}", None)
        key = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": digest}
        if isinstance(entry, dict) and all(entry.get(k) == v for k, v in key.items()):
            return path, entry, (entry.get("reason"), digest)
        reason = check_image(path)
        return path, {**key, "reason": reason}, (reason, digest)

    unique = list(dict.fromkeys(paths))
    verdicts, fresh = {}, {}
    workers = min(32, (os.cpu_count() or 1) + 4)
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        for done, (path, entry, verdict) in enumerate(pool.map(one, unique), 1):
            verdicts[path] = verdict
            if entry is not None:
                fresh[path] = entry
            if progress is not None:
                progress(done, len(unique))
            faults.point("preflight")

    def save():
        if cache_file is None or fresh == {p: cache.get(p) for p in fresh}:
            return
        from finetune_cli.files import write_json

        # Other experiments' files stay: one cache serves every config.
        cache.update(fresh)
        with contextlib.suppress(OSError):  # a cache: never worth failing for
            write_json(cache_file, {"version": 1, "files": cache})

    return verdicts, save


def preflight(
    index: DataIndex,
    on_bad_image: str = "error",
    progress=None,
    cache_file=None,
    verdicts=None,
) -> tuple[DataIndex, list[tuple[str, str]]]:
    """Check every image and the splits before training.

    Returns the index without bad images (when `on_bad_image` is "skip") and
    the list of (path, reason) left out. Verdicts are reused from
    `cache_file` for unchanged files (see `image_verdicts`), and saved
    there when the check passes (a failed check writes nothing). A caller
    with its own `verdicts` from `image_verdicts` saves them itself.

    Raises:
        DataError: a bad image (under "error"), the same file content in two
            splits, or a class left with too few images.
    """
    bad: list[tuple[str, str]] = []
    seen: dict[str, tuple[str, str]] = {}
    digests: dict[str, str] = {}
    save = None
    if verdicts is None:
        verdicts, save = image_verdicts(
            [p for samples in index.splits.values() for p, _ in samples],
            cache_file,
            progress,
        )
    conflicting: set[str] = set()
    for split, samples in index.splits.items():
        for path, label in samples:
            reason, digest = verdicts[path]
            if reason is not None:
                if on_bad_image == "error":
                    raise DataError(
                        f"bad image {path}: {reason} (set data.on_bad_image: "
                        "skip to leave such images out)"
                    )
                bad.append((path, reason))
                continue
            digests[path] = digest
            other = seen.get(digest)
            if other is not None and other[2] != label:
                # Which label is right cannot be told: neither copy is used.
                if on_bad_image == "error":
                    raise DataError(
                        f"the same image is labelled twice: {other[0]} "
                        f"({index.label_name(other[2])}) and {path} "
                        f"({index.label_name(label)}); keep the copy "
                        "under the right class (or set data.on_bad_image: "
                        "skip to leave both out)"
                    )
                bad.append((path, f"the same image as {other[0]}, another class"))
                conflicting.add(other[0])
                continue
            if other is not None and other[1] != split:
                if on_bad_image == "error":
                    raise DataError(
                        f"the same image is in two splits: {other[0]} "
                        f"({other[1]}) and {path} ({split}); remove one so "
                        "held-out metrics stay honest (or set "
                        "data.on_bad_image: skip to leave the later copy out)"
                    )
                # Splits are indexed train first: the held-out copy goes.
                bad.append((path, f"duplicate of {other[0]} ({other[1]})"))
                continue
            seen.setdefault(digest, (path, split, label))
    bad += [(p, "the same image is under another class too") for p in conflicting]
    if not bad:
        if save is not None:
            save()
        return dataclasses.replace(index, digests=digests), bad
    dropped = {p for p, _ in bad}
    splits = {
        s: [(p, lb) for p, lb in v if p not in dropped] for s, v in index.splits.items()
    }
    cleaned = dataclasses.replace(index, splits=splits, digests=digests)
    for i, name in enumerate(index.class_names):
        if cleaned.counts("train")[i] == 0:
            raise DataError(
                f"class {name!r} has no usable training images after skipping bad ones"
            )
    if not splits.get("val"):
        raise DataError("no usable validation images after skipping bad ones")
    if save is not None:
        save()
    return cleaned, bad

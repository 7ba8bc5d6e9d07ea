"""Folders on object storage (`gs://`, `s3://`, `ram://` in the tests),
through `tf.io.gfile`.

A run folder, an export or an evaluation whose path has a scheme is worked
on in a local mirror (`mirror_of`: under `$FINETUNE_CLI_MIRROR`, default
`~/.cache/finetune-cli/remote/`) with every local guarantee (files written
whole and renamed, locks, the staged run folder), and the mirror is
uploaded (`push`) after every commit of the run state and at the end, so
the remote folder is never more than one epoch behind. A remote run folder
is downloaded (`pull`) before it is resumed, evaluated or exported.

What is atomic where: on a local disk every file is written under a
temporary name and renamed. On object storage each file is uploaded under
a temporary name and renamed (`tf.io.gfile.rename`): GCS and S3 copy the
object whole, so a reader sees the old file or the new one, never half;
a folder as a whole is not atomic there, which is why the state file
(`resume.npz`) is uploaded last and a resume reads it first. The
experiment lock is held in the mirror: two machines writing the same
remote experiment are not locked against each other. `latest` is a text
pointer (`latest.txt`) on object storage, which has no links.

TensorFlow registers `gs://` itself; `s3://` and `hdfs://` need the
`tensorflow-io` package imported (`pip install tensorflow-io`).
"""

from __future__ import annotations

import hashlib
import os
import posixpath
from pathlib import Path

# Uploaded last: a remote run is only as new as its state.
_LAST = ("resume.npz", "status.json")


def is_remote(path) -> bool:
    """Whether `path` names a file system other than the local disk."""
    return path is not None and "://" in str(path)


def join(remote: str, *parts: str) -> str:
    return posixpath.join(str(remote), *parts)


def mirror_of(remote) -> Path:
    """The local folder that stands for `remote` (the same path every time,
    so a resume finds what an earlier session left)."""
    root = Path(
        os.environ.get("FINETUNE_CLI_MIRROR")
        or Path.home() / ".cache" / "finetune-cli" / "remote"
    )
    remote = str(remote).rstrip("/")
    digest = hashlib.sha256(remote.encode()).hexdigest()[:16]
    return root / digest / (posixpath.basename(remote) or "root")


def _gfile():
    import tensorflow as tf

    return tf.io.gfile


_STATE = ".sync.json"  # in the mirror: what was last sent or fetched


def _state(local: Path) -> dict:
    import json

    try:
        found = json.loads((local / _STATE).read_text())
    except (OSError, ValueError):
        return {}
    return found if isinstance(found, dict) else {}


def _save_state(local: Path, state: dict) -> None:
    import json

    from finetune_cli.files import atomic_write

    atomic_write(local / _STATE, json.dumps(state))


def _stamp(path: Path) -> list:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns]


def _download(src: str, dest: Path) -> None:
    """`src` to the local `dest`, whole or not at all (a temporary name,
    then renamed)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.partial")
    _gfile().copy(src, str(tmp), overwrite=True)
    os.replace(tmp, dest)


def push(local, remote) -> int:
    """Upload the files under `local` that changed (size or mtime) since
    they were last sent, each under a temporary name then renamed, the run
    state last; links to folders become text pointers (`<name>.txt`).
    Returns the number of files uploaded."""
    gfile = _gfile()
    local = Path(local)
    state = _state(local)
    files = []
    for dirpath, dirnames, filenames in os.walk(local):
        for d in dirnames:  # a link to a folder (`latest`): a text pointer
            link = Path(dirpath) / d
            if link.is_symlink() and not d.startswith("."):
                rel = link.relative_to(local).as_posix()
                write_pointer(join(remote, rel + ".txt"), os.readlink(link))
        dirnames[:] = sorted(
            d
            for d in dirnames
            if not d.startswith(".") and not (Path(dirpath) / d).is_symlink()
        )
        for name in sorted(filenames):
            if not name.startswith(".") and not (Path(dirpath) / name).is_symlink():
                files.append(Path(dirpath) / name)
    files.sort(key=lambda p: (p.name in _LAST, str(p)))
    sent = 0
    for path in files:
        rel = path.relative_to(local).as_posix()
        stamp = _stamp(path)
        if state.get(rel) == stamp:
            continue
        dest = join(remote, rel)
        gfile.makedirs(posixpath.dirname(dest))
        gfile.copy(str(path), dest + ".partial", overwrite=True)
        gfile.rename(dest + ".partial", dest, overwrite=True)
        state[rel] = stamp
        sent += 1
    if sent:
        _save_state(local, state)
    return sent


def write_pointer(dest: str, target: str) -> None:
    """A text pointer (`latest.txt`, a promotion's `DIR.txt`), replaced
    whole."""
    write_text(dest, target + "\n")


def write_text(dest: str, text: str) -> None:
    """`text` into the file `dest` (local or remote) under a temporary
    name, then renamed."""
    gfile = _gfile()
    gfile.makedirs(posixpath.dirname(dest))
    with gfile.GFile(dest + ".partial", "w") as f:
        f.write(text)
    gfile.rename(dest + ".partial", dest, overwrite=True)


def pull(remote, local) -> Path:
    """Download the folder `remote` into `local` (every file, unless the
    local copy is the one fetched last and the remote one has not changed
    since). Returns `local`."""
    gfile = _gfile()
    remote = str(remote).rstrip("/")
    local = Path(local)
    if not gfile.isdir(remote):
        from finetune_cli.errors import ConfigError

        raise ConfigError(f"{remote}: no such folder")
    local.mkdir(parents=True, exist_ok=True)
    state = _state(local)
    for dirpath, _, filenames in gfile.walk(remote):
        rel_dir = dirpath[len(remote) :].strip("/")
        for name in filenames:
            if name.endswith(".partial"):
                continue
            src = join(dirpath, name)
            rel = posixpath.join(rel_dir, name) if rel_dir else name
            dest = local / rel
            st = gfile.stat(src)
            seen = [st.length, st.mtime_nsec]
            if dest.is_file() and state.get("remote:" + rel) == seen:
                continue
            _download(src, dest)
            state["remote:" + rel] = seen
            state[rel] = _stamp(dest)  # what it is here: not to send back
    _save_state(local, state)
    return local


def run_mirror(remote_run: str) -> Path:
    """Where a remote run `<out>/<experiment>/<run>` is mirrored: where a
    run started on this machine was written (`mirror_of(<out>)/...`)."""
    experiment = posixpath.dirname(remote_run)
    out = posixpath.dirname(experiment)
    return (
        mirror_of(out) / posixpath.basename(experiment) / posixpath.basename(remote_run)
    )


def local_run(path) -> tuple[Path, str | None]:
    """(a local run folder or model file, the remote one it mirrors or
    None): a remote run folder (or a .keras file in one) is pulled first;
    `<experiment>/latest` follows `latest.txt`."""
    if not is_remote(path):
        return Path(path), None
    gfile = _gfile()
    path = str(path).rstrip("/")
    name = None
    if path.endswith(".keras"):
        path, name = posixpath.dirname(path), posixpath.basename(path)
    # A pointer first (`latest.txt`, a promotion's `DIR.txt`): a prefix-keyed
    # store (ram://) calls `latest` a folder when `latest.txt` exists.
    if gfile.exists(path + ".txt"):
        with gfile.GFile(path + ".txt") as f:
            path = join(posixpath.dirname(path), f.read().strip())
    mirror = pull(path, run_mirror(path))
    return (mirror / name if name else mirror), path


def fetch(path) -> str:
    """A local copy of the file `path` (itself when local)."""
    if not is_remote(path):
        return str(path)
    gfile = _gfile()
    dest = mirror_of(path)
    if not gfile.exists(str(path)):
        from finetune_cli.errors import ConfigError

        raise ConfigError(f"{path}: file not found")
    if not dest.is_file() or dest.stat().st_size != gfile.stat(str(path)).length:
        _download(str(path), dest)
    return str(dest)


def pull_csv(csv_path: str) -> str:
    """A local mirror of a remote `path,label` CSV and of the files its
    `path` column names (relative to the CSV's folder, as locally): the
    local CSV's path."""
    import csv
    import io

    gfile = _gfile()
    if not gfile.exists(csv_path):
        from finetune_cli.errors import DataError

        raise DataError(f"data.csv: file not found: {csv_path}")
    folder = posixpath.dirname(csv_path)
    local = mirror_of(folder)
    local.mkdir(parents=True, exist_ok=True)
    with gfile.GFile(csv_path, "rb") as f:
        raw = f.read()
    rows = csv.DictReader(io.StringIO(raw.decode("utf-8-sig")))
    for row in rows:
        rel = (row.get("path") or "").strip()
        if not rel or "://" in rel or rel.startswith("/"):
            continue  # the CSV check names it
        src, dest = join(folder, rel), local / rel
        if not gfile.exists(src):
            continue  # the CSV check names it (the local copy is not there)
        if not dest.is_file() or dest.stat().st_size != gfile.stat(src).length:
            _download(src, dest)
    target = local / posixpath.basename(csv_path)
    tmp = target.with_name(f".{target.name}.partial")
    tmp.write_bytes(raw)
    os.replace(tmp, target)
    return str(target)


_MIRRORED: dict = {}


def local_dir(path) -> Path:
    """A folder to read and write in place: `path` itself when local; for a
    remote one (the feature cache), its mirror, pulled on first use in this
    process (changed files only) and pushed at the end of each command
    (`flush`) and when the process ends. Eviction (`feature_cache.max_size`)
    frees the mirror, not the remote folder."""
    if not is_remote(path):
        return Path(path)
    key = str(path).rstrip("/")
    if key not in _MIRRORED:
        import atexit

        local = mirror_of(key)
        if _gfile().isdir(key):
            pull(key, local)
        local.mkdir(parents=True, exist_ok=True)
        atexit.register(_push_at_exit, local, key)
        _MIRRORED[key] = local
    return _MIRRORED[key]


def flush() -> None:
    """Upload every mirrored folder now (each command's end, `cli`)."""
    for key, local in _MIRRORED.items():
        push(local, key)


def _push_at_exit(local: Path, remote: str) -> None:
    import sys

    try:
        push(local, remote)
    except Exception as e:  # noqa: BLE001 - a cache: say so, never fail for it
        print(f"warning: could not upload {local} to {remote}: {e}", file=sys.stderr)

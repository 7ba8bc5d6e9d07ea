"""Where a run computes: one device, every local device, or several hosts.

`runtime.distribute` picks a `tf.distribute` strategy; this module builds it
and says what it is (a `Topology`). The rules a run follows under it:

- `data.batch_size` is the global batch: each step reads `batch_size`
  images in all, `batch_size / replicas` on each replica. The learning rate
  is not rescaled.
- The training file list is sharded explicitly: each epoch's shuffled list
  (the same on every worker) is dealt out by worker, and each epoch drops
  its last partial global batch so that every replica runs the same steps.
- `multi_worker` reads the cluster from `TF_CONFIG`. The chief (task
  `chief`, or worker 0 when there is none) writes the run folder; the other
  workers compute the same steps and write only to a temporary folder.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import socket
import time

from finetune_cli.errors import ConfigError


@dataclasses.dataclass
class Topology:
    """The strategy a run uses and its shape."""

    kind: str  # "none", "mirrored" or "multi_worker"
    strategy: object
    replicas: int = 1
    workers: int = 1
    task: str = "worker:0"
    chief: bool = True
    devices: tuple = ()

    @property
    def distributed(self) -> bool:
        return self.kind != "none"

    def per_replica_batch(self, batch_size: int) -> int:
        return batch_size // self.replicas

    def steps_per_epoch(self, n: int, batch_size: int) -> int:
        """Steps of one epoch over `n` training items.

        Without a strategy the last batch may be partial. With one, every
        worker reads the same number of full batches of its shard.
        """
        if not self.distributed:
            return max(1, -(-n // batch_size))
        return (n // self.workers) // (batch_size // self.workers)

    def describe(self) -> dict:
        return {
            "distribute": self.kind,
            "replicas": self.replicas,
            "workers": self.workers,
            "task": self.task,
            "devices": list(self.devices),
        }


def setup(runtime) -> Topology:
    """Build the strategy `runtime` asks for.

    Call before TensorFlow runs any op: logical devices and the
    multi-worker server can only be configured before then.

    Raises:
        ConfigError: an impossible request (logical devices after start, a
            missing or invalid TF_CONFIG, a cluster that does not answer).
    """
    import tensorflow as tf

    if runtime.logical_cpus:
        _split_cpu(tf, runtime.logical_cpus)
    kind = runtime.distribute
    if kind == "auto":
        # Physical, not logical: listing logical devices starts TensorFlow.
        many = len(tf.config.list_physical_devices("GPU")) > 1
        kind = "mirrored" if many else "none"
    if kind == "multi_worker":
        return _multi_worker(tf, runtime)
    gpus = tf.config.list_logical_devices("GPU")
    if kind == "none":
        return Topology("none", tf.distribute.get_strategy(), devices=_names(gpus))
    if kind == "mirrored":
        devices = _names(gpus or tf.config.list_logical_devices("CPU"))
        cross = None if gpus else tf.distribute.ReductionToOneDevice()
        strategy = tf.distribute.MirroredStrategy(devices, cross_device_ops=cross)
        return Topology(
            "mirrored",
            strategy,
            replicas=strategy.num_replicas_in_sync,
            devices=devices,
        )
    raise AssertionError(kind)


def adopt(model, topo: Topology):
    """Make `model` train and evaluate under `topo`'s strategy.

    Keras 3's `fit` fails under a multi-worker strategy in two places
    (keras-team/keras#20585): it builds the model from a first batch by
    reducing the batch's structure as if it were one tensor, and it
    averages each step's scalar logs across workers along an axis 0 they
    do not have. Without its own strategy, a model takes the strategy of
    the scope `fit`/`evaluate` run in and builds when the step is traced
    (the trainer runs those inside the scope); steps that give their logs
    a length-1 axis are averaged over every replica as intended.
    """
    if topo.kind != "multi_worker" or getattr(model, "_adopted", False):
        return model
    import tensorflow as tf

    def with_axis(step):
        def wrapped(data):
            logs = step(data)
            return {k: tf.reshape(v, [1]) for k, v in logs.items()}

        return wrapped

    model._distribute_strategy = None
    model.train_step = with_axis(model.train_step)
    model.test_step = with_axis(model.test_step)
    model._adopted = True
    return model


def _names(devices) -> tuple:
    return tuple(d.name for d in devices)


def _split_cpu(tf, n: int) -> None:
    (cpu,) = tf.config.list_physical_devices("CPU")[:1]
    try:
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration() for _ in range(n)]
        )
    except RuntimeError:
        # Already started (a second run in one process): fine if it matches.
        have = len(tf.config.list_logical_devices("CPU"))
        if have != n:
            raise ConfigError(
                "runtime.logical_cpus can only be set before TensorFlow "
                f"starts; this process already has {have} logical CPU(s). "
                f"Received: runtime.logical_cpus={n}"
            ) from None


def cluster() -> tuple[dict, str, int]:
    """(cluster spec, task type, task index) from TF_CONFIG."""
    raw = os.environ.get("TF_CONFIG")
    if not raw:
        raise ConfigError(
            "runtime.distribute: multi_worker reads the cluster from the "
            "TF_CONFIG environment variable, which is not set (docs/scale-out.md"
            "). Received: TF_CONFIG unset"
        )
    try:
        tf_config = json.loads(raw)
        spec = tf_config["cluster"]
        task = tf_config["task"]
        kind, index = task["type"], int(task["index"])
        if not _members(spec) or kind not in spec or index >= len(spec[kind]):
            raise ValueError("task not in cluster")
    except (ValueError, KeyError, TypeError, AttributeError):
        raise ConfigError(
            'TF_CONFIG must be JSON like {"cluster": {"worker": '
            '["host1:port", "host2:port"]}, "task": {"type": '
            '"worker", "index": 0}}. Received: '
            f"TF_CONFIG={raw[:200]!r}"
        ) from None
    return spec, kind, index


def _members(spec: dict) -> list:
    """Every task that trains: the chief (if any) and the workers."""
    return [*spec.get("chief", []), *spec.get("worker", [])]


def _multi_worker(tf, runtime) -> Topology:
    spec, kind, index = cluster()
    chief = kind == "chief" or (kind == "worker" and index == 0 and "chief" not in spec)
    me = spec[kind][index]
    members = _members(spec)
    peers = [a for a in members if a != me]
    _rendezvous(f"{kind}:{index}", me, peers, runtime.worker_timeout)
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    return Topology(
        "multi_worker",
        strategy,
        replicas=strategy.num_replicas_in_sync,
        workers=len(members),
        task=f"{kind}:{index}",
        chief=chief,
        devices=_names(tf.config.list_logical_devices("GPU"))
        or _names(tf.config.list_logical_devices("CPU")),
    )


def _rendezvous(task: str, me: str, peers: list, timeout: int) -> None:
    """Wait until every worker is up, for at most `timeout` seconds.

    TensorFlow waits for the cluster inside a call that nothing can
    interrupt, forever. So the workers meet first on their own addresses,
    in plain TCP: each listens on its address, connects to every peer, and
    goes on once it reached every peer and every peer reached it. Then the
    port is handed to TensorFlow.

    Raises:
        ConfigError: naming the addresses nothing answered at.
    """
    host, _, port = me.rpartition(":")
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind(("" if host == "localhost" else host, int(port)))
    except (OSError, ValueError) as e:
        raise ConfigError(
            f"worker {task} cannot listen on its TF_CONFIG address {me}: {e}"
        ) from None
    listener.listen(len(peers) + 4)
    listener.settimeout(0.2)
    deadline = time.monotonic() + timeout
    reached, heard = set(), set()
    try:
        while time.monotonic() < deadline:
            with contextlib.suppress(socket.timeout, OSError):
                conn, _ = listener.accept()
                with conn:
                    conn.settimeout(2)
                    heard.add(conn.recv(256).decode(errors="replace"))
            for peer in peers:
                if peer not in reached and _send(peer, me):
                    reached.add(peer)
            if len(reached) == len(peers) and heard >= set(peers):
                return
    finally:
        listener.close()
    silent = sorted(set(peers) - reached)
    raise ConfigError(
        f"worker {task} ({me}) could not reach the cluster in {timeout} s "
        "(runtime.worker_timeout): "
        + (
            f"nothing answers at {', '.join(silent)}"
            if silent
            else "every address answers, but not every worker joined"
        )
        + "; start every worker listed in TF_CONFIG"
    )


def _send(address: str, me: str) -> bool:
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=1) as s:
            s.sendall(me.encode())
            return True
    except (OSError, ValueError):
        return False


def lost_worker(e, me: str) -> str:
    """Which worker a collective op's error says went away, in TF_CONFIG's
    terms ("worker:1"; `me` is this task's), or the error's first line."""
    text = getattr(e, "message", None) or str(e)
    found = re.findall(r"/job:(\w+)/(?:replica:\d+/)?task:(\d+)", text)
    others = sorted({f"{j}:{t}" for j, t in found} - {me})
    if others:
        return f"{', '.join(others)} stopped answering"
    lines = text.strip().splitlines()
    return lines[0][:200] if lines else type(e).__name__


# What a collective raises when a peer dies or the cluster aborts.
def peer_errors():
    import tensorflow as tf

    return (
        tf.errors.UnavailableError,
        tf.errors.DeadlineExceededError,
        tf.errors.CancelledError,
        tf.errors.AbortedError,
    )

"""finetune-cli on a Ray cluster, through Ray Train's TensorflowTrainer.

Ray starts one training worker per `num_workers` and sets TF_CONFIG in
each (the cluster's addresses and the worker's index) before calling
`train_loop`; finetune-cli, run in that worker with
`runtime.distribute: multi_worker`, reads it from there. Worker 0 is the
chief and writes the run folder (on object storage here, so every node
sees it); the others write only to temporary folders.

    pip install "ray[train]" finetune-cli
    python examples/cluster/ray_train.py flowers.yaml --workers 2 --gpu

The config must set `runtime.distribute: multi_worker`, a `data.records`
pack (or data every node can read) and an `experiment.output_dir` every
node can write (gs://..., or a shared mount).
"""

from __future__ import annotations

import argparse
import subprocess


def train_loop(config: dict) -> None:
    # TF_CONFIG is in this process's environment, set by Ray; the command
    # inherits it. A non-zero exit (5: a peer died; resumable) fails the
    # worker, and Ray reports it.
    subprocess.run(
        ["finetune-cli", "finetune", config["config"], "--plain"], check=True
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("config")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--gpu", action="store_true")
    args = p.parse_args()

    from ray.train import ScalingConfig
    from ray.train.tensorflow import TensorflowTrainer

    trainer = TensorflowTrainer(
        train_loop,
        train_loop_config={"config": args.config},
        scaling_config=ScalingConfig(num_workers=args.workers, use_gpu=args.gpu),
    )
    trainer.fit()


if __name__ == "__main__":
    main()

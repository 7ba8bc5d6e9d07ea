"""Benchmark: `finetune-cli select` over 4 backbones on the flower photos.

MobileNetV2 takes the shared ImageNet weights; ResNet50, EfficientNetB0
and DenseNet121 take weights files this script makes (each application
built with random weights and saved, no-top, at 224 px): their speed,
size and the time `select` takes are real, their probe accuracy is that
of random features (and says nothing of the architecture). The whole
command runs twice in a process of its own: cold (no feature cache) and
warm (the cache of the first run reused), and the ratio is printed.

    python bench/select_backbones.py
    python bench/select_backbones.py --models MobileNetV2 ResNet50
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

import yaml

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parent))
import _assets
import _results  # noqa: E402


def made_weights(name: str, folder: Path) -> str:
    """A no-top weights file of `name` at 224 px with random weights."""
    import keras

    from finetune_cli.model import applications

    path = folder / f"{name.lower()}_random_no_top.weights.h5"
    if not path.exists():
        keras.utils.set_random_seed(0)
        base = applications.get(name).constructor()(
            include_top=False, weights=None, input_shape=(224, 224, 3), pooling="avg"
        )
        base.save_weights(path)
        keras.backend.clear_session()
    return str(path)


def main(argv=None) -> int:
    p = _assets.parser(__doc__)
    p.add_argument(
        "--models",
        nargs="+",
        default=["MobileNetV2", "ResNet50", "EfficientNetB0", "DenseNet121"],
    )
    args = p.parse_args(argv)
    if _assets.missing(args):
        return 0
    work = Path(tempfile.mkdtemp(prefix="bench-select-"))
    cfg = yaml.safe_load((_assets.ROOT / "configs" / "flowers.yaml").read_text())
    cfg["data"]["dir"] = args.data
    cfg["model"]["weights"] = args.weights
    config = work / "flowers.yaml"
    config.write_text(yaml.safe_dump(cfg, sort_keys=False))
    weights = [f"MobileNetV2={args.weights}"] + [
        f"{m}={made_weights(m, work)}" for m in args.models if m != "MobileNetV2"
    ]
    cmd = ["select", config, "--models", " ".join(args.models), "--force"]
    for w in weights:
        cmd += ["--weights", w]
    runs = {}
    for label in ("cold", "warm"):
        runs[label] = _assets.run_cli(*cmd, "--json", cwd=work, stdout=True)
        print(f"{label}: {runs[label][0]:.0f} s", flush=True)
    ranking = json.loads(runs["cold"][2])["ranking"]
    rows = [
        [
            r["name"],
            "shared ImageNet file" if r["name"] == "MobileNetV2" else "made (random)",
            f"{r['val_accuracy']:.4f}",
            f"{r['images_per_s']:.1f}",
            f"{r['params'] / 1e6:.1f}M",
            f"{r['export_bytes'] / 1e6:.1f} MB",
            f"{r['feature_seconds']:.0f} s",
        ]
        for r in ranking
    ]
    cold, warm = runs["cold"][0], runs["warm"][0]
    rows.append(
        ["whole command", "", "", "", "", "", f"cold {cold:.0f} s, warm {warm:.0f} s"]
    )
    rows.append(["warm vs cold", "", "", "", "", "", f"{warm / cold:.2f}x"])
    _results.report(
        "select_backbones",
        f"finetune-cli select, {len(args.models)} backbones on the flower photos",
        ["model", "weights", "probe val acc", "img/s", "params", "export", "features"],
        rows,
        note="Only MobileNetV2 has real (ImageNet) weights here; the others' "
        "accuracy is of random features, their speed, size and time are real. "
        "Times include the process start, the pre-flight and the probe.",
    )
    print(f"(work folder: {work})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

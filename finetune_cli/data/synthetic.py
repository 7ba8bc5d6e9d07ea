"""Synthetic labelled images, so the demo and the tests run offline.

Two class sets of simple shapes on textured backgrounds:

- `source`: circle, square, triangle, star
- `target`: ring, cross, diamond, hexagon

A base trained on `source` learns edges, corners and contours; fine-tuning it
on a small `target` set shows transfer for real, with no download.

`multi_label` (`generate_multi_label`): images of a 2x2 grid of cells,
each shape of the `source` set in a cell of its own with probability 0.4
(none at all sometimes), and a `labels.csv` whose label cell lists the
shapes drawn joined by `|`, for `task: multi_label`. Images are
written as real files, folder per class, in mixed formats (JPEG, PNG, BMP,
GIF), some grayscale and some RGBA, as users' folders often are.
"""

from __future__ import annotations

import math
import random
import shutil
from pathlib import Path

import numpy as np
from PIL import Image
from PIL import ImageDraw

from finetune_cli.errors import ConfigError

TASKS = {
    "source": ("circle", "square", "triangle", "star"),
    "target": ("ring", "cross", "diamond", "hexagon"),
}

# (format, PIL mode) cycled over the images of each class; the unusual ones
# come early so even a handful of images per class has them all.
_FORMATS = [
    ("jpg", "RGB"),
    ("png", "L"),
    ("png", "RGBA"),
    ("jpg", "RGB"),
    ("bmp", "RGB"),
    ("jpg", "RGB"),
    ("gif", "P"),
    ("jpg", "RGB"),
    ("png", "RGB"),
    ("jpg", "RGB"),
    ("jpg", "RGB"),
]


def _polygon(cx, cy, radius, sides, angle, ratio=1.0):
    return [
        (
            cx + radius * math.cos(angle + 2 * math.pi * k / sides),
            cy + ratio * radius * math.sin(angle + 2 * math.pi * k / sides),
        )
        for k in range(sides)
    ]


def _rotate(points, cx, cy, angle):
    c, s = math.cos(angle), math.sin(angle)
    return [
        (cx + (x - cx) * c - (y - cy) * s, cy + (x - cx) * s + (y - cy) * c)
        for x, y in points
    ]


def _star(cx, cy, r, angle):
    pts = []
    for k in range(10):
        rad = r if k % 2 == 0 else r * 0.45
        a = angle + math.pi * k / 5
        pts.append((cx + rad * math.cos(a), cy + rad * math.sin(a)))
    return pts


def _cross(cx, cy, r, angle):
    w = r * 0.35
    pts = [
        (-w, -r),
        (w, -r),
        (w, -w),
        (r, -w),
        (r, w),
        (w, w),
        (w, r),
        (-w, r),
        (-w, w),
        (-r, w),
        (-r, -w),
        (-w, -w),
    ]
    return _rotate([(cx + x, cy + y) for x, y in pts], cx, cy, angle)


def draw_shape(shape: str, size: int, rng: random.Random) -> Image.Image:
    """One RGB image of `shape` on a random textured background."""
    nprng = np.random.default_rng(rng.getrandbits(32))
    # Background: a colour gradient plus noise, so the shape is not the only
    # structure in the picture.
    c0 = np.array([rng.randint(0, 255) for _ in range(3)], dtype=np.float32)
    c1 = np.array([rng.randint(0, 255) for _ in range(3)], dtype=np.float32)
    t = np.linspace(0, 1, size, dtype=np.float32)[:, None, None]
    bg = c0 * (1 - t) + c1 * t
    bg = np.broadcast_to(bg, (size, size, 3)) + nprng.normal(0, 10, (size, size, 3))
    img = Image.fromarray(np.clip(bg, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img)
    mean = (c0 + c1) / 2
    # A fill colour far enough from the background to be visible.
    while True:
        fill = tuple(rng.randint(0, 255) for _ in range(3))
        if np.abs(np.array(fill) - mean).sum() > 180:
            break
    r = size * rng.uniform(0.28, 0.42)
    cx = rng.uniform(r + 1, size - r - 1)
    cy = rng.uniform(r + 1, size - r - 1)
    angle = rng.uniform(0, 2 * math.pi)
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "ring":
        draw.ellipse(
            [cx - r, cy - r, cx + r, cy + r], outline=fill, width=max(2, int(r / 3))
        )
    elif shape == "square":
        draw.polygon(_polygon(cx, cy, r, 4, angle), fill=fill)
    elif shape == "triangle":
        draw.polygon(_polygon(cx, cy, r, 3, angle), fill=fill)
    elif shape == "hexagon":
        draw.polygon(_polygon(cx, cy, r, 6, angle), fill=fill)
    elif shape == "star":
        draw.polygon(_star(cx, cy, r, angle), fill=fill)
    elif shape == "cross":
        draw.polygon(_cross(cx, cy, r, angle), fill=fill)
    elif shape == "diamond":
        pts = _polygon(cx, cy, r, 4, 0.0, ratio=0.5)
        draw.polygon(_rotate(pts, cx, cy, angle), fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return img


def _background(size: int, rng: random.Random) -> Image.Image:
    """A textured background with no shape (a gradient plus noise)."""
    nprng = np.random.default_rng(rng.getrandbits(32))
    c0 = np.array([rng.randint(0, 255) for _ in range(3)], dtype=np.float32)
    c1 = np.array([rng.randint(0, 255) for _ in range(3)], dtype=np.float32)
    t = np.linspace(0, 1, size, dtype=np.float32)[:, None, None]
    bg = np.broadcast_to(c0 * (1 - t) + c1 * t, (size, size, 3))
    bg = bg + nprng.normal(0, 10, (size, size, 3))
    return Image.fromarray(np.clip(bg, 0, 255).astype(np.uint8), "RGB")


def generate_multi_label(
    out_dir, *, images: int = 200, size: int = 64, seed: int = 0, force: bool = False
) -> dict:
    """Write `images` multi-label images and `labels.csv` under `out_dir`.
    Returns the images carrying each label (and "none": with no label)."""
    shapes = TASKS["source"]
    if images < 1 or size < 16:
        raise ConfigError(
            f"--per-class must be >= 1 and --size >= 16. "
            f"Received: images={images}, size={size}"
        )
    tmp = _fresh(Path(out_dir), force)
    rng = random.Random(f"{seed}:multi_label")
    half = size // 2
    rows, counts = ["path,label"], {s: 0 for s in (*shapes, "none")}
    (tmp / "images").mkdir(parents=True)
    for i in range(images):
        chosen = [s for s in shapes if rng.random() < 0.4]
        img = _background(size, rng)
        cells = rng.sample(range(4), len(chosen))
        for shape, cell in zip(chosen, cells, strict=True):
            tile = draw_shape(shape, half, rng)
            img.paste(tile, ((cell % 2) * half, (cell // 2) * half))
        name = f"images/{i:05d}.{'png' if i % 3 == 1 else 'jpg'}"
        img.save(tmp / name, **({"quality": 92} if name.endswith("jpg") else {}))
        rows.append(f"{name},{'|'.join(chosen)}")
        for s in chosen or ["none"]:
            counts[s] += 1
    (tmp / "labels.csv").write_text("\n".join(rows) + "\n")
    tmp.rename(out_dir)
    return counts


def _fresh(out_dir: Path, force: bool) -> Path:
    """The temporary folder to fill for `out_dir` (which must not exist,
    or is removed with `force`)."""
    if out_dir.exists():
        if not force:
            raise ConfigError(f"{out_dir} already exists; pass --force to replace it")
        shutil.rmtree(out_dir)
    tmp = out_dir.with_name(f".{out_dir.name}.partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    return tmp


def generate(
    out_dir,
    task: str = "source",
    *,
    per_class: int = 100,
    size: int = 64,
    seed: int = 0,
    force: bool = False,
) -> dict:
    """Write `per_class` images of each class of `task` under `out_dir`.

    The same arguments always give the same files. Returns images per class.

    Raises:
        ConfigError: unknown task, bad sizes, or `out_dir` exists (without
            `force`).
    """
    if task == "multi_label":
        return generate_multi_label(
            out_dir, images=per_class, size=size, seed=seed, force=force
        )
    if task not in TASKS:
        raise ConfigError(
            f"--task must be one of {', '.join(TASKS)} or multi_label. "
            f"Received: {task!r}"
        )
    if per_class < 1 or size < 16:
        raise ConfigError(
            f"--per-class must be >= 1 and --size >= 16. "
            f"Received: per_class={per_class}, size={size}"
        )
    out_dir = Path(out_dir)
    tmp = _fresh(out_dir, force)
    counts = {}
    for shape in TASKS[task]:
        rng = random.Random(f"{seed}:{task}:{shape}")
        folder = tmp / shape
        folder.mkdir(parents=True)
        for i in range(per_class):
            ext, mode = _FORMATS[i % len(_FORMATS)]
            img = draw_shape(shape, size, rng)
            if mode == "RGBA":
                img = img.convert("RGBA")
                img.putalpha(255)
            elif mode == "P":
                img = img.convert("P", palette=Image.Palette.ADAPTIVE)
            elif mode != "RGB":
                img = img.convert(mode)
            img.save(
                folder / f"{shape}_{i:04d}.{ext}",
                **({"quality": 92} if ext == "jpg" else {}),
            )
        counts[shape] = per_class
    # Appear complete or not at all.
    tmp.rename(out_dir)
    return counts

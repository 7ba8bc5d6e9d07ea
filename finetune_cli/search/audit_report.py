"""What `finetune-cli audit` shows: its findings as a page with
thumbnails, and in a line each."""

from __future__ import annotations

import html
from pathlib import Path

# The kinds of finding, in the order the report shows them.
KINDS = ("label_error", "duplicate", "cross_class_duplicate", "cross_split_duplicate")
KINDS += ("outlier", "unreadable")


def render_html(result, per_kind: int = 60) -> str:
    """The report page: per kind of finding, its first `per_kind` with
    thumbnails (`result`: an `audit.AuditResult`)."""
    from finetune_cli.evaluate.plots import thumbnail_tag

    e = html.escape
    counts = result.counts()
    sections = []
    for kind in KINDS:
        shown = [f for f in result.findings if f.kind == kind][:per_kind]
        if not shown:
            continue
        figures = "".join(
            f"<figure>{thumbnail_tag(f.file) if kind != 'unreadable' else ''}"
            f"<figcaption>{e(Path(f.file).name)}<br>{e(f.label)} "
            f"({f.score:.3f})<br>{e(f.other)}</figcaption></figure>"
            for f in shown
        )
        sections.append(
            f"<h2 id='{kind}'>{kind.replace('_', ' ')}: {counts[kind]}</h2>"
            f"<div>{figures}</div>"
        )
    p = result.params
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>finetune-cli audit</title>
<style>body {{ font-family: sans-serif; margin: 2em; }}
figure {{ display: inline-block; margin: 4px; width: 150px; font-size: 11px;
text-align: center; vertical-align: top; word-wrap: break-word; }}</style>
</head><body><h1>Data audit</h1>
<p>{result.images} images, {len(result.classes)} classes; features of
{e(p["model"])} ({e(str(p["weights"]))}, {p["image_size"][0]} px);
{p["folds"]}-fold probe accuracy {p["probe_accuracy"]:.4f}; duplicates at
cosine similarity &ge; {p["duplicate_threshold"]}. Scores: label errors, the
out-of-fold probability of the given label; duplicates, the similarity;
outliers, the robust z-score of the similarity to the nearest class.</p>
{"".join(sections) or "<p>Nothing found.</p>"}
</body></html>
"""


def describe(f) -> str:
    """One finding in a line, short."""
    name = Path(f.file).name
    if f.kind == "label_error":
        return f"{name}: labelled {f.label} ({f.score:.2f}), looks like {f.other}"
    if f.kind == "outlier":
        return f"{name} ({f.label}): far from every class (z {f.score:.1f})"
    if f.kind == "unreadable":
        return f"{name}: {f.other}"
    other = Path(f.other.split(" (")[0]).name
    return f"{name} ({f.label}) ~ {other} ({f.score:.3f})"

"""How often later steps show old classes: the procedural benchmark next to PASCAL VOC (overlapped setting).

    python benchmarks/cooccurrence.py        # shapes 5-1, generator versions 1 and 2, next to VOC 15-1
    python benchmarks/cooccurrence.py --protocol 6-1 --shapes-version 2 --train-size 10000 --json runs/cooc.json
    python benchmarks/cooccurrence.py --voc-root ../shared/data/voc_mini   # adds VOC pixel shares read from masks

A step's training images are those showing any of its new classes. Per step, and averaged over the
later steps (all but the base step): the step's images, the share showing any old class, the shares
of the most frequent and of the median old class, how many old classes appear in more than 1% / 5% /
20% of them, and the old classes' share of their labelled pixels; then the base classes under 1% of
every later step's images, the foreground share of all labelled pixels and the classes per image.

`shapes` is generated (--shapes-version, --train-size, --image-size, --data-seed). VOC comes from
per-image class lists (--voc-stats, a CSV of `image_id,classes` with space-separated class ids), which
carry no pixel counts, and from a VOC-layout directory of masks (--voc-root), which does. Prints
Markdown tables; ``--json PATH`` writes every figure as fractions in [0, 1].
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path

from hrhf.data import ShapesDataset, VOCSegmentation
from hrhf.data.cooccurrence import THRESHOLDS, class_sets_of, count_pixels, protocol_statistics
from hrhf.data.real import VOC_CLASSES
from hrhf.report import pct
from hrhf.tasks import NUM_CLASSES, make_task

ROOT = Path(__file__).resolve().parents[1]
VOC_STATS = ROOT.parent / "shared" / "data" / "voc_stats" / "train_aug_image_classes.csv"


def read_class_lists(path: Path) -> list[frozenset[int]]:
    """Per-image class sets of a CSV with columns image_id, classes (space-separated ids)."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if rows and "classes" not in rows[0]:
        raise ValueError(f"{path}: expected the columns image_id,classes, got {list(rows[0])}")
    return [frozenset(int(c) for c in row["classes"].split()) for row in rows]


def shapes_source(protocol: str, version: int, size: int, image_size: int, seed: int) -> dict:
    """Figures of generated `shapes` training images under a shapes protocol."""
    data = ShapesDataset("train", size=size, image_size=image_size, seed=seed, version=version)
    counts = count_pixels((data.render(i)[1] for i in range(len(data))), data.num_classes)
    stats = protocol_statistics(class_sets_of(counts), make_task("shapes", protocol), data.num_classes, counts)
    return {"label": f"shapes v{version} {protocol}", "dataset": "shapes", "input": data.identity(),
            "class_names": data.class_names[1:], **stats}


def voc_lists_source(protocol: str, path: Path) -> dict:
    """Figures of VOC per-image class lists under a VOC protocol (no pixel counts)."""
    stats = protocol_statistics(read_class_lists(path), make_task("voc", protocol), NUM_CLASSES["voc"])
    return {"label": f"VOC {protocol}", "dataset": "voc", "input": {"class_lists": str(path)},
            "class_names": VOC_CLASSES, **stats}


def voc_masks_source(protocol: str, root: str, split: str, aug_list: bool) -> dict:
    """Figures of the masks of a VOC-layout directory under a VOC protocol."""
    data = VOCSegmentation(root, split=split, aug_list=aug_list)
    counts = count_pixels((data.load_mask(i).numpy() for i in range(len(data))), data.num_classes)
    stats = protocol_statistics(class_sets_of(counts), make_task("voc", protocol), data.num_classes, counts)
    return {"label": f"VOC {protocol} masks ({len(data)})", "dataset": "voc", "input": data.identity(),
            "class_names": VOC_CLASSES, **stats}


def _named(source: dict, cls: int | None, share: float | None) -> str:
    if cls is None or share is None:
        return "-"
    return f"{pct(share)} ({source['class_names'][cls - 1]})" if share > 0 else pct(share)


def _above(counts: list[float], of: float) -> str:
    return " / ".join(f"{c:.3g}" for c in counts) + f" of {of:.3g}"


def _most_frequent(source: dict) -> tuple[int | None, float | None]:
    frequency = source["dataset"]["class_frequency"]
    if not frequency:
        return None, None
    cls = max(frequency, key=frequency.get)
    return cls, frequency[cls]


def summary_table(sources: list[dict]) -> str:
    """Markdown table: one column per source, the later steps' means and the dataset figures as rows."""
    thresholds = " / ".join(f"{100 * t:g}%" for t in THRESHOLDS)

    def row(name: str, cells: list[str]) -> str:
        return f"| {name} | " + " | ".join(cells) + " |"

    rows = [
        row("", [s["label"] for s in sources]),
        "|---|" + "---|" * len(sources),
    ]
    mean = [s["later_mean"] for s in sources]
    rows += [
        row("step images (mean of later steps)", [f"{m['images']:.0f}" for m in mean]),
        row("any old class, % of a step's images", [pct(m["any_old"]) for m in mean]),
        row("most frequent old class, %", [pct(m["top_old"]) for m in mean]),
        row("median old class, %", [pct(m["median_old"]) for m in mean]),
        row(f"old classes above {thresholds}", [_above(m["old_above"], m["old_classes"]) for m in mean]),
        row("old classes' share of a step's pixels, %", [pct(m["old_pixels"]) for m in mean]),
        row("base classes under 1% of every later step",
            [f"{len(s['base_rare_every_later_step'])} of {s['base_classes']}" for s in sources]),
        row("images", [str(s["dataset"]["images"]) for s in sources]),
        row("foreground, % of labelled pixels", [pct(s["dataset"]["foreground_pixels"]) for s in sources]),
        row("classes per image", [f"{s['dataset']['classes_per_image']:.2f}" for s in sources]),
        row("images with 1 / 2 / 3 / 4+ classes, %",
            [" / ".join(f"{100 * v:.0f}" for v in s["dataset"]["images_with_classes"]) for s in sources]),
        row("most frequent class, % of images", [_named(s, *_most_frequent(s)) for s in sources]),
    ]
    return "\n".join(rows)


def step_table(source: dict) -> str:
    """Markdown table of one source's steps."""
    names = source["class_names"]
    thresholds = " / ".join(f"{100 * t:g}%" for t in THRESHOLDS)
    rows = [
        f"| step | new | images | any old | most frequent old | median old | old above {thresholds} | old pixels |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for s in source["steps"][1:]:
        new = ", ".join(names[c - 1] for c in s["new_classes"])
        top = _named(source, s["top_old_class"], s["top_old"])
        above = _above(s["old_above"], s["old_classes"])
        rows.append(
            f"| {s['step']} | {new} | {s['images']} | {pct(s['any_old'])} | {top} | {pct(s['median_old'])} | {above}"
            f" | {pct(s['old_pixels'])} |"
        )
    base = ", ".join(names[c - 1] for c in source["base_rare_every_later_step"]) or "none"
    rows.append("")
    rows.append(f"Base classes under 1% of every later step's images: {base}.")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    """Measure the sources, print the tables, optionally write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--protocol", default="5-1", help="shapes protocol (default 5-1)")
    parser.add_argument("--shapes-version", type=int, nargs="*", default=[1, 2],
                        help="shapes generator versions, one column each (default 1 2; none: no shapes column)")
    parser.add_argument("--train-size", type=int, default=2000, help="generated shapes training images")
    parser.add_argument("--image-size", type=int, default=64, help="shapes image side in pixels")
    parser.add_argument("--data-seed", type=int, default=0, help="shapes generator seed")
    parser.add_argument("--voc-protocol", default="15-1", help="VOC protocol (default 15-1)")
    parser.add_argument("--voc-stats", default=str(VOC_STATS),
                        help="CSV of VOC per-image class lists ('' to leave out; default: the train_aug list)")
    parser.add_argument("--voc-root", default=None, help="VOC-layout directory whose masks to read (local or fsspec)")
    parser.add_argument("--voc-split", default="train", help="list of --voc-root to read (default train)")
    parser.add_argument("--voc-aug", action="store_true", help="read --voc-root's SegmentationClassAug list")
    parser.add_argument("--json", default=None, help="write every figure to this path")
    args = parser.parse_args(argv)

    sources = []
    timings = {}
    for version in args.shapes_version:
        start = time.perf_counter()
        sources.append(shapes_source(args.protocol, version, args.train_size, args.image_size, args.data_seed))
        timings[sources[-1]["label"]] = time.perf_counter() - start
    if args.voc_stats:
        path = Path(args.voc_stats)
        if path.is_file():
            sources.append(voc_lists_source(args.voc_protocol, path))
        else:
            print(f"note: no VOC class lists at {path}; VOC column left out", file=sys.stderr)
    if args.voc_root:
        sources.append(voc_masks_source(args.voc_protocol, args.voc_root, args.voc_split, args.voc_aug))
    if not sources:
        parser.error("nothing to measure: give --shapes-version, --voc-stats or --voc-root")

    print("Overlapped setting, later steps' means (shares of a step's training images):\n")
    print(summary_table(sources))
    for source in sources:
        print(f"\n{source['label']}, per step:\n")
        print(step_table(source))
    if timings:
        print("\n" + ", ".join(f"{k}: {v:.1f} s" for k, v in timings.items()), file=sys.stderr)
    if args.json:
        out = Path(args.json)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"command": sys.argv if argv is None else argv, "sources": sources}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Does the inversion make every old class? Per class, the share of each synthetic object the old model labels as it.

    python benchmarks/inversion_hits.py --checkpoint runs/quality-cache/base-c1-2-3-4-5-oNone-s0/step-0.pt \
        --variant "" --variant "inversion.jitter=0,inversion.init_std=0.1"

For each checkpoint and each variant (comma-separated overrides of the inversion settings stored in the
checkpoint's config; "" keeps them), synthesises every base class of the checkpoint as the next step
would (``inversion.images_per_scale`` images at each of ``inversion.scales``; a later step's model is
the teacher of the step after it) and prints a Markdown table
of the hit ratio per class: the mean over the class's images of (pixels the old model labels as the
target class) / (the SAA ratio r asked of the image). About 1 means objects of the asked size; about 0
means the class was not made and will not be replayed. Nothing here looks at a trained student's mIoU.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time

import torch

from hrhf.config import apply_overrides, from_dict
from hrhf.inversion import SegInversion, make_targets, object_area
from hrhf.losses import predicted_classes
from hrhf.models import load_checkpoint
from hrhf.pixels import normalize
from hrhf.pipeline import sources_of, task_of
from hrhf.report import class_hit_ratios


def hit_ratios(
    checkpoint: str, overrides: list[str], judge: tuple[torch.nn.Module, dict] | None = None
) -> tuple[list[str], list[float], float, list[float] | None]:
    """Class names, per-class hit ratio, seconds of one inversion of every class of ``checkpoint``, judged ratios.

    ``judge`` is a loaded checkpoint (model, payload) whose base classes are the checkpoint's, in the same
    order: a step-0 model trained apart, which judges a later step's model too.
    """
    teacher, payload = load_checkpoint(checkpoint)
    if judge is not None and judge[1]["classes"][0] != payload["classes"][0]:
        raise ValueError(f"the judge's base classes are {judge[1]['classes'][0]}, the checkpoint's "
                         f"{payload['classes'][0]}: a judge must be trained on the same classes in the same order")
    cfg = apply_overrides(from_dict(payload["config"]), overrides)
    names = sources_of(cfg)[0].class_names
    class_ids = task_of(cfg).steps[0]
    targets = make_targets(list(range(1, len(class_ids) + 1)), cfg.inversion.scales, cfg.inversion.images_per_scale,
                           base_seed=cfg.seed)
    start = time.perf_counter()
    with SegInversion(teacher, cfg.inversion, cfg.data.image_size) as inverter:
        result = inverter.invert(targets)
    seconds = time.perf_counter() - start
    by_class = class_hit_ratios(result.meta)
    hits = [by_class[k] for k in range(1, len(class_ids) + 1)]
    judged = None
    if judge is not None:
        judged_by_class = class_hit_ratios(judged_meta(judge[0], result.images, result.meta))
        judged = [judged_by_class[k] for k in range(1, len(class_ids) + 1)]
    return [names[c] for c in class_ids], hits, seconds, judged


@torch.no_grad()
def judged_meta(judge: torch.nn.Module, images: torch.Tensor, meta: list[dict]) -> list[dict]:
    """``meta`` with each image's area as ``judge`` labels its target class instead of the inverted model."""
    judge.eval()
    masks = torch.cat([predicted_classes(judge(normalize(chunk))) for chunk in images.split(64)])
    classes = torch.tensor([m["class"] for m in meta])
    area = object_area(masks, classes)
    return [{**m, "area": float(a)} for m, a in zip(meta, area)]


def main(argv: list[str] | None = None) -> int:
    """Print the hit-ratio table of every checkpoint and variant."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", action="append", required=True, help="a step-0 checkpoint (repeatable)")
    parser.add_argument("--variant", action="append", default=None,
                        help='comma-separated SECTION.KEY=VALUE overrides (repeatable; "" for the stored settings)')
    parser.add_argument("--judge", default=None,
                        help="a model of the same base classes trained from another seed: also print the ratios it gives")
    args = parser.parse_args(argv)
    variants = args.variant if args.variant is not None else [""]
    torch.set_num_threads(1)
    judge = load_checkpoint(args.judge) if args.judge else None
    header = None
    command = "python benchmarks/inversion_hits.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    print(f"Command: `{command.strip()}`\n")
    for checkpoint in args.checkpoint:
        for variant in variants:
            overrides = [o for o in variant.split(",") if o]
            names, hits, seconds, judged = hit_ratios(checkpoint, overrides, judge)
            if names != header:  # checkpoints of another class order get their own header
                header = names
                print("| checkpoint | variant | " + " | ".join(names) + " | lowest | s |")
                print("|---" * (len(names) + 4) + "|")
            print(f"| {checkpoint} | {variant or 'stored'} | " + " | ".join(f"{h:.2f}" for h in hits)
                  + f" | {min(hits):.2f} | {seconds:.0f} |", flush=True)
            if judged is not None:
                print(f"| judged by {args.judge} | {variant or 'stored'} | " + " | ".join(f"{h:.2f}" for h in judged)
                      + f" | {min(judged):.2f} | |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""What a Faster R-CNN + FPN epoch costs on this machine, per backbone: to size a detection comparison that fits it.

For each backbone, one process builds the detector of `attnlab detect train` (same builder, same data pipeline) on
detection-fashion-mnist at the given canvas and times ``--steps`` training steps (forward, backward, SGD update) and
``--steps`` evaluation batches (inference + torchmetrics' COCO mAP update), after one warm-up step each. Reported per
image: process CPU time (what the work costs, robust to other processes on a shared machine) and wall time, the
median over steps; then what one epoch of ``--train-images`` plus one validation pass of ``--val-images`` costs.

    OMP_NUM_THREADS=1 python benchmarks/detection_cost.py --models resnet20,se_resnet20,aw_resnet20,aw_se_resnet20 \
        --canvas 64 --out studies/results/benchmarks/detection_cost.csv
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import time

import torch

from attnlab.data.detection import detection_batches
from attnlab.detection import DetectConfig
from attnlab.detection.task import _for_training, build_detector, load_data
from attnlab.experiment.presets import LIGHT_HEADS
from attnlab.train.optim import make_optimizer


def timed(fn) -> tuple[float, float]:
    cpu, wall = time.process_time(), time.perf_counter()
    fn()
    return time.process_time() - cpu, time.perf_counter() - wall


def measure(cfg: DetectConfig, steps: int) -> dict[str, float]:
    from torchmetrics.detection import MeanAveragePrecision

    torch.manual_seed(0)
    data = load_data(cfg)
    model = build_detector(cfg, data)
    optimizer = make_optimizer(model, cfg)
    stream = detection_batches(data.train, cfg.batch_size, train=True, seed=0)
    batches = [next(stream) for _ in range(steps + 1)]

    def train_step(images, targets):
        losses = model(images, [_for_training(t) for t in targets])
        optimizer.zero_grad()
        sum(losses.values()).backward()
        optimizer.step()

    model.train()
    train = [timed(lambda b=b: train_step(*b)) for b in batches][1:]
    metric = MeanAveragePrecision(box_format="xyxy", iou_type="bbox", backend="pycocotools")

    @torch.no_grad()
    def eval_step(images, targets):
        detections = model(images)
        metric.update([{**d, "labels": d["labels"] - 1} for d in detections], targets)

    model.eval()
    evaluate = [timed(lambda b=b: eval_step(*b)) for b in batches][1:]
    n = cfg.batch_size
    return {
        "params": sum(p.numel() for p in model.parameters()),
        "train_cpu_ms_per_img": 1000 * statistics.median(c for c, _ in train) / n,
        "train_wall_ms_per_img": 1000 * statistics.median(w for _, w in train) / n,
        "eval_cpu_ms_per_img": 1000 * statistics.median(c for c, _ in evaluate) / n,
        "eval_wall_ms_per_img": 1000 * statistics.median(w for _, w in evaluate) / n,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="resnet20,se_resnet20,aw_resnet20,aw_se_resnet20")
    p.add_argument("--canvas", type=int, default=64)
    p.add_argument("--objects", default="1,4")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--fpn-channels", type=int, default=64)
    p.add_argument("--out-indices", default="2,3")
    p.add_argument("--train-images", type=int, default=4000)
    p.add_argument("--val-images", type=int, default=500)
    p.add_argument("--default-heads", action="store_true", help="torchvision's proposal/RoI counts, not LIGHT_HEADS")
    p.add_argument("--out", help="CSV file to write")
    args = p.parse_args()
    options = {"canvas": args.canvas, "objects": [int(v) for v in args.objects.split(",")], "size": 2000}
    rows = []
    for name in args.models.split(","):
        cfg = DetectConfig(
            model=name,
            batch_size=args.batch_size,
            fpn_channels=args.fpn_channels,
            out_indices=[int(v) for v in args.out_indices.split(",")],
            dataset_options=options,
            detector_kwargs={} if args.default_heads else LIGHT_HEADS,
        )
        heads = "default" if args.default_heads else "light"
        row = {"model": name, "canvas": args.canvas, "heads": heads, "threads": torch.get_num_threads()}
        row.update(measure(cfg, args.steps))
        for kind in ("cpu", "wall"):
            per_epoch = (
                args.train_images * row[f"train_{kind}_ms_per_img"] + args.val_images * row[f"eval_{kind}_ms_per_img"]
            )
            row[f"epoch_{kind}_s"] = per_epoch / 1000
        rows.append(row)
        print(json.dumps({k: round(v, 2) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
    if args.out:
        with open(args.out, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)


if __name__ == "__main__":
    main()

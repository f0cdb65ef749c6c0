"""The streaming imagefolder path on generated JPEG folders: its peak memory and its training throughput against the
in-memory path (issue 26 §1).

The folders are made here from Fashion-MNIST (attnlab's IDX reader; nothing is downloaded): the first N training
garments, each scaled to 64×64 (bilinear), made RGB and saved as a JPEG (quality 90) in one class folder each
(``ROOT/N/CLASS/i.jpg``, the pool layout: the test split is carved from it).

``memory``: one ``attnlab train`` process per folder size and path, the same steps for each (``--subset`` training
images at batch 64, one epoch; then 200 validation and 400 test images, also in batches of 64), its peak memory
sampled every 50 ms: the summed PSS of the trainer and its loader workers (shared pages counted once), and the
trainer's own peak RSS (the kernel's ``ru_maxrss``) → ``stream_memory.csv``. Streaming's peak must not grow with the
folder; in memory it does.

``throughput``: ``resnet18c`` trained at 64 px on the smaller folder, in memory and streamed (each worker count of
``--workers``), ``--subset`` images at ``--batch-size`` per trial, the candidates interleaved (memory, stream, memory,
...) in this one process after an untimed warm-up round, so that the shared machine's load hits all of them; each
trial's images per second is the run's own ``train_img_per_s`` (training steps only, loader start-up included; not
the loading of the folder, validation or test). The CSV keeps every trial with the load average before it, and a
``median`` row per candidate with its ratio to the in-memory median → ``stream_throughput.csv``.

``loader``: the streaming loader alone, one training epoch of the smaller folder's batches with no model, per worker
count (``0``: decoding in this process), interleaved → ``stream_loader.csv``: the ceiling it puts on training.

    python benchmarks/stream_data.py make --sizes 2000,20000
    python benchmarks/stream_data.py memory --sizes 2000,20000
    python benchmarks/stream_data.py throughput --repeats 3 --workers 2 --subset 192 --batch-size 32
    python benchmarks/stream_data.py loader --repeats 3 --workers 0,1,2 --batch-size 32
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parents[1] / "studies" / "results" / "benchmarks"
ROOT = Path(tempfile.gettempdir()) / "attnlab-stream-bench"


def make_folder(root: Path, n: int) -> Path:
    """``root/N/CLASS/i.jpg``: the first ``n`` Fashion-MNIST training garments as 64×64 RGB JPEGs (kept if made)."""
    from PIL import Image

    from attnlab.data.idx import load_fashion_mnist

    folder = root / str(n)
    done = folder / ".complete"
    if done.exists():
        return folder
    source = load_fashion_mnist()
    for i in range(n):
        label = source.classes[int(source.train.labels[i])].replace("/", "-")
        (folder / label).mkdir(parents=True, exist_ok=True)
        image = Image.fromarray(source.train.images[i, 0].numpy()).resize((64, 64), Image.BILINEAR).convert("RGB")
        image.save(folder / label / f"{i:05d}.jpg", quality=90)
    done.touch()
    return folder


def _tree(pid: int) -> list[int]:
    """``pid`` and its descendants (from /proc)."""
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        found.append(p)
        for task in Path(f"/proc/{p}/task").glob("*"):
            try:
                todo += [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                pass
    return found


def _pss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def peak_memory(argv: list[str]) -> tuple[float, float, float]:
    """Run ``argv``; (peak summed PSS of its process tree, the process's own peak RSS, wall seconds), MiB and s."""
    start = time.perf_counter()
    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL)
    peak = 0
    while True:
        pid, status, usage = os.wait4(process.pid, os.WNOHANG)
        if pid:
            break
        peak = max(peak, sum(_pss_kib(p) for p in _tree(process.pid)))
        time.sleep(0.05)
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode:
        raise SystemExit(f"{' '.join(argv)} failed with exit code {process.returncode}")
    return peak / 1024, usage.ru_maxrss / 1024, time.perf_counter() - start


def train_argv(folder: Path, out: Path, stream: bool, model: str, subset: int, workers: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "attnlab",
        "train",
        "--model",
        model,
        "--dataset",
        f"imagefolder:{folder}",
        "--data-arg",
        f"stream={str(stream).lower()}",
        "--data-arg",
        f"workers={workers}",
        "--epochs",
        "1",
        "--batch-size",
        "64",
        "--eval-batch-size",
        "64",
        "--subset",
        str(subset),
        "--val-size",
        "200",
        "--data-arg",
        "test_size=400",
        "--out",
        str(out),
    ]


def memory(args: argparse.Namespace) -> None:
    from attnlab.io import write_csv

    rows = []
    for n in args.sizes:
        folder = make_folder(args.root, n)
        for stream in (True, False):
            with tempfile.TemporaryDirectory() as tmp:
                load = os.getloadavg()[0]
                argv = train_argv(folder, Path(tmp) / "run", stream, args.model, args.subset, args.workers)
                pss, rss, wall = peak_memory(argv)
            row = {
                "images": n,
                "val_test_images": "200/400",
                "path": "stream" if stream else "memory",
                "model": args.model,
                "workers": args.workers if stream else 0,
                "train_images": args.subset,
                "steps": args.subset // 64,
                "peak_pss_tree_mib": round(pss, 1),
                "peak_rss_trainer_mib": round(rss, 1),
                "wall_s": round(wall, 1),
                "load_avg_1m": round(load, 2),
                "machine": f"{platform.machine()} {os.cpu_count()} cores",
            }
            print(row, flush=True)
            rows.append(row)
    write_csv(args.out or RESULTS / "stream_memory.csv", rows)


def throughput(args: argparse.Namespace) -> None:
    import torch

    from attnlab.io import write_csv
    from attnlab.train import TrainConfig, train

    folder = make_folder(args.root, args.sizes[0])
    candidates = {"memory": {"stream": False}}
    candidates.update({f"stream_w{w}": {"stream": True, "workers": w, "prefetch": args.prefetch} for w in args.workers})
    trials: dict[str, list[float]] = {name: [] for name in candidates}
    rows = []
    for round_ in range(1 + args.repeats):
        for name, options in candidates.items():
            with tempfile.TemporaryDirectory() as tmp:
                load = os.getloadavg()[0]
                cfg = TrainConfig(
                    model=args.model,
                    dataset=f"imagefolder:{folder}",
                    dataset_options={**options, "test_size": 64},
                    epochs=1,
                    batch_size=args.batch_size,
                    subset=args.subset,
                    val_size=64,
                    out=tmp,
                )
                summary = train(cfg, progress=False, log=lambda _: None)
            speed = summary["train_img_per_s"]
            print(f"round {round_} {name}: {speed:.1f} img/s (load {load:.2f})", flush=True)
            if round_ == 0:
                continue  # warm-up: the OS file cache, the allocator
            trials[name].append(speed)
            rows.append(
                {
                    "candidate": name,
                    "round": round_,
                    "img_per_s": round(speed, 3),
                    "ratio_to_memory": "",
                    "load_avg_1m": round(load, 2),
                }
            )
    base = statistics.median(trials["memory"])
    for name, speeds in trials.items():
        median = statistics.median(speeds)
        rows.append(
            {
                "candidate": name,
                "round": "median",
                "img_per_s": round(median, 3),
                "ratio_to_memory": round(median / base, 3),
                "load_avg_1m": round(os.getloadavg()[0], 2),
            }
        )
        print(f"{name}: median {median:.1f} img/s, {median / base:.3f}× memory", flush=True)
    threads, machine = torch.get_num_threads(), f"{platform.machine()} {os.cpu_count()} cores"
    setting = f"{args.model} 64px batch {args.batch_size}, {args.subset} images/trial, {threads} trainer threads, "
    setting += f"prefetch {args.prefetch}, {machine}"
    for row in rows:
        row["setting"] = setting
    write_csv(args.out or RESULTS / "stream_throughput.csv", rows)


def loader(args: argparse.Namespace) -> None:
    """The loader alone: one training epoch of the smaller folder's batches, streamed with no model (the ceiling the
    streaming path puts on training), per worker count, interleaved, wall clock."""
    import torch

    from attnlab.data import batches, load_dataset
    from attnlab.io import write_csv

    folder = make_folder(args.root, args.sizes[0])
    bundles = {
        f"loader_w{w}": load_dataset(f"imagefolder:{folder}", stream=True, workers=w, prefetch=args.prefetch)
        for w in args.workers
    }
    times: dict[str, list[float]] = {name: [] for name in bundles}
    rows = []
    for round_ in range(1 + args.repeats):
        for name, bundle in bundles.items():
            load = os.getloadavg()[0]
            start = time.perf_counter()
            seen = sum(len(y) for _, y in batches(bundle.train, bundle, args.batch_size, train=True, epoch=round_))
            speed = seen / (time.perf_counter() - start)
            print(f"round {round_} {name}: {speed:.0f} img/s (load {load:.2f})", flush=True)
            if round_:
                times[name].append(speed)
                rows.append({"candidate": name, "round": round_, "img_per_s": round(speed), "load_avg_1m": load})
    for name, speeds in times.items():
        row = {"candidate": name, "round": "median", "img_per_s": round(statistics.median(speeds))}
        rows.append({**row, "load_avg_1m": round(os.getloadavg()[0], 2)})
        print(row, flush=True)
    setting = f"{len(next(iter(bundles.values())).train)} training images, 64px JPEG, batch {args.batch_size}, "
    setting += f"{torch.get_num_threads()} threads, {platform.machine()} {os.cpu_count()} cores"
    for row in rows:
        row["setting"] = setting
    write_csv(args.out or RESULTS / "stream_loader.csv", rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=("make", "memory", "throughput", "loader"))
    parser.add_argument("--sizes", default="2000,20000", type=lambda s: [int(v) for v in s.split(",")])
    parser.add_argument("--root", type=Path, default=ROOT, help="where the generated folders go")
    parser.add_argument("--model", default=None, help="default: resnet20 (memory), resnet18c (throughput)")
    parser.add_argument("--subset", type=int, default=None, help="training images per run (default 1280 / 640)")
    parser.add_argument("--workers", default="2", help="loader workers (throughput: a comma list of candidates)")
    parser.add_argument("--prefetch", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=32, help="throughput's batch size (memory: 64)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.what == "make":
        for n in args.sizes:
            print(make_folder(args.root, n))
    elif args.what == "memory":
        args.model, args.subset = args.model or "resnet20", args.subset or 1280
        args.workers = int(args.workers)
        memory(args)
    elif args.what == "loader":
        args.workers = [int(w) for w in args.workers.split(",")]
        loader(args)
    else:
        args.model, args.subset = args.model or "resnet18c", args.subset or 640
        args.workers = [int(w) for w in args.workers.split(",")]
        throughput(args)


if __name__ == "__main__":
    main()

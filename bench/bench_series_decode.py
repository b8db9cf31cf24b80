"""CT series input path: volumes per second on the first load (read, order, decode, resample with
MONAI) and on cached loads, and a cached epoch's split between loading and DP training.

Four generated CT hospitals (simulation/synthetic_ct.py: four scanners with different slice and
pixel spacing, orientation and rescale), each loaded three times with one cache, side by side in one
run; then one local epoch of the default 3D model on each hospital's training volumes, with DP-SGD and
without.

    .venv/bin/python bench/bench_series_decode.py --write docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.bench_dicom_decode import train_epoch_seconds
from bench.markdown_report import replace_section
from client.datasets import DataSource, HospitalData, load_hospital
from shared_models.registry import resolve_model
from simulation.synthetic_ct import SCANNERS, STUDIES_PER_HOSPITAL, write_ct_hospitals

HEADING = "### CT series decode: first load and cached loads"
DATASET = "synthetic-ct"
MODEL = resolve_model("auto", "volume")  # the model a synthetic-ct run trains


def timed_loads(root: Path, index: int, cache: Path, loads: int) -> list[tuple[float, HospitalData]]:
    """Load hospital ``index`` ``loads`` times with one cache: the first reads and resamples every series."""
    out = []
    for _ in range(loads):
        t0 = time.perf_counter()
        data = load_hospital(DATASET, DataSource(partition_id=index, data_root=str(root), cache_dir=str(cache)))
        out.append((time.perf_counter() - t0, data))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hospitals", type=int, default=4)
    parser.add_argument("--loads", type=int, default=3)
    parser.add_argument("--write", type=Path, help="write the results into this markdown file")
    args = parser.parse_args()
    import torch

    from fedcare.dataset_registry import REGISTRY

    torch.set_num_threads(1)  # as in the simulation's actors
    batch = int(REGISTRY[DATASET].preset["batch_size"])
    rows, first_total, cached_total, volumes_total = [], 0.0, 0.0, 0
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "ct"
        t0 = time.perf_counter()
        write_ct_hospitals(root, args.hospitals, seed=0)
        write_s = time.perf_counter() - t0
        for i in range(args.hospitals):
            loads = timed_loads(root, i, Path(tmp) / "cache", args.loads)
            data = loads[0][1]
            n = len(data.y_train) + len(data.y_test)
            cached = min(s for s, _ in loads[1:])
            dp_s = train_epoch_seconds(data.x_train, data.y_train, True, MODEL, batch, warm_up=True)
            plain_s = train_epoch_seconds(data.x_train, data.y_train, False, MODEL, batch, warm_up=True)
            scanner = SCANNERS[i % len(SCANNERS)]
            rows.append(
                f"| hospital-{i} ({scanner.slice_mm:g} mm slices, {scanner.pixel_mm:g} mm pixels"
                f"{', feet first' if scanner.feet_first else ''}) | {n} | {n / loads[0][0]:.1f} | {n / cached:.0f} | "
                f"{cached:.2f} | {dp_s:.2f} | {plain_s:.2f} | {cached / (cached + dp_s):.0%} |"
            )
            print(rows[-1], flush=True)
            first_total, cached_total, volumes_total = (
                first_total + loads[0][0],
                cached_total + cached,
                volumes_total + n,
            )
    text = "\n".join(
        [
            HEADING,
            "",
            f"Measured {date.today()} on {platform.machine()} with {os.cpu_count()} cores, 1 torch thread; "
            f"{args.hospitals} generated CT hospitals ({', '.join(map(str, STUDIES_PER_HOSPITAL[: args.hospitals]))} "
            f"studies, one series each, written in {write_s:.0f} s); {args.loads} loads per hospital with one "
            "cache (the first reads every slice, orders and decodes the series and resamples them with "
            f"MONAI to 1x32x32x20 at 2 mm; later loads read the cache); {MODEL}, batch {batch}.",
            "",
            "    .venv/bin/python bench/bench_series_decode.py --write docs/benchmarks.md",
            "",
            "| hospital | volumes | first load (volumes/s) | cached load (volumes/s) | cached load s "
            "| DP train epoch s | non-DP train epoch s | load share of a cached DP epoch |",
            "|---|---|---|---|---|---|---|---|",
            *rows,
            "",
            f"All hospitals: first load {volumes_total / first_total:.1f} volumes/s, cached loads "
            f"{volumes_total / cached_total:.0f} volumes/s ({first_total / cached_total:.0f}x).",
        ]
    )
    print("\n" + text)
    if args.write:
        replace_section(args.write, HEADING, text)


if __name__ == "__main__":
    main()

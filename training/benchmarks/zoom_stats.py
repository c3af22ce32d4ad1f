"""How far the high-resolution canvas zooms into a dataset's images (the paper's figure 4).

For each distinct image, the crop plan of the model geometry gives the zoom ratio: longest side
of the high canvas / longest native side. The paper reports, over its training data, 99.5% of
images magnified (> 1x), 95% by at least 2x and 65% by at least 4x; this command prints the same
shares and quantiles for any dataset and draws the cumulative distribution as a PNG. Only image
headers are read, so it is fast on large sets.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from PIL import Image

from dragonfly_med.model.geometry import Geometry, plan_crops
from training.engine.records import read_records

THRESHOLDS = (1.0, 2.0, 4.0)
QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)
PAPER_SHARES = {"> 1x": 99.5, ">= 2x": 95.0, ">= 4x": 65.0}


def zoom_ratios(sizes: list[tuple[int, int]], geometry: Geometry) -> list[float]:
    return sorted(plan_crops(w, h, geometry).zoom for w, h in sizes)


def quantile(sorted_values: list[float], q: float) -> float:
    """Linear-interpolated quantile of sorted values (numpy's default method)."""
    position = q * (len(sorted_values) - 1)
    low = int(position)
    high = min(low + 1, len(sorted_values) - 1)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (position - low)


def summarize(zooms: list[float]) -> dict:
    n = len(zooms)
    return {
        "n_images": n,
        "share_percent": {
            "> 1x": 100.0 * sum(z > 1.0 for z in zooms) / n,
            ">= 2x": 100.0 * sum(z >= 2.0 for z in zooms) / n,
            ">= 4x": 100.0 * sum(z >= 4.0 for z in zooms) / n,
        },
        "paper_share_percent": PAPER_SHARES,
        "quantiles": {f"p{round(q * 100)}": round(quantile(zooms, q), 4) for q in QUANTILES},
    }


def plot_cdf(zooms: list[float], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.step(zooms, [(i + 1) / len(zooms) for i in range(len(zooms))], where="post")
    for threshold in THRESHOLDS:
        ax.axvline(threshold, color="grey", linestyle=":", linewidth=1)
    ax.set_xscale("log")
    ax.set_xlabel("zoom ratio (high canvas longest side / native longest side)")
    ax.set_ylabel("cumulative fraction of images")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def image_sizes(data: list[Path], image_root: Path | None) -> list[tuple[int, int]]:
    """Sizes of the distinct images of the given record files (headers only)."""
    paths = sorted({str(r.image) for f in data for r in read_records(f, image_root) if r.image is not None})
    sizes = []
    for path in paths:
        with Image.open(path) as image:
            sizes.append(image.size)
    return sizes


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", type=Path, nargs="+", required=True, help="JSON/JSONL/parquet record files")
    parser.add_argument("--image-root", type=Path, default=None)
    parser.add_argument("--geometry", default="dragonfly-med-v2", help="dragonfly-med-v2 (default) or tiny")
    parser.add_argument("--output", type=Path, default=Path("runs/zoom-stats/zoom_cdf.png"))
    parser.add_argument("--json", action="store_true")


def run(args: argparse.Namespace) -> int:
    from dragonfly_med.model.configuration_dragonfly import named_geometry

    sizes = image_sizes(args.data, args.image_root)
    if not sizes:
        raise SystemExit("no images found in the given records")
    zooms = zoom_ratios(sizes, named_geometry(args.geometry))
    summary = summarize(zooms) | {"geometry": args.geometry, "plot": str(args.output)}
    plot_cdf(zooms, args.output, f"Zoom ratio CDF ({args.geometry}, {len(zooms)} images)")
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(f"{summary['n_images']} images, geometry {args.geometry}; CDF -> {args.output}")
        for key, value in summary["share_percent"].items():
            print(f"  zoom {key:>5}: {value:5.1f}%   (paper: {PAPER_SHARES[key]}%)")
        print("  quantiles: " + ", ".join(f"{k}={v:.2f}" for k, v in summary["quantiles"].items()))
    return 0

"""Ingestion benchmark: `python -m dragonfly_med.cli.bench_ingest` (a few seconds on 2 CPU cores).

1. Decode + window a 512x512 CT slice end to end (`load_image`, soft-tissue preset): an
   uncompressed slice built from pydicom's CT_small (upsampled 4x), and pydicom's own 512x512
   JPEG 2000 CT (693_J2KI.dcm).
2. One frame of a 120-frame 512x512 RLE file versus decoding the whole file with pydicom,
   which shows that `load_image` decodes only the frame it is asked for.
"""

from __future__ import annotations

import json
import os
import platform
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

from dragonfly_med.cli.timing import median_s
from dragonfly_med.imaging.ingest import load_image


def _median_ms(fn: Callable[[], object], repeats: int, warmup: int = 2) -> float:
    return median_s(fn, repeats, warmup) * 1000.0


def _corpus(name: str) -> str:
    import pydicom.data

    path = Path(pydicom.data.__file__).parent / "test_files" / name
    if not path.is_file():
        raise FileNotFoundError(f"{name} is not bundled with this pydicom")
    return str(path)


def _ct_512(folder: Path) -> Path:
    """CT_small (128x128, HU via rescale) upsampled to a 512x512 uncompressed slice."""
    import pydicom

    ds = pydicom.dcmread(_corpus("CT_small.dcm"))
    big = np.kron(ds.pixel_array, np.ones((4, 4), dtype=ds.pixel_array.dtype))
    ds.Rows, ds.Columns = big.shape
    ds.PixelData = big.tobytes()
    path = folder / "ct512.dcm"
    ds.save_as(path)
    return path


def _multiframe_rle(folder: Path, frames: int) -> Path:
    """A frames x 512 x 512 int16 RLE Lossless file: shifted copies of the 512x512 slice."""
    import pydicom
    from pydicom.uid import RLELossless

    ds = pydicom.dcmread(_corpus("CT_small.dcm"))
    big = np.kron(ds.pixel_array, np.ones((4, 4), dtype=ds.pixel_array.dtype))
    volume = np.stack([np.roll(big, 3 * i, axis=0) for i in range(frames)])
    ds.Rows, ds.Columns = big.shape
    ds.NumberOfFrames = frames
    ds.compress(RLELossless, volume, encoding_plugin="pylibjpeg")
    path = folder / "multiframe_rle.dcm"
    ds.save_as(path)
    return path


def run_ingest_bench(repeats: int = 30, frames: int = 120) -> dict:
    """Median timings in milliseconds; see the module docstring for what is measured."""
    from pydicom.pixels import pixel_array

    results: dict = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "python": platform.python_version(),
        "repeats": repeats,
    }
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        ct = _ct_512(folder)
        results["ct512_uncompressed_ms"] = _median_ms(
            lambda: load_image(ct, window="soft_tissue"), repeats
        )
        j2k = _corpus("693_J2KI.dcm")
        results["ct512_j2k_ms"] = _median_ms(lambda: load_image(j2k, window="soft_tissue"), repeats)

        multi = _multiframe_rle(folder, frames)
        middle = frames // 2
        frame_ms = _median_ms(lambda: load_image(multi, frame=middle), repeats)
        whole_ms = _median_ms(lambda: pixel_array(str(multi)), max(3, repeats // 10), warmup=1)
        results["multiframe"] = {
            "frames": frames,
            "matrix": "512x512 int16",
            "transfer_syntax": "RLE Lossless",
            "file_mib": round(multi.stat().st_size / 2**20, 1),
            "one_frame_ms": frame_ms,
            "whole_file_ms": whole_ms,
            "ratio": whole_ms / frame_ms,
        }
    return results


def to_markdown(r: dict) -> str:
    m = r["multiframe"]
    return "\n".join(
        [
            f"Machine: {r['machine']}, Python {r['python']}; medians of {r['repeats']} runs.",
            "",
            "| Measurement | Median |",
            "|---|---|",
            f"| 512x512 CT, uncompressed: decode + soft-tissue window -> RGB | "
            f"{r['ct512_uncompressed_ms']:.1f} ms |",
            f"| 512x512 CT, JPEG 2000 (693_J2KI.dcm): decode + window -> RGB | "
            f"{r['ct512_j2k_ms']:.1f} ms |",
            f"| {m['frames']}-frame {m['matrix']} {m['transfer_syntax']} ({m['file_mib']} MiB): "
            f"frame {m['frames'] // 2} via load_image | {m['one_frame_ms']:.1f} ms |",
            f"| same file: pydicom decodes all {m['frames']} frames | {m['whole_file_ms']:.0f} ms |",
            f"| ratio whole file / one frame | {m['ratio']:.0f}x |",
        ]
    )


if __name__ == "__main__":
    bench = run_ingest_bench()
    print(json.dumps(bench, indent=2))
    print()
    print(to_markdown(bench))

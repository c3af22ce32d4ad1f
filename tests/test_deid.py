"""De-identification (PS3.15 Annex E basic profile) and the no-PHI guarantee of ingestion.

A DICOM is written with every identifying field filled with a distinctive value; none of them
may appear in the facts, the de-identified header, or anything the inspect CLI prints.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
import pydicom
import pydicom.data
import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from dragonfly_med.cli import inspect as inspect_cli
from dragonfly_med.imaging.deid import (
    ACTIONS,
    UNKNOWN_KEYWORDS,
    deidentify,
    safe_header_summary,
)
from dragonfly_med.imaging.ingest import load_image

CT_SMALL = str(Path(pydicom.data.__file__).parent / "test_files" / "CT_small.dcm")

UID_ROOT = "1.2.826.0.1.3680043.9.7777."

# keyword -> distinctive value; each must vanish everywhere.
PHI: dict[str, str] = {
    "PatientName": "Quixotica^Zanzibar",
    "PatientID": "PID-7731-QZ",
    "PatientBirthDate": "19230417",
    "PatientBirthTime": "041533",
    "PatientAddress": "42 Wallaby Way Sydney",
    "PatientTelephoneNumbers": "555-0199-QZ",
    "OtherPatientIDs": "OPID-99812",
    "OtherPatientNames": "Zanzibara^Quix",
    "PatientMotherBirthName": "Vellichor^Maud",
    "PatientAge": "097Y",
    "PatientWeight": "73.125",
    "PatientSize": "1.987",
    "EthnicGroup": "EthnicQZ",
    "Occupation": "Keeper-QZ",
    "AdditionalPatientHistory": "History of quixotism",
    "PatientComments": "Comment-QZ-secret",
    "MedicalRecordLocator": "MRL-QZ-2",
    "IssuerOfPatientID": "ISSUER-QZ",
    "AdmissionID": "ADM-QZ-77",
    "AccessionNumber": "ACC-5531-QZ",
    "InstitutionName": "Saint Elsewhere Hospital",
    "InstitutionAddress": "1 Elsewhere Road Gotham",
    "InstitutionalDepartmentName": "Dept of Quixology",
    "ReferringPhysicianName": "Hippocratix^Refo",
    "PerformingPhysicianName": "Galenix^Perfo",
    "NameOfPhysiciansReadingStudy": "Avicennix^Reado",
    "OperatorsName": "Vesalix^Opero",
    "PhysiciansOfRecord": "Oslerix^Recordo",
    "RequestingPhysician": "Listerix^Requo",
    "StudyID": "STUDYID-8841",
    "StudyDate": "20011122",
    "StationName": "STATION-QZ9",
    "DeviceSerialNumber": "SERIAL-QZ-31337",
    "ImageComments": "ImageComment-QZ",
    "StudyDescription": "CT abdomen for Quixotica",
    "StudyInstanceUID": UID_ROOT + "1",
    "SeriesInstanceUID": UID_ROOT + "2",
    "SOPInstanceUID": UID_ROOT + "3",
    "FrameOfReferenceUID": UID_ROOT + "4",
}
NESTED_PHI = {
    "SEQPID-QZ-1": "OtherPatientIDsSequence/PatientID",
    "RPID-QZ-5": "RequestAttributesSequence/RequestedProcedureID",
    UID_ROOT + "5": "ReferencedStudySequence/ReferencedSOPInstanceUID",
    UID_ROOT + "6": "ReferencedImageSequence/ReferencedSOPInstanceUID",
    "Paracelsix^Nestro": "SourceImageSequence/PerformingPhysicianName",
    "PrivateSecret-Zanzibar": "private (0009,xx10)",
    "OverlayComment-Zanzibar": "overlay (6000,4000)",
}


def all_phi_strings() -> list[str]:
    """Every value, plus each part of the person names."""
    values = list(PHI.values()) + list(NESTED_PHI)
    parts = [p for v in values if "^" in v for p in v.split("^")]
    return [v for v in values + parts if v != PHI["StudyDescription"]] + ["Quixotica"]


def make_phi_dataset() -> Dataset:
    """CT_small's pixels with every identifying field set to a distinctive value."""
    ds = pydicom.dcmread(CT_SMALL)
    for keyword, value in PHI.items():
        setattr(ds, keyword, value)
    ds.SeriesDescription = "AXIAL 5MM"
    ds.file_meta.MediaStorageSOPInstanceUID = PHI["SOPInstanceUID"]

    def item(**kwargs) -> Dataset:
        d = Dataset()
        for k, v in kwargs.items():
            setattr(d, k, v)
        return d

    ds.OtherPatientIDsSequence = Sequence([item(PatientID="SEQPID-QZ-1")])
    ds.RequestAttributesSequence = Sequence([item(RequestedProcedureID="RPID-QZ-5")])
    ds.ReferencedStudySequence = Sequence(
        [
            item(
                ReferencedSOPClassUID="1.2.840.10008.3.1.2.3.1",
                ReferencedSOPInstanceUID=UID_ROOT + "5",
            )
        ]
    )
    ds.ReferencedImageSequence = Sequence(
        [
            item(
                ReferencedSOPClassUID="1.2.840.10008.5.1.4.1.1.2",
                ReferencedSOPInstanceUID=UID_ROOT + "6",
            )
        ]
    )
    ds.SourceImageSequence = Sequence([item(PerformingPhysicianName="Paracelsix^Nestro")])
    block = ds.private_block(0x0009, "QZ PRIVATE", create=True)
    block.add_new(0x10, "LO", "PrivateSecret-Zanzibar")
    ds.add_new(0x60004000, "LT", "OverlayComment-Zanzibar")
    return ds


@pytest.fixture
def phi_file(tmp_path) -> Path:
    path = tmp_path / "Quixotica_Zanzibar_PID-7731-QZ.dcm"  # file names carry PHI too
    make_phi_dataset().save_as(path)
    return path


def written_bytes(ds: Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf)
    return buf.getvalue()


def leaks(text: str | bytes) -> list[str]:
    haystack = text.decode("latin-1") if isinstance(text, bytes) else text
    return [v for v in all_phi_strings() if v.lower() in haystack.lower()]


# ----------------------------------------------------------------------------- the PHI test


def test_phi_fixture_really_contains_phi(phi_file):
    raw = phi_file.read_bytes()
    assert len(leaks(raw)) >= len(PHI) - 1, "the fixture must carry every value to be removed"


def test_no_phi_in_facts(phi_file):
    facts = load_image(phi_file).facts.to_dict()
    assert leaks(json.dumps(facts)) == []
    assert facts["study_description"] is None, "a description naming the patient is dropped"
    assert facts["series_description"] == "AXIAL 5MM"
    assert facts["modality"] == "CT"


def test_no_phi_in_deidentified_header():
    clean = deidentify(make_phi_dataset())
    assert leaks(str(clean)) == []
    assert leaks(written_bytes(clean)) == []
    assert leaks(json.dumps(safe_header_summary(make_phi_dataset()))) == []


def test_no_phi_in_anything_the_cli_prints(phi_file, tmp_path, capsys):
    for extra in (["--json"], [], ["--json", "--header"], ["--header"], ["--frame", "9"]):
        status = inspect_cli.main([str(phi_file), "--out", str(tmp_path / "o.png"), *extra])
        out, err = capsys.readouterr()
        assert status in (0, 2)
        assert leaks(out + err) == [], extra
        assert "Quixotica_Zanzibar" not in out + err
    refused = tmp_path / "Quixotica_Zanzibar.dcm"
    refused.write_text("not an image")
    assert inspect_cli.main([str(refused)]) == 2
    out, err = capsys.readouterr()
    assert leaks(out + err) == [] and err.startswith("error:")


# ----------------------------------------------------------------------------- the profile


def test_table_keywords_all_resolve_and_cover_the_identity_fields():
    assert UNKNOWN_KEYWORDS == []
    for keyword in (
        "PatientName",
        "PatientID",
        "PatientBirthDate",
        "PatientAddress",
        "AccessionNumber",
        "InstitutionName",
        "InstitutionAddress",
        "ReferringPhysicianName",
        "PerformingPhysicianName",
        "OperatorsName",
        "StudyInstanceUID",
        "SOPInstanceUID",
    ):
        assert pydicom.datadict.tag_for_keyword(keyword) in ACTIONS, keyword
    assert len(ACTIONS) > 250


def test_action_codes_applied():
    clean = deidentify(make_phi_dataset())
    assert "PatientName" in clean and not clean.PatientName  # Z: present, empty
    assert "PatientID" in clean and not clean.PatientID
    assert "PatientAddress" not in clean  # X
    assert "StudyDescription" not in clean and "PatientAge" not in clean
    assert clean.InstitutionName == "REMOVED"  # X/Z/D -> D
    assert "ReferencedImageSequence" in clean  # X/Z/U*: kept, UIDs replaced inside
    ref = clean.ReferencedImageSequence[0]
    assert ref.ReferencedSOPInstanceUID.startswith("2.25.")
    assert ref.ReferencedSOPClassUID == "1.2.840.10008.5.1.4.1.1.2"
    assert "PerformingPhysicianName" not in clean.SourceImageSequence[0]
    assert clean.PatientIdentityRemoved == "YES"
    assert "Annex E" in clean.DeidentificationMethod
    assert clean.DeidentificationMethodCodeSequence[0].CodeValue == "113100"


def test_uids_replaced_consistently_and_class_uids_kept():
    a, b = make_phi_dataset(), make_phi_dataset()
    b.SOPInstanceUID = UID_ROOT + "99"
    ca, cb = deidentify(a), deidentify(b)
    assert ca.StudyInstanceUID == cb.StudyInstanceUID != a.StudyInstanceUID
    assert ca.SeriesInstanceUID == cb.SeriesInstanceUID
    assert ca.SOPInstanceUID != cb.SOPInstanceUID
    assert ca.file_meta.MediaStorageSOPInstanceUID == ca.SOPInstanceUID
    assert ca.SOPClassUID == a.SOPClassUID
    assert ca.file_meta.TransferSyntaxUID == a.file_meta.TransferSyntaxUID
    for uid in (ca.StudyInstanceUID, ca.SOPInstanceUID, ca.FrameOfReferenceUID):
        assert uid.startswith("2.25.") and len(uid) <= 64 and uid.is_valid
    assert deidentify(a, salt="site-b").StudyInstanceUID != ca.StudyInstanceUID


def test_private_tags_curves_and_overlays_removed_at_every_level():
    ds = make_phi_dataset()
    ds.SourceImageSequence[0].private_block(0x0011, "QZ NESTED", create=True).add_new(
        0x01, "LO", "nested private"
    )
    clean = deidentify(ds)
    seen = []
    clean.walk(lambda _ds, elem: seen.append(elem.tag))
    assert not any(t.is_private for t in seen)
    assert not any((t.group & 0xFF00) in (0x5000, 0x6000) for t in seen)


def test_original_untouched_and_pixels_intact():
    ds = make_phi_dataset()
    clean = deidentify(ds)
    assert ds.PatientName == PHI["PatientName"] and "PatientAddress" in ds
    assert np.array_equal(clean.pixel_array, ds.pixel_array)
    reloaded = load_image(written_bytes(clean))
    assert np.array_equal(np.asarray(reloaded.image), np.asarray(load_image(CT_SMALL).image))


def test_other_names_dates_and_uids_are_caught_by_safety_nets():
    ds = make_phi_dataset()
    ds.add_new(0x00081048, "PN", "Netted^Physician")  # Physician(s) of Record: listed anyway
    ds.add_new(0x00400244, "DA", "20011121")  # Performed Procedure Step Start Date
    ds.add_new(0x00181030, "LO", "PROTOCOL")  # Protocol Name: X/D -> dummy
    ds.ContributingEquipmentSequence = Sequence([Dataset()])
    ds.ContributingEquipmentSequence[0].ContributionDateTime = "20011121101010"
    ds.ContributingEquipmentSequence[0].add_new(0x00081072, "SQ", Sequence())
    ds.ContributingEquipmentSequence[0].add_new(0x0040A124, "UI", UID_ROOT + "77")  # UID
    clean = deidentify(ds)
    text = str(clean)
    assert "Netted" not in text and "20011121" not in text and UID_ROOT not in text
    assert clean.ProtocolName == "REMOVED"


def test_safe_header_summary_has_no_uids_or_binary():
    summary = safe_header_summary(pydicom.dcmread(CT_SMALL))
    assert summary["Modality"] == "CT"
    assert not any(k.endswith("UID") for k in summary)
    assert "PixelData" not in summary and "PatientName" not in summary
    assert summary["PatientIdentityRemoved"] == "YES"


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_deidentify_whole_corpus_without_errors():
    """Every readable bundled dataset (broken ones included) de-identifies cleanly."""
    count = 0
    for path in pydicom.data.get_testdata_files():
        if os.path.isdir(path):
            continue
        try:
            ds = pydicom.dcmread(path, force=True)
        except Exception:
            continue
        clean = deidentify(ds)
        tags = []
        clean.walk(lambda _ds, elem, tags=tags: tags.append(elem.tag))
        assert not any(t.is_private for t in tags), path
        count += 1
    assert count >= 150

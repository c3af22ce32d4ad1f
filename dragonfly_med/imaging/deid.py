"""De-identification of DICOM headers after the PS3.15 Annex E Basic Confidentiality Profile.

`deidentify(ds)` returns a de-identified copy; the original is untouched. Use it wherever a
header is stored, logged or shown. What it does, per PS3.15 Table E.1-1 (Basic Profile column):

* D: replace with a dummy value of the same VR; Z: empty the value; X: remove the attribute;
  U: replace the UID with one derived by hashing, so that the same original UID always maps to
  the same new one (series stay series, references still resolve).
* Compound codes keep the attribute present, which keeps the object valid without knowing its
  IOD: X/Z -> Z, X/D, Z/D and X/Z/D -> D, X/Z/U* -> keep the sequence and replace UIDs inside.
* All private attributes, curves (50xx) and overlays (60xx) are removed.
* Safety nets beyond the table: any other UID not in the DICOM registry is replaced, any other
  person name is emptied, and any other date, time or date-time is emptied.
* PatientIdentityRemoved = YES, DeidentificationMethod and its code sequence (113100) are set.

Burned-in text in the pixels is not touched: that is a separate problem (BurnedInAnnotation).
"""

from __future__ import annotations

import copy
import hashlib
import os
from typing import Any

from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword
from pydicom.dataelem import DataElement, empty_value_for_VR
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import UID

DEIDENTIFICATION_METHOD = "PS3.15 Annex E Basic Application Level Confidentiality Profile"

# Salt for UID hashing; set DRAGONFLY_DEID_SALT per site so UIDs cannot be matched across sites.
DEFAULT_SALT = os.environ.get("DRAGONFLY_DEID_SALT", "dragonfly-med")

# PS3.15 Table E.1-1, Basic Profile column, by action code (pydicom keywords).
_TABLE: dict[str, str] = {
    "D": """
        ClinicalTrialProtocolEthicsCommitteeName ClinicalTrialProtocolID ClinicalTrialSponsorName
        ClinicalTrialSubjectID ClinicalTrialSubjectReadingID GraphicAnnotationSequence
        PersonIdentificationCodeSequence PersonName VerifyingObserverName
        VerifyingObserverSequence ContentCreatorName
    """,
    "Z": """
        AccessionNumber ClinicalTrialProtocolName ClinicalTrialSiteID ClinicalTrialSiteName
        ClinicalTrialTimePointID FillerOrderNumberImagingServiceRequest PatientBirthDate
        PatientID PatientName PatientSex PlacerOrderNumberImagingServiceRequest
        ReferringPhysicianName StudyDate StudyID StudyTime
        VerifyingObserverIdentificationCodeSequence ConsultingPhysicianName
    """,
    "X": """
        AcquisitionComments AcquisitionContextSequence AcquisitionProtocolDescription
        ActualHumanPerformersSequence AdditionalPatientHistory AdmissionID AdmittingDate
        AdmittingDiagnosesCodeSequence AdmittingDiagnosesDescription AdmittingTime
        AffectedSOPInstanceUID Allergies AuthorObserverSequence BranchOfService CassetteID
        ClinicalTrialCoordinatingCenterName ClinicalTrialProtocolEthicsCommitteeApprovalNumber
        ClinicalTrialSeriesDescription ClinicalTrialSeriesID ClinicalTrialTimePointDescription
        CommentsOnThePerformedProcedureStep ConfidentialityConstraintOnPatientDataDescription
        ContentCreatorIdentificationCodeSequence ContributionDescription CountryOfResidence
        CurrentPatientLocation CustodialOrganizationSequence DataSetTrailingPadding
        DateOfLastCalibration DerivationDescription DigitalSignatureUID
        DigitalSignaturesSequence DischargeDiagnosisDescription DistributionAddress
        DistributionName EthnicGroup FrameComments HumanPerformerName
        HumanPerformerOrganization IconImageSequence IdentifyingComments ImageComments
        ImagePresentationComments ImagingServiceRequestComments Impressions
        InstanceCoercionDateTime InstitutionAddress InstitutionalDepartmentName
        InstitutionalDepartmentTypeCodeSequence InsurancePlanIdentification
        IntendedRecipientsOfResultsIdentificationSequence InterpretationApproverSequence
        InterpretationAuthor InterpretationDiagnosisDescription InterpretationIDIssuer
        InterpretationRecorder InterpretationText InterpretationTranscriber IssuerOfAdmissionID
        IssuerOfPatientID IssuerOfServiceEpisodeID LastMenstrualDate MAC MedicalAlerts
        MedicalRecordLocator MilitaryRank ModifiedAttributesSequence ModifiedImageDescription
        ModifyingDeviceID NameOfPhysiciansReadingStudy NamesOfIntendedRecipientsOfResults
        Occupation OperatorIdentificationSequence OrderCallbackPhoneNumber OrderEnteredBy
        OrderEntererLocation OriginalAttributesSequence OtherPatientIDs OtherPatientIDsSequence
        OtherPatientNames ParticipantSequence PatientAddress PatientAge PatientBirthName
        PatientBirthTime PatientComments PatientInstitutionResidence
        PatientInsurancePlanCodeSequence PatientMotherBirthName
        PatientPrimaryLanguageCodeSequence PatientPrimaryLanguageModifierCodeSequence
        PatientReligiousPreference PatientSize PatientState PatientTelecomInformation
        PatientTelephoneNumbers PatientTransportArrangements PatientWeight PerformedLocation
        PerformedProcedureStepDescription PerformedProcedureStepEndDate
        PerformedProcedureStepEndDateTime PerformedProcedureStepEndTime
        PerformedProcedureStepID PerformedProcedureStepStartDate
        PerformedProcedureStepStartDateTime PerformedProcedureStepStartTime
        PerformedStationAETitle PerformedStationGeographicLocationCodeSequence
        PerformedStationName PerformedStationNameCodeSequence
        PerformingPhysicianIdentificationSequence PerformingPhysicianName PersonAddress
        PersonTelecomInformation PersonTelephoneNumbers PhysicianApprovingInterpretation
        PhysiciansOfRecord PhysiciansOfRecordIdentificationSequence
        PhysiciansReadingStudyIdentificationSequence PlateID PreMedication PregnancyStatus
        ReasonForStudy ReferencedDigitalSignatureSequence ReferencedPatientAliasSequence
        ReferencedPatientPhotoSequence ReferencedPatientSequence
        ReferencedSOPInstanceMACSequence ReferringPhysicianAddress
        ReferringPhysicianIdentificationSequence ReferringPhysicianTelephoneNumbers
        RegionOfResidence RequestAttributesSequence RequestedContrastAgent
        RequestedProcedureComments RequestedProcedureID RequestedProcedureLocation
        RequestingPhysician RequestingService RequestingServiceCodeSequence
        ResponsibleOrganization ResponsiblePerson ResponsiblePersonRole ResultsComments
        ResultsDistributionListSequence ResultsIDIssuer ScheduledHumanPerformersSequence
        ScheduledPatientInstitutionResidence ScheduledPerformingPhysicianIdentificationSequence
        ScheduledPerformingPhysicianName ScheduledProcedureStepDescription
        ScheduledProcedureStepEndDate ScheduledProcedureStepEndTime
        ScheduledProcedureStepLocation ScheduledProcedureStepStartDate
        ScheduledProcedureStepStartTime ScheduledStationAETitle
        ScheduledStationGeographicLocationCodeSequence ScheduledStationName
        ScheduledStationNameCodeSequence ScheduledStudyLocation ScheduledStudyLocationAETitle
        SeriesDate SeriesDescription SeriesTime ServiceEpisodeDescription ServiceEpisodeID
        SmokingStatus SpecialNeeds SpecimenAccessionNumber StudyComments StudyDescription
        StudyIDIssuer TextComments TextString TimeOfLastCalibration TimezoneOffsetFromUTC
        TopicAuthor TopicKeywords TopicSubject TopicTitle VerifyingOrganization VisitComments
        AdmittingDiagnosesCodeSequence ReasonForTheRequestedProcedure
        ReasonForRequestedProcedureCodeSequence PatientSexNeutered CurveDate CurveTime
        OverlayDate OverlayTime ContentSequence Arbitrary InstitutionCodeSequence
    """,
    "X/Z": """
        AcquisitionDate AcquisitionTime ReferencedStudySequence RequestedProcedureDescription
        ReviewerName ProcedureCodeSequence
    """,
    "X/D": """
        AcquisitionDateTime AcquisitionDeviceProcessingDescription DetectorID
        EndAcquisitionDateTime InstanceCreationDate ProtocolName DateTime Date Time
        ObservationDateTime
    """,
    "Z/D": """
        ContentDate ContentTime ContrastBolusAgent
    """,
    "X/Z/D": """
        DeviceSerialNumber InstitutionName OperatorsName StationName GantryID GeneratorID
        InstanceCreationTime ReferencedPerformedProcedureStepSequence
    """,
    "U": """
        AcquisitionUID ConcatenationUID ContextGroupExtensionCreatorUID DeviceUID
        DimensionOrganizationUID DoseReferenceUID FailedSOPInstanceUIDList FiducialUID
        FrameOfReferenceUID InstanceCreatorUID IrradiationEventUID
        LargePaletteColorLookupTableUID MediaStorageSOPInstanceUID
        ReferencedFrameOfReferenceUID ReferencedGeneralPurposeScheduledProcedureStepTransactionUID
        ReferencedSOPInstanceUID ReferencedSOPInstanceUIDInFile RelatedFrameOfReferenceUID
        RequestedSOPInstanceUID SeriesInstanceUID SOPInstanceUID SpecimenUID
        StorageMediaFileSetUID StudyInstanceUID SynchronizationFrameOfReferenceUID
        TemplateExtensionCreatorUID TemplateExtensionOrganizationUID TransactionUID UID
    """,
    "X/Z/U*": """
        ReferencedImageSequence SourceImageSequence
    """,
}

# Compound codes resolved to the action that keeps the attribute present (see module doc).
_RESOLVE = {"X/Z": "Z", "X/D": "D", "Z/D": "D", "X/Z/D": "D", "X/Z/U*": "K"}

# File meta attributes that name the sending and receiving systems.
_META_REMOVE = (
    "SourceApplicationEntityTitle",
    "SendingApplicationEntityTitle",
    "ReceivingApplicationEntityTitle",
    "PrivateInformationCreatorUID",
    "PrivateInformation",
)

_DUMMY_TEXT = "REMOVED"
_DUMMIES: dict[str, Any] = {
    "PN": "ANONYMOUS",
    "DA": "19000101",
    "TM": "000000",
    "DT": "19000101000000",
    "AS": "000Y",
    "IS": "0",
    "DS": "0",
}


def _build_actions() -> tuple[dict[int, str], list[str]]:
    """Tag -> resolved action; keywords that pydicom's dictionary lacks are reported."""
    actions: dict[int, str] = {}
    unknown: list[str] = []
    for code, keywords in _TABLE.items():
        for keyword in keywords.split():
            tag = tag_for_keyword(keyword)
            if tag is None:
                unknown.append(keyword)
                continue
            actions[tag] = _RESOLVE.get(code, code)
    return actions, unknown


ACTIONS, UNKNOWN_KEYWORDS = _build_actions()


def deidentify(ds: Dataset, *, salt: str = DEFAULT_SALT) -> Dataset:
    """Return a de-identified deep copy of `ds` (the original is not modified)."""
    out = copy.deepcopy(ds)
    _clean_dataset(out, salt)
    meta = getattr(out, "file_meta", None)
    if meta is not None:
        for keyword in _META_REMOVE:
            if keyword in meta:
                delattr(meta, keyword)
        if "MediaStorageSOPInstanceUID" in meta:
            meta.MediaStorageSOPInstanceUID = _new_uid(meta.MediaStorageSOPInstanceUID, salt)
    _mark(out)
    return out


def safe_header_summary(ds: Dataset, *, max_chars: int = 120) -> dict[str, str]:
    """Printable keyword -> value pairs of the de-identified header (no UIDs, no binary)."""
    clean = deidentify(ds)
    summary: dict[str, str] = {}
    for tag in clean.keys():
        if tag.group >= 0x7FE0 or tag.is_private:
            continue
        vr = _vr(clean, tag)
        if vr in ("SQ", "UI", "OB", "OW", "OF", "OD", "OL", "OV", "UN") or not vr:
            continue
        keyword = keyword_for_tag(tag)
        value = clean[tag].value
        if not keyword or value in (None, "", b""):
            continue
        text = str(value)
        summary[keyword] = text if len(text) <= max_chars else text[: max_chars - 3] + "..."
    return summary


def _clean_dataset(ds: Dataset, salt: str) -> None:
    """Apply the table to one dataset level and recurse into sequence items."""
    for tag in list(ds.keys()):
        if tag.is_private or (tag.group & 0xFF00) in (0x5000, 0x6000):
            del ds[tag]
            continue
        if tag.group == 0x7FE0:
            continue  # pixel data: left as is (and never read here)
        action = ACTIONS.get(int(tag))
        vr = _vr(ds, tag)
        if action is None:
            action = _fallback_action(vr)
        _apply(ds, tag, vr, action, salt)


def _fallback_action(vr: str) -> str:
    """Attributes not in the table: replace UIDs, empty names, dates and times, keep the rest."""
    if vr == "UI":
        return "U"
    if vr in ("PN", "DA", "DT", "TM"):
        return "Z"
    return "K"


def _apply(ds: Dataset, tag, vr: str, action: str, salt: str) -> None:
    if action == "X":
        del ds[tag]
    elif action == "Z":
        _set(ds, tag, vr, empty_value_for_VR(vr) if vr != "SQ" else Sequence())
    elif action == "D":
        _set(ds, tag, vr, _dummy(vr))
    elif action == "U":
        elem = ds[tag]
        if elem.value not in (None, ""):
            values = elem.value if elem.VM > 1 else [elem.value]
            new = [_new_uid(v, salt) for v in values]
            elem.value = new if elem.VM > 1 else new[0]
    elif vr == "SQ":  # K: keep, but clean what the items hold
        for item in ds[tag].value or []:
            _clean_dataset(item, salt)


def _set(ds: Dataset, tag, vr: str, value: Any) -> None:
    ds[tag] = DataElement(tag, vr, value)


def _dummy(vr: str) -> Any:
    """A harmless value valid for the VR; sequences become empty."""
    if vr == "SQ":
        return Sequence()
    if vr in _DUMMIES:
        return _DUMMIES[vr]
    if vr in ("LO", "SH", "LT", "ST", "UT", "UC", "CS", "AE"):
        return _DUMMY_TEXT
    return empty_value_for_VR(vr)


def _new_uid(value: Any, salt: str) -> UID:
    """Same input UID -> same output UID (2.25 form); registry UIDs (SOP classes) are kept."""
    uid = UID(str(value).strip())
    if uid.name != str(uid):  # a registered, non-identifying UID such as a SOP Class
        return uid
    digest = hashlib.sha256(f"{salt}\0{uid}".encode()).digest()
    return UID(f"2.25.{int.from_bytes(digest[:16], 'big')}")


def _vr(ds: Dataset, tag) -> str:
    """The VR from the dictionary when possible, so deferred values are never read."""
    try:
        vr = dictionary_VR(tag)
    except KeyError:
        vr = ""
    if not vr or " or " in vr:  # ambiguous (US or SS) or unknown: ask the element
        vr = str(ds[tag].VR)
    return vr


def _mark(ds: Dataset) -> None:
    """Record what was done, as PS3.15 E.1.1 asks."""
    ds.PatientIdentityRemoved = "YES"
    ds.DeidentificationMethod = DEIDENTIFICATION_METHOD
    code = Dataset()
    code.CodeValue = "113100"
    code.CodingSchemeDesignator = "DCM"
    code.CodeMeaning = "Basic Application Confidentiality Profile"
    ds.DeidentificationMethodCodeSequence = Sequence([code])

"""From an uploaded file to an 8-bit image and its facts: DICOM and photo ingestion, windowing,
de-identification and whole series. Imports without torch."""

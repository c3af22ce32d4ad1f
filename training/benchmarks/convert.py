"""Converters from the benchmarks' official layouts to our LLaVA-style JSONL (one file per split).

`python -m training convert NAME --source DIR --output OUT` writes OUT/{train,test,...}.jsonl;
image paths are written relative to OUT, so a recipe entry reads
`{path: OUT/train.jsonl, image_root: OUT}`. Each record carries `split` and `answer_type`
("closed" / "open" for VQA, "caption" / "report" for generation), which evaluation uses.

Layouts read (what each benchmark's own release ships; see paper appendix B for the links):
- vqa-rad: `VQA_RAD Dataset Public.json` + `VQA_RAD Image Folder/`; test = phrase_type test_*.
- slake: `train.json`, `validate.json`, `test.json` + `imgs/`; English questions only (q_lang).
- path-vqa: `qas/{train,val,test}/{split}_qa.pkl` + `images/{split}/NAME.jpg` (the repo's
  data/split folder); closed = yes/no answers.
- iu-xray, peir-gross: bioCaption's `train_images.tsv` / `test_images.tsv` (image TAB caption)
  + `iu_xray_images/` or `peir_gross_images/`.
- roco: `{train,validation,test}/radiology/{captions.txt,dlinks.txt}` + `images/`.
- mimic-cxr: `mimic-cxr-2.0.0-split.csv[.gz]`, `mimic-cxr-2.0.0-metadata.csv[.gz]`,
  reports `files/pXX/pID/sSTUDY.txt`, images `files/pXX/pID/sSTUDY/DICOM_ID.jpg`; the
  FINDINGS section of each study with a frontal (PA, else AP) image.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import json
import os
import pickle
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from training.engine.records import Record, record_to_llava, write_jsonl

PROMPTS = {
    "iu-xray": "Write the findings and impression of the radiology report for this chest X-ray.",
    "peir-gross": "Write a one-sentence caption for this gross pathology image.",
    "roco": "Write a caption for this radiology image.",
    "mimic-cxr": "Write the findings section of the radiology report for this chest X-ray.",
}
YES_NO = ("yes", "no")


def vqa_record(rid: str, image: Path, question: str, answer, split: str, answer_type: str, source: str) -> Record:
    return Record(rid, image, [(question.strip(), str(answer).strip())], source, {"split": split, "answer_type": answer_type})


def caption_record(rid: str, image: Path, text: str, split: str, source: str, kind: str = "caption") -> Record:
    return Record(rid, image, [(PROMPTS[source], " ".join(text.split()))], source, {"split": split, "answer_type": kind})


def convert_vqa_rad(src: Path) -> Iterator[Record]:
    rows = json.loads((src / "VQA_RAD Dataset Public.json").read_text())
    for row in rows:
        split = "test" if str(row.get("phrase_type", "")).startswith("test") else "train"
        kind = "closed" if str(row["answer_type"]).strip().upper() == "CLOSED" else "open"
        image = src / "VQA_RAD Image Folder" / row["image_name"]
        yield vqa_record(f"vqa-rad-{row['qid']}", image, row["question"], row["answer"], split, kind, "vqa-rad")


def convert_slake(src: Path) -> Iterator[Record]:
    for split, filename in (("train", "train.json"), ("validation", "validate.json"), ("test", "test.json")):
        if not (src / filename).exists():
            continue
        for row in json.loads((src / filename).read_text()):
            if row.get("q_lang") != "en":
                continue
            kind = "closed" if str(row["answer_type"]).upper() == "CLOSED" else "open"
            image = src / "imgs" / row["img_name"]
            yield vqa_record(f"slake-{row['qid']}", image, row["question"], row["answer"], split, kind, "slake")


def convert_path_vqa(src: Path) -> Iterator[Record]:
    for split, name in (("train", "train"), ("validation", "val"), ("test", "test")):
        qa_file = src / "qas" / name / f"{name}_qa.pkl"
        if not qa_file.exists():
            continue
        with qa_file.open("rb") as handle:
            rows = pickle.load(handle)  # the official release is a pickle: only load trusted copies
        for index, row in enumerate(rows):
            answer = str(row["answer"]).strip()
            kind = "closed" if answer.lower() in YES_NO else "open"
            image = src / "images" / name / f"{row['image']}.jpg"
            yield vqa_record(f"path-vqa-{name}-{index}", image, row["question"], answer, split, kind, "path-vqa")


def biocaption(name: str, folder: str, kind: str) -> Callable[[Path], Iterator[Record]]:
    """bioCaption's layout (IU X-Ray, PEIR Gross): {split}_images.tsv = image TAB caption."""

    def convert(src: Path) -> Iterator[Record]:
        for split in ("train", "test"):
            tsv = src / f"{split}_images.tsv"
            if not tsv.exists():
                continue
            for line in tsv.read_text().splitlines():
                if not line.strip():
                    continue
                image, caption = line.split("\t", 1)
                yield caption_record(f"{name}-{Path(image).stem}", src / folder / image, caption, split, name, kind)

    return convert


def convert_roco(src: Path) -> Iterator[Record]:
    for split in ("train", "validation", "test"):
        folder = src / split / "radiology"
        if not (folder / "captions.txt").exists():
            continue
        images = {}
        for line in (folder / "dlinks.txt").read_text().splitlines():
            parts = [p.strip() for p in line.split("\t")]
            if len(parts) >= 3:
                images[parts[0]] = parts[-1]
        for line in (folder / "captions.txt").read_text().splitlines():
            if "\t" not in line:
                continue
            rid, caption = (p.strip() for p in line.split("\t", 1))
            if rid in images and caption:
                yield caption_record(rid, folder / "images" / images[rid], caption, split, "roco")


def read_csv(path: Path) -> list[dict]:
    """A CSV that may also be shipped gzipped (PhysioNet ships both)."""
    gz = path.with_name(path.name + ".gz")
    if path.exists():
        text = path.read_text()
    elif gz.exists():
        text = gzip.decompress(gz.read_bytes()).decode()
    else:
        raise FileNotFoundError(f"neither {path} nor {gz} exists")
    return list(csv.DictReader(text.splitlines()))


SECTION = re.compile(r"^\s*([A-Z][A-Z /&]+):", re.M)


def report_section(report: str, name: str = "FINDINGS") -> str | None:
    """The text of one upper-case section (`FINDINGS:` ... up to the next `HEADER:`)."""
    headers = list(SECTION.finditer(report))
    for index, match in enumerate(headers):
        if match.group(1).strip() == name:
            end = headers[index + 1].start() if index + 1 < len(headers) else len(report)
            text = " ".join(report[match.end() : end].split())
            return text or None
    return None


def convert_mimic_cxr(src: Path) -> Iterator[Record]:
    splits = {r["dicom_id"]: r["split"] for r in read_csv(src / "mimic-cxr-2.0.0-split.csv")}
    split_names = {"train": "train", "validate": "validation", "test": "test"}
    chosen: dict[tuple[str, str], tuple[int, str]] = {}  # (subject, study) -> (view rank, dicom)
    for row in read_csv(src / "mimic-cxr-2.0.0-metadata.csv"):
        rank = {"PA": 0, "AP": 1}.get(row.get("ViewPosition", ""))
        if rank is None or row["dicom_id"] not in splits:
            continue
        key = (row["subject_id"], row["study_id"])
        if key not in chosen or rank < chosen[key][0]:
            chosen[key] = (rank, row["dicom_id"])
    for (subject, study), (_, dicom) in sorted(chosen.items()):
        folder = src / "files" / f"p{subject[:2]}" / f"p{subject}"
        report = folder / f"s{study}.txt"
        findings = report_section(report.read_text()) if report.exists() else None
        if findings:
            split = split_names.get(splits[dicom], splits[dicom])
            yield caption_record(f"mimic-cxr-{study}", folder / f"s{study}" / f"{dicom}.jpg", findings, split, "mimic-cxr", "report")


@dataclass(frozen=True)
class Benchmark:
    """A benchmark: its converter, its task and the metrics table 5 or 6 reports for it."""

    convert: Callable[[Path], Iterator[Record]]
    task: str  # "vqa" or "caption"


BENCHMARKS = {
    "vqa-rad": Benchmark(convert_vqa_rad, "vqa"),
    "slake": Benchmark(convert_slake, "vqa"),
    "path-vqa": Benchmark(convert_path_vqa, "vqa"),
    "iu-xray": Benchmark(biocaption("iu-xray", "iu_xray_images", "report"), "caption"),
    "peir-gross": Benchmark(biocaption("peir-gross", "peir_gross_images", "caption"), "caption"),
    "roco": Benchmark(convert_roco, "caption"),
    "mimic-cxr": Benchmark(convert_mimic_cxr, "caption"),
}


def convert(name: str, source: Path, output: Path) -> dict[str, int]:
    """Convert benchmark `name` from its official layout at source into output/{split}.jsonl."""
    by_split: dict[str, list[dict]] = {}
    for record in BENCHMARKS[name].convert(Path(source)):
        row = record_to_llava(record)
        row["image"] = os.path.relpath(record.image, output)
        by_split.setdefault(record.meta["split"], []).append(row)
    if not by_split:
        raise ValueError(f"no {name} records found under {source}; see `python -m training convert --help`")
    for split, rows in by_split.items():
        write_jsonl(Path(output) / f"{split}.jsonl", rows)
    return {split: len(rows) for split, rows in by_split.items()}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = __doc__
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("benchmark", choices=sorted(BENCHMARKS))
    parser.add_argument("--source", type=Path, required=True, help="the official release folder")
    parser.add_argument("--output", type=Path, required=True, help="folder for {split}.jsonl")


def run(args: argparse.Namespace) -> int:
    counts = convert(args.benchmark, args.source, args.output)
    print(json.dumps({"benchmark": args.benchmark, "output": str(args.output), "records": counts}))
    return 0

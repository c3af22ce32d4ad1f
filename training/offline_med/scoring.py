"""How offline-med answers are scored: the option an answer commits to after its evidence,
closed accuracy (committed and strict), token F1, yes rates, per family, and the Markdown table.

Pure functions of prediction rows (no model, no data folder), so the evaluation, the ablation,
the model card and `rescore` read one definition of "correct".
"""

from __future__ import annotations

from training.benchmarks.metrics import closed_accuracy, mean_token_f1, normalize_answer

# Families the builder can emit (docs/offline-med.md); absent ones are reported with n = 0.
FAMILIES = (
    "modality",
    "body_region",
    "plane",
    "window",
    "laterality",
    "atlas_region",
    "finding",
    "fine_detail",
    "description",
)


def committed_answer(prediction: str, options: list[str] | None) -> str:
    """What a closed answer commits to, after its evidence: for a yes/no question its last
    yes/no word ("This is a CT, so no." -> "no"); for a choose-one question the one offered
    option it names as whole words ("The label says RC9." -> "RC9"). A prediction with no
    yes/no word, or naming both options or none, is left as is (and is wrong)."""
    words = normalize_answer(prediction).split()
    if options and {normalize_answer(o) for o in options} == {"yes", "no"}:
        verdicts = [w for w in words if w in ("yes", "no")]
        return verdicts[-1] if verdicts else prediction
    padded = f" {' '.join(words)} "
    named = [o for o in options or () if f" {normalize_answer(o)} " in padded]
    return named[0] if len(named) == 1 else prediction


def truth_of(row: dict) -> str:
    """The option a closed record's answer commits to (older data: the reference itself)."""
    return row.get("truth") or row["reference"]


def offered(row: dict) -> list[str] | None:
    """A closed record's options; a yes/no truth stands for ("yes", "no") where none are stored."""
    if row.get("options"):
        return row["options"]
    return ["yes", "no"] if normalize_answer(truth_of(row)) in ("yes", "no") else None


def yes_rates(closed: list[dict], committed: list[str]) -> tuple[float | None, float | None]:
    """Share of "yes" among the committed answers to yes/no questions, and in their truth."""
    pairs = [(c, truth_of(r)) for r, c in zip(closed, committed, strict=True) if offered(r) == ["yes", "no"]]
    if not pairs:
        return None, None
    said = sum(normalize_answer(c) == "yes" for c, _ in pairs) / len(pairs)
    truth = sum(normalize_answer(t) == "yes" for _, t in pairs) / len(pairs)
    return round(said, 4), round(truth, 4)


def score(rows: list[dict], probe_ceilings: dict[str, float] | None = None) -> dict:
    """Overall and per-family closed accuracy and token F1 as fractions (None when undefined).

    `closed_accuracy` scores the option a closed answer commits to (`committed_answer`)
    against the record's truth; `closed_accuracy_strict` the whole normalised answer against the
    reference sentence. Token F1 is on the raw answers. `probe_ceilings` (family -> fraction)
    adds each family's `probe_ceiling`.
    """

    def frac(value: float) -> float | None:
        return None if value != value else round(value / 100.0, 4)  # NaN: no such questions

    def block(group: list[dict]) -> dict:
        closed = [r for r in group if r["answer_type"] == "closed"]
        committed = [committed_answer(r["prediction"], offered(r)) for r in closed]
        yes_rate, truth_yes_rate = yes_rates(closed, committed)
        return {
            "closed_accuracy": frac(closed_accuracy(committed, [truth_of(r) for r in closed])),
            "closed_accuracy_strict": frac(
                closed_accuracy([r["prediction"] for r in closed], [r["reference"] for r in closed])
            ),
            "token_f1": frac(
                mean_token_f1([r["prediction"] for r in group], [r["reference"] for r in group])
            ),
            "yes_rate": yes_rate,
            "truth_yes_rate": truth_yes_rate,
            "n": len(group),
            "n_closed": len(closed),
        }

    by_family = {f: block([r for r in rows if r["family"] == f]) for f in FAMILIES}
    for family in sorted({r["family"] for r in rows} - set(FAMILIES)):
        by_family[family] = block([r for r in rows if r["family"] == family])
    for family, ceiling in (probe_ceilings or {}).items():
        if family in by_family:
            by_family[family]["probe_ceiling"] = ceiling
    return block(rows) | {"by_family": by_family}


def table(result: dict) -> str:
    """A Markdown table: the model and each baseline, overall and per family (closed acc / F1),
    with the family's probe ceiling and the yes rates where measured."""
    systems = {"model": result} | result.get("baselines", {})
    ceilings = any("probe_ceiling" in block for block in result["by_family"].values())

    def pct(value: float | None) -> str:
        return "-" if value is None else f"{100 * value:.1f}"

    def cell(block: dict) -> str:
        return f"{pct(block.get('closed_accuracy'))} / {pct(block.get('token_f1'))}"

    extra = ["probe ceiling"] if ceilings else []
    extra.append("yes rate (truth)")

    def extras(block: dict) -> list[str]:
        cells = [pct(block.get("probe_ceiling"))] if ceilings else []
        return cells + [f"{pct(block.get('yes_rate'))} ({pct(block.get('truth_yes_rate'))})"]

    columns = [*systems, *extra]
    lines = ["| family (n) | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    rows = [(f"**overall** ({result['n']})", result, lambda s: s)]
    rows += [
        (f"{family} ({block['n']}, {block.get('n_closed', '?')} closed)", block, lambda s, f=family: s["by_family"][f])
        for family, block in result["by_family"].items()
    ]
    for name, block, pick in rows:
        cells = [cell(pick(s)) for s in systems.values()] + extras(block)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return (
        "\n".join(lines)
        + "\n\ncells: closed accuracy % / token F1 %; '-': no such questions in the sample. probe ceiling:"
        " a linear read-out of the frozen tower's features on the same questions (training/tiny/probe_ceilings.py);"
        " yes rate: the model's share of 'yes' answers to yes/no questions (the truth's in brackets).\n"
    )

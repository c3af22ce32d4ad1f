"""Questions and answers of the offline medical set, one function per question family.

Each answer is a fact we know about the image (from its source's metadata or from what we drew),
so every sample is exactly right. Closed questions are yes/no or name their options in the
question, and `Balancer` keeps yes/no answers and option positions at ~50/50. That alone does not
make a model that ignores the image score at chance on the categorical facts (modality, region,
plane, window): their truths are not uniform (most slices are axial), so "Is this slice in the
axial plane?" is mostly "yes" by prior. Every split therefore asks each closed fact question
once per option it offers, each time of an image whose truth is that option (`complements`): a
question's text then tells nothing about its answer, as in VQA v2's complementary pairs.

Answers are short sentences with the evidence first: "This is a CT, so no." for a yes/no
question, "This is a CT." for a choose-one or open one. A 135M LLM learns to name what it sees
long before it learns to check a named option against the image (a bare "no" collapses to one
answer for every image); with the naming first, the yes/no follows from the sentence it has just
written. `Turn.truth` keeps the option an answer commits to, which is what evaluation scores.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from functools import partial

import numpy as np
from PIL import Image

from training.offline_med.render import (
    QUADRANTS,
    TEXTURES,
    WINDOWS,
    draw_label,
    draw_lesion,
    draw_marker,
    draw_textured_lesion,
    foreground_point,
    quadrant,
    random_label,
    upsample_canvas,
)
from training.offline_med.sources import View

MODALITIES = ("CT", "MRI", "X-ray", "ultrasound", "fundus photograph", "histology")
REGIONS = ("head", "chest", "abdomen", "eye", "tissue")
PLANES = ("axial", "coronal", "sagittal")
MODALITY_LONG = {
    "CT": "a computed tomography (CT) image",
    "MRI": "a magnetic resonance imaging (MRI) image",
    "X-ray": "a plain radiograph (X-ray)",
    "ultrasound": "an ultrasound image",
    "fundus photograph": "a fundus photograph of the retina",
    "histology": "a histology image of a tissue section stained by immunohistochemistry (IHC)",
}
PLANE_LONG = {
    "axial": "the axial plane, which divides the body into upper and lower parts",
    "coronal": "the coronal plane, which divides the body into front and back parts",
    "sagittal": "the sagittal plane, which divides the body into left and right parts",
}
WINDOW_USE = {
    "brain": "separates grey and white matter but shows bone as plain white",
    "bone": "shows the detail of bone while soft tissue looks uniformly grey",
    "soft tissue": "shows fat, muscle and organs, with bone bright and air black",
}
CAPTION_PROMPTS = (
    "Describe the image briefly.",
    "Give a short caption for this image.",
    "What does this image show?",
    "Summarise the visual content of the image.",
)


@dataclass
class Turn:
    """One question and its answer; `options` is set for closed questions only."""

    question: str
    answer: str
    options: tuple[str, ...] = ()
    asked: str | None = None  # yes/no questions about a fact: the value the question names
    truth: str | None = None  # the option (or, for open questions, the fact) the answer commits to


@dataclass
class Sample:
    """A conversation about one image. `image_key` names a shared view image (written once);
    derived images (marks, lesions, canvases) have none and are written for this sample only."""

    family: str
    source: str
    image: Image.Image
    turns: list[Turn]
    image_key: str | None = None
    detail: dict | None = None  # fine-detail family: what was drawn where, for audits and tests
    group: str | None = None  # complementary questions: one text asked of several images

    @property
    def answer_type(self) -> str:
        return "closed" if all(t.options for t in self.turns) else "open"


@dataclass
class Balancer:
    """Deals yes/no (or first/second) from shuffled decks of two, one deck per question kind,
    so every kind is balanced to within one answer in every split."""

    rng: random.Random
    decks: dict[str, list[bool]] = field(default_factory=dict)

    def flip(self, kind: str) -> bool:
        deck = self.decks.setdefault(kind, [])
        if not deck:
            deck += [True, False]
            self.rng.shuffle(deck)
        return deck.pop()


def yes_no(flag: bool) -> str:
    return "yes" if flag else "no"


def or_list(options: list[str]) -> str:
    """'a or b' / 'a, b or c', the way options are named in a question."""
    return options[0] if len(options) == 1 else ", ".join(options[:-1]) + " or " + options[-1]


MODALITY_NAME = {
    "CT": "a CT",
    "MRI": "an MRI",
    "X-ray": "an X-ray",
    "ultrasound": "an ultrasound image",
    "fundus photograph": "a fundus photograph",
    "histology": "a histology image",
}
REGION_NAME = {"tissue": "a tissue section"}
EVIDENCE = {
    "modality": lambda v: f"This is {MODALITY_NAME[v]}",
    "body_region": lambda v: f"It shows {REGION_NAME.get(v, 'the ' + v)}",
    "plane": lambda v: f"The slice is in the {v} plane",
    "window": lambda v: f"It is shown in a {v} window",
}


def sentence(evidence: str) -> str:
    """The answer of a choose-one or open question: the evidence as a sentence."""
    return f"{evidence}."


def fact_sentence(family: str, value: str) -> str:
    return sentence(EVIDENCE[family](value))


def so_yes_no(evidence: str, flag: bool) -> str:
    """The answer of a yes/no question: the evidence, then the verdict that follows from it."""
    return f"{evidence}, so {yes_no(flag)}."


def fact_answer(family: str, turn: Turn, truth: str) -> Turn:
    """`turn` answered for an image whose `family` fact is `truth` (complements reuse a
    question on other images, so the evidence is rebuilt from each image's own fact)."""
    evidence = EVIDENCE[family](truth)
    if turn.asked is not None:
        verdict = yes_no(truth == turn.asked)
        return replace(turn, answer=so_yes_no(evidence, truth == turn.asked), truth=verdict)
    return replace(turn, answer=sentence(evidence), truth=truth)


def closed_yes_no(rng: random.Random, bal: Balancer, family: str, truth: str, vocab: tuple[str, ...], template: str) -> Turn:
    """'Is this X?' with X the truth or, half of the time, another member of the vocabulary."""
    return yes_no_turn(rng, bal.flip(f"{family}:yes"), family, truth, vocab, template)


def yes_no_turn(rng: random.Random, answer_yes: bool, family: str, truth: str, vocab: tuple[str, ...], template: str) -> Turn:
    """'Is this X?' asking the truth when `answer_yes`, else a random other member."""
    asked = truth if answer_yes else rng.choice([v for v in vocab if v != truth])
    turn = Turn(template.format(asked) + " Answer yes or no.", "", ("yes", "no"), asked)
    return fact_answer(family, turn, truth)


def closed_choice(
    rng: random.Random, bal: Balancer, kind: str, truth: str, vocab: tuple[str, ...], template: str, say: Callable[[str], str], n: int = 2
) -> Turn:
    """Choose-one with the options named in the question; the truth's position is balanced.
    `say` turns the truth into the answer sentence."""
    others = rng.sample([v for v in vocab if v != truth], min(n - 1, len(vocab) - 1))
    options = [truth, *others] if bal.flip(f"{kind}:first") else [*others, truth]
    if len(options) > 2:
        rng.shuffle(options)
    return Turn(template.format(or_list(options)), say(truth), tuple(options), truth=truth)


def fact_turn(rng: random.Random, bal: Balancer, family: str, truth: str, vocab: tuple[str, ...], phrasing: tuple[str, str, str]) -> Turn:
    """One question about a categorical fact, as yes/no, choose-one or open, answered with
    the evidence first."""
    yes_no_t, choice_t, open_t = phrasing
    form = rng.choices(("yes_no", "choice", "open"), weights=(0.35, 0.35, 0.3))[0]
    if form == "yes_no":
        return closed_yes_no(rng, bal, family, truth, vocab, yes_no_t)
    if form == "choice":
        say = partial(fact_sentence, family)
        return closed_choice(rng, bal, family, truth, vocab, choice_t, say, n=3 if family == "plane" else 2)
    return Turn(open_t, fact_sentence(family, truth), truth=truth)


PHRASING = {
    "modality": ("Is the imaging modality {}?", "What imaging modality is this: {}?", "What imaging modality was used for this image?"),
    "body_region": ("Does this image show the {}?", "Which body region is shown: {}?", "Which body region does this image show?"),
    "plane": ("Is this slice in the {} plane?", "In which plane is this slice: {}?", "In which anatomical plane is this slice?"),
    "window": ("Is this CT displayed in a {} window?", "Which CT window is used here: {}?", "Which CT window is this image displayed in?"),
}


# Other ways users ask the open fact questions (the app's gallery suggests the first ones). Only
# training questions use them, so the held-out splits keep one phrasing per family.
OPEN_VARIANTS = {
    "modality": ("What imaging modality is this?", "What kind of medical image is this?", "Which modality was used to acquire this image?"),
    "body_region": ("Which body region is shown?", "What part of the body does this image show?"),
    "plane": ("Which plane is this slice in?", "What is the anatomical plane of this image?"),
    "window": ("What window is this CT shown in?", "Which display window does this CT use?"),
}


def facts_of(view: View, present: dict[str, set[str]] | None = None) -> dict[str, tuple[str, tuple[str, ...]]]:
    """The categorical facts a view can be asked about: family -> (truth, vocabulary).

    With `present` (family -> truths that some view of the split has), a vocabulary is cut to
    those truths wherever two or more exist, so that every option asked has an image to
    complement it (`complements`)."""
    facts = {"modality": (view.modality, MODALITIES)}
    if view.body_region:
        facts["body_region"] = (view.body_region, REGIONS)
    if view.plane:
        facts["plane"] = (view.plane, PLANES)
    if view.window:
        facts["window"] = (view.window, tuple(WINDOWS))
    if present is None:
        return facts
    cut = {family: (truth, tuple(v for v in vocab if v in present[family])) for family, (truth, vocab) in facts.items()}
    return {family: cut[family] if len(cut[family][1]) > 1 else facts[family] for family in facts}


def truths_present(views: list[View]) -> dict[str, set[str]]:
    """family -> the truths the given views have for it."""
    present: dict[str, set[str]] = {}
    for view in views:
        for family, (truth, _) in facts_of(view).items():
            present.setdefault(family, set()).add(truth)
    return present


def caption(view: View) -> str:
    """A one-line caption from the view's facts (stage 1)."""
    text = MODALITY_LONG[view.modality]
    if view.plane:
        text = f"{text[0].upper()}{text[1:]}, {view.plane} slice"
    if view.body_region and view.body_region not in ("eye", "tissue"):
        text += f" of the {view.body_region}"
    if view.window:
        text += f", shown in a {view.window} window"
    return text[0].upper() + text[1:] + "."


def description(view: View) -> str:
    """A long answer: every known fact in full sentences."""
    sentences = [f"This is {MODALITY_LONG[view.modality]}."]
    if view.body_region and view.body_region not in ("eye", "tissue"):
        sentences.append(f"It shows the {view.body_region}.")
    if view.plane:
        sentences.append(f"The slice is in {PLANE_LONG[view.plane]}.")
    if view.window:
        centre, width = WINDOWS[view.window]
        sentences.append(f"It is displayed in a {view.window} window (centre {centre} HU, width {width} HU), which {WINDOW_USE[view.window]}.")
    if view.midline_x is not None:
        sentences.append("By the radiological convention, the patient's left is on the right of the image.")
    return " ".join(sentences)


def fact_samples(
    view: View, key: str, rng: random.Random, bal: Balancer, paired: bool = False, present: dict[str, set[str]] | None = None
) -> Iterator[Sample]:
    """One question per known fact of a view, and sometimes a long description.

    `paired` (training): a yes/no question comes with its mirror on the same image (the true
    option where it asked a false one, and vice versa), so that no answer prior lowers the loss
    and only looking at the image does; an open question may be asked in one of its
    `OPEN_VARIANTS`. `present`: see `facts_of`."""
    for family, (truth, vocab) in facts_of(view, present).items():
        turn = fact_turn(rng, bal, family, truth, vocab, PHRASING[family])
        if paired and not turn.options:
            turn = replace(turn, question=rng.choice((turn.question, *OPEN_VARIANTS[family])))
        yield Sample(family, view.source, view.image, [turn], key)
        if paired and turn.options == ("yes", "no"):
            mirror = yes_no_turn(rng, turn.truth == "no", family, truth, vocab, PHRASING[family][0])
            yield Sample(family, view.source, view.image, [mirror], key)
    if rng.random() < 0.3:
        turn = Turn(rng.choice(("Describe this image in detail.", "Write a short report of what this image shows.")), description(view))
        yield Sample("description", view.source, view.image, [turn], key)


def complements(sample: Sample, keyed_views: list[tuple[str, View]], rng: random.Random) -> list[Sample]:
    """The same closed fact question asked of other images, one per option the asked image does
    not answer with, each image picked by `rng` among the views whose truth gives that answer.

    A yes/no question gets one complement (an image where the answer flips); a choose-one
    question gets one per other option. Options no view can answer are left without one. The
    complements carry the `group` of `sample`, so that evaluation can draw them together."""
    turn = sample.turns[0]
    truths = [(key, view, facts_of(view).get(sample.family, (None,))[0]) for key, view in keyed_views]
    found = []
    for answer in [o for o in turn.options if o != turn.truth]:
        if turn.asked is None:
            candidates = [(key, view, truth) for key, view, truth in truths if truth == answer]
        else:
            candidates = [(key, view, truth) for key, view, truth in truths if truth is not None and (truth == turn.asked) == (answer == "yes")]
        if candidates:
            key, view, truth = rng.choice(candidates)
            answered = fact_answer(sample.family, turn, truth)
            found.append(Sample(sample.family, view.source, view.image, [answered], key, group=sample.group))
    return found


def caption_sample(view: View, key: str, rng: random.Random) -> Sample:
    return Sample("caption", view.source, view.image, [Turn(rng.choice(CAPTION_PROMPTS), caption(view))], key)


def multi_turn_sample(view: View, key: str, rng: random.Random, bal: Balancer) -> Sample:
    """A conversation of two to four questions about the same image, ending with a description."""
    facts = list(facts_of(view).items())
    rng.shuffle(facts)
    turns = [fact_turn(rng, bal, family, truth, vocab, PHRASING[family]) for family, (truth, vocab) in facts[:3]]
    turns.append(Turn("Now describe the image in detail.", description(view)))
    return Sample("multi_turn", view.source, view.image, turns, key)


def lesion_at(where: str) -> str:
    return f"The lesion is in the {where} quadrant."


FINDING_PRESENT = "Is there a simulated round lesion (a focal round spot added to the image)? Answer yes or no."


def finding_samples(view: View, rng: random.Random, bal: Balancer, paired: bool = False) -> Iterator[Sample]:
    """A simulated lesion (6-10% of the width, visible at any resolution): presence or location.
    `paired` (training): a presence question is asked of the view both with and without it."""
    if rng.random() < 0.35:
        image, drawn = draw_lesion(view.image, rng)
        where = quadrant(*drawn.centre, image.width, image.height)
        if rng.random() < 0.5:
            question = "A simulated round lesion was added to this image. In which image quadrant is it: {}?"
            turn = closed_choice(rng, bal, "finding_quadrant", where, QUADRANTS, question, lesion_at, n=4)
        else:
            turn = Turn("A simulated round lesion was added to this image. Where is it?", lesion_at(where), truth=where)
        yield Sample("finding", view.source, image, [turn])
        return
    present = bal.flip("finding:yes")
    for shown in (present, not present) if paired else (present,):
        image = draw_lesion(view.image, rng)[0] if shown else view.image.copy()
        evidence = "There is a round lesion" if shown else "There is no round lesion"
        yield Sample("finding", view.source, image, [Turn(FINDING_PRESENT, so_yes_no(evidence, shown), ("yes", "no"), truth=yes_no(shown))])


RADIOLOGICAL = "Images follow the radiological convention: the patient's left is on the image's right."


def laterality_sample(view: View, rng: random.Random, bal: Balancer) -> Sample | None:
    """Mark a point in one hemisphere and ask which side of the patient it is on."""
    left = bal.flip("laterality:left")
    offset = 0.08 * view.image.width
    point = None
    for _ in range(50):
        x, y = foreground_point(view.image, rng, margin=0.1)
        if (x > view.midline_x + offset) == left and abs(x - view.midline_x) > offset:
            point = (x, y)
            break
    if point is None:
        return None
    side = "left" if left else "right"
    evidence = f"The marked point is on the patient's {side}"
    image = draw_marker(view.image, *point)
    form = rng.random()
    if form < 0.4:
        turn = Turn(f"{RADIOLOGICAL} Is the point marked by the red circle on the patient's left or right side?", sentence(evidence), ("left", "right"), truth=side)
    elif form < 0.8:
        asked = side if bal.flip("laterality:yes") else ("right" if left else "left")
        question = f"{RADIOLOGICAL} Is the point marked by the red circle on the patient's {asked} side? Answer yes or no."
        turn = Turn(question, so_yes_no(evidence, asked == side), ("yes", "no"), truth=yes_no(asked == side))
    else:
        turn = Turn(f"{RADIOLOGICAL} On which side of the patient is the marked point?", sentence(evidence), truth=side)
    return Sample("laterality", view.source, image, [turn])


def stable_label_point(labels: np.ndarray, rng: random.Random) -> tuple[int, int, int] | None:
    """A pixel whose 7x7 neighbourhood is one atlas region, so a small mark is unambiguous."""
    ys, xs = np.nonzero(labels > 0)
    for _ in range(100):
        if len(xs) == 0:
            return None
        i = rng.randrange(len(xs))
        y, x = int(ys[i]), int(xs[i])
        patch = labels[max(0, y - 3) : y + 4, max(0, x - 3) : x + 4]
        if patch.size == 49 and (patch == labels[y, x]).all():
            return x, y, int(labels[y, x])
    return None


def atlas_sample(view: View, names: dict[int, str], rng: random.Random, bal: Balancer) -> Sample | None:
    """Mark a point and ask for its AAL region (Colin27): yes/no, two-choice or open."""
    found = stable_label_point(view.atlas, rng)
    if found is None:
        return None
    x, y, label = found
    truth = names[label]
    in_slice = [names[v] for v in np.unique(view.atlas) if v > 0 and v != label and v in names]
    if not in_slice:
        return None
    image = draw_marker(view.image, x, y)
    prefix = "The red circle marks a point in the brain."
    evidence = f"The marked point is in the {truth}"
    form = rng.random()
    if form < 0.35:
        asked = truth if bal.flip("atlas:yes") else rng.choice(in_slice)
        question = f"{prefix} Is the marked point in the {asked} (AAL atlas)? Answer yes or no."
        turn = Turn(question, so_yes_no(evidence, asked == truth), ("yes", "no"), truth=yes_no(asked == truth))
    elif form < 0.7:
        other = rng.choice(in_slice)
        options = (truth, other) if bal.flip("atlas:first") else (other, truth)
        turn = Turn(f"{prefix} Which AAL atlas region is it in: {options[0]} or {options[1]}?", sentence(evidence), options, truth=truth)
    else:
        turn = Turn(f"{prefix} Which AAL atlas region is the marked point in?", sentence(evidence), truth=truth)
    return Sample("atlas_region", view.source, image, [turn])


def fine_detail_sample(view: View, side: int, rng: random.Random, bal: Balancer) -> Sample:
    """A large canvas with a detail readable only when zoomed in: the texture inside a lesion
    (60%) or a tiny printed label (40%). The answer names what the detail shows, not where it
    is ("The lesion is speckled inside."; "The label says K7."): answers that said where first
    ("The lesion in the upper left quadrant is ...", sessions 18-19) named the quadrant right
    only at chance (ablation 21-25%, run 19's test answers 4 of 24) while the texture was read
    at 89-100%, so the tiny model stated a wrong position with every right answer
    (docs/tiny-default.md). The stage-1 caption still says where (`fine_detail_caption`).

    A tiny dot was asked too until session 18: no view's features carry it (linear read-out
    50% from the low, medium and high crops alike, docs/tiny-default.md), so no model could
    show a zoom-in gain on it."""
    canvas = upsample_canvas(view.image, side)
    if rng.random() < 0.6:
        return textured_lesion_sample(view, canvas, rng, bal)
    text = random_label(rng)
    canvas, drawn = draw_label(canvas, text, rng)
    where = quadrant(*drawn.centre, canvas.width, canvas.height)
    question = "A tiny label is printed somewhere in this image. What does it say"
    answer = f"The label says {text}."
    if rng.random() < 0.7:
        other = text
        while other == text:
            other = random_label(rng, len(text))
        options = (text, other) if bal.flip("fine_label:first") else (other, text)
        turn = Turn(f"{question}: {options[0]} or {options[1]}?", answer, options, truth=text)
    else:
        turn = Turn(f"{question}?", answer, truth=text)
    detail = {"kind": "label", "box": list(drawn.box), "where": where, "text": text}
    return Sample("fine_detail", view.source, canvas, [turn], detail=detail)


def textured_lesion_sample(view: View, canvas: Image.Image, rng: random.Random, bal: Balancer) -> Sample:
    """A round lesion seen in the overview whose inside, speckled or uniform, is seen only when
    zoomed in; asked as a choice of the two (options in balanced order)."""
    texture = TEXTURES[0] if bal.flip("fine_texture:speckled") else TEXTURES[1]
    canvas, drawn = draw_textured_lesion(canvas, texture, rng)
    where = quadrant(*drawn.centre, canvas.width, canvas.height)
    options = TEXTURES if bal.flip("fine_texture:first") else TEXTURES[::-1]
    question = f"Look closely at the round lesion: is its inside {options[0]} or {options[1]}?"
    turn = Turn(question, f"The lesion is {texture} inside.", options, truth=texture)
    detail = {"kind": "texture", "box": list(drawn.box), "where": where, "texture": texture}
    return Sample("fine_detail", view.source, canvas, [turn], detail=detail)


def fine_detail_caption(view: View, sample: Sample, rng: random.Random) -> Sample:
    """A stage-1 caption of a fine-detail canvas that names its detail, where it is and what it
    shows. Stage 1 trains the projector alone: captions of views only never asked it to keep
    a lesion's texture. From a stage 1 with these captions the ablation's L+M+H reads the
    texture at 100% on three seeds, L at 50% (without them: 52.8% both; docs/ablation.md)."""
    detail = sample.detail
    if detail["kind"] == "texture":
        seen = f"a round lesion in the {detail['where']} quadrant, {detail['texture']} inside"
    else:
        seen = f"a tiny label reading {detail['text']} in the {detail['where']} quadrant"
    text = f"{caption(view)[:-1]}, with {seen}."
    return Sample("caption", view.source, sample.image, [Turn(rng.choice(CAPTION_PROMPTS), text)], sample.image_key)

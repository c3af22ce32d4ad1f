"""The paper's biomedical metrics (tables 5 and 6), each returned as a percentage.

- VQA: closed-question accuracy and token-level F1 as Tu et al. (Med-PaLM M) define it: SQuAD
  style, on normalised answers (lower case, punctuation and articles removed), precision and
  recall over the bag of tokens shared with the reference, averaged over questions.
- Captioning and report generation: ROUGE-L (F-measure, `rouge-score`), METEOR 1.5 and CIDEr-D
  through pycocoevalcap, the implementations the captioning literature reports; both tokenise
  with its PTB tokenizer and run on Java, offline.
"""

from __future__ import annotations

import re
import string
from collections import Counter

ARTICLES = re.compile(r"\b(a|an|the)\b")
PUNCTUATION = str.maketrans("", "", string.punctuation)


def normalize_answer(text: str) -> str:
    """Lower case, no punctuation, no articles, single spaces (SQuAD's normalisation)."""
    text = text.lower().translate(PUNCTUATION)
    return " ".join(ARTICLES.sub(" ", text).split())


def closed_prediction(prediction: str, reference: str) -> str:
    """The answer a closed question's prediction commits to.

    Generative models answer "Yes, there is ..." where the reference is "yes": for yes/no
    references the first yes/no word of the prediction is its answer (LLaVA-Med's convention);
    otherwise the whole normalised prediction is compared.
    """
    words = normalize_answer(prediction).split()
    if normalize_answer(reference) in ("yes", "no"):
        return next((w for w in words if w in ("yes", "no")), " ".join(words))
    return " ".join(words)


def closed_accuracy(predictions: list[str], references: list[str]) -> float:
    """Percent of closed questions whose committed answer equals the normalised reference."""
    if not references:
        return float("nan")
    hits = sum(closed_prediction(p, r) == normalize_answer(r) for p, r in zip(predictions, references, strict=True))
    return 100.0 * hits / len(references)


def token_f1(prediction: str, reference: str) -> float:
    """Token-level F1 of one answer, in [0, 1]; two empty answers agree fully."""
    pred, ref = normalize_answer(prediction).split(), normalize_answer(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def mean_token_f1(predictions: list[str], references: list[str]) -> float:
    if not references:
        return float("nan")
    return 100.0 * sum(token_f1(p, r) for p, r in zip(predictions, references, strict=True)) / len(references)


def rouge_l(predictions: list[str], references: list[str]) -> float:
    """Mean ROUGE-L F-measure (rouge-score, stemming on as in its reference use)."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    scores = [scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(predictions, references, strict=True)]
    return 100.0 * sum(scores) / len(scores)


def _coco_inputs(predictions: list[str], references: list[str]) -> tuple[dict, dict]:
    """pycocoevalcap's {id: [text]} maps, tokenised with its PTB tokenizer (Java)."""
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    tokenizer = PTBTokenizer()
    gts = tokenizer.tokenize({i: [{"caption": r}] for i, r in enumerate(references)})
    res = tokenizer.tokenize({i: [{"caption": p}] for i, p in enumerate(predictions)})
    return gts, res


def meteor(predictions: list[str], references: list[str]) -> float:
    from pycocoevalcap.meteor.meteor import Meteor

    gts, res = _coco_inputs(predictions, references)
    score, _ = Meteor().compute_score(gts, res)  # the Java process ends with the object
    return 100.0 * score


def cider(predictions: list[str], references: list[str]) -> float:
    """CIDEr-D over the corpus (document frequencies come from these references)."""
    from pycocoevalcap.cider.cider import Cider

    gts, res = _coco_inputs(predictions, references)
    score, _ = Cider().compute_score(gts, res)
    return 100.0 * score


def vqa_metrics(predictions: list[str], references: list[str], answer_types: list[str]) -> dict[str, float]:
    """Table 6's metrics: accuracy on closed questions, token F1 on all (and on open ones)."""
    closed = [i for i, t in enumerate(answer_types) if t == "closed"]
    opened = [i for i, t in enumerate(answer_types) if t != "closed"]
    return {
        "closed_accuracy": closed_accuracy([predictions[i] for i in closed], [references[i] for i in closed]),
        "token_f1": mean_token_f1(predictions, references),
        "open_token_f1": mean_token_f1([predictions[i] for i in opened], [references[i] for i in opened]),
    }


def caption_metrics(predictions: list[str], references: list[str]) -> dict[str, float]:
    """Table 5's metrics."""
    return {
        "rouge_l": rouge_l(predictions, references),
        "meteor": meteor(predictions, references),
        "cider": cider(predictions, references),
    }

"""Record tests/tiny_gallery_answers.json from the shipped tiny assets: greedy answers to the
gallery, one thread. Run it when new assets ship (`python scripts/record_gallery_answers.py
"run 14"`); a change of how the assets load must then leave them token for token."""
import json
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
torch.set_num_threads(1)
from test_tiny import GALLERY_ANSWERS, GALLERY_TOKENS, gallery_answers  # noqa: E402

from dragonfly_med.checkpoints.loading import load_model  # noqa: E402


def main(run: str) -> None:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    model, processor = load_model("tiny")
    rows = gallery_answers(model, processor)
    head = {
        "produced_by": f"tests/test_tiny.py::gallery_answers on load_model('tiny') at commit {commit}: "
        f"assets/tiny/projector.safetensors and the PEFT adapter assets/tiny/adapter_model.safetensors "
        f"({run}), torch {torch.__version__}, one thread",
        "max_new_tokens": GALLERY_TOKENS,
    }
    # one answer per line, as the committed file reads in a diff
    answers = ",\n".join("  " + json.dumps(r) for r in rows)
    text = json.dumps(head, indent=1)[:-2] + f',\n "answers": [\n{answers}\n ]\n}}\n'
    json.loads(text)
    GALLERY_ANSWERS.write_text(text)
    for r in rows:
        print(r["image"], "|", r["question"][:40], "|", r["text"])


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "the shipped run")

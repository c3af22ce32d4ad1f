"""`python -m dragonfly_med ask IMAGE --question TEXT [--model ...] [--json]`: one answer.

IMAGE may be a DICOM (any extension) or a photo; it is read by `ingest.load_image`, so a file
that is not an image ends with one `error: ...` line and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys

EXIT_ERROR, EXIT_REFUSED = 1, 2


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = "Ask the model one question about an image (DICOM or photo)."
    parser.add_argument("image", help="DICOM file (any extension) or PNG/JPEG/TIFF/...")
    parser.add_argument("--question", "-q", required=True)
    parser.add_argument(
        "--model",
        default="tiny",
        help="tiny (default), a hub id / dragonfly-med-v2, or a directory",
    )
    quant = parser.add_mutually_exclusive_group()
    quant.add_argument("--load-in-4bit", action="store_true", help="nf4 LLM (bitsandbytes)")
    quant.add_argument("--load-in-8bit", action="store_true", help="int8 LLM (bitsandbytes)")
    parser.add_argument(
        "--dtype",
        default=None,
        help="float32 / bfloat16 / float16 (default: bf16 on GPU, fp32 on CPU)",
    )
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument(
        "--temperature", type=float, default=0.0, help="0 = greedy (default, as released)"
    )
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--json", action="store_true", help="print JSON")


def _fail(message: str, code: int) -> int:
    print(f"error: {message}", file=sys.stderr)
    return code


def run(args: argparse.Namespace) -> int:
    from dragonfly_med.imaging.errors import IngestError
    from dragonfly_med.imaging.ingest import load_image

    try:
        image = load_image(args.image).image
    except IngestError as err:
        return _fail(str(err), EXIT_REFUSED)
    # Libraries imported on the way (deepspeed via accelerate) print to stdout: keep it for JSON.
    with contextlib.redirect_stdout(sys.stderr):
        from dragonfly_med.chat import ChatEngine, SamplingParams
        from dragonfly_med.checkpoints.loading import ModelNotAvailableError

        try:
            engine = ChatEngine.load(
                args.model,
                load_in_4bit=args.load_in_4bit,
                load_in_8bit=args.load_in_8bit,
                dtype=args.dtype,
            )
        except (ModelNotAvailableError, ValueError, FileNotFoundError) as err:
            return _fail(str(err), EXIT_REFUSED)
        params = SamplingParams(
            temperature=args.temperature, top_p=args.top_p, max_new_tokens=args.max_new_tokens
        )
        conv = engine.new_conversation(image)
        for _ in conv.stream(args.question, params):
            pass
    stats = conv.last_stats
    if stats.status == "error":
        return _fail(stats.error or "generation failed", EXIT_ERROR)
    answer = conv.history[-1][1]
    if args.json:
        result = {
            "answer": answer,
            "model": engine.model_id,
            "ttft_s": stats.ttft_s,
            "tokens_per_s": stats.tokens_per_s,
            "new_tokens": stats.new_tokens,
            "plan": conv.plan.to_dict() if conv.plan else None,
        }
        print(json.dumps(result))
    else:
        print(answer)
        ttft = f"{stats.ttft_s:.2f} s" if stats.ttft_s is not None else "n/a"
        rate = f"{stats.tokens_per_s:.1f} tok/s" if stats.tokens_per_s else "n/a"
        print(f"[{engine.model_id}] first token {ttft}, {rate}", file=sys.stderr)
    return 0

"""Command line: `python -m dragonfly_med {plan,ask,inspect,convert,bench} ...`.

Each subcommand lives in its own module with `add_arguments(parser)` and `run(args) -> int`,
imported only when used so that `plan` and `inspect` start without torch.
"""

import argparse
import importlib
import os
import sys

COMMANDS = {
    "plan": ("dragonfly_med.cli.plan", "show the crop plan (grids, zoom, tokens) for an image or WxH"),
    "ask": ("dragonfly_med.cli.ask", "ask the model one question about an image"),
    "inspect": ("dragonfly_med.cli.inspect", "read a DICOM or photo: facts as JSON and the 8-bit image"),
    "convert": ("dragonfly_med.checkpoints.released", "convert a released-format checkpoint to our safetensors format"),
    "bench": ("dragonfly_med.cli.bench", "measure preprocessing, pooling and tiny-model latency"),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dragonfly_med", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (_module, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    args, rest = parser.parse_known_args(argv)
    module = importlib.import_module(COMMANDS[args.command][0])
    command_parser = argparse.ArgumentParser(prog=f"python -m dragonfly_med {args.command}")
    module.add_arguments(command_parser)
    try:
        return module.run(command_parser.parse_args(rest))
    except BrokenPipeError:  # output piped into `head` and the like: stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())

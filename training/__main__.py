"""Command line: `python -m training {run,show-recipe,convert,dedup,check,zoom-stats,eval,...} ...`.

Each subcommand lives in its own module with `add_arguments(parser)` and `run(args) -> int`,
imported only when used, so `show-recipe` and `convert` start without torch. Another module
registers a subcommand by adding one line to COMMANDS.
"""

import argparse
import importlib
import sys

COMMANDS = {
    "run": ("training.engine.trainer", "train one recipe stage (also under `accelerate launch`)"),
    "show-recipe": ("training.engine.recipe", "print a resolved recipe (--json for machines)"),
    "assemble": ("training.engine.assemble", "build general stage 1's start: Llama + CLIP + a new projector"),
    "convert": ("training.benchmarks.convert", "convert an official benchmark layout to LLaVA-style JSONL"),
    "dedup": ("training.benchmarks.dedup", "drop duplicate (image content, instruction) records"),
    "check": ("training.benchmarks.check", "report missing images, empty answers and over-long samples"),
    "zoom-stats": ("training.benchmarks.zoom_stats", "CDF of zoom ratios over a dataset (paper figure 4)"),
    "eval": ("training.benchmarks.evaluate", "score a model on a biomedical benchmark (paper tables 5 and 6)"),
    "build-offline-med": ("training.offline_med.build", "build the offline medical VQA set (docs/offline-med.md)"),
    "reproduce-tiny": ("training.tiny.reproduce", "data -> tiny-med-stage1..3 -> eval -> assets/tiny/"),
    "bench-step": ("training.tiny.bench_step", "time per trained answer of a tiny-model training step (docs/benchmarks.md)"),
    "ablation": ("training.tiny.ablation", "zoom-in ablation L / L+M / L+H / L+M+H (docs/ablation.*)"),
    "convert-adapters": ("training.engine.convert_adapters", "old lora.safetensors adapters -> a PEFT adapter folder"),
    "probe-features": ("training.tiny.probe_features", "what a linear read-out of the frozen tower answers of the eval questions (probe ceilings)"),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (_module, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    args, rest = parser.parse_known_args(argv)
    module_name = COMMANDS[args.command][0]
    if args.command == "eval" and {"offline-med", "--benchmark=offline-med"} & set(rest):
        module_name = "training.offline_med.evaluate"  # its own scorer: baselines and question families
    module = importlib.import_module(module_name)
    command_parser = argparse.ArgumentParser(prog=f"python -m training {args.command}")
    module.add_arguments(command_parser)
    return module.run(command_parser.parse_args(rest))


if __name__ == "__main__":
    sys.exit(main())

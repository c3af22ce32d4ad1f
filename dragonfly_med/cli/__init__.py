"""The subcommands of `python -m dragonfly_med` (plan, ask, inspect, bench), one module each with
`add_arguments(parser)` and `run(args) -> int`."""

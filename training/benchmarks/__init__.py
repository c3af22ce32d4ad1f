"""Public benchmarks and dataset tools: converters to LLaVA-style JSONL, deduplication, checks,
zoom statistics, metrics and evaluation (paper tables 5 and 6)."""

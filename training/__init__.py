"""Training, data tools and evaluation for Dragonfly-Med: the paper's recipes from one CPU to many GPUs."""

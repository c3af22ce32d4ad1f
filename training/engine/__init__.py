"""The training engine: recipes, records and the data mixture, the trainer (accelerate and
DeepSpeed) and the frozen tower's feature cache. It knows no particular dataset."""

"""offline-med: the medical VQA set built from images that install offline (catalogue of sources,
views, rendering, questions, build) and its evaluation with baselines and probe ceilings."""

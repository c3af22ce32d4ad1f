"""The Dragonfly architecture, laid out like a transformers model folder: configuration, pure crop
geometry, image processing, processing (prompt + image tokens), vision towers and modeling.

Nothing here reads checkpoints from disk or the hub (that is `dragonfly_med.checkpoints`), and
`geometry` imports without torch.
"""

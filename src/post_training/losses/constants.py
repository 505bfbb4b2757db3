"""Constants shared by the losses and the data that feeds them (no torch, no tokenizer)."""

IGNORE_INDEX = -100
"""Label of a position no loss is taken on (PyTorch's ``cross_entropy`` default ``ignore_index``):
padding, and the first token of a sequence (nothing predicts it)."""

"""Models: load the tokenizer and causal LM of a ``model/*.yaml`` config (``loading``: dtype,
special tokens, chat template, quantization, PEFT) and build the tiny default model's files
(``tiny_model``)."""

"""Alias of :mod:`post_training.data_sft.build_mixture`: keeps
``python -m post_training.data_sft.dataset_mixture`` working; nothing else lives here."""

from post_training.data_sft.build_mixture import main

if __name__ == "__main__":
    main()

"""Alias of :mod:`post_training.data_sft.build_split`: keeps
``python -m post_training.data_sft.dataset_split`` working; nothing else lives here."""

from post_training.data_sft.build_split import main

if __name__ == "__main__":
    main()

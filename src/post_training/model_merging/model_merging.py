"""Alias of :mod:`post_training.merge`, so ``python -m post_training.model_merging.model_merging``
keeps working; nothing else lives here."""

from post_training.merge import main

if __name__ == "__main__":
    main()

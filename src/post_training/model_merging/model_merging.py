"""Alias of :mod:`post_training.merge`: keeps the old path
``python -m post_training.model_merging.model_merging`` working by running that entrypoint as
``__main__`` (so Hydra finds its configs as it does for the new path); nothing else lives here."""

import runpy

if __name__ == "__main__":
    runpy.run_module("post_training.merge", run_name="__main__", alter_sys=True)

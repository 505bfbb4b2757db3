"""Supervised fine-tuning data, from files to tokenized batches.

Which rows: ``file_formats`` (files -> Arrow tables per format) -> ``sources`` (a source spec ->
rows: local files, saved datasets, the Hub) -> ``transforms`` (a raw row -> canonical
``messages``) -> ``mixing`` (several sources sampled by weight / fraction / count) ->
``splitting`` (deterministic train / eval split) -> ``dataset_config`` (the train / eval datasets
of a ``dataset/*.yaml`` config).

Which tokens: ``templates`` + ``tokenize`` (chat template, masks, filters) -> ``training_data``
(the tokenized, cached data of a run) -> ``packing``, ``sampling``, ``collate`` (batches).

Entrypoints: ``build_mixture`` and ``build_split`` save a built dataset (``saved_datasets``);
``inspect`` shows the data as training sees it. ``dataset_mixture`` / ``dataset_split`` are the
old paths of the builders.
"""

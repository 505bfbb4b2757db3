"""Preference data: canonical pairs (``transforms``, ``pairs``) and tokenized pairs (``encode``).

Canonical preference row (DESIGN.md): ``prompt`` (messages ending before the reply), ``chosen`` and
``rejected`` (assistant messages), optional ``chosen_reward``, ``rejected_reward``, ``ref_rewards``
(list), ``ref_chosen_logps``, ``ref_rejected_logps``, ``chosen_quantile_reward``,
``rejected_quantile_reward``.

* ``transforms``: a raw row to a canonical pair (``preference``, which recognises HH-RLHF,
  UltraFeedback, LLaMA-Factory ShareGPT and Orca rows; ``hh_rlhf``, ``sharegpt_pairs``,
  ``orca_pairs``, ``tiny_task_pairs``, your own);
* ``pairs``: the validated canonical pairs of a source spec;
* ``encode``: tokenized pairs (chosen and rejected back to back in one row; over-long pairs
  dropped or truncated by ``data.truncation``) and the train / eval pairs of a run.
"""

"""Online RL (``train_online``): the trainer that samples with the alignment pipeline's seeded
generation, scores with its reward registry and optimises the losses of
:mod:`post_training.losses.online` on the shared loop of ``trainers.base``."""

"""post-training: SFT (PLW, LN-PLW, IRL) and preference optimisation, composed with Hydra."""

__version__ = "0.1.0"

"""post-training: SFT (PLW, LN-PLW, IRL) and preference optimisation, composed with Hydra.

Offline by default: models and datasets are read from local paths or the local Hugging Face
cache; set ``HF_HUB_OFFLINE=0`` explicitly to allow downloads. (Set before any Hugging Face
library is imported, since they read it at import time.)
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

__version__ = "0.1.0"

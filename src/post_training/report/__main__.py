"""``python -m post_training.report``: see :mod:`post_training.report`."""

import sys

from post_training.report import main

sys.exit(main())

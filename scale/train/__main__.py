"""``python -m scale.train`` (and ``torchrun ... -m scale.train``): the same flags as ``entdyn train``."""

from .loop import main

raise SystemExit(main())

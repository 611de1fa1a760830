"""``python -m entdyn ...``: the same as the ``entdyn`` console script."""

from .cli import main

raise SystemExit(main())

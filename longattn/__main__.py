"""``python -m longattn`` is the ``longattn`` command."""

from .cli import main

raise SystemExit(main())

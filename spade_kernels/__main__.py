"""``python -m spade_kernels``: the ``spade-kernels`` command."""

from .cli import main

raise SystemExit(main())

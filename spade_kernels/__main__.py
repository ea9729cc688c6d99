"""``python -m spade_kernels``: the ``spade-kernels`` command."""

from .sae.cli import main

raise SystemExit(main())

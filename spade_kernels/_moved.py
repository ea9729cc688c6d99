"""Import paths that moved when the SAE toolkit became ``spade_kernels.sae``: they keep working.

``import spade_kernels.train`` (and ``data``, ``evaluation``, ``cli``,
``integrations`` with its adapters) gives the module at its new path, with a
``DeprecationWarning`` that names it, so code written against the earlier
layout runs unchanged while saying where to look.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

#: Former module path → where it lives now.
MOVED = {
    "spade_kernels.train": "spade_kernels.sae.train",
    "spade_kernels.data": "spade_kernels.sae.data",
    "spade_kernels.evaluation": "spade_kernels.sae.evaluation",
    "spade_kernels.cli": "spade_kernels.sae.cli",
    "spade_kernels.integrations": "spade_kernels.sae.integrations",
    "spade_kernels.integrations.sae_lens": "spade_kernels.sae.integrations.sae_lens",
    "spade_kernels.integrations.dictionary_learning": "spade_kernels.sae.integrations.dictionary_learning",
    "spade_kernels.integrations.overcomplete": "spade_kernels.sae.integrations.overcomplete",
    "spade_kernels._io": "spade_kernels.files",
}


def _warn(name: str) -> None:
    warnings.warn(f"{name} moved to {MOVED[name]}; import it from there", DeprecationWarning, stacklevel=3)


class _MovedFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds a former path and loads it as the module at its new one (the same module object)."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname in MOVED:
            # The new module's file as origin: ``python -m <former path>`` puts it in sys.argv[0].
            origin = importlib.util.find_spec(MOVED[fullname]).origin
            return importlib.util.spec_from_loader(
                fullname, self, origin=origin, is_package=fullname.endswith("integrations")
            )
        return None

    def create_module(self, spec):
        _warn(spec.name)
        return importlib.import_module(MOVED[spec.name])

    def get_code(self, fullname):
        """The new module's code, for ``python -m <former path>`` (runpy asks the loader for it)."""
        _warn(fullname)
        new = MOVED[fullname]
        return importlib.util.find_spec(new).loader.get_code(new)

    def exec_module(self, module) -> None:
        pass  # the module at its new path is already executed


def install() -> None:
    """Put the finder on ``sys.meta_path`` once."""
    if not any(isinstance(f, _MovedFinder) for f in sys.meta_path):
        sys.meta_path.append(_MovedFinder())

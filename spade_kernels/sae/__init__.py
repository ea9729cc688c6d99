"""The SAE toolkit built on the kernel library: train, data, evaluate, the command line, trainer adapters.

* :mod:`.train` — the paper's recipe (:func:`~.train.train_spade`), resumable
  states for one process and for several (docs/training.md);
* :mod:`.data` — the paper's synthetic sets, activation files and directories
  of shards, the streaming pass that checks and scales them;
* :mod:`.evaluation` — what ``spade-kernels eval`` reports;
* :mod:`.cli` — the ``spade-kernels`` command;
* :mod:`.integrations` — SAELens, dictionary_learning and Overcomplete.

Everything here uses only the library's public API (``spade_kernels``,
``spade_kernels.backends``, ``.distributed``, ``.files``, ``.layer``,
``.bench``); the library never imports this package (tests/test_structure.py).
Nothing is imported here, so ``import spade_kernels.sae`` stays light.
"""

"""Adapters that plug SpaDE into existing SAE trainers.

Each adapter is an optional extra and imports its trainer library only when
it is itself imported, e.g.::

    from spade_kernels.sae.integrations import sae_lens  # registers architecture "spade"

Nothing is imported here, so ``import spade_kernels`` never needs a trainer.
"""

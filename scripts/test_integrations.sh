#!/usr/bin/env bash
# The integration tests: SpaDE trained through SAELens's (and evaluated by SAEBench), dictionary_learning's,
# Overcomplete's and sparsify's own training loops, saved and reloaded with their loaders.
# Each library gets its own virtual environment with the CPU torch pinned (see the scripts),
# so this needs network access to PyPI the first time (about 2–4 min each).
set -euo pipefail
cd "$(dirname "$0")/.."
# SPADE_PRUNE_VENVS=1 (set by .ci/run) removes each venv once its suites have run, so this stage holds
# one library venv (1.3-1.9 GB) on disk at a time instead of all four: a CI machine's free disk varies.
prune() { if [ "${SPADE_PRUNE_VENVS:-0}" = 1 ]; then rm -rf "$1"; fi; }
bash scripts/test_sae_lens.sh "$@"
bash scripts/test_saebench.sh "$@"
prune "${SAE_LENS_VENV:-.venv-sae-lens}"
bash scripts/test_dictionary_learning.sh "$@"
prune "${DL_VENV:-.venv-dictionary-learning}"
bash scripts/test_overcomplete.sh "$@"
prune "${OC_VENV:-.venv-overcomplete}"
bash scripts/test_sparsify.sh "$@"
prune "${SPARSIFY_VENV:-.venv-sparsify}"

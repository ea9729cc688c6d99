#!/usr/bin/env bash
# The integration tests: SpaDE trained through SAELens's (and evaluated by SAEBench), dictionary_learning's,
# Overcomplete's and sparsify's own training loops, saved and reloaded with their loaders.
# Each library gets its own virtual environment with the CPU torch pinned (see the scripts),
# so this needs network access to PyPI the first time (about 2–4 min each).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/test_sae_lens.sh "$@"
bash scripts/test_saebench.sh "$@"
bash scripts/test_dictionary_learning.sh "$@"
bash scripts/test_overcomplete.sh "$@"
bash scripts/test_sparsify.sh "$@"

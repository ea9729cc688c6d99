#!/usr/bin/env bash
# Test SAEBench's core eval on a SpaDE SAE (tests/integrations/test_saebench.py)
# in the SAELens virtual environment, .venv-sae-lens (see test_sae_lens.sh).
#
#   scripts/test_saebench.sh [pytest args]
#
# sae-bench 0.6.0 declares requirements this venv must not take: numpy<2 and
# datasets<4 (downgrades of what sae-lens installed), torchvision (a CUDA
# torch of several GB unless pinned), openai, sae-probes, scikit-learn,
# matplotlib, seaborn, plotly, ...  Its core eval (sae_bench.evals.core) needs
# none of them beyond what sae-lens already brings except tabulate, so
# sae-bench is installed with --no-deps and tabulate pinned beside it; every
# install carries the torch constraint.  The other evals (absorption, sparse
# probing, SCR/TPP, autointerp, ...) need more (scikit-learn, openai, ...),
# which this script does not install.  Re-running reuses the venv.
# SAE_LENS_VENV, SAE_LENS_SPEC and SAE_BENCH_SPEC override the venv path and
# the requirements.
set -euo pipefail
cd "$(dirname "$0")/.."

# shellcheck source=scripts/pinned_venv.sh
. scripts/pinned_venv.sh
SAE_LENS_SPEC="${SAE_LENS_SPEC:-sae-lens>=6.54,<7}"
SAE_BENCH_SPEC="${SAE_BENCH_SPEC:-sae-bench==0.6.0}"
SAE_BENCH_EXTRAS=("tabulate==0.9.0")

start=$(date +%s)
pinned_venv "${SAE_LENS_VENV:-.venv-sae-lens}" "${SAE_LENS_BUILD_EXT:-0}"
"$PY" -c "import sae_lens" 2>/dev/null || "$PY" -m pip install -q -c "$CONSTRAINTS" "$SAE_LENS_SPEC"
"$PY" -c "import tabulate" 2>/dev/null || "$PY" -m pip install -q -c "$CONSTRAINTS" "${SAE_BENCH_EXTRAS[@]}"
"$PY" -c "import sae_bench" 2>/dev/null || "$PY" -m pip install -q --no-deps -c "$CONSTRAINTS" "$SAE_BENCH_SPEC"
"$PY" - <<'PYEOF'
import importlib.metadata as m

print("versions:", ", ".join(f"{p} {m.version(p)}" for p in ("torch", "sae-lens", "sae-bench", "tabulate")))
import sae_bench.evals.core.main  # noqa: F401  (fails here, not as a skip, if the install is incomplete)
PYEOF
echo "install: $(($(date +%s) - start)) s"

"$PY" -m pytest -q tests/integrations/test_saebench.py "$@"

#!/usr/bin/env bash
# Set up benchopt's bilevel benchmark (benchopt/benchmark_bilevel, JAX) OUTSIDE this repository,
# for timing its own SOBA/SABA/StocBiO/AmIGO/BOME on the quadratic problem against
# benchmarks/bilevel_curves.py (issue 15; benchmarks/benchopt_quadratic.py runs the timing).
# Nothing it fetches is committed here.
#
#   SCRATCH=/work/scratch bash benchmarks/benchopt_setup.sh
#
# It needs a copy of the benchmark in $SCRATCH/benchmark_bilevel (git clone
# https://github.com/benchopt/benchmark_bilevel, or a snapshot of it) and network access to
# the Python package index for jax, jaxlib, numpy and benchopt. It says what is missing and
# stops when either is absent.
set -euo pipefail
SCRATCH=${SCRATCH:-/work/scratch}
REPO_ROOT=$(cd "$(dirname "$0")/.." && pwd)
case "$(cd "$SCRATCH" 2>/dev/null && pwd || echo "$SCRATCH")/" in
  "$REPO_ROOT"/*) echo "SCRATCH=$SCRATCH is inside the repository; choose a folder outside it." >&2; exit 2;;
esac
mkdir -p "$SCRATCH"
BENCH="$SCRATCH/benchmark_bilevel"
if [ ! -f "$BENCH/objective.py" ]; then
  echo "benchopt's benchmark is ABSENT: no $BENCH/objective.py." >&2
  echo "Get it with: git clone https://github.com/benchopt/benchmark_bilevel $BENCH" >&2
  echo "(or export a snapshot there: git --git-dir=<mirror> archive HEAD | tar -x -C $BENCH)" >&2
  exit 1
fi
VENV="$SCRATCH/jaxenv"
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
"$VENV/bin/pip" install --quiet jax jaxlib numpy scipy benchopt
"$VENV/bin/python" -c "import jax, benchopt; print('jax', jax.__version__, 'benchopt', benchopt.__version__)"
echo "Ready. The side-by-side timing on bilevel_curves.py's quadratic (same data, same"
echo "hyperparameters, benchopt's solvers called from benchmarks/benchopt_driver_jax.py):"
echo "  SCRATCH=$SCRATCH python3 benchmarks/benchopt_quadratic.py --repeats 3"
echo "benchopt's own CLI on its own simulated quadratic, from $BENCH:"
echo "  JAX_ENABLE_X64=1 JAX_PLATFORMS=cpu $VENV/bin/benchopt run . -d simulated \\"
echo "    -s soba -s saba -s stocbio -s amigo --max-runs 100 --timeout 60"

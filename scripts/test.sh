#!/usr/bin/env bash
# The one command that installs every test dependency and runs the whole suite.
# .ci/run calls exactly this.
set -uo pipefail
cd "$(dirname "$0")/.."
scripts/install-test-deps.sh || { echo "test dependency installation failed"; exit 1; }

python3 -m ruff check wasmesh tests benchmarks || exit 1
python3 -m mypy || exit 1

# Here every real part (Envoy, the registry, skopeo, node, built plugins, ...) must be present: a test
# that would skip for a missing one fails instead, and so does any other skip not marked allowed_skip
# (tests/real_parts.py).
export WASMESH_REQUIRE_REAL_PARTS=1
python3 -m pytest "$@"
rc=$?
if [ "$rc" -eq 5 ]; then
  echo "pytest collected no tests: failing on purpose"
  exit 1
fi
exit "$rc"

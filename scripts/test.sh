#!/usr/bin/env bash
# Set up (if needed) and run the whole test suite on this machine. GPU tests skip on CPU, saying why.
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh || exit 1
export TMPDIR=${TMPDIR:-$(mktemp -d)}
# the Triton interpreter tests' triton (scripts/setup.sh)
export W4A8_TRITON_INTERPRETER_PATH=${W4A8_TRITON_INTERPRETER_PATH:-$PWD/.venv/triton-interpreter}
.venv/bin/python -m pytest "$@"
rc=$?
if [ "$rc" -eq 5 ]; then
  echo "error: pytest collected no tests (exit code 5): the suite is missing, or the selection matched nothing" >&2
  exit 5
fi
exit "$rc"

#!/usr/bin/env bash
# The long fuzz run of the HTTP API: tests/test_fuzz.py::test_fuzz with many more schemathesis
# examples (default 2000; roughly 15-25 minutes on 2 CPU cores), against a daemon it starts.
# Usage: ops/bench/fuzz.sh [EXAMPLES] [pytest args...]
# A failure prints the request as a curl command and a --hypothesis-seed to replay it.
set -euo pipefail
cd "$(dirname "$0")/../.."
export FUZZ_EXAMPLES=${1:-2000}
shift || true
exec "${PYTHON:-.venv/bin/python}" -m pytest tests/test_fuzz.py::test_fuzz -p no:cacheprovider -q "$@"

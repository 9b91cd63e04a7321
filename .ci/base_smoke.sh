#!/usr/bin/env bash
# CI: the README's commands that need no extras, run from a venv made with nothing but `pip install -e .`, so
# a dependency that only an extra happens to bring in (torch once brought jinja2, which the chat templates
# need) turns CI red. Every test runs with the extras installed and cannot see such a gap.
#   1. every module the code imports, and every clp_jax module, imports (.ci/base_imports.py);
#   2. `decode.py --mode verify --chat` on piped input: one turn, then EOF ends it;
#   3. `decode.py --compare ar` (the README's first command) on the demo backbone, shortened.
# About 3 minutes on 2 cores with the demo backbone converted in the cache ($CLP_JAX_CACHE, else
# ~/.cache/clp_jax); its first download and conversion add a few minutes once, shared with the tests.
# Usage: bash .ci/base_smoke.sh [VENV_DIR]   (default .venv-base, made afresh). Exit status 1 if any step fails.
set -u  # no pipefail: a step's status is its command's, not printf's
cd "$(dirname "$0")/.."
VENV="${1:-.venv-base}"
t_start=$SECONDS
rm -rf "$VENV"
python3 -m venv "$VENV" || exit 1
"$VENV/bin/python" -m pip install -q --upgrade pip || exit 1
"$VENV/bin/python" -m pip install -q -e . || { echo "base smoke: pip install -e . failed" >&2; exit 1; }
PY="$VENV/bin/python"
export PYTHONUNBUFFERED=1
logs=$(mktemp -d)
failed=()

# step NAME TIMEOUT_S STDIN CHECK... -- COMMAND...: runs COMMAND (stdin piped from the string STDIN), then each
# CHECK, an extended regex that its stdout or stderr must match ("stdout:REGEX": stdout alone). Prints the
# output's tail on failure.
step() {
  local name=$1 limit=$2 input=$3 t0=$SECONDS rc=0 checks=()
  shift 3
  while [ "$1" != "--" ]; do checks+=("$1"); shift; done
  shift
  echo "== base smoke: $name: $*"
  printf '%b' "$input" | timeout "$limit" "$@" >"$logs/$name.out" 2>"$logs/$name.err" || rc=$?
  local bad="" c where pattern=()
  [ "$rc" -eq 0 ] || bad="exit status $rc$([ "$rc" -eq 124 ] && echo " (timed out after ${limit} s)")"
  for c in "${checks[@]}"; do
    where=("$logs/$name.out" "$logs/$name.err")
    if [ "${c#stdout:}" != "$c" ]; then c=${c#stdout:}; where=("$logs/$name.out"); fi
    pattern+=(-e "$c")
    [ -n "$bad" ] || grep -Eq -- "$c" "${where[@]}" || bad="the output lacks /$c/"
  done
  if [ -n "$bad" ]; then
    echo "   FAILED ($bad); the output's tail:" >&2
    tail -n 12 "$logs/$name.out" | sed 's/^/   out | /' >&2
    tail -n 20 "$logs/$name.err" | sed 's/^/   err | /' >&2
    failed+=("$name")
  else
    cat "$logs/$name.out" "$logs/$name.err" | grep -E "${pattern[@]}" | head -n 4 | cut -c1-160 | sed 's/^/   | /'
    echo "   ok in $((SECONDS - t0)) s"
  fi
}

step imports 120 "" "stdout:every clp_jax module import" -- "$PY" .ci/base_imports.py
step chat 300 'def add(a, b):\n' "stdout:you> def add\(a, b\):" "stdout:assistant> " "^\[verify\] [0-9]+ tokens" -- \
  "$PY" decode.py --mode verify --chat --max-new-tokens 8
step compare_ar 420 "" "stdout:exact match 1\.00" "stdout:speedup over ar" "stdout:^\[ar\] [0-9]+ tokens" -- \
  "$PY" decode.py --compare ar --max-new-tokens 16

rm -rf "$logs"
if [ "${#failed[@]}" -ne 0 ]; then
  echo "base smoke: FAILED (${failed[*]}) in $((SECONDS - t_start)) s: a README command does not run from" \
       "\`pip install -e .\` alone; declare what it needs in pyproject.toml [project] dependencies" >&2
  exit 1
fi
echo "base smoke: passed in $((SECONDS - t_start)) s"

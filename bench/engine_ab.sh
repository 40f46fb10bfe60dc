#!/usr/bin/env bash
# The engine bench of this tree against another revision's, alternating, in one run, so the
# ratio survives a noisy machine:  bench/engine_ab.sh BASE_REV [ROUNDS] [engine_bench.py args]
#   e.g.  bench/engine_ab.sh a4a0f5a 3 --sensors 200000 --readings 1000000
set -euo pipefail
cd "$(dirname "$0")/.."
base=${1:?usage: bench/engine_ab.sh BASE_REV [ROUNDS] [engine_bench.py args]}
rounds=${2:-3}
shift; shift || true
py=${PY:-.venv/bin/python}
[[ $py = /* ]] || py="$PWD/$py"      # absolute, but not resolved: a venv's python is a link
tmp=$(mktemp -d)
trap 'git worktree remove --force "$tmp/base" >/dev/null 2>&1; rm -rf "$tmp"' EXIT
git worktree add -q --detach "$tmp/base" "$base"
rate() { grep -o 'engine (decode + all built-in packs): *[0-9,]*' | grep -o '[0-9,]*$' | tr -d ,; }
for r in $(seq "$rounds"); do
    b=$(cd "$tmp/base" && PYTHONPATH="$tmp/base" "$py" bench/engine_bench.py "$@" | rate)
    n=$(PYTHONPATH="$PWD" "$py" bench/engine_bench.py "$@" | rate)
    echo "round $r: base $base $b readings/s, this tree $n readings/s, ratio $(awk "BEGIN{printf \"%.2f\", $n/$b}")"
done

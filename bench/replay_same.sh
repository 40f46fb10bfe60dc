#!/usr/bin/env bash
# The engine's outputs do not change: `cityops replay` of the Chengdu demo, and of a generated
# city where most sensors are silent (absence notices, gateway incidents, every built-in pack),
# on another revision and on this tree; notices and dead letters must be byte-identical.
#   bench/replay_same.sh BASE_REV [SENSORS]      e.g.  bench/replay_same.sh main 50000
set -euo pipefail
cd "$(dirname "$0")/.."
base=${1:?usage: bench/replay_same.sh BASE_REV [SENSORS]}
sensors=${2:-50000}
py=${PY:-.venv/bin/python}
[[ $py = /* ]] || py="$PWD/$py"      # absolute, but not resolved: a venv's python is a link
tmp=$(mktemp -d)
trap 'git worktree remove --force "$tmp/base" >/dev/null 2>&1; rm -rf "$tmp"' EXIT
git worktree add -q --detach "$tmp/base" "$base"
"$py" -m pipeline.tools.registry_gen "$tmp/city" --sensors "$sensors" --seed 1 >/dev/null
PYTHONPATH="$PWD/bench:$PWD" "$py" - "$tmp/city" "$tmp/city.jsonl" <<'PY'
import random, sys
from engine_bench import make_payloads
from pipeline.core.registry import load
from rules.compiler import load_rules
reg = load(sys.argv[1], load_rules().kinds)
heard = sorted(random.Random(3).sample(range(len(reg)), len(reg) // 20))   # 95 % never heard
with open(sys.argv[2], "wb") as f:
    f.write(b"\n".join(make_payloads(reg.subset(heard), 200_000, 6 * 3_600_000)) + b"\n")
PY
run() {   # tree name args...
    local tree=$1 name=$2; shift 2
    (cd "$tree" && PYTHONPATH="$tree" "$py" -c 'import sys; from pipeline.cli import main; sys.exit(main())' \
        replay "$@" --out "$tmp/$name.notices" --dead-letters "$tmp/$name.dead" >/dev/null 2>"$tmp/$name.log") \
        || { cat "$tmp/$name.log"; exit 1; }
}
status=0
for case in demo city city-batch20; do
    case $case in
        demo) args=(--demo) ;;
        city) args=("$tmp/city.jsonl" --registry "$tmp/city") ;;
        city-batch20) args=("$tmp/city.jsonl" --registry "$tmp/city" --batch 20) ;;
    esac
    run "$tmp/base" "base-$case" "${args[@]}"
    run "$PWD" "this-$case" "${args[@]}"
    for part in notices dead; do
        if cmp -s "$tmp/base-$case.$part" "$tmp/this-$case.$part"; then
            echo "$case $part: identical ($(wc -l <"$tmp/this-$case.$part") lines)"
        else
            echo "$case $part: DIFFERENT"; status=1
        fi
    done
done
exit $status

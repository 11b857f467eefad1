#!/usr/bin/env bash
# One full benchmark run (as root for the emulated network), then the results page.
#   bash benchmarks/run_all.sh [OUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-bench-results}"
bin=.venv/bin
cmd="iotoffload bench upload --bandwidths 5,20,80 --cpu 25 --duration 90 --after-upload 5 --interval 0.25
iotoffload bench overhead --repeat 30
iotoffload bench energy --bandwidths 5,20,80
iotoffload bench load --steps 0,1,2,4 --queries 20
iotoffload bench scale --devices 1,2,4,8 --seconds 5
iotoffload bench handoff --rate 10 --before 3 --after 8 --uplink 20"
while IFS= read -r line; do
  echo "== $line"
  # shellcheck disable=SC2086
  $bin/$line --out "$out"
done <<< "$cmd"
$bin/iotoffload bench report --results "$out" --doc docs/benchmarks.md --command "$cmd"

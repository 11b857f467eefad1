#!/usr/bin/env bash
# One full benchmark run (as root for the emulated network), then the results page.
# ResNet-50 and efficientnet-lite0 where offloading pays (upload: each planner against waiting
# for the float32 model and IONN's float32 upload; load, energy); MobileNetV2 for the
# middleware's own costs (overhead, scale, handoff). Build the models first:
#   iotoffload model prepare resnet50 --upload-weights auto (and efficientnet-lite0)
#   bash benchmarks/run_all.sh [OUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-bench-results}"
bin=.venv/bin
cmd="iotoffload bench upload --model resnet50 --bandwidths 20,50,80 --cpu 25 --rtt-ms 10 --horizon 30 --duration 100 --after-upload 8 --interval 0.25
iotoffload bench upload --model efficientnet-lite0 --bandwidths 20,50,80 --cpu 25 --rtt-ms 10 --horizon 30 --duration 100 --after-upload 8 --interval 0.25
iotoffload bench load --model resnet50 --steps 0,2,4,8 --queries 10 --cpu 25
iotoffload bench overhead --brokers mosquitto,mosquitto-tls,embedded --upload-mbit 80 --repeat 30
iotoffload bench energy --model resnet50 --bandwidths 5,20,80 --edge-speed 4 --device-slowdown 4
iotoffload bench scale --devices 1,2,4,8,16,100 --seconds 5
iotoffload bench handoff --rate 10 --before 3 --after 8 --uplink 20"
while IFS= read -r line; do
  echo "== $line"
  # shellcheck disable=SC2086
  $bin/$line --out "$out"
done <<< "$cmd"
$bin/iotoffload bench report --results "$out" --doc docs/benchmarks.md --command "$cmd"

#!/usr/bin/env bash
# Soak test (not part of the default suite): a steady 1,000 msg/s QoS 1 stream through one
# mqbridge process for 10 minutes (or as long as asked), with a fault every 10-20 s (connection
# cuts on either side, stalls, slow links, target broker restarts), every message checked, and the
# process's RSS, open file descriptors, threads and runtime tasks reported at the start and at the end.
#
#   scripts/soak.sh            # 10 minutes
#   scripts/soak.sh 180        # 3 minutes (seconds; rounded down to whole 30 s rounds)
#   MQBRIDGE_CHAOS_SEED=42 scripts/soak.sh 300
set -euo pipefail
cd "$(dirname "$0")/.."

secs="${1:-${MQBRIDGE_SOAK_SECS:-600}}"
if ! [[ "$secs" =~ ^[0-9]+$ ]] || [ "$secs" -lt 60 ]; then
  echo "usage: $0 [seconds >= 60]" >&2
  exit 2
fi
echo "soak: ${secs}s of load with periodic faults (mosquitto: ${MOSQUITTO:-/usr/sbin/mosquitto})"
MQBRIDGE_SOAK_SECS="$secs" exec cargo test --release --test soak -- --ignored --nocapture

#!/usr/bin/env bash
# A long target outage through a spool (issue #15; not part of the default suite): 1,000 msg/s
# QoS 1 for 5 minutes from a source mosquitto with its default queue of 1,000 messages, the target
# broker down for 3 of them. Every message must arrive; the bridge's RSS, the spool's size on disk
# and the drain time after the target's return are printed ("outage summary" line).
#
#   scripts/outage.sh            # 300 s, target down 180 s
#   scripts/outage.sh 120 60     # shorter: 120 s, down 60 s
set -euo pipefail
cd "$(dirname "$0")/.."

secs="${1:-300}"
down="${2:-180}"
if ! [[ "$secs" =~ ^[0-9]+$ && "$down" =~ ^[0-9]+$ ]] || [ "$down" -ge "$secs" ]; then
  echo "usage: $0 [seconds] [seconds the target is down, less than the first]" >&2
  exit 2
fi
echo "outage: ${secs}s at 1,000 msg/s, target down ${down}s"
MQBRIDGE_OUTAGE_SECS="$secs" MQBRIDGE_OUTAGE_DOWN_SECS="$down" \
  exec cargo test --release --test outage -- --ignored --nocapture

#!/usr/bin/env bash
# The one test command: installs what the tests need when absent (mosquitto), then runs the whole
# suite against one shared release build. Tests start their own brokers on free loopback ports.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v mosquitto >/dev/null 2>&1 && [ ! -x /usr/sbin/mosquitto ]; then
  echo "installing mosquitto (the tests start their own instances on free ports)"
  SUDO=""
  [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq mosquitto >/dev/null
fi

cargo fmt --check
cargo clippy --release --all-targets -- -D warnings
cargo test --release -- --test-threads "${MQBRIDGE_TEST_THREADS:-4}"

#!/usr/bin/env bash
# The one test command: installs what the tests need when absent (mosquitto, RabbitMQ, NATS), then runs
# the whole suite against one shared release build. Tests start their own brokers on free loopback
# ports.
set -euo pipefail
cd "$(dirname "$0")/.."

# mosquitto for almost every test; RabbitMQ (its web_mqtt plugin ships in the package) for the
# ws:// tests against a real WebSocket MQTT server. The tests start nodes of their own.
missing=()
command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || missing+=(mosquitto)
[ -x /usr/lib/rabbitmq/bin/rabbitmq-server ] || missing+=(rabbitmq-server)
# NATS's MQTT listener: a real broker without shared subscriptions (tests/no_shared_subscriptions.rs).
[ -x /usr/sbin/nats-server ] || missing+=(nats-server)
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing ${missing[*]} (the tests start their own instances on free ports)"
  SUDO=""
  [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi

cargo fmt --check
cargo clippy --release --all-targets -- -D warnings
cargo test --release -- --test-threads "${MQBRIDGE_TEST_THREADS:-4}"

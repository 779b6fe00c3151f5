//! Shared harness for the integration tests: real mosquitto brokers, a RabbitMQ node of the
//! test's own (a real MQTT-over-WebSocket server), the `mqbridge` binary as a child process, and
//! MQTT 3.1.1 / 5 clients that publish numbered messages and record what arrives. Every wait has
//! a deadline, and every child process dies with its handle.
//!
//! Each test binary uses a different part of it, hence the allowances for unused items.
#![allow(dead_code)]

mod bridge;
mod client;
mod configs;
pub mod fake_broker;
mod ids;
mod mosquitto;
mod nats;
mod process;
mod proxy;
mod rabbitmq;
mod temp;
mod wait;
mod ws_relay;

#[allow(unused_imports)]
pub use bridge::{
    Bridge, CliOutput, Resources, cpu_share, cpu_time, http_get, metric, mqbridge_cli,
    sample_resources,
};
#[allow(unused_imports)]
pub use client::{
    Collector, PUBLISH_WINDOW, Proto, Publisher, Received, publish_numbered,
    publish_numbered_paced, publish_one,
};
#[allow(unused_imports)]
pub use configs::{RouteConfig, start_ready, wait_ready};
#[allow(unused_imports)]
pub use ids::{
    IdCount, assert_at_least_once, assert_exactly_once, count_ids, duplicate_ids, ids_in_order,
    largest_after, numbered_payload, padded_payload, parse_id,
};
#[allow(unused_imports)]
pub use mosquitto::{Mosquitto, MosquittoOpts};
#[allow(unused_imports)]
pub use nats::Nats;
#[allow(unused_imports)]
pub use proxy::{Proxy, RandomCuts, Tapped, random_duration};
#[allow(unused_imports)]
pub use rabbitmq::RabbitMq;
#[allow(unused_imports)]
pub use temp::{TestDir, free_port, write_temp};
#[allow(unused_imports)]
pub use wait::{wait_until, wait_until_async};
#[allow(unused_imports)]
pub use ws_relay::{RelaySeen, WsRelay};

//! Command line only: parse arguments, set up logging, hand over to the library.

use std::{path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand, ValueEnum};

/// mqbridge: a broker-to-broker MQTT bridge. Pools of paired connections consume from a source
/// broker through shared subscriptions and republish to a target broker, acknowledging to the
/// source only what the target took.
#[derive(Parser)]
#[command(version, about, long_about = None)]
struct Cli {
    /// Log line format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run the bridge until SIGINT/SIGTERM, then drain in-flight messages and exit 0. SIGHUP
    /// reloads the config file: changed routes restart, the others keep running untouched.
    Run {
        /// Configuration file (TOML; YAML or JSON by extension).
        #[arg(short, long)]
        config: PathBuf,
    },
    /// Validate the configuration and print the resolved plan (exit 0 valid, 2 invalid).
    Check {
        /// Configuration file (TOML; YAML or JSON by extension).
        #[arg(short, long)]
        config: PathBuf,
        /// Dry run: which routes take this topic and what each rewrites it to.
        #[arg(long)]
        topic: Option<String>,
    },
    /// Start two in-process brokers ("edge", "cloud"), a bridge between them and sample
    /// traffic; print what crosses and the live rates. Needs nothing installed.
    Demo {
        /// Stop after this long (e.g. "30s"), drain, check nothing was lost and exit;
        /// default: run until Ctrl-C.
        #[arg(long, value_parser = humantime::parse_duration)]
        duration: Option<std::time::Duration>,
        /// Sample messages published per second.
        #[arg(long, default_value_t = 20)]
        rate: u32,
        /// Messages per second from 5 s to 15 s (0: no surge): above one pair's 200
        /// PUBLISH/s at the BifroMQ-shaped cloud, so the pool grows.
        #[arg(long, default_value_t = 600)]
        surge: u32,
    },
    /// A live view of a running bridge from its admin endpoint's /status: one line per route
    /// and pair (state, msg/s, in flight/window, drops, last ack age). Full screen on a
    /// terminal (q quits); a plain table per interval when stdout is not one, or with --once.
    Top {
        /// The admin endpoint, host:port; default: [admin] listen of --config, else
        /// 127.0.0.1:9464.
        #[arg(long, value_name = "ADDR")]
        admin: Option<String>,
        /// Take the admin address from this config file's [admin] listen.
        #[arg(short, long)]
        config: Option<PathBuf>,
        /// Time between polls.
        #[arg(long, default_value = "1s", value_parser = parse_interval)]
        interval: std::time::Duration,
        /// Print one plain table (after two polls, so the rates are real) and exit.
        #[arg(long)]
        once: bool,
    },
}

/// A `humantime` duration of at least 100 ms.
fn parse_interval(s: &str) -> Result<std::time::Duration, String> {
    let d = humantime::parse_duration(s)
        .map_err(|e| format!("{e} (write e.g. \"1s\" or \"500ms\")"))?;
    if d < std::time::Duration::from_millis(100) {
        return Err("at least 100ms".into());
    }
    Ok(d)
}

fn init_logging(format: LogFormat, default_level: &str) {
    let filter = std::env::var("MQBRIDGE_LOG")
        .or_else(|_| std::env::var("RUST_LOG"))
        .unwrap_or_else(|_| default_level.into());
    let filter = tracing_subscriber::EnvFilter::try_new(&filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The demo's own output is the show: only warnings from the bridge unless asked.
    let default_level = match cli.command {
        Command::Demo { .. } | Command::Top { .. } => "warn",
        _ => "info",
    };
    init_logging(cli.log_format, default_level);
    match cli.command {
        Command::Check { config, topic } => match mqbridge::config::load_plan(&config) {
            Ok(plan) => {
                match topic {
                    Some(t) => {
                        if let Err(e) = mqbridge::topic::TopicName::parse(&t) {
                            eprintln!(
                                "error: --topic \"{t}\" is not a topic name ({e}); give a topic \
                                 as a publisher would send it (no + or #)"
                            );
                            return ExitCode::from(2);
                        }
                        print!("{}", mqbridge::check::dry_run(&plan, &t))
                    }
                    None => print!("{}", mqbridge::check::render_plan(&plan)),
                }
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::from(2)
            }
        },
        Command::Run { config } => {
            let plan = match mqbridge::config::load_plan(&config) {
                Ok(plan) => plan,
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::from(2);
                }
            };
            if let Err(e) = mqbridge::spool::startup::check(&plan) {
                eprintln!("error: {e}");
                return ExitCode::from(2);
            }
            let runtime = match mqbridge::run::runtime(plan.bridge.worker_threads) {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("error: cannot start the runtime: {e}");
                    return ExitCode::from(1);
                }
            };
            match runtime.block_on(mqbridge::run::run(&config, plan)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("error: {e:#}");
                    ExitCode::from(1)
                }
            }
        }
        Command::Top {
            admin,
            config,
            interval,
            once,
        } => {
            let admin = match mqbridge::top::admin_address(admin.as_deref(), config.as_deref()) {
                Ok(a) => a,
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::from(2);
                }
            };
            let options = mqbridge::top::TopOptions {
                admin,
                interval,
                once,
            };
            match mqbridge::top::run(&options) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("error: {e:#}");
                    ExitCode::from(1)
                }
            }
        }
        Command::Demo {
            duration,
            rate,
            surge,
        } => {
            let runtime = match tokio::runtime::Runtime::new() {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("error: cannot start the runtime: {e}");
                    return ExitCode::from(1);
                }
            };
            let options = mqbridge::demo::DemoOptions {
                duration,
                rate,
                surge,
            };
            match runtime.block_on(mqbridge::demo::run(options)) {
                Ok(summary) if summary.lost == 0 => ExitCode::SUCCESS,
                Ok(summary) => {
                    eprintln!("error: {} messages lost", summary.lost);
                    ExitCode::from(1)
                }
                Err(e) => {
                    eprintln!("error: {e:#}");
                    ExitCode::from(1)
                }
            }
        }
    }
}

//! `ferrite-bench`: the load generator behind `bench/run.sh`.
//!
//! The same binary drives Ferrite and the systems it is compared with, so the
//! client side of every comparison is identical. Each load subcommand prints
//! one JSON line of results on standard output; `summary` turns the lines a
//! run collected into the Markdown tables of `docs/benchmarks.md`.
//! `generate` writes the IoT fleet dataset that `lp --dataset` loads and
//! `queries` queries.
//!
//! Every load is bounded in count and time, and only loopback addresses are
//! accepted as targets.

mod idle;
mod live;
mod lorawan;
mod lp;
mod mqtt;
mod queries;
mod sink;
mod stats;
mod summary;
mod target;
mod tsbs;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "ferrite-bench",
    version,
    about = "Load generator for Ferrite's benchmarks; each load prints one JSON line of results"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Write InfluxDB line-protocol batches over HTTP and report points/s.
    Lp(lp::LpArgs),
    /// Publish MQTT QoS 1 messages from many connections and report PUBACKs/s.
    Mqtt(mqtt::MqttArgs),
    /// Open idle MQTT connections and hold them, for memory measurements.
    Idle(idle::IdleArgs),
    /// Publish over MQTT at a fixed rate and measure the latency to a live WebSocket subscriber.
    Live(live::LiveArgs),
    /// Print Markdown tables (median, min, max, ratios) from collected result lines.
    Summary(summary::SummaryArgs),
    /// Write the IoT fleet dataset as line protocol; counts go to standard error.
    Generate(tsbs::GenerateArgs),
    /// Run the IoT fleet query set against one system and report latencies and result sizes.
    Queries(queries::QueriesArgs),
    /// Send LoRaWAN uplinks of many ABP devices through a simulated gateway and report uplinks/s stored.
    Lorawan(lorawan::LorawanArgs),
    /// Serve HTTP on loopback and discard every request body, to measure the generator alone.
    Sink(sink::SinkArgs),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;

    let output = match cli.command {
        Command::Lp(args) => serde_json::to_value(runtime.block_on(lp::run(args))?)?,
        Command::Mqtt(args) => serde_json::to_value(runtime.block_on(mqtt::run(args))?)?,
        Command::Idle(args) => serde_json::to_value(runtime.block_on(idle::run(args))?)?,
        Command::Live(args) => serde_json::to_value(runtime.block_on(live::run(args))?)?,
        Command::Queries(args) => serde_json::to_value(runtime.block_on(queries::run(args))?)?,
        Command::Lorawan(args) => serde_json::to_value(runtime.block_on(lorawan::run(args))?)?,
        Command::Sink(args) => serde_json::to_value(runtime.block_on(sink::run(args))?)?,
        Command::Summary(args) => {
            print!("{}", summary::run(&args)?);
            return Ok(());
        }
        Command::Generate(args) => {
            // Standard output may carry the dataset, so the counts go to standard error.
            let report = tsbs::run(&args)?;
            eprintln!("{}", serde_json::to_string(&report)?);
            return Ok(());
        }
    };
    println!("{}", serde_json::to_string(&output)?);
    Ok(())
}

//! `dalle-mesh`: train, check and benchmark DalleBart. Every subcommand prints one JSON line on
//! stdout (logs go to stderr), so scripts and scaling studies can parse results directly.

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use dalle_mesh::{bench, parity};
use dm_model::DalleBartConfig;
use std::path::PathBuf;

#[derive(Parser)]
#[command(name = "dalle-mesh", version, about = "Train DALL·E mini (DalleBart) sharded over a device mesh")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Check forward, backward and one AdamW step against a dalle-mini reference fixture.
    Parity {
        /// Fixture folder (config.json, weights/batch/expected safetensors, fixture.json).
        #[arg(long)]
        fixture: PathBuf,
    },
    /// Benchmarks.
    Bench {
        #[command(subcommand)]
        what: BenchCommand,
    },
}

#[derive(Subcommand)]
enum BenchCommand {
    /// Time full training steps (forward, backward, AdamW) of a model on random data.
    Step {
        #[command(flatten)]
        model: ModelArgs,
        #[arg(long, default_value_t = 8)]
        batch: usize,
        #[arg(long, default_value_t = 10)]
        steps: usize,
        #[arg(long, default_value_t = 2)]
        warmup: usize,
    },
    /// GFLOP/s of the backend's matmul on the model's GEMM shapes.
    Gemm {
        #[command(flatten)]
        model: ModelArgs,
        #[arg(long, default_value_t = 8)]
        batch: usize,
        #[arg(long, default_value_t = 10)]
        reps: usize,
    },
}

#[derive(clap::Args)]
struct ModelArgs {
    /// A dalle-mini preset: micro, mini or mega.
    #[arg(long, conflicts_with = "config")]
    preset: Option<String>,
    /// A dalle-mini config.json.
    #[arg(long)]
    config: Option<PathBuf>,
}

impl ModelArgs {
    fn resolve(&self) -> Result<(String, DalleBartConfig)> {
        match (&self.preset, &self.config) {
            (_, Some(path)) => Ok((path.display().to_string(), DalleBartConfig::from_file(path)?)),
            (Some(p), None) => Ok((p.clone(), DalleBartConfig::preset(p)?)),
            (None, None) => Ok(("micro".into(), DalleBartConfig::micro())),
        }
    }
}

fn print_json<T: serde::Serialize>(v: &T) -> Result<()> {
    println!("{}", serde_json::to_string(v)?);
    Ok(())
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .init();
    match run(Cli::parse()) {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::exit(2);
        }
    }
}

fn run(cli: Cli) -> Result<i32> {
    match cli.command {
        Command::Parity { fixture } => {
            let report = parity::run(&fixture).with_context(|| format!("parity on {}", fixture.display()))?;
            print_json(&report)?;
            Ok(if report.pass { 0 } else { 1 })
        }
        Command::Bench { what: BenchCommand::Step { model, batch, steps, warmup } } => {
            let (name, cfg) = model.resolve()?;
            print_json(&bench::bench_step(&name, cfg, batch, steps, warmup)?)?;
            Ok(0)
        }
        Command::Bench { what: BenchCommand::Gemm { model, batch, reps } } => {
            let (_, cfg) = model.resolve()?;
            for g in bench::bench_gemm(&cfg, batch, reps)? {
                print_json(&g)?;
            }
            Ok(0)
        }
    }
}

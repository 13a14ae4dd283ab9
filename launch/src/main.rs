//! `dalle-mesh`: train, check and benchmark DalleBart. Every subcommand prints one JSON line on
//! stdout (logs go to stderr), so scripts and scaling studies can parse results directly.

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use dalle_mesh::{bench, parity, run_config::RunConfig, sample, train};
use dm_model::dallebart::SamplingOptions;
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
    /// Train DalleBart. Without arguments: the built-in small model on the built-in synthetic
    /// dataset, on CPU, into ./runs/default.
    Train {
        /// Run config (YAML); defaults to the built-in run.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Output folder: metrics.jsonl, checkpoints/, samples/, loss.png [default: the --resume
        /// run folder, else runs/default].
        #[arg(long)]
        out: Option<PathBuf>,
        /// Continue exactly from the newest checkpoint that loads of this run folder (or from this
        /// checkpoint, setting newer ones aside). `auto`: continue the run in --out if it holds a
        /// checkpoint, else start it there (for sbatch scripts that requeue themselves).
        #[arg(long)]
        resume: Option<PathBuf>,
        /// Override training.steps.
        #[arg(long)]
        steps: Option<u64>,
        /// Use this config in a folder whose run.yaml describes another run.
        #[arg(long)]
        allow_config_change: bool,
        /// Override the run config's device: cpu, or cuda (one GPU per rank, NCCL between them).
        #[arg(long, value_enum)]
        device: Option<bench::Device>,
        /// Override the run config's precision: fp32 or bf16-mixed.
        #[arg(long)]
        precision: Option<dm_model::plan::Precision>,
    },
    /// Generate images for prompts from a checkpoint.
    Sample {
        /// A run folder (its newest checkpoint is used) or one checkpoints/step_* folder.
        #[arg(long)]
        checkpoint: PathBuf,
        /// A caption; repeat for several.
        #[arg(long, required = true)]
        prompt: Vec<String>,
        /// Samples per prompt.
        #[arg(long, default_value_t = 8)]
        n: usize,
        #[arg(long, default_value_t = 1.0)]
        temperature: f32,
        #[arg(long)]
        top_k: Option<usize>,
        #[arg(long)]
        top_p: Option<f32>,
        /// Classifier-free guidance scale (1 = off); the empty caption is the unconditional prompt.
        #[arg(long, default_value_t = 1.0)]
        cond_scale: f32,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        #[arg(long, default_value = "samples.png")]
        out: PathBuf,
        /// A VQGAN folder (vqgan-jax config.json + weights): decode the codes into images, each
        /// prompt under its image.
        #[arg(long)]
        vqgan: Option<PathBuf>,
        /// cpu, or cuda (GPU 0, or LOCAL_RANK under a launcher).
        #[arg(long, value_enum, default_value = "cpu")]
        device: bench::Device,
        /// fp32 or bf16-mixed.
        #[arg(long, default_value = "fp32")]
        precision: dm_model::plan::Precision,
    },
    /// The VQGAN: decode image codes to pixels, encode images to codes, check parity.
    Vqgan {
        #[command(subcommand)]
        what: VqganCommand,
    },
    /// Datasets: import dalle-mini's encoded format, or write the built-in synthetic set.
    Data {
        #[command(subcommand)]
        what: DataCommand,
    },
    /// Tokenizers: train a byte-level BPE on captions.
    Tokenizer {
        #[command(subcommand)]
        what: TokenizerCommand,
    },
    /// Check forward, backward and one AdamW step against a dalle-mini reference fixture.
    Parity {
        /// Fixture folder (config.json, weights/batch/expected safetensors, fixture.json).
        #[arg(long)]
        fixture: PathBuf,
        /// Tensor-parallel ranks (threads; GPUs with --device cuda).
        #[arg(long, default_value_t = 1)]
        tp: usize,
        /// Data-parallel ranks (threads; GPUs with --device cuda).
        #[arg(long, default_value_t = 1)]
        dp: usize,
        /// How the ranks talk: auto (threads in one process; MPI when srun, mpirun or
        /// `dalle-mesh launch` started one process per rank; NCCL with --device cuda), threads,
        /// mpi, nccl.
        #[arg(long, default_value = "auto", value_parser = parity::parse_transport)]
        transport: dalle_mesh::run_config::Transport,
        /// cpu, or cuda (rank threads on GPUs 0..tp×dp over NCCL; untested on GPUs).
        #[arg(long, value_enum, default_value = "cpu")]
        device: bench::Device,
        /// fp32 or bf16-mixed.
        #[arg(long, default_value = "fp32")]
        precision: dm_model::plan::Precision,
    },
    /// The op conformance cases on the GPU (small, model-sized, bf16-mixed), the parity fixtures,
    /// NCCL, benchmarks (needs an NVIDIA GPU; exits 2 without one, 1 if a check fails).
    GpuCheck {
        /// Folder for gpu-check.json.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// CUDA kernels.
    Kernels {
        #[command(subcommand)]
        what: KernelsCommand,
    },
    /// Per-rank memory plan (and per-step communication) of training a model on a tp × dp mesh,
    /// before anything is allocated. Exits 1 when --device-memory is given and the plan doesn't fit.
    Plan {
        #[command(flatten)]
        model: ModelArgs,
        /// Tensor-parallel ranks.
        #[arg(long, default_value_t = 1)]
        tp: usize,
        /// Data-parallel ranks.
        #[arg(long, default_value_t = 1)]
        dp: usize,
        /// Micro-batch rows per data-parallel rank.
        #[arg(long, alias = "batch", default_value_t = 8)]
        batch_per_device: usize,
        /// Memory of one device, e.g. 24GiB or 80GB.
        #[arg(long)]
        device_memory: Option<String>,
        /// fp32 (what the CPU ranks allocate) or bf16-mixed (GPU mixed-precision estimate).
        #[arg(long, default_value = "fp32")]
        precision: dm_model::plan::Precision,
        /// Shard the optimizer state across dp (ZeRO-1).
        #[arg(long)]
        zero1: bool,
        /// Also predict the step time (performance model): predicted_step_s, predicted_samples_per_s,
        /// predicted_mfu, bottleneck.
        #[arg(long)]
        time: bool,
        /// Hardware profile for --time: a built-in name (h100-sxm, tpu-v3, cpu-epyc-2core) or a YAML
        /// file; default on --device cpu: this CPU's cached calibration (measured once).
        #[arg(long)]
        profile: Option<String>,
        /// Device the prediction is for (as `bench step --device`).
        #[arg(long, value_enum, default_value = "cpu")]
        device: bench::Device,
    },
    /// Train over a grid of meshes, ZeRO-1 settings, model sizes and batches; tables and plots.
    Sweep {
        /// Sweep YAML (see configs/sweep-cpu.yaml).
        #[arg(long)]
        config: PathBuf,
        /// Output folder: results.jsonl, results.csv, results.md, plots; an interrupted sweep
        /// started again with the same --out continues where it stopped.
        #[arg(long)]
        out: PathBuf,
        /// How points run: local (this machine, ranks as threads) or slurm.
        #[arg(long, value_enum, default_value = "local")]
        launcher: dalle_mesh::sweep::Launcher,
        /// Run only the point of this grid index as this process's rank (what each job of
        /// `--launcher slurm` runs, under srun); rank 0 writes OUT/points/INDEX.json.
        #[arg(long)]
        point: Option<usize>,
    },
    /// Start N ranks of a command on this host (like torchrun): `dalle-mesh launch --nproc 4 --
    /// train --config run.yaml`. Prefixes their output with the rank, forwards SIGTERM/SIGINT/
    /// SIGUSR1, stops all on the first failure and exits with that rank's code.
    Launch {
        /// Number of ranks (processes).
        #[arg(long)]
        nproc: usize,
        /// mpirun (CPU ranks over MPI; default with --features mpi) or direct (torchrun variables).
        #[arg(long, value_enum, default_value = "auto")]
        via: dalle_mesh::launcher::Via,
        /// Port of the rendezvous store (default: a free one).
        #[arg(long)]
        master_port: Option<u16>,
        /// Seconds between SIGTERM and SIGKILL for the other ranks after one failed.
        #[arg(long, default_value_t = 10.0)]
        kill_grace_s: f64,
        /// The dalle-mesh command every rank runs.
        #[arg(last = true, required = true)]
        args: Vec<String>,
    },
    /// Benchmarks.
    Bench {
        #[command(subcommand)]
        what: BenchCommand,
    },
    /// Write a checkpoint (a run folder, one checkpoint, or a dalle-mini folder) as a folder that
    /// dalle-mini's DalleBart.from_pretrained / DalleBartTokenizer.from_pretrained load, or as ours.
    Export {
        checkpoint: PathBuf,
        #[arg(long, value_enum, default_value = "dalle-mini")]
        format: dalle_mesh::interop::ExportFormat,
        /// Weight dtype of a dalle-mini export.
        #[arg(long, value_enum, default_value = "float32")]
        dtype: dalle_mesh::interop::ExportDtype,
        #[arg(long)]
        out: PathBuf,
    },
}

#[derive(Subcommand)]
enum KernelsCommand {
    /// Compile every kernel with NVRTC (no GPU needed); ptxas register/spill report when found.
    Check {
        #[arg(long, default_value = "sm_90")]
        arch: String,
    },
}

#[derive(Subcommand)]
enum DataCommand {
    /// Import dalle-mini's encoded data into an encoded dataset: JSONL rows
    /// `{"caption": str, "encoding": [image_length ints]}`, or parquet (a file, a folder of
    /// them or a quoted glob) with `caption` / `encoding` columns.
    Import {
        input: PathBuf,
        /// Caption column / key (dalle-mini's text_column).
        #[arg(long, default_value = "caption")]
        caption_column: String,
        /// Codes column / key (dalle-mini's encoding_column).
        #[arg(long, default_value = "encoding")]
        encoding_column: String,
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value_t = 256)]
        image_length: usize,
        #[arg(long, default_value_t = 16384)]
        image_vocab: u32,
        /// Skip bad rows (reporting how many) instead of failing.
        #[arg(long)]
        skip_bad: bool,
    },
    /// Check an encoded dataset: every file's checksum and every row (caption offsets, UTF-8,
    /// codes below the image vocabulary). Exits 2 naming the first problem.
    Verify { dir: PathBuf },
    /// One JSON line about a dataset (imported folder, or parquet file / folder / glob): rows,
    /// image_length, image_vocab and codes_sha256_u16le, to compare datasets.
    Info {
        input: PathBuf,
        #[arg(long, default_value = "caption")]
        caption_column: String,
        #[arg(long, default_value = "encoding")]
        encoding_column: String,
    },
    /// Write the built-in synthetic dataset (train/, eval/, tokenizer.json, held_out.json).
    Synthetic {
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value_t = 20000)]
        train_rows: usize,
        #[arg(long, default_value_t = 1000)]
        eval_rows: usize,
        #[arg(long, default_value_t = 256)]
        image_length: usize,
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
    /// Encode (image, caption) pairs through a VQGAN into a dataset: a folder of .png/.jpg with
    /// same-named .txt captions, or a JSONL of {"image": path, "caption": str}.
    EncodeImages {
        input: PathBuf,
        #[arg(long)]
        vqgan: PathBuf,
        #[arg(long)]
        out: PathBuf,
        /// Images read (in parallel) per batch.
        #[arg(long, default_value_t = 8)]
        batch: usize,
    },
}

#[derive(Subcommand)]
enum VqganCommand {
    /// Decode a codes file (JSON `{"codes": [[...], ...]}`) into one PNG per row.
    Decode {
        /// A VQGAN folder: config.json + flax_model.msgpack or weights.safetensors.
        #[arg(long)]
        vqgan: PathBuf,
        #[arg(long)]
        codes: PathBuf,
        /// Output folder for 0000.png, 0001.png, ...
        #[arg(long)]
        out: PathBuf,
    },
    /// Encode image files (PNG/JPEG; resized and centre-cropped) into a codes file.
    Encode {
        #[arg(long)]
        vqgan: PathBuf,
        #[arg(required = true)]
        images: Vec<PathBuf>,
        /// The codes file to write (JSON).
        #[arg(long)]
        out: PathBuf,
    },
    /// Decode and encode a vqgan-jax reference fixture; exits 0 only when both match.
    Parity {
        #[arg(long)]
        fixture: PathBuf,
    },
    /// Write a VQGAN folder with random weights (for tests and benchmarks).
    Random {
        /// A vqgan-jax config.json (default: the released f16_16384 configuration).
        #[arg(long)]
        config: Option<PathBuf>,
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
}

#[derive(Subcommand)]
enum TokenizerCommand {
    /// Train a byte-level BPE (BART special tokens at 0..4) on a file of captions, one per line.
    Train {
        captions: PathBuf,
        #[arg(long, default_value_t = 8192)]
        vocab_size: usize,
        #[arg(long, default_value = "tokenizer.json")]
        out: PathBuf,
    },
    /// Print the token ids of captions as JSON, as dalle-mini's tokenizer gives them
    /// (padding="max_length", truncation).
    Encode {
        /// A tokenizer folder (tokenizer.json, or vocab.json + merges.txt) or a tokenizer.json.
        #[arg(long)]
        tokenizer: PathBuf,
        #[arg(long, default_value_t = 64)]
        max_length: usize,
        /// Apply dalle-mini's caption normaliser first (its normalize_text).
        #[arg(long)]
        normalize: bool,
        #[arg(required = true)]
        captions: Vec<String>,
    },
}

#[derive(Subcommand)]
enum BenchCommand {
    /// Time full training steps (forward, backward, AdamW) of a model on random data.
    Step {
        #[command(flatten)]
        model: ModelArgs,
        /// Rows per data-parallel rank.
        #[arg(long, default_value_t = 8)]
        batch: usize,
        #[arg(long, default_value_t = 10)]
        steps: usize,
        #[arg(long, default_value_t = 2)]
        warmup: usize,
        /// Tensor-parallel ranks (CPU threads).
        #[arg(long, default_value_t = 1)]
        tp: usize,
        /// Data-parallel ranks (CPU threads).
        #[arg(long, default_value_t = 1)]
        dp: usize,
        /// Shard the optimizer state across dp (ZeRO-1).
        #[arg(long)]
        zero1: bool,
        /// fp32, or bf16-mixed (fp32 masters, bf16 Dense-kernel copies and activations; CPU: bf16 storage).
        #[arg(long, default_value = "fp32")]
        precision: dm_model::plan::Precision,
        /// cpu, or cuda (one GPU per rank, NCCL; untested on GPUs; exits 2 without a usable GPU).
        #[arg(long, value_enum, default_value = "cpu")]
        device: bench::Device,
    },
    /// Collectives over N ranks at doubling sizes, printed as nccl-tests prints them (stderr),
    /// every result verified; exits 1 if any element is wrong.
    Comm {
        /// threads, mpi (processes of a launcher), or nccl (rank threads on GPUs 0..N; untested on
        /// GPUs; exits 2 without them).
        #[arg(long, value_enum, default_value = "threads")]
        transport: dalle_mesh::bench_comm::Transport,
        #[arg(long, default_value_t = 2)]
        ranks: usize,
        /// MIN:MAX, doubling.
        #[arg(long, default_value = "1KiB:64MiB")]
        sizes: String,
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
    /// Decode time of one image through a VQGAN with random weights, against the CPU's GEMM FLOP/s.
    Vqgan {
        /// A vqgan-jax config.json (default: the released f16_16384 configuration, 256×256).
        #[arg(long)]
        config: Option<PathBuf>,
        #[arg(long, default_value_t = 2)]
        reps: usize,
        /// Also time encoding one image.
        #[arg(long)]
        encode: bool,
    },
}

#[derive(clap::Args)]
struct ModelArgs {
    /// A dalle-mini preset: micro, mini or mega.
    #[arg(long, conflicts_with = "config")]
    preset: Option<String>,
    /// A dalle-mini config.json, or a model folder holding one.
    #[arg(long)]
    config: Option<PathBuf>,
}

impl ModelArgs {
    fn resolve(&self) -> Result<(String, DalleBartConfig)> {
        match (&self.preset, &self.config) {
            (_, Some(path)) if path.is_dir() => {
                Ok((path.display().to_string(), DalleBartConfig::from_file(&path.join("config.json"))?))
            }
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
    let rank = dalle_mesh::rank_log::process_rank();
    dalle_mesh::rank_log::init(rank);
    match run(Cli::parse()) {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("{}", dalle_mesh::rank_log::error_line(rank, &e));
            std::process::exit(dalle_mesh::exit_code::for_error(&e));
        }
    }
}

fn run(cli: Cli) -> Result<i32> {
    match cli.command {
        Command::Plan { model, tp, dp, batch_per_device, device_memory, precision, zero1, time, profile, device } => {
            let (_, cfg) = model.resolve()?;
            let device_memory = device_memory.as_deref().map(dalle_mesh::run_config::parse_bytes).transpose()?;
            let opts = dm_model::plan::PlanOptions {
                precision,
                zero1,
                device_memory,
                ..dm_model::plan::PlanOptions::new(tp, dp, batch_per_device)
            };
            let mut report = dalle_mesh::plan_cmd::run(&cfg, opts.clone())?;
            if time {
                dalle_mesh::plan_cmd::add_time(&mut report, &cfg, &opts, device, profile.as_deref())?;
            }
            print_json(&report)?;
            Ok(if report["fits"] == serde_json::json!(false) { 1 } else { 0 })
        }
        Command::GpuCheck { out } => {
            let r = dalle_mesh::gpu_check::run(out.as_deref())?;
            print_json(&serde_json::json!({
                "available": r.available, "pass": r.pass, "failed": r.failed, "message": r.message, "json": r.json,
            }))?;
            Ok(r.exit_code())
        }
        Command::Kernels { what: KernelsCommand::Check { arch } } => {
            let r = dalle_mesh::kernels_cmd::run(&arch)?;
            print_json(&r)?;
            Ok(r.exit_code())
        }
        Command::Train { config, out, resume, steps, allow_config_change, device, precision } => {
            let mut cfg = match &config {
                Some(p) => RunConfig::from_file(p)?,
                None => RunConfig::default(),
            };
            if let Some(s) = steps {
                cfg.training.steps = s;
            }
            cfg.device = device.unwrap_or(cfg.device);
            cfg.precision = precision.unwrap_or(cfg.precision);
            let resume = if dalle_mesh::resume_auto::is_auto(resume.as_deref()) {
                dalle_mesh::resume_auto::resolve(out.as_deref())?
            } else {
                resume
            };
            let out = out.unwrap_or_else(|| {
                resume.as_deref().map_or_else(|| "runs/default".into(), dalle_mesh::run_checkpoint::run_folder)
            });
            dalle_mesh::signals::install().context("installing the stop-signal handlers")?;
            let opts = train::TrainOptions { allow_config_change };
            let summary = train::train_with(cfg, &out, resume.as_deref(), &opts)?;
            if summary.world_rank == 0 {
                print_json(&summary)?;
            }
            Ok(summary.exit_code())
        }
        Command::Sample {
            checkpoint,
            prompt,
            n,
            temperature,
            top_k,
            top_p,
            cond_scale,
            seed,
            out,
            vqgan,
            device,
            precision,
        } => {
            let opts = SamplingOptions { temperature, top_k, top_p, cond_scale, seed };
            let setup = sample::Setup { vqgan: vqgan.as_deref(), on: sample::On { device, precision } };
            let path = sample::run(&checkpoint, &prompt, n, &opts, &out, setup)?;
            print_json(&serde_json::json!({"samples": path, "prompts": prompt, "per_prompt": n}))?;
            Ok(0)
        }
        Command::Data {
            what:
                DataCommand::Import { input, caption_column, encoding_column, out, image_length, image_vocab, skip_bad },
        } => {
            let opts = dm_data::ImportOptions {
                image_length,
                image_vocab,
                skip_bad,
                caption_field: caption_column,
                encoding_field: encoding_column,
            };
            let started = std::time::Instant::now();
            let report = dm_data::import(&input, &out, &opts)?;
            print_json(&serde_json::json!({
                "out": out, "rows_written": report.rows_written, "rows_skipped": report.rows_skipped,
                "lines_read": report.lines_read, "seconds": started.elapsed().as_secs_f64(),
            }))?;
            Ok(0)
        }
        Command::Data { what: DataCommand::Verify { dir } } => {
            let r = dm_data::Dataset::open(&dir)?.verify()?;
            print_json(&serde_json::json!({"dir": dir, "rows": r.rows, "bytes": r.bytes, "ok": true}))?;
            Ok(0)
        }
        Command::Data { what: DataCommand::Info { input, caption_column, encoding_column } } => {
            print_json(&dm_data::parquet::data_info(&input, &caption_column, &encoding_column)?)?;
            Ok(0)
        }
        Command::Tokenizer { what: TokenizerCommand::Encode { tokenizer, max_length, normalize, captions } } => {
            print_json(&dalle_mesh::interop::tokenizer_encode(&tokenizer, max_length, normalize, &captions)?)?;
            Ok(0)
        }
        Command::Export { checkpoint, format, dtype, out } => {
            print_json(&dalle_mesh::interop::export(&checkpoint, format, dtype, &out)?)?;
            Ok(0)
        }
        Command::Data { what: DataCommand::Synthetic { out, train_rows, eval_rows, image_length, seed } } => {
            let spec = dm_data::SyntheticSpec { train_rows, eval_rows, image_length, seed };
            let r = dm_data::generate_synthetic(&spec, &out)?;
            print_json(&r.info)?;
            Ok(0)
        }
        Command::Vqgan { what } => dalle_mesh::vqgan_cmd::run_command(what.into()),
        Command::Data { what: DataCommand::EncodeImages { input, vqgan, out, batch } } => {
            print_json(&dalle_mesh::encode_images::run(&input, &vqgan, &out, batch)?)?;
            Ok(0)
        }
        Command::Tokenizer { what: TokenizerCommand::Train { captions, vocab_size, out } } => {
            let text = std::fs::read_to_string(&captions).with_context(|| format!("reading {}", captions.display()))?;
            let tok = dm_data::train_bpe(text.lines().filter(|l| !l.trim().is_empty()), vocab_size, &out)?;
            print_json(&serde_json::json!({"out": out, "vocab_size": tok.vocab_size()}))?;
            Ok(0)
        }
        Command::Parity { fixture, tp, dp, transport, device, precision } => {
            parity::check_device(device, precision, tp.saturating_mul(dp), transport)?;
            let report = match device {
                bench::Device::Cuda => parity::run_cuda(&fixture, tp, dp).map(Some),
                bench::Device::Cpu => parity::run_ranks(&fixture, tp, dp, transport),
            }
            .with_context(|| format!("parity on {}", fixture.display()))?;
            match report {
                Some(r) => {
                    print_json(&r)?;
                    Ok(if r.pass { 0 } else { 1 })
                }
                None => Ok(0),
            }
        }
        Command::Launch { nproc, via, master_port, kill_grace_s, args } => {
            let grace = std::time::Duration::from_secs_f64(kill_grace_s.clamp(0.0, 3600.0));
            let opts = dalle_mesh::launcher::LaunchOptions { nproc, via, master_port, kill_grace: grace, args };
            let report = dalle_mesh::launcher::run(&opts)?;
            tracing::info!(?report, "launch finished");
            Ok(report.exit_code)
        }
        Command::Bench {
            what: BenchCommand::Step { model, batch, steps, warmup, tp, dp, zero1, precision, device },
        } => {
            bench::check_supported(precision, device)?;
            let (name, cfg) = model.resolve()?;
            let o = bench::StepOptions {
                steps,
                warmup,
                zero1,
                precision,
                device,
                ..bench::StepOptions::new(tp, dp, batch)
            };
            if let Some(report) = bench::bench_step_here(&name, &cfg, &o)? {
                print_json(&report)?;
            }
            Ok(0)
        }
        Command::Bench { what: BenchCommand::Comm { transport, ranks, sizes } } => {
            let sizes = dalle_mesh::bench_comm::parse_sizes(&sizes)?;
            // Process ranks other than 0 print nothing.
            let Some(report) = dalle_mesh::bench_comm::run(transport, ranks, &sizes)? else { return Ok(0) };
            eprint!("{}", dalle_mesh::bench_comm::table(&report));
            print_json(&report)?;
            Ok(if report.pass { 0 } else { 1 })
        }
        Command::Sweep { config, out, point: Some(index), .. } => {
            if let Some(record) = dalle_mesh::sweep_slurm::run_point(&config, &out, index)? {
                println!("{record}");
            }
            Ok(0)
        }
        Command::Sweep { config, out, launcher, point: None } => {
            let summary = dalle_mesh::sweep::run(&config, &out, launcher)?;
            print_json(&summary)?;
            Ok(0)
        }
        Command::Bench { what: BenchCommand::Vqgan { config, reps, encode } } => {
            print_json(&dalle_mesh::vqgan_cmd::bench(config.as_deref(), reps, encode)?)?;
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

impl From<VqganCommand> for dalle_mesh::vqgan_cmd::VqganAction {
    fn from(c: VqganCommand) -> Self {
        use dalle_mesh::vqgan_cmd::VqganAction as A;
        match c {
            VqganCommand::Decode { vqgan, codes, out } => A::Decode { vqgan, codes, out },
            VqganCommand::Encode { vqgan, images, out } => A::Encode { vqgan, images, out },
            VqganCommand::Parity { fixture } => A::Parity { fixture },
            VqganCommand::Random { config, out, seed } => A::Random { config, out, seed },
        }
    }
}

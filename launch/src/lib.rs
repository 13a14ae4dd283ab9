//! The `dalle-mesh` command's library half: each subcommand is a module with a `run`-style
//! function returning a serialisable report, so tests drive exactly what the binary runs.

pub mod bench;
pub mod bench_comm;
pub mod bench_procs;
pub mod calibrate;
pub mod device;
pub mod divergence;
pub mod encode_images;
pub mod exit_code;
pub mod gpu_check;
pub mod interop;
pub mod kernels_cmd;
pub mod launcher;
pub mod optim_step;
pub mod parity;
pub mod plan_cmd;
pub mod plot;
pub mod process_ranks;
pub mod rank_log;
pub mod resume_auto;
pub mod run_checkpoint;
pub mod run_config;
pub mod run_lock;
pub mod sample;
pub mod signals;
pub mod stop;
pub mod sweep;
pub mod sweep_report;
pub mod sweep_slurm;
pub mod train;
pub mod train_data;
pub mod trainer;
pub mod vqgan_cmd;
pub mod vqgan_grid;
pub mod vqgan_image;
pub mod world;

use std::path::Path;

/// Writes `bytes` to `path` through a temporary file, fsync and rename.
pub fn atomic_write(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    Ok(dm_model::checkpoint::write_atomic(path, bytes)?)
}

/// Writes `loss.png` and `loss.svg` into `out`: training and eval loss against the unigram baseline.
pub fn plot_loss(out: &Path, train: &[(f64, f64)], eval: &[(f64, f64)], baseline: f64) -> anyhow::Result<()> {
    let chart = plot::Chart {
        title: "dalle-mesh training".into(),
        x_label: "step".into(),
        y_label: "cross-entropy".into(),
        series: vec![
            plot::Series { name: "train loss".into(), points: train.to_vec(), colour: [31, 119, 180] },
            plot::Series { name: "eval loss".into(), points: eval.to_vec(), colour: [214, 39, 40] },
        ],
        hlines: vec![("unigram baseline".into(), baseline, [90, 90, 90])],
    };
    plot::write_png(&chart, &out.join("loss.png"), 800, 500)?;
    plot::write_svg(&chart, &out.join("loss.svg"))?;
    Ok(())
}

/// Crash-test hook: when `DALLE_MESH_TEST_HOLD` is `<point>:<step>` (points: `step`, in the middle
/// of an optimizer step after its backward; `checkpoint`, after a checkpoint's files are written
/// and before it is published; `signal:0`, when a stop signal has been agreed, before saving), prints `HOLD <point> <step>` to stderr and sleeps, so a test can
/// SIGKILL the process at exactly that point. Does nothing otherwise.
pub fn test_hook(point: &str, step: u64) {
    let Ok(spec) = std::env::var("DALLE_MESH_TEST_HOLD") else { return };
    if spec == format!("{point}:{step}") {
        eprintln!("HOLD {point} {step}");
        std::thread::sleep(std::time::Duration::from_secs(600));
    }
}

/// Refuses up front a run whose per-rank memory plan exceeds the budget: the plan
/// ([`dm_model::plan`], fp32 as the CPU ranks allocate) of the largest rank with the run's mesh,
/// ZeRO-1 setting and micro-batch per rank (`batch_size / grad_accumulation / dp`), compared with
/// `budget` on the tracked total (the untracked attention scratch is not budgeted). The error
/// gives the plan's parts and what would fit: a smaller micro-batch (more accumulation), ZeRO-1,
/// a larger tp or dp. `DALLE_MESH_SKIP_PLAN_CHECK=1` skips the check (tests of the tracker's own
/// refusal).
pub fn plan_check(model: &dm_model::DalleBartConfig, cfg: &run_config::RunConfig, budget: u64) -> anyhow::Result<()> {
    use dm_model::plan::{plan, PlanOptions};
    use plan_cmd::human_bytes as h;
    if std::env::var("DALLE_MESH_SKIP_PLAN_CHECK").is_ok_and(|v| !v.is_empty() && v != "0") {
        tracing::warn!("DALLE_MESH_SKIP_PLAN_CHECK is set: not checking the memory plan against the budget");
        return Ok(());
    }
    let (t, m) = (&cfg.training, &cfg.mesh);
    let options = |tp: usize, dp: usize, ga: usize, zero1: bool| PlanOptions {
        precision: cfg.precision,
        zero1: zero1 && dp > 1,
        device_memory: Some(budget),
        ..PlanOptions::new(tp, dp, t.batch_size / ga / dp)
    };
    let opts = options(m.tp, m.dp, t.grad_accumulation, m.zero1);
    let p = plan(model, &opts).map_err(|e| anyhow::anyhow!("mesh (tp {}, dp {}): {e}", m.tp, m.dp))?;
    if p.total_tracked <= budget {
        tracing::info!(
            planned = %h(p.total_tracked),
            budget = %h(budget),
            "the memory plan of the largest rank fits mesh.device_memory"
        );
        return Ok(());
    }
    let fits = |o: &PlanOptions| plan(model, o).ok().filter(|q| q.total_tracked <= budget).map(|q| q.total_tracked);
    let mut hints = Vec::new();
    // A smaller micro-batch: more gradient accumulation, same global batch.
    let micro = t.batch_size / t.grad_accumulation;
    if let Some((ga, b)) = (2..=micro)
        .map(|k| t.grad_accumulation * k)
        .filter(|&ga| t.batch_size.is_multiple_of(ga) && (t.batch_size / ga).is_multiple_of(m.dp))
        .find_map(|ga| fits(&options(m.tp, m.dp, ga, m.zero1)).map(|b| (ga, b)))
    {
        hints.push(format!(
            "training.grad_accumulation: {ga} (micro-batch {} per rank) → {}",
            t.batch_size / ga / m.dp,
            h(b)
        ));
    }
    if !m.zero1 && m.dp > 1 {
        if let Some(b) = fits(&options(m.tp, m.dp, t.grad_accumulation, true)) {
            hints.push(format!("mesh.zero1: true → {}", h(b)));
        }
    }
    if let Some((tp, b)) = [2, 4, 8, 16, 32, 64]
        .iter()
        .map(|k| m.tp * k)
        .find_map(|tp| fits(&options(tp, m.dp, t.grad_accumulation, m.zero1)).map(|b| (tp, b)))
    {
        hints.push(format!("mesh.tp: {tp} → {} per rank", h(b)));
    }
    if let Some((dp, b)) = [2, 4, 8, 16, 32, 64]
        .iter()
        .map(|k| m.dp * k)
        .filter(|&dp| micro.is_multiple_of(dp))
        .find_map(|dp| fits(&options(m.tp, dp, t.grad_accumulation, true)).map(|b| (dp, b)))
    {
        hints.push(format!("mesh.dp: {dp} with mesh.zero1: true (same global batch) → {} per rank", h(b)));
    }
    let hint = if hints.is_empty() {
        "nothing tried fits (micro-batch 1, ZeRO-1, tp and dp up to ×64): use devices with more memory".to_string()
    } else {
        format!("options that fit: {}", hints.join("; "))
    };
    anyhow::bail!(
        "the memory plan of the largest rank (tp rank {}) needs {} ({} bytes) but mesh.device_memory is {} \
         ({budget} bytes): weights {} + gradients {} + optimizer state {} + activations {} (micro-batch {} per \
         rank) + communication buffers {}, on tp {} × dp {}{}. Lower training.batch_size or raise \
         training.grad_accumulation, raise mesh.tp or mesh.dp, or set mesh.zero1; {hint}",
        p.tp_rank,
        h(p.total_tracked),
        p.total_tracked,
        h(budget),
        h(p.weights),
        h(p.gradients),
        h(p.optimizer_state),
        h(p.activations),
        opts.batch_per_device,
        h(p.communication_buffers),
        m.tp,
        m.dp,
        if opts.zero1 { " with ZeRO-1" } else { "" },
    )
}

/// Failure-test hook: when `DALLE_MESH_TEST_FAIL` is `<rank>:<step>`, that rank returns an error
/// in the middle of that step (after its backward, before the gradient collectives), as a rank
/// whose device failed would. Does nothing otherwise.
pub fn test_fail(rank: usize, step: u64) -> anyhow::Result<()> {
    if std::env::var("DALLE_MESH_TEST_FAIL").is_ok_and(|s| s == format!("{rank}:{step}")) {
        anyhow::bail!("injected failure on rank {rank} at step {step} (DALLE_MESH_TEST_FAIL)");
    }
    Ok(())
}

/// Stop-agreement test hook: when `DALLE_MESH_TEST_STOP` is `<rank>:<step>`, that rank alone
/// behaves at that step as if it had received SIGTERM (the other ranks learn it only through the
/// agreement collective). Does nothing otherwise.
pub fn test_stop(rank: usize, step: u64) -> stop::StopReason {
    if std::env::var("DALLE_MESH_TEST_STOP").is_ok_and(|s| s == format!("{rank}:{step}")) {
        return stop::StopReason::Signal(signals::SIGTERM);
    }
    stop::StopReason::None
}

/// Disk-full test hook: when `DALLE_MESH_TEST_DISK_FULL` is a step, writing that step's
/// checkpoint files fails as a full disk would (ENOSPC). Does nothing otherwise.
pub fn test_disk_full(step: u64) -> std::io::Result<()> {
    if std::env::var("DALLE_MESH_TEST_DISK_FULL").is_ok_and(|s| s == step.to_string()) {
        return Err(std::io::Error::from_raw_os_error(28));
    }
    Ok(())
}

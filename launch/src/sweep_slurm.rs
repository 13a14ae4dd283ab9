//! `dalle-mesh sweep --launcher slurm`: every point the plan accepts runs as one SLURM job (a
//! task of a job array, through `sbatch` and the template `launch/slurm/cpu-mpi-sweep.sbatch`),
//! as `tp × dp` MPI processes started by `srun` (the process launch of `train`).
//!
//! - Points the plan refuses are recorded at once and never submitted.
//! - One array per world size (`--ntasks` is per array); the array's task ids are the points'
//!   indices in the grid, and each task runs `dalle-mesh sweep --point INDEX`, whose rank 0 writes
//!   the point's record to `OUT/points/INDEX.json`. Tasks run one at a time (`--dependency=singleton`
//!   and a throttle of 1) so their timings don't share the CPUs.
//! - The sweep polls `squeue` and the records, appending each record to `results.jsonl` as its
//!   job ends. The submitted jobs are kept in `OUT/slurm/jobs.json`: a sweep started again after
//!   an interruption collects the records that came in meanwhile, waits for the jobs still queued
//!   or running, and submits only the points that have neither.
//! - A job that ends without a record is a failure naming its log (`OUT/slurm/point-INDEX.out`);
//!   the records of the others are kept, and running the sweep again resubmits the failed points.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use dm_model::perf_model::HardwareProfile;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::sweep::{add_measurement, planned_record, Loaded};

/// The job script of one point (written into `OUT/slurm/` so the sweep runs from any folder).
pub const POINT_TEMPLATE: &str = include_str!("../slurm/cpu-mpi-sweep.sbatch");

/// The jobs a sweep submitted: job id → point indices.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
struct Jobs {
    jobs: BTreeMap<String, Vec<usize>>,
}

fn points_dir(out: &Path) -> PathBuf {
    out.join("points")
}

fn slurm_dir(out: &Path) -> PathBuf {
    out.join("slurm")
}

/// `OUT/points/INDEX.json`: the record a point's job wrote.
pub fn point_file(out: &Path, index: usize) -> PathBuf {
    points_dir(out).join(format!("{index}.json"))
}

fn load_jobs(path: &Path) -> Result<Jobs> {
    match std::fs::read_to_string(path) {
        Ok(t) => serde_json::from_str(&t).with_context(|| {
            format!("{} is damaged: delete it to resubmit every point without a record", path.display())
        }),
        Err(_) => Ok(Jobs::default()),
    }
}

fn absolute(p: &Path) -> Result<PathBuf> {
    std::fs::canonicalize(p).with_context(|| format!("resolving {}", p.display()))
}

/// `sbatch`'s `--array` list of point indices, run one at a time.
fn array_spec(points: &[usize]) -> String {
    let list: Vec<String> = points.iter().map(usize::to_string).collect();
    format!("{}%1", list.join(","))
}

/// Submits the points of one world size as one array; returns the job id.
fn submit(config: &Path, out: &Path, world: usize, points: &[usize]) -> Result<String> {
    let dir = slurm_dir(out);
    let script = dir.join("sweep-point.sbatch");
    crate::atomic_write(&script, POINT_TEMPLATE.as_bytes())?;
    let exe = std::env::current_exe().context("finding this dalle-mesh binary")?;
    let (config, out_abs) = (absolute(config)?, absolute(out)?);
    let name = format!("dalle-mesh-sweep-{:08x}", crc32fast::hash(out_abs.to_string_lossy().as_bytes()));
    let output = Command::new("sbatch")
        .arg("--parsable")
        .arg(format!("--job-name={name}"))
        .arg(format!("--array={}", array_spec(points)))
        .arg(format!("--ntasks={world}"))
        .arg("--dependency=singleton")
        .arg(format!("--output={}", absolute(&dir)?.join("point-%a.out").display()))
        .env("DALLE_MESH", &exe)
        .env("SWEEP_CONFIG", &config)
        .env("SWEEP_OUT", &out_abs)
        .arg(&script)
        .output()
        .map_err(|e| {
            crate::bad_input!(
                "--launcher slurm: could not run sbatch ({e}): run the sweep on a SLURM login node (SLURM_CONF set), \
                 or use --launcher local"
            )
        })?;
    if !output.status.success() {
        bail!("sbatch refused the sweep's points {points:?}: {}", String::from_utf8_lossy(&output.stderr).trim());
    }
    let text = String::from_utf8_lossy(&output.stdout);
    let id = text.trim().split(';').next().unwrap_or("").to_string();
    if id.is_empty() || !id.chars().all(|c| c.is_ascii_digit()) {
        bail!("sbatch answered {text:?}, not a job id");
    }
    tracing::info!(job = %id, world, ?points, "submitted sweep points");
    Ok(id)
}

/// The array task ids of `job` still queued or running (`squeue -r` lists one line per task).
fn active_tasks(job: &str) -> Result<BTreeSet<usize>> {
    let o = Command::new("squeue")
        .args(["-h", "-r", "-j", job, "-o", "%K"])
        .output()
        .context("running squeue to follow the sweep's jobs")?;
    // squeue fails for a job id the controller has already forgotten: nothing of it is active.
    if !o.status.success() {
        return Ok(BTreeSet::new());
    }
    Ok(String::from_utf8_lossy(&o.stdout).lines().filter_map(|l| l.trim().parse().ok()).collect())
}

/// Reads a point's record, checking it is this grid's point `id`.
fn read_point(path: &Path, id: &str) -> Result<Value> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let v: Value = serde_json::from_str(&text).with_context(|| format!("{} is not a JSON record", path.display()))?;
    if v["id"] != id {
        bail!(
            "{} holds point {} but this grid's point there is {id}: the sweep config changed under a running sweep; \
             use another --out",
            path.display(),
            v["id"]
        );
    }
    Ok(v)
}

/// Runs the points `todo` (grid indices) of the sweep as SLURM jobs; `collect` gets each record
/// (refused points at once, measured ones as their jobs end). Returns the number collected.
pub fn run_points(
    config: &Path,
    out: &Path,
    l: &Loaded,
    profile: &HardwareProfile,
    todo: &[usize],
    collect: &mut dyn FnMut(Value) -> Result<()>,
) -> Result<usize> {
    std::fs::create_dir_all(slurm_dir(out))?;
    std::fs::create_dir_all(points_dir(out))?;
    let jobs_path = slurm_dir(out).join("jobs.json");
    let mut jobs = load_jobs(&jobs_path)?;
    let mut collected = 0;
    let mut waiting: BTreeMap<usize, String> = BTreeMap::new(); // point → job id
    let mut submit_by_world: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
    for &i in todo {
        let p = &l.points[i];
        let (v, o) = planned_record(p, l.model(p)?, l.budget, profile, l.steps())?;
        if o.is_none() {
            collect(v)?;
            collected += 1;
            continue;
        }
        let job = jobs.jobs.iter().find(|(_, pts)| pts.contains(&i)).map(|(j, _)| j.clone());
        match job {
            Some(j) if point_file(out, i).exists() || active_tasks(&j)?.contains(&i) => {
                waiting.insert(i, j);
            }
            _ => {
                let _ = std::fs::remove_file(point_file(out, i));
                submit_by_world.entry(p.tp * p.dp).or_default().push(i);
            }
        }
    }
    for (world, pts) in submit_by_world {
        let id = submit(config, out, world, &pts)?;
        for &i in &pts {
            waiting.insert(i, id.clone());
        }
        jobs.jobs.insert(id, pts);
        crate::atomic_write(&jobs_path, serde_json::to_string_pretty(&jobs)?.as_bytes())?;
    }
    let mut failed = Vec::new();
    while !waiting.is_empty() {
        // squeue first, then the files: a task writes its record before it leaves the queue.
        let mut active: BTreeMap<String, BTreeSet<usize>> = BTreeMap::new();
        for j in waiting.values().collect::<BTreeSet<_>>() {
            active.insert(j.clone(), active_tasks(j)?);
        }
        let mut ended = Vec::new();
        for (&i, j) in &waiting {
            let file = point_file(out, i);
            if file.exists() {
                collect(read_point(&file, &l.points[i].id())?)?;
                collected += 1;
                ended.push(i);
            } else if !active[j].contains(&i) {
                failed.push(format!(
                    "point {i} ({}): job {j}_{i} ended without a record, see {}",
                    l.points[i].id(),
                    slurm_dir(out).join(format!("point-{i}.out")).display()
                ));
                ended.push(i);
            }
        }
        for i in ended {
            waiting.remove(&i);
        }
        if !waiting.is_empty() {
            std::thread::sleep(Duration::from_millis(500));
        }
    }
    if !failed.is_empty() {
        bail!(
            "{} sweep point(s) failed (the others' records are kept in {}; run the same command again to resubmit \
             the failed ones):\n  {}",
            failed.len(),
            out.join("results.jsonl").display(),
            failed.join("\n  ")
        );
    }
    Ok(collected)
}

/// `dalle-mesh sweep --point INDEX` (what each job of `--launcher slurm` runs): this process is
/// one rank of the point's `tp × dp` processes; world rank 0 writes the record to
/// `OUT/points/INDEX.json` and returns it. Uses the calibration the submitting sweep saved.
pub fn run_point(config: &Path, out: &Path, index: usize) -> Result<Option<Value>> {
    let l = Loaded::from_file(config)?;
    let p = l.points.get(index).ok_or_else(|| {
        crate::bad_input!("--point {index}: the sweep {} has {} points (0-based)", config.display(), l.points.len())
    })?;
    let saved = out.join("calibration.yaml");
    let text = std::fs::read_to_string(&saved).map_err(|e| {
        crate::bad_input!(
            "--point needs the calibration of the sweep that submitted it, {} ({e}): run `dalle-mesh sweep \
             --launcher slurm --config {} --out {}`, which submits the points",
            saved.display(),
            config.display(),
            out.display()
        )
    })?;
    let profile = crate::calibrate::parse_profile(&text, &saved.display().to_string())?;
    let cfg = l.model(p)?;
    let (mut v, o) = planned_record(p, cfg, l.budget, &profile, l.steps())?;
    let rank0 = match o {
        Some(o) => match crate::bench::bench_step_here(&p.model.name, cfg, &o)? {
            Some(m) => {
                add_measurement(&mut v, cfg, &o, &profile, &m)?;
                true
            }
            None => false,
        },
        None => crate::world::detect()?.rank == 0,
    };
    if !rank0 {
        return Ok(None);
    }
    std::fs::create_dir_all(points_dir(out))?;
    crate::atomic_write(&point_file(out, index), format!("{v}\n").as_bytes())?;
    Ok(Some(v))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arrays_list_point_indices_one_at_a_time() {
        assert_eq!(array_spec(&[0, 3, 5]), "0,3,5%1");
        assert!(POINT_TEMPLATE.contains("--point \"$SLURM_ARRAY_TASK_ID\"") && POINT_TEMPLATE.contains("srun"));
    }

    #[test]
    fn jobs_and_records_are_checked() {
        let dir = std::env::temp_dir().join(format!("dm-sweep-slurm-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let jobs = dir.join("jobs.json");
        assert_eq!(load_jobs(&jobs).unwrap(), Jobs::default());
        std::fs::write(&jobs, "{not json").unwrap();
        assert!(format!("{:#}", load_jobs(&jobs).unwrap_err()).contains("delete it"));
        let rec = dir.join("0.json");
        std::fs::write(&rec, r#"{"id": "model=a tp=1"}"#).unwrap();
        assert_eq!(read_point(&rec, "model=a tp=1").unwrap()["id"], "model=a tp=1");
        assert!(format!("{:#}", read_point(&rec, "model=b tp=1").unwrap_err()).contains("config changed"));
        std::fs::remove_dir_all(&dir).ok();
    }
}

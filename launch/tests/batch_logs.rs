//! Batch jobs: plain progress lines when stderr is not a terminal, the rank on every line of a
//! process rank, `--resume auto`, and an early exit-2 refusal of `mesh.transport: nccl`.

mod common;
use common::*;

fn exit_code(out: &std::process::Output) -> i32 {
    out.status.code().unwrap_or(-1)
}

#[test]
fn batch_mode_prints_one_plain_line_per_log_every_steps() {
    let dir = scratch("batchlog");
    let cfg = tiny_config(&dir, "run.yaml", "", ", steps: 6, save_every: 0, sample_every: 0");
    let yaml = std::fs::read_to_string(&cfg).unwrap().replace("log_every: 1", "log_every: 3");
    std::fs::write(&cfg, yaml).unwrap();
    let mut cmd = train_cmd(&cfg, Some(&dir.join("out")), &[]);
    cmd.env("RUST_LOG", "info");
    let out = run(cmd);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stderr = text(&out.stderr);
    assert!(!stderr.contains('\u{1b}'), "ANSI escapes in a non-terminal log:\n{stderr}");
    let lines: Vec<&str> = stderr.lines().filter(|l| l.contains(" train ") || l.ends_with(" train")).collect();
    let steps: Vec<&str> = lines.iter().filter_map(|l| l.split_whitespace().find(|w| w.starts_with("step="))).collect();
    assert_eq!(steps, ["step=3", "step=6"], "{stderr}");
    for l in &lines {
        for field in ["loss=", "lr=", "grad_norm=", "samples_per_s=", "image_tokens_per_s=", "peak_memory="] {
            assert!(l.contains(field), "{field} missing from {l:?}");
        }
        assert!(!l.contains("rank="), "a one-process run's lines carry no rank: {l}");
    }
    assert!(!stderr.contains('\r') && !stderr.contains("[0"), "a progress bar was drawn:\n{stderr}");
}

#[test]
fn resume_auto_starts_fresh_then_continues_like_an_uninterrupted_run() {
    let dir = scratch("resumeauto");
    let cfg = tiny_config(&dir, "run.yaml", "", ", steps: 8, save_every: 4, sample_every: 0");
    let (auto, straight) = (dir.join("auto"), dir.join("straight"));
    // No folder yet: a fresh start.
    let first = run(train_cmd(&cfg, Some(&auto), &["--resume", "auto", "--steps", "4"]));
    assert!(first.status.success(), "{}", text(&first.stderr));
    assert_eq!(summary(&first)["steps"], 4);
    // The folder holds step 4: continue from it.
    let second = run(train_cmd(&cfg, Some(&auto), &["--resume", "auto"]));
    assert!(second.status.success(), "{}", text(&second.stderr));
    assert_eq!(summary(&second)["steps"], 8);
    let reference = run(train_cmd(&cfg, Some(&straight), &[]));
    assert!(reference.status.success(), "{}", text(&reference.stderr));
    assert_eq!(losses(&auto), losses(&straight), "resumed losses differ from the uninterrupted run's");
    assert_eq!(losses(&auto).len(), 8);
    // Without --out: bad input naming the flag.
    let no_out = run(train_cmd(&cfg, None, &["--resume", "auto"]));
    assert_eq!(exit_code(&no_out), 2, "{}", text(&no_out.stderr));
    assert!(text(&no_out.stderr).contains("--resume auto needs --out"), "{}", text(&no_out.stderr));
}

#[test]
fn nccl_transport_for_train_exits_2_before_writing_anything() {
    let dir = scratch("nccl");
    let cfg = tiny_config(&dir, "run.yaml", "", ", steps: 2");
    let yaml = std::fs::read_to_string(&cfg).unwrap() + "mesh: {transport: nccl}\n";
    std::fs::write(&cfg, yaml).unwrap();
    let out_dir = dir.join("out");
    for env in [vec![], vec![("RANK", "0"), ("WORLD_SIZE", "1")]] {
        let mut cmd = train_cmd(&cfg, Some(&out_dir), &[]);
        cmd.envs(env);
        let out = run(cmd);
        let stderr = text(&out.stderr);
        assert_eq!(exit_code(&out), 2, "{stderr}");
        assert!(stderr.contains("mesh.transport nccl") && stderr.contains("mesh.transport: auto"), "{stderr}");
        assert!(!out_dir.exists(), "the refused run created {}", out_dir.display());
    }
}

#[test]
fn lines_and_errors_of_a_process_rank_carry_the_rank() {
    let dir = scratch("ranktag");
    let cfg = tiny_config(&dir, "run.yaml", "", ", steps: 2");
    // Rank 1 of 2 processes for a one-rank mesh: refused (a wrong world size), after a log line.
    let mut cmd = train_cmd(&cfg, Some(&dir.join("out")), &["--resume", "auto"]);
    cmd.env("RUST_LOG", "info").env("RANK", "1").env("WORLD_SIZE", "2");
    let out = run(cmd);
    let stderr = text(&out.stderr);
    assert_eq!(exit_code(&out), 2, "{stderr}");
    let info = stderr.lines().find(|l| l.contains("--resume auto")).unwrap_or_else(|| panic!("{stderr}"));
    assert!(info.starts_with("rank=1 "), "{info}");
    let last = stderr.lines().last().unwrap_or_default();
    assert!(last.starts_with("error: rank 1: ") && last.contains("started 2 processes"), "{last}");
}

//! Stop signals, the mesh's agreement on stopping, and the divergence guard (issue 8, items 1-2).

mod common;
use common::*;
use std::io::{BufRead, BufReader};
use std::time::Duration;

const LONG: &str = ", steps: 100000, save_every: 100000";

#[test]
fn sigterm_finishes_the_step_saves_exits_75_and_the_resume_is_exact() {
    let dir = scratch("sigterm");
    let cfg = tiny_config(&dir, "run.yaml", "", LONG);
    let out = dir.join("interrupted");
    let mut child = spawn(train_cmd(&cfg, Some(&out), &[]));
    wait_for_lines(&out, 6, &mut child);
    send(&child, libc::SIGTERM);
    let done = wait_with_limit(child, Duration::from_secs(30));
    assert_eq!(done.status.code(), Some(75), "{}", text(&done.stderr));
    let s = summary(&done);
    assert_eq!(s["stopped"], "SIGTERM", "{s}");
    let stopped_at = s["steps"].as_u64().unwrap();
    assert_eq!(checkpoint_steps(&out), vec![stopped_at], "the stop saves the step it finished");

    // Resumed to stopped_at + 5: the losses are those of an uninterrupted run, bit for bit.
    let total = (stopped_at + 5).to_string();
    let resumed = run(train_cmd(&cfg, None, &["--resume", out.to_str().unwrap(), "--steps", &total]));
    assert!(resumed.status.success(), "{}", text(&resumed.stderr));
    let reference = dir.join("reference");
    let r = run(train_cmd(&cfg, Some(&reference), &["--steps", &total]));
    assert!(r.status.success(), "{}", text(&r.stderr));
    assert_eq!(losses(&out), losses(&reference), "the resumed losses differ from the uninterrupted run's");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn sigint_sigusr1_sighup_also_stop_after_saving_and_a_second_signal_exits_at_once() {
    let dir = scratch("signals");
    let cfg = tiny_config(&dir, "run.yaml", "", LONG);
    for (i, sig) in [libc::SIGINT, libc::SIGUSR1, libc::SIGHUP].into_iter().enumerate() {
        let out = dir.join(format!("once{i}"));
        let mut child = spawn(train_cmd(&cfg, Some(&out), &[]));
        wait_for_lines(&out, 3, &mut child);
        send(&child, sig);
        let done = wait_with_limit(child, Duration::from_secs(30));
        assert_eq!(done.status.code(), Some(75), "signal {sig}: {}", text(&done.stderr));
        assert_eq!(checkpoint_steps(&out).len(), 1, "signal {sig}");
    }
    for (i, (sig, code)) in [(libc::SIGINT, 130), (libc::SIGTERM, 143)].into_iter().enumerate() {
        let out = dir.join(format!("twice{i}"));
        // The run holds after taking the first signal, so the second can't merge with it.
        let mut cmd = train_cmd(&cfg, Some(&out), &[]);
        cmd.env("DALLE_MESH_TEST_HOLD", "signal:0");
        let mut child = spawn(cmd);
        wait_for_lines(&out, 3, &mut child);
        send(&child, sig);
        let stderr = child.stderr.take().unwrap();
        let held = BufReader::new(stderr).lines().map_while(Result::ok).any(|l| l.starts_with("HOLD signal"));
        assert!(held, "the run did not take the first signal {sig}");
        send(&child, sig);
        let done = wait_with_limit(child, Duration::from_secs(30));
        assert_eq!(done.status.code(), Some(code), "second signal {sig}: {}", text(&done.stderr));
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn on_a_mesh_one_signalled_rank_stops_every_rank_at_the_same_step() {
    let dir = scratch("meshstop");
    let p = dir.join("mesh.yaml");
    std::fs::write(
        &p,
        "model: {d_model: 32, encoder_layers: 1, decoder_layers: 1, attention_heads: 4, ffn_dim: 40}\n\
         data: {synthetic: {train_rows: 100, eval_rows: 20, image_length: 16, seed: 2}}\n\
         training: {steps: 50, batch_size: 8, log_every: 1, eval_every: 0, save_every: 0}\n\
         mesh: {tp: 2, dp: 2}\n",
    )
    .unwrap();
    let out = dir.join("o");
    let mut cmd = train_cmd(&p, Some(&out), &[]);
    // Only rank 3 "receives SIGTERM", at step 4; the others learn it from the agreement.
    cmd.env("DALLE_MESH_TEST_STOP", "3:4").env("DALLE_MESH_COMM_TIMEOUT_S", "20");
    let done = wait_with_limit(spawn(cmd), Duration::from_secs(60));
    assert_eq!(done.status.code(), Some(75), "{}", text(&done.stderr));
    let s = summary(&done);
    assert_eq!((s["steps"].as_u64(), s["stopped"].as_str()), (Some(4), Some("SIGTERM")), "{s}");
    assert_eq!(checkpoint_steps(&out), vec![4]);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Largest |weight| of a checkpoint.
fn max_abs_weight(ckpt: &std::path::Path) -> f32 {
    let t = dm_model::checkpoint::read_tensors(&ckpt.join("weights.safetensors")).unwrap();
    let mut m = 0.0f32;
    for t in t.values() {
        if let dm_model::checkpoint::HostTensor::F32 { data, .. } = t {
            m = data.iter().fold(m, |m, x| m.max(x.abs()));
        }
    }
    m
}

#[test]
fn a_diverging_run_stops_with_exit_3_before_saving_and_keeps_the_good_checkpoints() {
    let dir = scratch("diverge");
    // lr 1e3: the loss climbs but may stay finite; the median rule stops it.
    let cfg =
        tiny_config(&dir, "big.yaml", ", learning_rate: 1000.0", ", steps: 400, save_every: 1, keep_checkpoints: 2");
    let out = dir.join("big");
    let done = run(train_cmd(&cfg, Some(&out), &[]));
    let err = text(&done.stderr);
    assert_eq!(done.status.code(), Some(3), "{err}");
    assert!(err.contains("diverged"), "{err}");
    // The best checkpoint (lowest running loss) survived the rotation.
    let best: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("checkpoints/best.json")).unwrap()).unwrap();
    let best_step = best["step"].as_u64().unwrap();
    assert!(checkpoint_steps(&out).contains(&best_step), "best {best_step} was rotated away");
    assert!(best["quality"].as_f64().unwrap() < 10.0, "{best}");

    // lr 1e30: weights of ~1e29 after one update; the check before saving refuses them.
    let cfg =
        tiny_config(&dir, "huge.yaml", ", learning_rate: 1.0e30", ", steps: 50, save_every: 1, keep_checkpoints: 5");
    let out = dir.join("huge");
    let done = run(train_cmd(&cfg, Some(&out), &[]));
    let err = text(&done.stderr);
    assert_eq!(done.status.code(), Some(3), "{err}");
    assert!(err.contains("nothing was saved") || err.contains("diverged"), "{err}");
    for (step, ckpt) in dalle_mesh::run_checkpoint::list_checkpoints(&out) {
        let m = max_abs_weight(&ckpt);
        assert!(m < 100.0, "checkpoint {step} holds a weight of {m}");
    }
    // ... and a resume with a sane learning rate continues from the last good one.
    let fixed =
        tiny_config(&dir, "fixed.yaml", ", learning_rate: 0.003", ", steps: 6, save_every: 1, keep_checkpoints: 5");
    let again = run(train_cmd(&fixed, None, &["--resume", out.to_str().unwrap(), "--allow-config-change"]));
    assert!(again.status.success(), "{}", text(&again.stderr));
    std::fs::remove_dir_all(&dir).unwrap();
}

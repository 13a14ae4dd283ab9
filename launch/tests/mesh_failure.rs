//! A rank that fails mid-step: every other rank stops with a clear error instead of hanging.
//! (Its own test binary: it sets a process-wide environment variable.)

#[test]
fn a_rank_failing_mid_step_stops_every_rank_with_a_clear_error() {
    let out = std::env::temp_dir().join(format!("dm-mesh-fail-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    let cfg = dalle_mesh::run_config::RunConfig::from_yaml_str(
        "model: {d_model: 32, encoder_layers: 1, decoder_layers: 1, attention_heads: 4, ffn_dim: 40}\n\
         data: {synthetic: {train_rows: 100, eval_rows: 20, image_length: 16, seed: 2}}\n\
         training: {steps: 5, batch_size: 8, log_every: 1, eval_every: 0, save_every: 0}\n\
         mesh: {tp: 2, dp: 2}\n",
    )
    .unwrap();
    std::env::set_var("DALLE_MESH_COMM_TIMEOUT_S", "20");
    std::env::set_var("DALLE_MESH_TEST_FAIL", "3:2");
    let started = std::time::Instant::now();
    let err = format!("{:#}", dalle_mesh::train::train(cfg, &out, None).unwrap_err());
    assert!(err.contains("rank 3") && err.contains("injected failure"), "{err}");
    assert!(started.elapsed().as_secs() < 15, "the other ranks must stop promptly, not wait for the timeout");
    let _ = std::fs::remove_dir_all(&out);
}

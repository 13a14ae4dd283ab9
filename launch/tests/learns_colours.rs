//! The built-in run learns: after a short training on the synthetic scenes, samples for
//! HELD-OUT prompts (colour–shape pairs never seen in training), decoded through the codebook,
//! show the asked-for colours where the caption puts them.

use dalle_mesh::run_config::RunConfig;
use dm_data::synthetic::{score_codes, Scene};
use dm_model::dallebart::SamplingOptions;

#[test]
fn samples_for_held_out_prompts_have_the_asked_for_colours_where_asked() {
    let out = std::env::temp_dir().join(format!("dm-learns-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    let cfg = RunConfig::from_yaml_str(
        "data: {synthetic: {train_rows: 6000, eval_rows: 200, image_length: 64, seed: 0}}\n\
         training: {steps: 250, batch_size: 32, eval_every: 250, save_every: 250, log_every: 50}\n",
    )
    .unwrap();
    let summary = dalle_mesh::train::train(cfg, &out, None).unwrap();
    let eval = summary.eval_loss.unwrap() as f64;
    assert!(
        eval < 0.5 * summary.unigram_baseline_loss,
        "eval loss {eval} not clearly under the unigram baseline {}",
        summary.unigram_baseline_loss
    );

    // Held-out prompts: the eval split's captions (each contains a held-out colour–shape pair).
    let eval_set = dm_data::Dataset::open(out.join("data/synthetic-6000x200-64-seed0/eval")).unwrap();
    let captions: Vec<String> = (0..12).map(|i| eval_set.caption(i).unwrap().to_string()).collect();
    let png = out.join("held_out.png");
    let greedy = SamplingOptions { temperature: 0.0, ..Default::default() };
    dalle_mesh::sample::run(&out, &captions, 1, &greedy, &png, Default::default()).unwrap();
    assert!(png.exists());

    // Re-generate the codes to score them (sampling is deterministic).
    let dir = dalle_mesh::run_checkpoint::latest(&out).unwrap();
    let cfg = dm_model::DalleBartConfig::from_file(&dir.join("config.json")).unwrap();
    let table = dm_model::ParamTable::new(&cfg);
    let w = dm_model::checkpoint::load_weights(&dir.join("weights.safetensors"), &table).unwrap();
    let mut model = dm_model::DalleBart::new(dm_runtime::cpu::CpuBackend::new(), cfg.clone(), w).unwrap();
    let tok = dm_data::TextTokenizer::from_file(dir.join("tokenizer.json")).unwrap().with_max_text_length(16).unwrap();
    let info =
        dalle_mesh::train::DataInfo { kind: "synthetic".into(), grid: 8, max_text_length: 16, normalize_text: true };
    let codes =
        dalle_mesh::sample::sample_images(&mut model, &tok, &info, &captions, 1, &greedy, &out.join("again.png"), None)
            .unwrap();
    let (mut regions, mut cells) = (0usize, 0.0f32);
    for (caption, c) in captions.iter().zip(&codes) {
        let scene = Scene::parse(caption).expect("synthetic captions parse");
        let s = score_codes(&scene, c, 8).unwrap();
        println!("{caption}: {}/3 regions, {:.0}% cells", s.regions_correct, 100.0 * s.cell_colour_accuracy);
        regions += s.regions_correct;
        cells += s.cell_colour_accuracy;
    }
    let n = captions.len();
    // Background, first and second object: the dominant colour of each region must be the one
    // the caption names, for nearly all of them (chance is ~1/8 per region).
    assert!(regions * 10 >= 3 * n * 8, "only {regions} of {} regions have the asked-for colour", 3 * n);
    assert!(cells / n as f32 > 0.8, "cell colour accuracy {}", cells / n as f32);
    std::fs::remove_dir_all(&out).unwrap();
}

//! The VQGAN end to end: parity with vqgan-jax's fixture, the decode/encode commands,
//! `data encode-images`, and the trainer's sample grid decoded through a VQGAN folder with the
//! prompts under the images.

use dalle_mesh::vqgan_cmd;
use dalle_mesh::vqgan_image::{caption_lines, GridLayout};
use dm_model::vqgan::{Vqgan, VqganConfig, VqganWeights};
use std::path::{Path, PathBuf};

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/interop/vqgan-tiny")
}

fn scratch(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("dm-vqgan-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A small random VQGAN: `resolution` px in, a 4×4 latent grid (16 codes) from 128 codes,
/// which fits the synthetic dataset at image_length 16.
fn small_vqgan(dir: &Path, resolution: usize) -> Vqgan {
    let levels = (resolution / 4).trailing_zeros() as usize + 1;
    let cfg = VqganConfig {
        ch: 32,
        ch_mult: vec![1; levels],
        num_res_blocks: 1,
        attn_resolutions: vec![4],
        resolution,
        z_channels: 8,
        embed_dim: 8,
        n_embed: 128,
        ..VqganConfig::default()
    };
    let w = VqganWeights::random(&cfg, 7);
    w.save(&cfg, dir).unwrap();
    Vqgan::new(cfg, w).unwrap()
}

#[test]
fn vqgan_tiny_fixture_passes_parity() {
    let r = vqgan_cmd::parity(&fixture()).unwrap();
    println!("{}", serde_json::to_string(&r).unwrap());
    assert!(r.pass, "{r:#?}");
    assert_eq!(r.encode_codes_match, 1.0, "the fixture's margins are all ≥ 1e-3, so every code must match");
    assert!(r.reconstructed_max_abs_err.is_some());
}

#[test]
fn parity_notices_a_slightly_wrong_weight() {
    let tmp = scratch("perturbed");
    for f in ["config.json", "expected.safetensors", "fixture.json", "weights.safetensors"] {
        std::fs::copy(fixture().join(f), tmp.join(f)).unwrap();
    }
    let mut t = dm_model::checkpoint::read_tensors(&tmp.join("weights.safetensors")).unwrap();
    let name = "decoder.up_0.block_1.conv2.kernel";
    if let Some(dm_model::checkpoint::HostTensor::F32 { data, .. }) = t.get_mut(name) {
        data[5] += 1e-2;
    }
    let tensors: Vec<_> = t
        .into_iter()
        .map(|(n, v)| match v {
            dm_model::checkpoint::HostTensor::F32 { shape, data } => (n, shape, data),
            _ => unreachable!(),
        })
        .collect();
    dm_model::checkpoint::write_safetensors(&tmp.join("weights.safetensors"), &tensors).unwrap();
    let r = vqgan_cmd::parity(&tmp).unwrap();
    assert!(!r.pass, "a perturbed decoder weight must fail parity: {r:#?}");
    assert!(r.decode_max_abs_err > r.decode_tolerance);
}

#[test]
fn msgpack_and_safetensors_folders_load_the_same_weights() {
    let (a, b) = (scratch("msgpack"), scratch("safetensors"));
    for (dir, weights) in [(&a, "flax_model.msgpack"), (&b, "weights.safetensors")] {
        for f in ["config.json", weights] {
            std::fs::copy(fixture().join(f), dir.join(f)).unwrap();
        }
    }
    let (ma, mb) = (Vqgan::load(&a).unwrap(), Vqgan::load(&b).unwrap());
    let specs = dm_model::vqgan::arch::param_specs(&ma.config);
    assert_eq!(specs.len(), 151, "the fixture's msgpack holds 151 arrays");
    for s in specs {
        assert_eq!(ma.weights().get(&s.name), mb.weights().get(&s.name), "{}", s.name);
        assert_eq!(ma.weights().get(&s.name).len(), s.shape.iter().product::<usize>(), "{}", s.name);
    }
    // A truncated msgpack is an error naming the file, not a panic.
    let bytes = std::fs::read(a.join("flax_model.msgpack")).unwrap();
    std::fs::write(a.join("flax_model.msgpack"), &bytes[..bytes.len() / 2]).unwrap();
    let err = format!("{:#}", Vqgan::load(&a).unwrap_err());
    assert!(err.contains("flax_model.msgpack"), "{err}");
}

#[test]
fn loading_refuses_weights_that_do_not_match_the_config() {
    let tmp = scratch("mismatch");
    std::fs::copy(fixture().join("weights.safetensors"), tmp.join("weights.safetensors")).unwrap();
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture().join("config.json")).unwrap()).unwrap();
    cfg["n_embed"] = 65.into();
    std::fs::write(tmp.join("config.json"), cfg.to_string()).unwrap();
    let err = Vqgan::load(&tmp).unwrap_err().to_string();
    assert!(err.contains("quantize.embedding.embedding") && err.contains("[65, 8]"), "{err}");
    cfg["ch"] = 48.into();
    std::fs::write(tmp.join("config.json"), cfg.to_string()).unwrap();
    let err = Vqgan::load(&tmp).unwrap_err().to_string();
    assert!(err.contains("multiple of GroupNorm"), "{err}");
}

#[test]
fn decode_then_encode_commands_round_trip_files() {
    let tmp = scratch("cmds");
    let model = small_vqgan(&tmp.join("vq"), 16);
    let codes: Vec<Vec<u32>> = (0..3).map(|r| (0..16).map(|i| ((i * 5 + r * 11) % 128) as u32).collect()).collect();
    std::fs::write(tmp.join("codes.json"), serde_json::json!({ "codes": codes }).to_string()).unwrap();
    let written = vqgan_cmd::decode(&tmp.join("vq"), &tmp.join("codes.json"), &tmp.join("png")).unwrap();
    assert_eq!(written.len(), 3);
    for (p, c) in written.iter().zip(&codes) {
        let img = image::open(p).unwrap().to_rgb8();
        assert_eq!((img.width(), img.height()), (16, 16));
        // The PNG is the decoded activation clipped and rounded.
        let want = dalle_mesh::vqgan_image::to_rgb(&model.decode_codes(c).unwrap()).unwrap();
        assert_eq!(img.as_raw(), &want.pixels);
    }
    let encoded = vqgan_cmd::encode(&tmp.join("vq"), &written, &tmp.join("enc.json")).unwrap();
    assert_eq!(vqgan_cmd::read_codes(&tmp.join("enc.json")).unwrap(), encoded);
    for (p, c) in written.iter().zip(&encoded) {
        let img = dalle_mesh::vqgan_image::load_image(p, 16).unwrap();
        assert_eq!(&model.encode(&img).unwrap().codes, c);
    }
    let bad = vqgan_cmd::decode(&tmp.join("vq"), &tmp.join("enc.json").with_extension("missing"), &tmp.join("x"));
    assert!(bad.is_err());
}

#[test]
fn encode_images_skips_and_counts_unreadable_images() {
    let tmp = scratch("encode-images");
    let model = small_vqgan(&tmp.join("vq"), 16);
    let src = tmp.join("images");
    std::fs::create_dir_all(&src).unwrap();
    // Two good images of other sizes (resized and centre-cropped), one corrupt, one uncaptioned.
    for (i, (w, h)) in [(40u32, 24u32), (16, 30)].iter().enumerate() {
        let img = image::RgbImage::from_fn(*w, *h, |x, y| image::Rgb([(x * 6) as u8, (y * 8) as u8, (i * 90) as u8]));
        img.save(src.join(format!("img{i}.png"))).unwrap();
        std::fs::write(src.join(format!("img{i}.txt")), format!("caption number {i}\n")).unwrap();
    }
    std::fs::write(src.join("broken.jpg"), b"this is not a jpeg").unwrap();
    std::fs::write(src.join("broken.txt"), "a broken image").unwrap();
    image::RgbImage::new(20, 20).save(src.join("lonely.png")).unwrap();
    let r = dalle_mesh::encode_images::run(&src, &tmp.join("vq"), &tmp.join("ds"), 2).unwrap();
    assert_eq!((r.rows_written, r.skipped_unreadable, r.skipped_no_caption), (2, 1, 1), "{r:#?}");
    assert!(r.skipped.iter().any(|s| s.image.ends_with("broken.jpg")));
    let ds = dm_data::Dataset::open(tmp.join("ds")).unwrap();
    assert_eq!((ds.len(), ds.image_length(), ds.image_vocab()), (2, 16, 128));
    for i in 0..2 {
        assert_eq!(ds.caption(i).unwrap(), format!("caption number {i}"));
        let img = dalle_mesh::vqgan_image::load_image(&src.join(format!("img{i}.png")), 16).unwrap();
        assert_eq!(ds.codes(i).unwrap().to_vec(), model.encode(&img).unwrap().codes);
    }
    // The same pairs as JSONL.
    let jsonl = tmp.join("pairs.jsonl");
    std::fs::write(&jsonl, "{\"image\": \"images/img1.png\", \"caption\": \"from jsonl\"}\n").unwrap();
    let r = dalle_mesh::encode_images::run(&jsonl, &tmp.join("vq"), &tmp.join("ds2"), 8).unwrap();
    assert_eq!(r.rows_written, 1);
    // Nothing readable: an error, and nothing written.
    std::fs::write(&jsonl, "{\"image\": \"images/broken.jpg\", \"caption\": \"x\"}\n").unwrap();
    let err = dalle_mesh::encode_images::run(&jsonl, &tmp.join("vq"), &tmp.join("ds3"), 8).unwrap_err();
    assert!(format!("{err:#}").contains("1 unreadable"), "{err:#}");
    assert!(!tmp.join("ds3").exists());
}

#[test]
fn trainer_sample_grid_decodes_synthetic_codes_through_a_vqgan_with_prompts_under_images() {
    let tmp = scratch("train");
    let resolution = 32;
    small_vqgan(&tmp.join("vq"), resolution);
    let prompts = ["a red circle above a blue square on a yellow background", "a green cross"];
    let cfg_path = tmp.join("run.yaml");
    std::fs::write(
        &cfg_path,
        format!(
            "model: {{d_model: 32, encoder_layers: 1, decoder_layers: 1, attention_heads: 2, ffn_dim: 48}}\n\
             data: {{synthetic: {{train_rows: 64, eval_rows: 8, image_length: 16, seed: 1}}}}\n\
             training: {{steps: 2, batch_size: 4, log_every: 1, eval_every: 0, save_every: 0, \
             sample_prompts: [\"{}\", \"{}\"], vqgan: {}}}\n",
            prompts[0],
            prompts[1],
            tmp.join("vq").display()
        ),
    )
    .unwrap();
    let cfg = dalle_mesh::run_config::RunConfig::from_file(&cfg_path).unwrap();
    let summary = dalle_mesh::train::train(cfg, &tmp.join("run"), None).unwrap();
    let png = summary.sample_png.expect("the trainer samples at the end");
    let grid = image::open(&png).unwrap().to_rgb8();
    let layout = GridLayout::new(2, resolution, resolution);
    assert_eq!((grid.width() as usize, grid.height() as usize), (layout.width(), layout.height()));
    // Under each image, the strip holds exactly its prompt drawn in the grid's font.
    for (k, prompt) in prompts.iter().enumerate() {
        let (x0, y0) = layout.origin(k);
        let strip_y = y0 + layout.image_h;
        let (w, h) = (layout.tile_w, layout.caption_h);
        let mut want = vec![255u8; w * h * 3];
        for (i, line) in caption_lines(prompt, layout.caption_width(), layout.scale).iter().enumerate() {
            let y = 2 + i * 9 * layout.scale as usize;
            dalle_mesh::plot::draw_text(&mut want, w, h, 0, y as i64, line, layout.scale, [20, 20, 20]);
        }
        let mut got = Vec::with_capacity(w * h * 3);
        for y in 0..h {
            for x in 0..w {
                got.extend(grid.get_pixel((x0 + x) as u32, (strip_y + y) as u32).0);
            }
        }
        assert_eq!(got.len(), want.len());
        assert!(got == want, "the caption strip under image {k} does not show {prompt:?}");
        assert!(want.iter().any(|v| *v != 255), "the caption rendering is empty");
    }
}

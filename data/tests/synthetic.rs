//! The built-in synthetic dataset.

use std::collections::BTreeSet;

use dm_data::synthetic::{
    all_scenes, code_colour, decode_codes, dominant_colour, expected_colour_regions, generate_synthetic, grid_side,
    held_out_pairs, score_codes, split_scenes, Colour, Object, Scene, Shape, SyntheticInfo, SyntheticSpec, IMAGE_VOCAB,
    PATCH,
};
use dm_data::{save_png_grid, Dataset, TextTokenizer};

fn spec(seed: u64) -> SyntheticSpec {
    SyntheticSpec { train_rows: 300, eval_rows: 60, image_length: 256, seed }
}

#[test]
fn generates_consistent_splits() {
    let tmp = tempfile::tempdir().unwrap();
    let report = generate_synthetic(&spec(7), tmp.path()).unwrap();
    let info: SyntheticInfo =
        serde_json::from_str(&std::fs::read_to_string(tmp.path().join("held_out.json")).unwrap()).unwrap();
    assert_eq!(info, report.info);
    assert_eq!(info.grid, 16);
    assert_eq!(info.image_vocab, 128);
    assert_eq!(info.held_out_pairs.len(), 4);
    assert_eq!(info.held_out_pairs, held_out_pairs(7));
    assert!(info.train_distinct_captions > 5000 && info.eval_distinct_captions > 1000, "{info:?}");
    assert!(info.max_caption_tokens <= 16, "{info:?}");

    let tok = TextTokenizer::from_file(tmp.path().join("tokenizer.json")).unwrap();
    assert_eq!(tok.vocab_size(), info.text_vocab);

    let held = &info.held_out_pairs;
    let mut longest = 0;
    for (split, rows, eval) in [("train", 300, false), ("eval", 60, true)] {
        let ds = Dataset::open(tmp.path().join(split)).unwrap();
        ds.verify_checksums().unwrap();
        assert_eq!(ds.len(), rows);
        assert_eq!(ds.image_length(), 256);
        assert_eq!(ds.image_vocab(), IMAGE_VOCAB);
        for i in 0..ds.len() {
            let row = ds.row(i).unwrap();
            let scene = Scene::parse(row.caption).expect("caption parses");
            assert!(scene.is_valid());
            assert_eq!(row.codes.to_vec(), scene.render(16), "row {i}");
            let has_held = held.contains(&scene.first) || held.contains(&scene.second);
            assert_eq!(has_held, eval, "{split} row {i}: {}", row.caption);
            let ids = tok.token_ids(row.caption).unwrap();
            assert!(!ids.contains(&3));
            assert!(ids.len() + 2 <= info.max_caption_tokens);
            longest = longest.max(ids.len() + 2);
        }
    }
    // 360 random rows almost surely include a longest caption ("to the right of" + "an").
    assert_eq!(longest, info.max_caption_tokens);
}

#[test]
fn generation_is_deterministic_by_seed() {
    let a = tempfile::tempdir().unwrap();
    let b = tempfile::tempdir().unwrap();
    let c = tempfile::tempdir().unwrap();
    generate_synthetic(&spec(3), a.path()).unwrap();
    generate_synthetic(&spec(3), b.path()).unwrap();
    generate_synthetic(&spec(4), c.path()).unwrap();
    for f in ["train/codes.bin", "train/captions.bin", "eval/captions.bin", "tokenizer.json", "held_out.json"] {
        assert_eq!(std::fs::read(a.path().join(f)).unwrap(), std::fs::read(b.path().join(f)).unwrap(), "{f}");
    }
    assert_ne!(
        std::fs::read(a.path().join("train/captions.bin")).unwrap(),
        std::fs::read(c.path().join("train/captions.bin")).unwrap()
    );
}

#[test]
fn held_out_pairs_keep_every_colour_and_shape_in_train() {
    for seed in 0..20 {
        let held = held_out_pairs(seed);
        let colours: BTreeSet<Colour> = held.iter().map(|o| o.colour).collect();
        let shapes: BTreeSet<Shape> = held.iter().map(|o| o.shape).collect();
        assert_eq!((colours.len(), shapes.len()), (4, 4));
        let train = split_scenes(&held, false);
        let seen: BTreeSet<Object> = train.iter().flat_map(|s| [s.first, s.second]).collect();
        for o in &held {
            assert!(!seen.contains(o));
        }
        assert_eq!(seen.len(), 24 - 4);
        let eval = split_scenes(&held, true);
        assert_eq!(train.len() + eval.len(), all_scenes().len());
    }
    assert_ne!(held_out_pairs(0), held_out_pairs(1));
}

#[test]
fn captions_parse_back() {
    let scenes = all_scenes();
    let captions: BTreeSet<String> = scenes.iter().map(Scene::caption).collect();
    assert_eq!(captions.len(), scenes.len());
    for s in scenes.iter().step_by(11) {
        assert_eq!(Scene::parse(&s.caption()), Some(*s));
        assert_eq!(Scene::parse(&dm_data::normalize_text(&s.caption())), Some(*s));
    }
    assert_eq!(Scene::parse("a red circle"), None);
    assert_eq!(Scene::parse("a red blob above a blue square on a white background"), None);
    let s = Scene::parse("a red circle to the left of a blue cross on a black background").unwrap();
    assert_eq!(s.caption(), "a red circle to the left of a blue cross on a black background");
}

#[test]
fn decoded_images_have_the_expected_colours() {
    for g in [4, 10, 16, 32] {
        for scene in all_scenes().iter().step_by(97) {
            let codes = scene.render(g);
            assert_eq!(codes.len(), g * g);
            assert!(codes.iter().all(|&c| c < IMAGE_VOCAB));
            let image = decode_codes(&codes, g).unwrap();
            assert_eq!((image.width, image.height), (g * PATCH, g * PATCH));
            let regions = expected_colour_regions(scene, g);
            assert_eq!(regions.len(), 3);
            assert_eq!(regions.iter().map(|r| r.0.len()).sum::<usize>(), g * g);
            for (cells, colour) in &regions {
                assert!(!cells.is_empty(), "g={g} {}", scene.caption());
                assert_eq!(dominant_colour(&image, g, cells), Some(*colour));
                for &c in cells {
                    assert_eq!(code_colour(codes[c]), Some(*colour));
                    assert_eq!(dominant_colour(&image, g, &[c]), Some(*colour));
                }
            }
            let score = score_codes(scene, &codes, g).unwrap();
            assert!(score.exact && score.regions_correct == 3 && score.cell_colour_accuracy == 1.0);
        }
    }
}

#[test]
fn spatial_relations_place_objects() {
    let g = 16;
    let scene = Scene::parse("a red circle above a blue square on a white background").unwrap();
    let regions = expected_colour_regions(&scene, g);
    let mean_row = |cells: &[usize]| cells.iter().map(|c| c / g).sum::<usize>() as f32 / cells.len() as f32;
    let mean_col = |cells: &[usize]| cells.iter().map(|c| c % g).sum::<usize>() as f32 / cells.len() as f32;
    assert!(mean_row(&regions[1].0) < mean_row(&regions[2].0));
    let scene = Scene::parse("a red circle to the right of a blue square on a white background").unwrap();
    let regions = expected_colour_regions(&scene, g);
    assert!(mean_col(&regions[1].0) > mean_col(&regions[2].0));
}

#[test]
fn shapes_differ_from_grid_12() {
    for g in [12, 16, 32] {
        let masks: BTreeSet<Vec<usize>> = Shape::ALL
            .iter()
            .map(|&shape| {
                let scene = Scene {
                    first: Object { colour: Colour::Red, shape },
                    relation: dm_data::synthetic::Relation::Above,
                    second: Object { colour: Colour::Blue, shape: Shape::Square },
                    background: Colour::White,
                };
                expected_colour_regions(&scene, g)[1].0.clone()
            })
            .collect();
        assert_eq!(masks.len(), 4, "g={g}");
    }
}

#[test]
fn wrong_outputs_score_lower() {
    let g = 16;
    let scene = Scene::parse("a green triangle below an orange cross on a black background").unwrap();
    assert_eq!(scene.caption(), "a green triangle below an orange cross on a black background");
    let mut codes = scene.render(g);
    for c in codes.iter_mut().take(g * 4) {
        *c = Colour::Purple.index() * 16;
    }
    let score = score_codes(&scene, &codes, g).unwrap();
    assert!(!score.exact);
    assert!((score.cell_colour_accuracy - 0.75).abs() < 1e-6, "{score:?}");
    // Out-of-codebook codes decode (magenta) rather than fail.
    let mut bad = scene.render(g);
    bad[0] = 9999;
    assert!(decode_codes(&bad, g).is_ok());
    assert!(decode_codes(&bad, 15).is_err());
}

#[test]
fn grid_size_rules() {
    assert_eq!(grid_side(256).unwrap(), 16);
    assert_eq!(grid_side(16).unwrap(), 4);
    assert!(grid_side(9).is_err());
    assert!(grid_side(200).is_err());
    let tmp = tempfile::tempdir().unwrap();
    let mut s = spec(0);
    s.image_length = 100;
    s.train_rows = 10;
    s.eval_rows = 2;
    let r = generate_synthetic(&s, tmp.path()).unwrap();
    assert_eq!(r.info.grid, 10);
    s.image_length = 255;
    assert!(generate_synthetic(&s, tmp.path().join("x")).is_err());
}

#[test]
fn png_grid_is_written() {
    let tmp = tempfile::tempdir().unwrap();
    let images: Vec<_> =
        all_scenes().iter().step_by(500).take(5).map(|s| decode_codes(&s.render(16), 16).unwrap()).collect();
    let path = tmp.path().join("grid.png");
    save_png_grid(&images, &path).unwrap();
    let decoder = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(&path).unwrap()));
    let reader = decoder.read_info().unwrap();
    let info = reader.info();
    // 5 images → 3 columns × 2 rows of 128×128 tiles with 2-pixel gaps.
    assert_eq!((info.width, info.height), (3 * 128 + 4 * 2, 2 * 128 + 3 * 2));
    if let Ok(dir) = std::env::var("DM_DATA_PNG_OUT") {
        std::fs::copy(&path, std::path::Path::new(&dir).join("synthetic_grid.png")).unwrap();
    }
    assert!(save_png_grid(&[], tmp.path().join("none.png")).is_err());
}

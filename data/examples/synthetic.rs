//! Writes the synthetic dataset and a PNG of a few rows:
//! `cargo run -p dm-data --release --example synthetic -- OUT_DIR [TRAIN_ROWS EVAL_ROWS IMAGE_LENGTH SEED]`

use dm_data::synthetic::{decode_codes, generate_synthetic, SyntheticSpec};
use dm_data::{save_png_grid, Dataset};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(out) = args.first() else {
        eprintln!("usage: synthetic OUT_DIR [TRAIN_ROWS EVAL_ROWS IMAGE_LENGTH SEED]");
        std::process::exit(2);
    };
    let num = |i: usize, default: u64| -> Result<u64, std::num::ParseIntError> {
        args.get(i).map_or(Ok(default), |s| s.parse())
    };
    let d = SyntheticSpec::default();
    let spec = SyntheticSpec {
        train_rows: num(1, d.train_rows as u64)? as usize,
        eval_rows: num(2, d.eval_rows as u64)? as usize,
        image_length: num(3, d.image_length as u64)? as usize,
        seed: num(4, d.seed)?,
    };
    let t = std::time::Instant::now();
    let report = generate_synthetic(&spec, out)?;
    println!("{}", serde_json::to_string_pretty(&report.info)?);
    println!("generated in {:.2?}", t.elapsed());
    let eval = Dataset::open(&report.paths.eval)?;
    let g = report.info.grid;
    let mut images = Vec::new();
    for i in 0..eval.len().min(16) {
        let row = eval.row(i)?;
        println!("eval {i}: {}", row.caption);
        images.push(decode_codes(&row.codes.to_vec(), g)?);
    }
    if !images.is_empty() {
        let png = std::path::Path::new(out).join("eval_samples.png");
        save_png_grid(&images, &png)?;
        println!("wrote {}", png.display());
    }
    Ok(())
}

//! Peak memory of reading a dalle-mini checkpoint, relative to its size.
//!
//! `flax_read_memory write DIR D_MODEL LAYERS` writes a random-weight DalleBart of that width and
//! depth as config.json + flax_model.msgpack (f32, stacked); `flax_read_memory read DIR` loads it
//! into the fp32 parameter table the way `train`/`sample`/`parity` do and prints one JSON line with
//! the file size, the process's peak resident memory (VmHWM) and their ratio. Run the two in
//! separate processes so the writer's memory is not counted.

use dm_model::dalle_mini::{load_model, save_dalle_mini, SaveDtype};
use dm_model::{DalleBartConfig, ParamTable};
use std::path::Path;

fn peak_rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("write") if args.len() == 5 => {
            let (d, layers): (usize, usize) = (args[3].parse()?, args[4].parse()?);
            let cfg = DalleBartConfig {
                d_model: d,
                encoder_layers: layers,
                decoder_layers: layers,
                encoder_ffn_dim: d * 2,
                decoder_ffn_dim: d * 2,
                encoder_attention_heads: 8,
                decoder_attention_heads: 8,
                ..DalleBartConfig::mini()
            };
            let table = ParamTable::new(&cfg);
            let values = table.init_values(cfg.init_std, 1);
            save_dalle_mini(Path::new(&args[2]), &cfg, &values, SaveDtype::F32)?;
            println!("{{\"params\": {}}}", table.numel());
        }
        Some("read") if args.len() == 3 => {
            let dir = Path::new(&args[2]);
            let file = std::fs::metadata(dir.join("flax_model.msgpack"))?.len();
            let before = peak_rss_bytes();
            let (_, weights) = load_model(dir)?;
            let params: usize = weights.iter().map(Vec::len).sum();
            let peak = peak_rss_bytes();
            println!(
                "{{\"file_bytes\": {file}, \"params\": {params}, \"peak_rss_bytes\": {peak}, \"rss_before_bytes\": {before}, \"peak_over_file\": {:.3}}}",
                peak as f64 / file as f64
            );
        }
        _ => return Err("usage: flax_read_memory write DIR D_MODEL LAYERS | read DIR".into()),
    }
    Ok(())
}

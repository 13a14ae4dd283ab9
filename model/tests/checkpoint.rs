//! safetensors round trips in both layouts.

use dm_model::checkpoint::{load_weights, read_tensors, save_weights};
use dm_model::{DalleBartConfig, ParamTable};

#[test]
fn both_layouts_round_trip_and_load_into_each_other() {
    let mut cfg = DalleBartConfig::micro();
    cfg.d_model = 16;
    cfg.encoder_attention_heads = 2;
    cfg.decoder_attention_heads = 4;
    cfg.encoder_ffn_dim = 24;
    cfg.decoder_ffn_dim = 8;
    cfg.encoder_vocab_size = 30;
    cfg.image_vocab_size = 20;
    cfg.image_length = 9;
    cfg.max_text_length = 5;
    cfg.encoder_layers = 3;
    let table = ParamTable::new(&cfg);
    let values = table.init_values(0.02, 1);
    let dir = std::env::temp_dir().join(format!("dm-ckpt-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for stacked in [false, true] {
        let path = dir.join(format!("w-{stacked}.safetensors"));
        save_weights(&path, &table, &values, stacked).unwrap();
        let names: Vec<String> = read_tensors(&path).unwrap().into_keys().collect();
        let has_stacked = names.iter().any(|n| n.contains("FlaxBartEncoderLayers."));
        let has_per_layer = names.iter().any(|n| n.contains("FlaxBartEncoderLayer_2."));
        assert_eq!((has_stacked, has_per_layer), (stacked, !stacked), "{names:?}");
        assert_eq!(load_weights(&path, &table).unwrap(), values);
    }
    // A stacked file with a different layer count is refused, naming the tensor.
    let mut other = cfg.clone();
    other.encoder_layers = 2;
    let err = load_weights(&dir.join("w-true.safetensors"), &ParamTable::new(&other)).unwrap_err().to_string();
    assert!(err.contains("FlaxBartEncoderLayers") && err.contains("layers"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

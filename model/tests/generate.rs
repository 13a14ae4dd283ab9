//! KV-cache generation must agree with the teacher-forced training forward.

use dm_model::dallebart::{Prompt, SamplingOptions};
use dm_model::{Batch, DalleBart, DalleBartConfig};
use dm_runtime::cpu::CpuBackend;

fn small_config() -> DalleBartConfig {
    DalleBartConfig {
        d_model: 32,
        encoder_layers: 2,
        decoder_layers: 2,
        encoder_attention_heads: 2,
        decoder_attention_heads: 4,
        encoder_ffn_dim: 40,
        decoder_ffn_dim: 48,
        encoder_vocab_size: 50,
        image_vocab_size: 37,
        image_length: 12,
        max_text_length: 6,
        init_std: 0.5, // large weights: sharp, tie-free logits
        use_scan: false,
    }
}

fn prompt(ids: &[i32], t: usize) -> Prompt {
    let mut input_ids = ids.to_vec();
    let mut attention_mask = vec![1; ids.len()];
    input_ids.resize(t, 1);
    attention_mask.resize(t, 0);
    Prompt { input_ids, attention_mask }
}

#[test]
fn greedy_generation_equals_argmax_of_the_teacher_forced_forward() {
    let cfg = small_config();
    let mut model = DalleBart::init(CpuBackend::new(), cfg.clone(), 3).unwrap();
    let prompts = vec![prompt(&[0, 7, 9, 2], 6), prompt(&[0, 11, 2], 6)];
    let greedy = SamplingOptions { temperature: 0.0, ..Default::default() };
    let codes = model.generate(&prompts, None, &greedy).unwrap();
    assert_eq!(codes.len(), 2);

    let (ids, mask): (Vec<i32>, Vec<i32>) = (
        prompts.iter().flat_map(|p| p.input_ids.clone()).collect(),
        prompts.iter().flat_map(|p| p.attention_mask.clone()).collect(),
    );
    let labels: Vec<i32> = codes.iter().flatten().map(|&c| c as i32).collect();
    let batch = Batch::new(&cfg, 2, ids, mask, labels).unwrap();
    model.forward(&batch).unwrap();
    let logits = model.logits().unwrap();
    let v = cfg.loss_classes();
    for (r, row_codes) in codes.iter().enumerate() {
        for (t, &c) in row_codes.iter().enumerate() {
            let row = &logits[(r * cfg.image_length + t) * v..][..cfg.image_vocab_size];
            let argmax = row.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).unwrap().0;
            assert_eq!(argmax as u32, c, "row {r} position {t}");
        }
    }
}

#[test]
fn guidance_with_scale_one_equals_plain_sampling_and_other_scales_change_it() {
    let cfg = small_config();
    let mut model = DalleBart::init(CpuBackend::new(), cfg, 5).unwrap();
    let prompts = vec![prompt(&[0, 7, 9, 2], 6)];
    let empty = prompt(&[0, 2], 6);
    let opts = SamplingOptions { temperature: 1.0, top_k: Some(8), seed: 9, ..Default::default() };
    let plain = model.generate(&prompts, None, &opts).unwrap();
    let again = model.generate(&prompts, Some(&empty), &opts).unwrap();
    assert_eq!(plain, again, "cond_scale 1 ignores the unconditional prompt and is deterministic in the seed");
    let guided = model.generate(&prompts, Some(&empty), &SamplingOptions { cond_scale: 4.0, ..opts }).unwrap();
    assert_ne!(plain, guided);
    assert!(guided[0].iter().all(|&c| c < 37));
}

//! The backward's gradient-ready hook ([`dm_model::dallebart::grad_groups`]): every parameter is
//! announced exactly once, in the documented backward order, and only once its gradient is final
//! (the values seen by the sink equal the gradients after the whole backward, bit for bit, also
//! when the backward accumulates onto gradients of an earlier micro-batch).

use dm_model::dallebart::grad_groups::{backward_groups, GradSink};
use dm_model::{Batch, DalleBart, DalleBartConfig, ParamTable};
use dm_runtime::cpu::{CpuBackend, CpuBuf};

fn config() -> DalleBartConfig {
    DalleBartConfig { decoder_layers: 3, image_length: 8, max_text_length: 6, ..DalleBartConfig::tiny() }
}

fn batch(cfg: &DalleBartConfig, rows: usize, seed: usize) -> Batch {
    let (t, l) = (cfg.max_text_length, cfg.image_length);
    let ids: Vec<i32> = (0..rows * t).map(|i| ((i * 7 + seed * 13) % cfg.encoder_vocab_size) as i32).collect();
    let mask: Vec<i32> = (0..rows * t).map(|i| (i % t < t - (i / t) % 3) as i32).collect();
    let labels = (0..rows * l).map(|i| ((i * 5 + seed * 3) % cfg.image_vocab_size) as i32).collect();
    Batch::new(cfg, rows, ids, mask, labels).unwrap()
}

/// Records each announced group and the gradient values it held at that moment.
#[derive(Default)]
struct Recorder {
    groups: Vec<Vec<usize>>,
    seen: Vec<(usize, Vec<f32>)>,
}

impl GradSink<CpuBackend> for Recorder {
    fn grads_ready(&mut self, grads: &mut [CpuBuf], params: &[usize]) -> dm_model::Result<()> {
        self.groups.push(params.to_vec());
        for &i in params {
            self.seen.push((i, grads[i].values().to_vec()));
        }
        Ok(())
    }
}

#[test]
fn every_parameter_is_announced_once_in_backward_order() {
    let cfg = config();
    let t = ParamTable::new(&cfg);
    let groups = backward_groups(&t);
    let mut all: Vec<usize> = groups.iter().flatten().copied().collect();
    all.sort_unstable();
    assert_eq!(all, (0..t.specs.len()).collect::<Vec<_>>(), "every parameter exactly once");
    // The head first, the encoder's embeddings last, decoder layers before encoder layers.
    assert_eq!(groups[0], vec![t.lm_head, t.decoder.final_ln_bias]);
    assert!(groups.last().unwrap().contains(&t.encoder.embed_tokens));
    assert_eq!(groups.len(), 1 + cfg.decoder_layers + 1 + 1 + cfg.encoder_layers + 1);
}

#[test]
fn announced_gradients_are_final_also_when_accumulating() {
    let cfg = config();
    let be = CpuBackend::new();
    let values = ParamTable::new(&cfg).init_values(0.05, 7);
    let mut model = DalleBart::new(be.clone(), cfg.clone(), values).unwrap();
    let tokens = (2 * cfg.image_length) as f32;
    model.zero_grads().unwrap();
    // A first micro-batch without a sink, then the one the sink watches.
    model.forward(&batch(&cfg, 2, 1)).unwrap();
    model.loss_and_backward(1.0 / tokens).unwrap();
    model.forward(&batch(&cfg, 2, 2)).unwrap();
    let mut rec = Recorder::default();
    model.loss_and_backward_with(1.0 / tokens, &mut rec).unwrap();

    assert_eq!(rec.groups, backward_groups(&model.table), "announced in the documented order");
    let finals = model.grad_values().unwrap();
    for (i, seen) in &rec.seen {
        let name = &model.table.specs[*i].name;
        assert!(seen.iter().any(|&x| x != 0.0), "{name}: announced with an all-zero gradient");
        assert_eq!(seen, &finals[*i], "{name}: changed after it was announced");
    }

    // The same two micro-batches without the sink give the same gradients bit for bit.
    let values = ParamTable::new(&cfg).init_values(0.05, 7);
    let mut plain = DalleBart::new(be.clone(), cfg.clone(), values).unwrap();
    plain.zero_grads().unwrap();
    for seed in [1, 2] {
        plain.forward(&batch(&cfg, 2, seed)).unwrap();
        plain.loss_and_backward(1.0 / tokens).unwrap();
    }
    assert_eq!(plain.grad_values().unwrap(), finals);
}

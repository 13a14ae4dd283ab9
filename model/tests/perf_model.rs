//! The performance model's work counts against what the runtime executes: GEMM and attention
//! FLOPs of one forward + backward, counted by the `Profiled` backend on every tensor-parallel
//! rank, equal [`step_work`]'s exactly (padded vocabularies and uneven ffn splits included).

use dm_model::dallebart::TpGroup;
use dm_model::perf_model::step_work;
use dm_model::plan::PlanOptions;
use dm_model::{Batch, DalleBart, DalleBartConfig, ParamTable};
use dm_parallel::{Communicator, Mesh, TimedComm};
use dm_runtime::cpu::CpuBackend;
use dm_runtime::{OpClass, Profiled};
use rand::{Rng, SeedableRng};
use std::sync::Arc;

fn config() -> DalleBartConfig {
    DalleBartConfig {
        d_model: 32,
        encoder_layers: 2,
        decoder_layers: 1,
        encoder_attention_heads: 4,
        decoder_attention_heads: 2,
        encoder_ffn_dim: 45,
        decoder_ffn_dim: 38,
        encoder_vocab_size: 41,
        image_vocab_size: 22,
        image_length: 16,
        max_text_length: 8,
        init_std: 0.02,
        use_scan: false,
    }
}

fn batch(cfg: &DalleBartConfig, rows: usize) -> Batch {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
    let t = cfg.max_text_length;
    let ids = (0..rows * t).map(|_| rng.random_range(0..cfg.encoder_vocab_size as i32)).collect();
    let mask = (0..rows * t).map(|i| (i % t < t - 2) as i32).collect();
    let labels = (0..rows * cfg.image_length).map(|_| rng.random_range(0..cfg.image_vocab_size as i32)).collect();
    Batch::new(cfg, rows, ids, mask, labels).unwrap()
}

/// (gemm calls, gemm FLOPs, attention FLOPs) counted on each tp rank of one forward + backward.
fn counted(cfg: &DalleBartConfig, tp: usize, rows: usize) -> Vec<(u64, f64, f64)> {
    let mesh = Mesh::new(tp, 1).unwrap();
    let full = ParamTable::new(cfg).init_values(cfg.init_std, 1);
    let b = batch(cfg, rows);
    dm_parallel::run_ranks(&mesh, |rank, comms| -> Result<(u64, f64, f64), String> {
        let be = Profiled::new(CpuBackend::new());
        let comm: Arc<dyn Communicator<CpuBackend>> = Arc::new(comms.tp);
        let timed: Arc<dyn Communicator<Profiled<CpuBackend>>> = Arc::new(TimedComm::new(comm));
        let group = (tp > 1).then(|| TpGroup { rank, size: tp, comm: timed });
        let table = ParamTable::sharded(cfg, rank, tp);
        let mut model = DalleBart::new_sharded(be.clone(), cfg.clone(), group, table.shard_values(&full))
            .map_err(|e| e.to_string())?;
        let before = be.profile();
        model.forward_backward(&b).map_err(|e| e.to_string())?;
        let p = be.profile().since(&before);
        let (g, a) = (p.get(OpClass::Gemm), p.get(OpClass::Attention));
        Ok((g.calls, g.units, a.units))
    })
    .unwrap()
}

#[test]
fn flops_equal_the_runtime_counters_on_every_rank() {
    let cfg = config();
    for tp in [1, 2] {
        let got = counted(&cfg, tp, 3);
        for (rank, (calls, gemm, attn)) in got.into_iter().enumerate() {
            let w = step_work(&cfg, &PlanOptions::new(tp, 1, 3), rank);
            assert_eq!(calls as usize, w.gemms.len(), "tp {tp} rank {rank}");
            assert_eq!(gemm, w.gemm_flops(), "tp {tp} rank {rank}");
            assert_eq!(attn, w.attention_flops, "tp {tp} rank {rank}");
        }
    }
}

//! Losses without an update: the eval loss on the eval set and the probe loss before a
//! checkpoint write, each split across dp and averaged over it (tp collectives inside the model,
//! one scalar all-reduce over dp).

use super::{reduce_scalar, to_model_batch, Shared};
use anyhow::Result;
use dm_data::{ReaderState, ShardedReader};
use dm_model::DalleBart;
use dm_parallel::{Communicator, ReduceOp};
use dm_runtime::Backend;
use std::sync::Arc;

/// Mean eval loss over the first `eval_batches` eval batches, split across dp.
pub fn eval_loss<B: Backend>(
    model: &mut DalleBart<B>,
    sh: &Shared,
    dp_group: Option<&Arc<dyn Communicator<B>>>,
    dp_index: usize,
    dp: usize,
) -> Result<Option<f32>> {
    let Some(eval) = sh.data.eval.clone() else { return Ok(None) };
    let tr = &sh.cfg.training;
    let micro = (tr.batch_size / tr.grad_accumulation).min(eval.len() / dp * dp).max(dp);
    let batches = tr.eval_batches.min(eval.len() / micro).max(1);
    let mut reader = ShardedReader::with_state(eval, sh.data.tokenizer.clone(), ReaderState::new(0))?;
    let mut sum = 0.0f64;
    for _ in 0..batches {
        let b = to_model_batch(reader.next_batch(micro, dp_index, dp)?, sh.model_cfg)?;
        sum += model.eval_loss(&b)? as f64;
    }
    let local = (sum / batches as f64) as f32;
    let be = model.backend().clone();
    Ok(Some(reduce_scalar(&be, dp_group, local, ReduceOp::Avg)?))
}

/// The loss of the current weights on the next training micro-batch (read from a copy of the
/// reader, so training does not skip it), averaged over dp: the check before a checkpoint write.
/// Collectives: one forward and loss over tp, one scalar average over dp.
pub fn probe_loss<B: Backend>(
    model: &mut DalleBart<B>,
    sh: &Shared,
    dp_group: Option<&Arc<dyn Communicator<B>>>,
    reader: &crate::train_data::TrainReader,
    dp_index: usize,
    dp: usize,
) -> Result<f32> {
    let tr = &sh.cfg.training;
    let mut peek = sh.data.train.reader(&sh.data.tokenizer, reader.state())?;
    let b = to_model_batch(peek.next_batch(tr.batch_size / tr.grad_accumulation, dp_index, dp)?, sh.model_cfg)?;
    let local = model.eval_loss(&b)?;
    let be = model.backend().clone();
    reduce_scalar(&be, dp_group, local, ReduceOp::Avg)
}

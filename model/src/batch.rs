//! One training batch as dalle-mini feeds it: caption tokens with their attention mask, and
//! image codes as labels with `decoder_input_ids = [BOS] + labels[:-1]`.

use crate::config::DalleBartConfig;
use crate::error::{ModelError, Result};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    pub batch: usize,
    pub text_len: usize,
    pub image_len: usize,
    /// `[batch, text_len]` BPE ids.
    pub input_ids: Vec<i32>,
    /// `[batch, text_len]`, 1 = real token, 0 = padding.
    pub attention_mask: Vec<i32>,
    /// `[batch, image_len]` image codes the decoder must predict.
    pub labels: Vec<i32>,
    /// `[batch, image_len]` decoder inputs.
    pub decoder_input_ids: Vec<i32>,
}

impl Batch {
    /// Builds a batch from captions and labels, deriving `decoder_input_ids` from the labels.
    pub fn new(
        cfg: &DalleBartConfig,
        batch: usize,
        input_ids: Vec<i32>,
        attention_mask: Vec<i32>,
        labels: Vec<i32>,
    ) -> Result<Self> {
        let (t, l) = (cfg.max_text_length, cfg.image_length);
        let bos = cfg.bos_id() as i32;
        let mut decoder_input_ids = Vec::with_capacity(labels.len());
        for row in labels.chunks(l.max(1)) {
            decoder_input_ids.push(bos);
            decoder_input_ids.extend_from_slice(&row[..row.len().saturating_sub(1)]);
        }
        let b = Self { batch, text_len: t, image_len: l, input_ids, attention_mask, labels, decoder_input_ids };
        b.validate(cfg)?;
        Ok(b)
    }

    /// Checks lengths and id ranges against the config, naming the first offending entry.
    pub fn validate(&self, cfg: &DalleBartConfig) -> Result<()> {
        let (b, t, l) = (self.batch, self.text_len, self.image_len);
        if b == 0 {
            return Err(ModelError::Batch("batch size is 0".into()));
        }
        if t != cfg.max_text_length {
            return Err(ModelError::Batch(format!(
                "text length {t} != max_text_length {} (pad captions to max_text_length)",
                cfg.max_text_length
            )));
        }
        if l != cfg.image_length {
            return Err(ModelError::Batch(format!("image length {l} != image_length {}", cfg.image_length)));
        }
        let fields: [(&str, &[i32], usize, usize); 4] = [
            ("input_ids", &self.input_ids, t, cfg.encoder_vocab_size),
            ("attention_mask", &self.attention_mask, t, 2),
            ("labels", &self.labels, l, cfg.loss_classes()),
            ("decoder_input_ids", &self.decoder_input_ids, l, cfg.loss_classes()),
        ];
        for (name, data, len, limit) in fields {
            if data.len() != b * len {
                return Err(ModelError::Batch(format!(
                    "`{name}` has {} entries, expected batch {b} × {len}",
                    data.len()
                )));
            }
            if let Some((i, v)) = data.iter().enumerate().find(|(_, &v)| v < 0 || v as usize >= limit) {
                return Err(ModelError::Batch(format!(
                    "`{name}`[{}, {}] = {v} is outside 0..{limit}",
                    i / len,
                    i % len
                )));
            }
        }
        Ok(())
    }

    /// Rows `start..start+n` of the batch (data-parallel split).
    pub fn slice(&self, start: usize, n: usize) -> Self {
        let (t, l) = (self.text_len, self.image_len);
        Self {
            batch: n,
            text_len: t,
            image_len: l,
            input_ids: self.input_ids[start * t..(start + n) * t].to_vec(),
            attention_mask: self.attention_mask[start * t..(start + n) * t].to_vec(),
            labels: self.labels[start * l..(start + n) * l].to_vec(),
            decoder_input_ids: self.decoder_input_ids[start * l..(start + n) * l].to_vec(),
        }
    }
}

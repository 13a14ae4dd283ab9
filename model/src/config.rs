//! `DalleBartConfig`: read from (and written as) dalle-mini's `config.json`.
//!
//! Only the architecture dalle-mini releases is implemented (NormFormer LayerNorm placement, GLU
//! feed-forward, LayerNorm, no biases, exact GELU, learned absolute positions). Any other
//! architecture flag is refused with an error that names it.

use crate::error::{io_err, ModelError, Result};
use serde_json::{Map, Value};
use std::path::Path;

#[derive(Debug, Clone, PartialEq)]
pub struct DalleBartConfig {
    pub d_model: usize,
    pub encoder_layers: usize,
    pub decoder_layers: usize,
    pub encoder_attention_heads: usize,
    pub decoder_attention_heads: usize,
    pub encoder_ffn_dim: usize,
    pub decoder_ffn_dim: usize,
    /// Text vocabulary (rows of the encoder token embedding).
    pub encoder_vocab_size: usize,
    /// Image codes; the decoder embedding and lm_head have one more row/column (BOS).
    pub image_vocab_size: usize,
    pub image_length: usize,
    pub max_text_length: usize,
    pub init_std: f32,
    /// Checkpoint layout: layers stacked along a leading axis (dalle-mini's default) or one
    /// tensor per layer.
    pub use_scan: bool,
}

/// Flags whose value must be exactly this for the implemented architecture.
const REQUIRED_FLAGS: &[(&str, &str)] = &[
    ("ln_type", "\"layernorm\""),
    ("ln_positions", "\"normformer\""),
    ("use_glu", "true"),
    ("use_bias", "false"),
    ("use_head_scale", "false"),
    ("use_cosine_attention", "false"),
    ("use_deepnet_scaling", "false"),
    ("use_alibi", "false"),
    ("use_swin_position_embeddings", "false"),
    ("use_absolute_position_embeddings", "true"),
    ("use_subln_init", "false"),
    ("scale_embedding", "false"),
    ("force_ln_scale", "false"),
    ("use_final_ln_encoder", "true"),
    ("use_final_ln_decoder", "true"),
    ("tie_word_embeddings", "false"),
    ("sinkhorn_iters", "1"),
    ("activation_function", "\"gelu\""),
    ("dropout", "0.0"),
    ("attention_dropout", "0.0"),
    ("activation_dropout", "0.0"),
];

impl DalleBartConfig {
    /// A tiny configuration for tests and examples (d_model 32, 2 + 2 layers of 4 heads, ffn 64,
    /// text vocabulary 50, image vocabulary 40, 16 image tokens, 8 text tokens): tests override
    /// the fields their shapes depend on with `DalleBartConfig { .., ..DalleBartConfig::tiny() }`.
    pub fn tiny() -> Self {
        Self {
            d_model: 32,
            encoder_layers: 2,
            decoder_layers: 2,
            encoder_attention_heads: 4,
            decoder_attention_heads: 4,
            encoder_ffn_dim: 64,
            decoder_ffn_dim: 64,
            encoder_vocab_size: 50,
            image_vocab_size: 40,
            image_length: 16,
            max_text_length: 8,
            init_std: 0.02,
            use_scan: false,
        }
    }
    /// dalle-mini's "micro" configuration (23.7 M parameters).
    pub fn micro() -> Self {
        Self {
            d_model: 256,
            encoder_layers: 2,
            decoder_layers: 2,
            encoder_attention_heads: 2,
            decoder_attention_heads: 2,
            encoder_ffn_dim: 256,
            decoder_ffn_dim: 256,
            encoder_vocab_size: 50264,
            image_vocab_size: 16384,
            image_length: 256,
            max_text_length: 64,
            init_std: 0.02,
            use_scan: true,
        }
    }
    /// The released DALL·E mini (437.8 M parameters).
    pub fn mini() -> Self {
        Self {
            d_model: 1024,
            encoder_layers: 12,
            decoder_layers: 12,
            encoder_attention_heads: 16,
            decoder_attention_heads: 16,
            encoder_ffn_dim: 2730,
            decoder_ffn_dim: 2730,
            ..Self::micro()
        }
    }
    /// The released DALL·E mega (2,587.5 M parameters).
    pub fn mega() -> Self {
        Self {
            d_model: 2048,
            encoder_layers: 24,
            decoder_layers: 24,
            encoder_attention_heads: 32,
            decoder_attention_heads: 32,
            encoder_ffn_dim: 4096,
            decoder_ffn_dim: 4096,
            encoder_vocab_size: 50272,
            image_vocab_size: 16415,
            ..Self::micro()
        }
    }
    /// A named preset: `micro`, `mini` or `mega`.
    pub fn preset(name: &str) -> Result<Self> {
        match name {
            "micro" => Ok(Self::micro()),
            "mini" => Ok(Self::mini()),
            "mega" => Ok(Self::mega()),
            other => Err(ModelError::Config(format!("unknown preset `{other}`: use micro, mini or mega"))),
        }
    }

    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(io_err(format!("reading {}", path.display())))?;
        Self::from_json_str(&text).map_err(|e| match e {
            ModelError::Config(msg) => ModelError::Config(format!("{}: {msg}", path.display())),
            e => e,
        })
    }

    pub fn from_json_str(text: &str) -> Result<Self> {
        let value: Value =
            serde_json::from_str(text).map_err(|e| ModelError::Config(format!("not valid JSON: {e}")))?;
        let map = value.as_object().ok_or_else(|| ModelError::Config("expected a JSON object".into()))?;
        Self::from_json(map)
    }

    pub fn from_json(map: &Map<String, Value>) -> Result<Self> {
        if let Some(t) = map.get("model_type").and_then(Value::as_str) {
            if t != "dallebart" {
                return Err(ModelError::Config(format!("model_type is `{t}`, expected `dallebart`")));
            }
        }
        for (flag, want) in REQUIRED_FLAGS {
            if let Some(v) = map.get(*flag) {
                let want_v: Value = serde_json::from_str(want).expect("static JSON");
                let same = match (v.as_f64(), want_v.as_f64()) {
                    (Some(a), Some(b)) => a == b,
                    _ => *v == want_v,
                };
                if !same {
                    return Err(ModelError::Config(format!(
                        "unsupported architecture flag `{flag}` = {v}: dalle-mesh implements only dalle-mini's released architecture ({flag} = {want})"
                    )));
                }
            }
        }
        let usize_field = |name: &str| -> Result<usize> {
            let v = map.get(name).ok_or_else(|| ModelError::Config(format!("missing field `{name}`")))?;
            v.as_u64()
                .filter(|&n| n > 0)
                .map(|n| n as usize)
                .ok_or_else(|| ModelError::Config(format!("field `{name}` must be a positive integer, got {v}")))
        };
        let cfg = Self {
            d_model: usize_field("d_model")?,
            encoder_layers: usize_field("encoder_layers")?,
            decoder_layers: usize_field("decoder_layers")?,
            encoder_attention_heads: usize_field("encoder_attention_heads")?,
            decoder_attention_heads: usize_field("decoder_attention_heads")?,
            encoder_ffn_dim: usize_field("encoder_ffn_dim")?,
            decoder_ffn_dim: usize_field("decoder_ffn_dim")?,
            encoder_vocab_size: usize_field("encoder_vocab_size")?,
            image_vocab_size: usize_field("image_vocab_size")?,
            image_length: usize_field("image_length")?,
            max_text_length: usize_field("max_text_length")?,
            init_std: map.get("init_std").and_then(Value::as_f64).unwrap_or(0.02) as f32,
            use_scan: map.get("use_scan").and_then(Value::as_bool).unwrap_or(true),
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks the shape arithmetic (heads divide d_model, …).
    pub fn validate(&self) -> Result<()> {
        for (heads, which) in [
            (self.encoder_attention_heads, "encoder_attention_heads"),
            (self.decoder_attention_heads, "decoder_attention_heads"),
        ] {
            if heads == 0 || !self.d_model.is_multiple_of(heads) {
                return Err(ModelError::Config(format!(
                    "d_model {} is not divisible by {which} {heads}",
                    self.d_model
                )));
            }
        }
        let fields = [
            ("d_model", self.d_model),
            ("encoder_layers", self.encoder_layers),
            ("decoder_layers", self.decoder_layers),
            ("encoder_ffn_dim", self.encoder_ffn_dim),
            ("decoder_ffn_dim", self.decoder_ffn_dim),
            ("encoder_vocab_size", self.encoder_vocab_size),
            ("image_vocab_size", self.image_vocab_size),
            ("image_length", self.image_length),
            ("max_text_length", self.max_text_length),
        ];
        if let Some((name, _)) = fields.iter().find(|(_, v)| *v == 0) {
            return Err(ModelError::Config(format!("`{name}` must be positive")));
        }
        if !(self.init_std.is_finite() && self.init_std > 0.0) {
            return Err(ModelError::Config(format!("init_std must be positive, got {}", self.init_std)));
        }
        if i32::try_from(self.encoder_vocab_size.max(self.image_vocab_size + 1)).is_err() {
            return Err(ModelError::Config("vocabulary sizes must fit in i32".into()));
        }
        Ok(())
    }

    /// Classes of the loss (the image codes + BOS) = rows of the decoder embedding = columns of
    /// lm_head.
    pub fn loss_classes(&self) -> usize {
        self.image_vocab_size + 1
    }
    /// The decoder's start token (BOS), the extra image row.
    pub fn bos_id(&self) -> usize {
        self.image_vocab_size
    }

    /// The config as dalle-mini writes it (loadable by dalle-mini and by [`Self::from_json`]).
    pub fn to_json(&self) -> Value {
        let mut m = Map::new();
        let mut put = |k: &str, v: Value| {
            m.insert(k.to_string(), v);
        };
        put("model_type", "dallebart".into());
        put("architectures", serde_json::json!(["eBart"]));
        put("d_model", self.d_model.into());
        put("encoder_layers", self.encoder_layers.into());
        put("decoder_layers", self.decoder_layers.into());
        put("encoder_attention_heads", self.encoder_attention_heads.into());
        put("decoder_attention_heads", self.decoder_attention_heads.into());
        put("encoder_ffn_dim", self.encoder_ffn_dim.into());
        put("decoder_ffn_dim", self.decoder_ffn_dim.into());
        put("encoder_vocab_size", self.encoder_vocab_size.into());
        put("image_vocab_size", self.image_vocab_size.into());
        put("image_length", self.image_length.into());
        put("max_text_length", self.max_text_length.into());
        put("init_std", (self.init_std as f64).into());
        put("use_scan", self.use_scan.into());
        put("bos_token_id", self.bos_id().into());
        put("pad_token_id", self.bos_id().into());
        put("eos_token_id", self.bos_id().into());
        put("decoder_start_token_id", self.bos_id().into());
        put("max_length", (self.image_length + 1).into());
        put("min_length", (self.image_length + 1).into());
        put("is_encoder_decoder", true.into());
        for (flag, want) in REQUIRED_FLAGS {
            put(flag, serde_json::from_str(want).expect("static JSON"));
        }
        Value::Object(m)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_through_json() {
        let c = DalleBartConfig::mini();
        let back = DalleBartConfig::from_json(c.to_json().as_object().unwrap()).unwrap();
        assert_eq!(c, back);
    }

    #[test]
    fn refuses_unsupported_flags_by_name() {
        let mut j = DalleBartConfig::micro().to_json();
        j["ln_type"] = "rmsnorm".into();
        let err = DalleBartConfig::from_json(j.as_object().unwrap()).unwrap_err().to_string();
        assert!(err.contains("ln_type") && err.contains("rmsnorm"), "{err}");
        let mut j = DalleBartConfig::micro().to_json();
        j["use_bias"] = true.into();
        let err = DalleBartConfig::from_json(j.as_object().unwrap()).unwrap_err().to_string();
        assert!(err.contains("use_bias"), "{err}");
    }

    #[test]
    fn refuses_heads_not_dividing_d_model() {
        let mut j = DalleBartConfig::micro().to_json();
        j["decoder_attention_heads"] = 3.into();
        let err = DalleBartConfig::from_json(j.as_object().unwrap()).unwrap_err().to_string();
        assert!(err.contains("decoder_attention_heads"), "{err}");
    }
}

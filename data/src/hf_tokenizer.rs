//! Tokenizer folders as `DalleBartTokenizer.save_pretrained` (a transformers `BartTokenizerFast`)
//! writes them: `tokenizer.json`, and/or the slow tokenizer's `vocab.json` + `merges.txt`, with
//! `special_tokens_map.json` and `tokenizer_config.json`. A folder with `tokenizer.json` loads it
//! as is; one with only `vocab.json` + `merges.txt` is rebuilt as `BartTokenizer` does: byte-level
//! BPE (`add_prefix_space` from tokenizer_config.json, default false), RoBERTa post-processing,
//! and the special tokens of special_tokens_map.json with their `lstrip`/`rstrip` flags.

use std::path::Path;

use serde_json::Value;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::BPE;
use tokenizers::normalizers::NormalizerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::processors::roberta::RobertaProcessing;
use tokenizers::{AddedToken, DecoderWrapper, PostProcessorWrapper, PreTokenizerWrapper};
use tokenizers::{Tokenizer, TokenizerBuilder, TokenizerImpl};

use crate::error::{DataError, Result};
use crate::text::TextTokenizer;

fn tok_err(path: &Path, e: impl std::fmt::Display) -> DataError {
    DataError::Tokenizer(format!("{}: {e}", path.display()))
}

fn read_json(path: &Path) -> Result<Option<Value>> {
    if !path.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(path).map_err(|e| DataError::io(path, e))?;
    serde_json::from_str(&text).map(Some).map_err(|e| tok_err(path, format!("not valid JSON ({e})")))
}

/// A special token as special_tokens_map.json / tokenizer_config.json give it: a string, or an
/// object with `content`, `lstrip`, `rstrip`, `single_word`, `normalized`.
fn added_token(v: &Value) -> Option<AddedToken> {
    let (content, flags) = match v {
        Value::String(s) => (s.clone(), None),
        Value::Object(o) => (o.get("content")?.as_str()?.to_string(), Some(o)),
        _ => return None,
    };
    let flag = |k: &str| flags.and_then(|o| o.get(k)).and_then(Value::as_bool).unwrap_or(false);
    let normalized = flags.and_then(|o| o.get("normalized")).and_then(Value::as_bool).unwrap_or(false);
    Some(
        AddedToken::from(content, true)
            .lstrip(flag("lstrip"))
            .rstrip(flag("rstrip"))
            .single_word(flag("single_word"))
            .normalized(normalized),
    )
}

/// Loads a tokenizer: a `tokenizer.json` file, or a folder as described in the module docs.
pub fn load_tokenizer(path: &Path) -> Result<Tokenizer> {
    if path.is_file() {
        return Tokenizer::from_file(path).map_err(|e| tok_err(path, e));
    }
    if !path.is_dir() {
        return Err(DataError::io(path, std::io::Error::new(std::io::ErrorKind::NotFound, "no such file or folder")));
    }
    let fast = path.join("tokenizer.json");
    if fast.is_file() {
        return Tokenizer::from_file(&fast).map_err(|e| tok_err(&fast, e));
    }
    let (vocab, merges) = (path.join("vocab.json"), path.join("merges.txt"));
    if !vocab.is_file() || !merges.is_file() {
        return Err(DataError::Tokenizer(format!(
            "{}: holds neither tokenizer.json nor vocab.json + merges.txt; point --tokenizer at a folder \
             written by DalleBartTokenizer.save_pretrained (or at a tokenizer.json)",
            path.display()
        )));
    }
    slow_tokenizer(path, &vocab, &merges)
}

fn slow_tokenizer(dir: &Path, vocab: &Path, merges: &Path) -> Result<Tokenizer> {
    let as_str = |p: &Path| p.to_string_lossy().to_string();
    let bpe = BPE::from_file(&as_str(vocab), &as_str(merges)).build().map_err(|e| tok_err(vocab, e))?;
    let config = read_json(&dir.join("tokenizer_config.json"))?.unwrap_or(Value::Null);
    let prefix_space = config.get("add_prefix_space").and_then(Value::as_bool).unwrap_or(false);
    let trim_offsets = config.get("trim_offsets").and_then(Value::as_bool).unwrap_or(true);
    let specials = read_json(&dir.join("special_tokens_map.json"))?.unwrap_or(Value::Null);
    let special = |key: &str, default: &str| -> String {
        specials
            .get(key)
            .or_else(|| config.get(key))
            .and_then(added_token)
            .map(|t| t.content)
            .unwrap_or_else(|| default.to_string())
    };
    let (bos, eos) = (special("bos_token", "<s>"), special("eos_token", "</s>"));
    let id = |t: &str| bpe.get_vocab().get(t).copied().ok_or_else(|| tok_err(vocab, format!("has no `{t}` token")));
    let (bos_id, eos_id) = (id(&bos)?, id(&eos)?);
    let post =
        RobertaProcessing::new((eos, eos_id), (bos, bos_id)).add_prefix_space(prefix_space).trim_offsets(trim_offsets);
    let built: TokenizerImpl<BPE, NormalizerWrapper, PreTokenizerWrapper, PostProcessorWrapper, DecoderWrapper> =
        TokenizerBuilder::new()
            .with_normalizer(None)
            .with_model(bpe)
            .with_pre_tokenizer(Some(ByteLevel::new(prefix_space, trim_offsets, true).into()))
            .with_post_processor(Some(post.into()))
            .with_decoder(Some(ByteLevelDecoder::default().into()))
            .build()
            .map_err(|e| tok_err(dir, e))?;
    let mut tokenizer: Tokenizer = built.into();
    let mut tokens: Vec<AddedToken> = Vec::new();
    for key in ["bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token"] {
        if let Some(t) = specials.get(key).or_else(|| config.get(key)).and_then(added_token) {
            tokens.push(t);
        }
    }
    if let Some(extra) = specials.get("additional_special_tokens").and_then(Value::as_array) {
        tokens.extend(extra.iter().filter_map(added_token));
    }
    tokenizer.add_special_tokens(&tokens);
    Ok(tokenizer)
}

/// A [`TextTokenizer`] over a tokenizer folder (or file), padding/truncating to `max_length`,
/// with dalle-mini's caption normaliser on or off.
pub fn text_tokenizer(path: &Path, max_length: usize, normalize: bool) -> Result<TextTokenizer> {
    Ok(TextTokenizer::from_tokenizer(load_tokenizer(path)?)?
        .with_max_text_length(max_length)?
        .with_normalizer(normalize))
}

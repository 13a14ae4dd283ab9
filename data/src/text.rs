//! Caption normalisation (dalle-mini's `TextNormalizer`) and tokenisation (BART conventions).
//!
//! # Normaliser coverage
//!
//! [`normalize_text`] follows dalle-mini's `TextNormalizer.__call__` step by step, in the same
//! order and with the same regular expressions, except:
//!
//! * `ftfy.fix_text` (mojibake repair, e.g. `"Ã©"` → `"é"`) is **not** done: there is no Rust
//!   port. Well-formed text is unaffected (ftfy leaves it alone).
//! * `unidecode` is replaced by the `deunicode` crate (the same transliteration tables'
//!   approach: `"é"` → `"e"`, `"“"` → `"\""`, `"–"` → `"-"`, `"日本"` → `"Ri Ben"`); the two
//!   tables differ for some rare symbols and emoji (unidecode drops most emoji, deunicode
//!   spells some out). Unmapped characters are dropped, as unidecode does.
//! * Hashtags: dalle-mini splits `#wordsruntogether` into words with a Wikipedia word-frequency
//!   list downloaded at run time; here `#tag` keeps the tag as one word (only splitting at
//!   non-`[a-zA-Z0-9']` characters, as its splitter does first).
//! * `<person>` (CC12M): dalle-mini substitutes a random choice of "a person" / "someone" /
//!   "somebody"; here always the most frequent, "a person" (deterministic). Runs of several
//!   `<person>` still become "people".
//! * Python's `\s`, `\w`, `\d` and Rust's `regex` classes agree on ASCII, which is all that is
//!   left after transliteration.
//!
//! Covered, as in dalle-mini: HTML entity unescaping (twice), transliteration to ASCII (so
//! accents are stripped and quotes/dashes simplified), lower-casing, wiki references `[12]` at
//! either end, HTML tags, URLs (`http…`), thousands separators in numbers, dots between word
//! characters and `/` between digits kept, `'s 't 'd 'm 'll 're 've` kept, `-` between words →
//! space, spaces around `% & / $ *` (dalle-mini keeps `&` as a token rather than spelling out
//! "and"), `_ # \` → space, other quotes → `"`, punctuation `()[].,|:;?!=+~-/{}` → comma,
//! 4+ repeated non-digit characters → one, merged quotes and commas, collapsed whitespace,
//! leading/trailing commas removed, and a leading space prepended.

use std::path::Path;
use std::sync::LazyLock;

use regex::Regex;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::normalizers::NormalizerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::processors::roberta::RobertaProcessing;
use tokenizers::{AddedToken, DecoderWrapper, PostProcessorWrapper, PreTokenizerWrapper};
use tokenizers::{Tokenizer, TokenizerBuilder, TokenizerImpl};

use crate::error::{DataError, Result};

const TEMP_TOKEN: &str = "xtokx";

fn re(pattern: &str) -> Regex {
    Regex::new(pattern).expect("valid regex")
}

static PERSON_RUN: LazyLock<Regex> = LazyLock::new(|| re(r"<person>([,\s]*(and)*[,\s]*<person>)+"));
static WIKI_REF_START: LazyLock<Regex> = LazyLock::new(|| re(r"\A\s*\[\d+\]"));
static WIKI_REF_END: LazyLock<Regex> = LazyLock::new(|| re(r"\[\d+\]\s*\z"));
static HTML_TAG: LazyLock<Regex> = LazyLock::new(|| re(r"<[^<]+?>"));
static URL: LazyLock<Regex> = LazyLock::new(|| re(r"http\S+"));
static COMMA_NUMBER: LazyLock<Regex> = LazyLock::new(|| re(r"(\d),(\d{3})"));
static DOT_NUMBER: LazyLock<Regex> = LazyLock::new(|| re(r"(\w)\.(\w)"));
static DATE_SLASH: LazyLock<Regex> = LazyLock::new(|| re(r"(\d)/(\d)"));
static WORD_DASH: LazyLock<Regex> = LazyLock::new(|| re(r"(\w)-(\w)"));
static SPACED_CHARS: LazyLock<Regex> = LazyLock::new(|| re(r"([%&/$*])"));
static HASHTAG: LazyLock<Regex> = LazyLock::new(|| re(r"#(\w+)"));
static HASHTAG_SPLIT: LazyLock<Regex> = LazyLock::new(|| re(r"[^a-zA-Z0-9']+"));
static IGNORE_CHARS: LazyLock<Regex> = LazyLock::new(|| re(r#"[_#\\]"#));
static QUOTES: LazyLock<Regex> = LazyLock::new(|| re(r#"['"`]"#));
static PUNCTUATION: LazyLock<Regex> = LazyLock::new(|| re(r"[()\[\].,|:;?!=+~\-/{}]"));
static MERGE_QUOTES: LazyLock<Regex> = LazyLock::new(|| re(r#"(\s*"+\s*)+"#));
static MERGE_COMMAS: LazyLock<Regex> = LazyLock::new(|| re(r"(\s*,+\s*)+"));
static SPACES: LazyLock<Regex> = LazyLock::new(|| re(r"\s+"));

fn is_word_char(c: char) -> bool {
    c.is_alphanumeric() || c == '_'
}

/// dalle-mini's `pre_process_quotes`: `'(?=([stdm]|(ll)|(re)|(ve)|(ll))\b)` → placeholder
/// (Rust's `regex` has no look-ahead, so this scans by hand).
fn pre_process_quotes(t: &str) -> String {
    const SUFFIXES: [&str; 7] = ["s", "t", "d", "m", "ll", "re", "ve"];
    let mut out = String::with_capacity(t.len());
    for (i, c) in t.char_indices() {
        if c == '\'' {
            let rest = &t[i + 1..];
            let keep = SUFFIXES
                .iter()
                .any(|s| rest.starts_with(s) && !rest[s.len()..].chars().next().is_some_and(is_word_char));
            if keep {
                out.push_str(TEMP_TOKEN);
                out.push_str("quote");
                out.push_str(TEMP_TOKEN);
                continue;
            }
        }
        out.push(c);
    }
    out
}

/// dalle-mini's `remove_repeating_chars`: `(\D)(\1{3,})` → `\1`, i.e. a run of 4 or more of the
/// same non-digit character becomes one.
fn remove_repeating_chars(t: &str) -> String {
    let mut out = String::with_capacity(t.len());
    let chars: Vec<char> = t.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        let mut j = i + 1;
        while j < chars.len() && chars[j] == c {
            j += 1;
        }
        let run = j - i;
        let n = if run >= 4 && !c.is_numeric() { 1 } else { run };
        out.extend(std::iter::repeat_n(c, n));
        i = j;
    }
    out
}

fn remove_first_last_commas(t: &str) -> &str {
    let t = t.trim();
    let t = t.strip_suffix(',').unwrap_or(t);
    let t = t.strip_prefix(',').unwrap_or(t);
    t.trim()
}

/// dalle-mini's caption normaliser (see the module docs for what differs). The result always
/// starts with a space, as dalle-mini's does.
pub fn normalize_text(text: &str) -> String {
    // ftfy.fix_text: not available (see module docs).
    // fix_html: html.unescape twice.
    let t = html_escape::decode_html_entities(text);
    let t = html_escape::decode_html_entities(&t).into_owned();
    // unidecode
    let t = deunicode::deunicode_with_tofu(&t, "");
    let t = t.to_lowercase();
    // replace_person_token
    let mut t = PERSON_RUN.replace_all(&t, " people ").into_owned();
    if t.contains("<person>") {
        t = t.replace("<person>", " a person ");
    }
    // remove_wiki_ref
    let t = WIKI_REF_START.replace(&t, "");
    let t = WIKI_REF_END.replace(&t, "");
    let t = HTML_TAG.replace_all(&t, "");
    let t = URL.replace_all(&t, "");
    // remove_comma_numbers (twice, for 1,000,000)
    let t = COMMA_NUMBER.replace_all(&t, "${1}${2}");
    let t = COMMA_NUMBER.replace_all(&t, "${1}${2}");
    // pre-process dots in numbers, quotes, dates
    let t = DOT_NUMBER.replace_all(&t, format!("${{1}}{TEMP_TOKEN}dot{TEMP_TOKEN}${{2}}").as_str());
    let t = pre_process_quotes(&t);
    let t = DATE_SLASH.replace_all(&t, format!("${{1}}{TEMP_TOKEN}slash{TEMP_TOKEN}${{2}}").as_str());
    // handle_special_chars
    let t = WORD_DASH.replace_all(&t, "${1} ${2}");
    let t = SPACED_CHARS.replace_all(&t, " ${1} ");
    // expand_hashtags (without the word-frequency splitter)
    let t = HASHTAG.replace_all(&t, |caps: &regex::Captures| {
        HASHTAG_SPLIT.split(&caps[1]).filter(|w| !w.is_empty()).collect::<Vec<_>>().join(" ")
    });
    let t = IGNORE_CHARS.replace_all(&t, " ");
    let t = QUOTES.replace_all(&t, " \" ");
    let t = PUNCTUATION.replace_all(&t, ",");
    // post-process placeholders
    let t = t
        .replace(&format!("{TEMP_TOKEN}dot{TEMP_TOKEN}"), ".")
        .replace(&format!("{TEMP_TOKEN}quote{TEMP_TOKEN}"), "'")
        .replace(&format!("{TEMP_TOKEN}slash{TEMP_TOKEN}"), "/");
    let t = remove_repeating_chars(&t);
    let t = MERGE_QUOTES.replace_all(&t, " \" ");
    let t = MERGE_COMMAS.replace_all(&t, ", ");
    let t = SPACES.replace_all(&t, " ");
    format!(" {}", remove_first_last_commas(&t))
}

/// dalle-mini's default `max_text_length`.
pub const DEFAULT_MAX_TEXT_LENGTH: usize = 64;

/// Special tokens of a trained tokenizer, in id order (BART's order for the first four).
pub const SPECIAL_TOKENS: [&str; 5] = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"];

/// One caption encoded to a fixed length.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncodedText {
    /// `<s> tokens… </s> <pad>…`, exactly `max_text_length` ids.
    pub input_ids: Vec<i32>,
    /// 1 for `<s>`, tokens and `</s>`; 0 for padding.
    pub attention_mask: Vec<i32>,
}

/// A `tokenizers` tokenizer with BART's encoding conventions: `<s>` first, `</s>` last,
/// `<pad>` up to `max_text_length`, truncation keeping `</s>`; captions go through
/// [`normalize_text`] first unless that is switched off.
#[derive(Clone)]
pub struct TextTokenizer {
    inner: Tokenizer,
    max_text_length: usize,
    normalize: bool,
    bos: u32,
    pad: u32,
    eos: u32,
}

impl std::fmt::Debug for TextTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TextTokenizer")
            .field("vocab_size", &self.vocab_size())
            .field("max_text_length", &self.max_text_length)
            .field("normalize", &self.normalize)
            .field("bos/pad/eos", &(self.bos, self.pad, self.eos))
            .finish()
    }
}

fn tok_err(context: &str, e: impl std::fmt::Display) -> DataError {
    DataError::Tokenizer(format!("{context}: {e}"))
}

impl TextTokenizer {
    /// Loads a `tokenizer.json` (e.g. BART's, dalle-mini's, or one from [`train_bpe`]). It must
    /// define `<s>`, `</s>` and `<pad>`. Truncation/padding settings stored in the file are
    /// ignored (this type applies its own).
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let inner = Tokenizer::from_file(path).map_err(|e| tok_err(&path.display().to_string(), e))?;
        Self::from_tokenizer(inner)
    }

    /// Wraps an already-loaded tokenizer.
    pub fn from_tokenizer(mut inner: Tokenizer) -> Result<Self> {
        inner.with_truncation(None).map_err(|e| tok_err("disabling truncation", e))?;
        inner.with_padding(None);
        let id = |t: &str| {
            inner.token_to_id(t).ok_or_else(|| {
                DataError::Tokenizer(format!("the tokenizer has no {t} token (BART conventions need <s>, </s>, <pad>)"))
            })
        };
        let (bos, pad, eos) = (id("<s>")?, id("<pad>")?, id("</s>")?);
        for x in [bos, pad, eos] {
            if x > i32::MAX as u32 {
                return Err(DataError::Tokenizer(format!("special token id {x} exceeds i32")));
            }
        }
        Ok(TextTokenizer { inner, max_text_length: DEFAULT_MAX_TEXT_LENGTH, normalize: true, bos, pad, eos })
    }

    /// Sets the encoded length (at least 2: `<s>` and `</s>`).
    pub fn with_max_text_length(mut self, max_text_length: usize) -> Result<Self> {
        if max_text_length < 2 {
            return Err(DataError::InvalidArgument(format!(
                "max_text_length {max_text_length} leaves no room for <s> and </s>"
            )));
        }
        self.max_text_length = max_text_length;
        Ok(self)
    }

    /// Switches [`normalize_text`] on (the default) or off.
    pub fn with_normalizer(mut self, normalize: bool) -> Self {
        self.normalize = normalize;
        self
    }

    pub fn max_text_length(&self) -> usize {
        self.max_text_length
    }

    pub fn normalizes(&self) -> bool {
        self.normalize
    }

    /// Vocabulary size including special and added tokens.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn bos_id(&self) -> i32 {
        self.bos as i32
    }

    pub fn pad_id(&self) -> i32 {
        self.pad as i32
    }

    pub fn eos_id(&self) -> i32 {
        self.eos as i32
    }

    /// The wrapped `tokenizers` tokenizer.
    pub fn inner(&self) -> &Tokenizer {
        &self.inner
    }

    /// The caption's token ids without special tokens, padding or truncation (normalised first
    /// if normalisation is on).
    pub fn token_ids(&self, caption: &str) -> Result<Vec<u32>> {
        let text;
        let input = if self.normalize {
            text = normalize_text(caption);
            text.as_str()
        } else {
            caption
        };
        let enc = self.inner.encode(input, false).map_err(|e| tok_err("encoding", e))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Encodes a caption to `max_text_length` ids: `<s>`, at most `max_text_length - 2` tokens,
    /// `</s>`, then `<pad>`; mask 1 on the first three parts.
    pub fn encode(&self, caption: &str) -> Result<EncodedText> {
        let mut input_ids = Vec::with_capacity(self.max_text_length);
        let mut attention_mask = Vec::with_capacity(self.max_text_length);
        self.encode_into(caption, &mut input_ids, &mut attention_mask)?;
        Ok(EncodedText { input_ids, attention_mask })
    }

    /// As [`encode`](Self::encode), appending to `ids` and `mask`.
    pub fn encode_into(&self, caption: &str, ids: &mut Vec<i32>, mask: &mut Vec<i32>) -> Result<()> {
        let tokens = self.token_ids(caption)?;
        let kept = tokens.len().min(self.max_text_length - 2);
        ids.push(self.bos as i32);
        ids.extend(tokens[..kept].iter().map(|&t| t as i32));
        ids.push(self.eos as i32);
        let real = kept + 2;
        ids.extend(std::iter::repeat_n(self.pad as i32, self.max_text_length - real));
        mask.extend(std::iter::repeat_n(1, real));
        mask.extend(std::iter::repeat_n(0, self.max_text_length - real));
        Ok(())
    }

    /// Decodes ids back to text, dropping special tokens (ids outside the vocabulary are an error).
    pub fn decode(&self, ids: &[i32]) -> Result<String> {
        let ids: Vec<u32> = ids.iter().map(|&i| i as u32).collect();
        self.inner.decode(&ids, true).map_err(|e| tok_err("decoding", e))
    }
}

/// Trains a byte-level BPE tokenizer (GPT-2/BART style: byte-level pre-tokeniser without an
/// added prefix space, since normalised captions start with a space; byte-level decoder;
/// RoBERTa post-processor) on the captions, each normalised with [`normalize_text`] first
/// (matching [`TextTokenizer`]'s default). Special tokens `<s>`, `<pad>`, `</s>`, `<unk>`,
/// `<mask>` get ids 0..=4. `vocab_size` counts them and the 256 byte symbols, so it must be at
/// least 261; training stops earlier when nothing is left to merge. Saves `tokenizer.json` at
/// `out_path` and returns the loaded tokenizer.
pub fn train_bpe<'a>(
    captions: impl Iterator<Item = &'a str>,
    vocab_size: usize,
    out_path: impl AsRef<Path>,
) -> Result<TextTokenizer> {
    let out_path = out_path.as_ref();
    let alphabet = ByteLevel::alphabet();
    let min = alphabet.len() + SPECIAL_TOKENS.len();
    if vocab_size < min {
        return Err(DataError::InvalidArgument(format!(
            "vocab_size {vocab_size} is below {min} (256 byte symbols + {} special tokens)",
            SPECIAL_TOKENS.len()
        )));
    }
    let normalized: Vec<String> = captions.map(normalize_text).collect();
    let mut trainer = BpeTrainerBuilder::new()
        .show_progress(false)
        .vocab_size(vocab_size)
        .min_frequency(0)
        .initial_alphabet(alphabet.into_iter().collect())
        .special_tokens(SPECIAL_TOKENS.iter().map(|t| AddedToken::from(*t, true)).collect())
        .build();
    let byte_level = ByteLevel::new(false, true, true);
    let mut tokenizer: TokenizerImpl<
        BPE,
        NormalizerWrapper,
        PreTokenizerWrapper,
        PostProcessorWrapper,
        DecoderWrapper,
    > = TokenizerBuilder::new()
        .with_model(BPE::default())
        .with_normalizer(None)
        .with_pre_tokenizer(Some(byte_level.into()))
        .with_post_processor(Some(
            RobertaProcessing::new(("</s>".into(), 2), ("<s>".into(), 0)).add_prefix_space(false).into(),
        ))
        .with_decoder(Some(ByteLevelDecoder::default().into()))
        .build()
        .map_err(|e| tok_err("building", e))?;
    tokenizer.train(&mut trainer, normalized.iter()).map_err(|e| tok_err("training", e))?;
    for (id, tok) in SPECIAL_TOKENS.iter().enumerate() {
        if tokenizer.token_to_id(tok) != Some(id as u32) {
            return Err(DataError::Tokenizer(format!(
                "trained tokenizer put {tok} at {:?}, expected {id}",
                tokenizer.token_to_id(tok)
            )));
        }
    }
    if let Some(parent) = out_path.parent() {
        if !parent.as_os_str().is_empty() {
            std::fs::create_dir_all(parent).map_err(|e| DataError::io(parent, e))?;
        }
    }
    tokenizer.save(out_path, true).map_err(|e| tok_err(&out_path.display().to_string(), e))?;
    TextTokenizer::from_file(out_path)
}

//! Caption normalisation and tokenisation.

use dm_data::text::{normalize_text, train_bpe, TextTokenizer, SPECIAL_TOKENS};

/// Outputs of dalle-mini's `TextNormalizer` steps (Python, with ftfy and unidecode, and the
/// hashtag splitter and `<person>` sampling replaced as documented in `dm_data::text`).
const REFERENCE: &[(&str, &str)] = &[
    ("A Red Circle above a Blue Square", " a red circle above a blue square"),
    ("Café crème brûlée — “délicieux”!", " cafe creme brulee, \" delicieux \""),
    (
        "Tom & Jerry's house, 1,000,000 dollars for 3.5 kg on 12/25/2020",
        " tom & jerry's house, 1000000 dollars for 3.5 kg on 12/25/2020",
    ),
    ("Check https://example.com/page?x=1 now!!!", " check now"),
    ("<b>Bold</b> text &amp;amp; more &lt;tag&gt;", " bold text & more"),
    ("[12] Wiki article text [3]", " wiki article text"),
    ("Sooooo cooool!!!!  ...   wow", " so col, wow"),
    (
        "it's a dog's life, they'll we're I've don't 'quoted' `back`",
        " it's a dog's life, they'll we're i've don't \" quoted \" back \"",
    ),
    ("#SunsetBeach photo #hello_world", " sunsetbeach photo hello world"),
    (
        "well-known state-of-the-art 50% $5 a*b back\\slash under_score",
        " well known state of the art 50 % $ 5 a * b back slash under score",
    ),
    ("<person> and <person> at the beach with <person>", " people at the beach with a person"),
    ("Straße in München, Zürich — naïve façade", " strasse in munchen, zurich, naive facade"),
    ("(a) [b] {c} x|y: z; w? v! u=t+s~r", " a, b, c, x, y, z, w, v, u, t, s, r"),
    ("   ,leading and trailing,   ", " leading and trailing"),
    ("日本の風景", " ri ben nofeng jing"),
    ("1111 aaaa ---- ....", " 1111 a"),
    ("A \"quoted\" phrase with ''double'' quotes", " a \" quoted \" phrase with \" double \" quotes"),
    ("e.g. U.S.A. v2.0", " e.g, u.s, a, v2.0"),
    ("", " "),
];

#[test]
fn normalizer_matches_dalle_mini_reference() {
    let mut failures = Vec::new();
    for (input, expected) in REFERENCE {
        let got = normalize_text(input);
        if &got != expected {
            failures.push(format!("{input:?}\n  expected {expected:?}\n  got      {got:?}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

fn captions() -> Vec<String> {
    // A few hundred varied captions from the synthetic scenes.
    dm_data::synthetic::all_scenes().iter().step_by(37).map(|s| s.caption()).collect()
}

fn trained(dir: &std::path::Path) -> TextTokenizer {
    let caps = captions();
    assert!(caps.len() > 200);
    train_bpe(caps.iter().map(String::as_str), 400, dir.join("tokenizer.json")).unwrap()
}

#[test]
fn trained_bpe_roundtrips_and_follows_bart_conventions() {
    let tmp = tempfile::tempdir().unwrap();
    let tok = trained(tmp.path());
    for (id, t) in SPECIAL_TOKENS.iter().enumerate() {
        assert_eq!(tok.inner().token_to_id(t), Some(id as u32), "{t}");
    }
    assert_eq!((tok.bos_id(), tok.pad_id(), tok.eos_id()), (0, 1, 2));
    assert!(tok.vocab_size() <= 400);

    // Reload from disk: identical encodings.
    let reloaded = TextTokenizer::from_file(tmp.path().join("tokenizer.json")).unwrap();
    let vocab = reloaded.vocab_size() as i32;
    for caption in captions().iter().take(50).chain(["A Purple Zebra, très jolie!".to_string()].iter()) {
        let a = tok.encode(caption).unwrap();
        let b = reloaded.encode(caption).unwrap();
        assert_eq!(a, b);
        assert_eq!(a.input_ids.len(), 64);
        assert!(a.input_ids.iter().all(|&i| (0..vocab).contains(&i)));
        assert!(!a.input_ids.contains(&3), "byte-level BPE never needs <unk>");
        // Decoding gives back the normalised caption.
        assert_eq!(reloaded.decode(&a.input_ids).unwrap(), normalize_text(caption));
    }
}

#[test]
fn padding_and_truncation() {
    let tmp = tempfile::tempdir().unwrap();
    let tok = trained(tmp.path()).with_max_text_length(16).unwrap();
    let caption = "a red circle above a blue square on a yellow background";
    let n = tok.token_ids(caption).unwrap().len();
    assert!(n > 3 && n + 2 < 16, "{n}");
    let e = tok.encode(caption).unwrap();
    assert_eq!(e.input_ids.len(), 16);
    assert_eq!(e.attention_mask.len(), 16);
    assert_eq!(e.input_ids[0], 0);
    assert_eq!(e.input_ids[n + 1], 2);
    assert!(e.input_ids[n + 2..].iter().all(|&i| i == 1));
    assert!(e.attention_mask[..n + 2].iter().all(|&m| m == 1));
    assert!(e.attention_mask[n + 2..].iter().all(|&m| m == 0));
    assert!(e.input_ids[1..=n].iter().all(|&i| i > 4));

    // Truncation keeps <s> and </s>.
    let short = tok.clone().with_max_text_length(5).unwrap();
    let t = short.encode(caption).unwrap();
    assert_eq!(t.input_ids.len(), 5);
    assert_eq!(t.input_ids[0], 0);
    assert_eq!(t.input_ids[4], 2);
    assert_eq!(&t.input_ids[1..4], &e.input_ids[1..4]);
    assert_eq!(t.attention_mask, vec![1; 5]);
    // Exactly-fitting caption: no padding, nothing cut.
    let exact = tok.clone().with_max_text_length(n + 2).unwrap().encode(caption).unwrap();
    assert_eq!(exact.input_ids, e.input_ids[..n + 2].to_vec());
    assert!(tok.clone().with_max_text_length(1).is_err());

    // An empty caption: with normalisation it is " " (dalle-mini prepends a space), one token;
    // without, just <s> </s>.
    let empty = tok.encode("").unwrap();
    assert_eq!((empty.input_ids[0], empty.input_ids[2], empty.input_ids[3]), (0, 2, 1));
    assert_eq!(empty.attention_mask.iter().sum::<i32>(), 3);
    let raw_empty = tok.clone().with_normalizer(false).encode("").unwrap();
    assert_eq!(&raw_empty.input_ids[..3], &[0, 2, 1]);
    assert_eq!(raw_empty.attention_mask.iter().sum::<i32>(), 2);
}

#[test]
fn normalizer_can_be_switched_off() {
    let tmp = tempfile::tempdir().unwrap();
    let tok = trained(tmp.path());
    assert!(tok.normalizes());
    let shouty = "  A RED   Circle!!!!";
    assert_eq!(tok.encode(shouty).unwrap(), tok.encode("a red circle").unwrap());
    let raw = tok.clone().with_normalizer(false);
    assert_ne!(raw.encode(shouty).unwrap(), tok.encode(shouty).unwrap());
    assert_eq!(raw.encode(" a red circle").unwrap(), tok.encode("a red circle").unwrap());
}

#[test]
fn training_is_deterministic_and_checks_vocab_size() {
    let a = tempfile::tempdir().unwrap();
    let b = tempfile::tempdir().unwrap();
    trained(a.path());
    trained(b.path());
    assert_eq!(
        std::fs::read(a.path().join("tokenizer.json")).unwrap(),
        std::fs::read(b.path().join("tokenizer.json")).unwrap()
    );
    let err = train_bpe(["x"].into_iter(), 100, a.path().join("t.json")).unwrap_err();
    assert!(err.to_string().contains("261"), "{err}");
}

#[test]
fn missing_tokenizer_file_is_an_error() {
    let err = TextTokenizer::from_file("/nonexistent/tokenizer.json").unwrap_err();
    assert!(err.to_string().contains("/nonexistent/tokenizer.json"));
}

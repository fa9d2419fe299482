//! Chapter 2 tokenizers: parity with tiktoken, round trips, the book's worked examples.
#![allow(clippy::unwrap_used)] // tests: a panic is the failure report
use crate::common;

use anyhow::Result;
use llmlab::data::tokenizer::{build_simple_vocab, train_bpe, END_OF_TEXT_ID};
use llmlab::data::{BpeTokenizer, SimpleTokenizerV1, SimpleTokenizerV2};
use std::collections::BTreeMap;

fn gpt2() -> Result<BpeTokenizer> {
    BpeTokenizer::gpt2_from_dir(&common::gpt2_bpe_dir())
}

/// Our GPT-2 BPE gives tiktoken's ids (built from the same encoder.json/vocab.bpe) on the-verdict,
/// every SMS Spam message and a file of Unicode edge cases.
#[test]
fn gpt2_ids_match_tiktoken() -> Result<()> {
    let tok = gpt2()?;
    let verdict = common::mirror().join("the-verdict/the-verdict.txt");
    let spam = common::mirror().join("sms-spam-collection/SMSSpamCollection");
    let edge = common::repo().join("tests/fixtures/unicode_edge_cases.txt");
    let bpe = common::gpt2_bpe_dir();
    let out = common::Reference::script("tiktoken_ids.py")
        .input(&bpe)
        .input(&verdict)
        .input(&spam)
        .input(&edge)
        .run()?;
    let reference: BTreeMap<String, serde_json::Value> = serde_json::from_str(&out)?;

    let want: Vec<u32> = serde_json::from_value(reference[verdict.to_str().unwrap()].clone())?;
    let got = tok.encode(&std::fs::read_to_string(&verdict)?)?;
    assert_eq!(
        got.len(),
        5145,
        "the book counts 5,145 tokens in the-verdict"
    );
    assert_eq!(got, want, "the-verdict ids differ from tiktoken");

    let want: Vec<Vec<u32>> = serde_json::from_value(reference[spam.to_str().unwrap()].clone())?;
    let text = std::fs::read_to_string(&spam)?;
    let msgs: Vec<&str> = text
        .split('\n')
        .filter_map(|l| l.split_once('\t').map(|(_, m)| m))
        .collect();
    assert_eq!(msgs.len(), 5574);
    assert_eq!(want.len(), msgs.len());
    for (i, (m, w)) in msgs.iter().zip(&want).enumerate() {
        assert_eq!(
            &tok.encode(m)?,
            w,
            "SMS message {i} ({m:?}) differs from tiktoken"
        );
    }

    let want: Vec<u32> = serde_json::from_value(reference[edge.to_str().unwrap()].clone())?;
    let edge_text = std::fs::read_to_string(&edge)?;
    let got = tok.encode(&edge_text)?;
    assert_eq!(got, want, "Unicode edge cases differ from tiktoken");
    assert!(
        got.iter().filter(|&&i| i == END_OF_TEXT_ID).count() >= 3,
        "<|endoftext|> is a special token"
    );
    Ok(())
}

/// The book's ch02 example sentence.
#[test]
fn gpt2_encodes_book_example() -> Result<()> {
    let tok = gpt2()?;
    let ids = tok.encode(
        "Hello, do you like tea? <|endoftext|> In the sunlit terraces of someunknownPlace.",
    )?;
    assert_eq!(
        ids,
        vec![
            15496, 11, 466, 345, 588, 8887, 30, 220, 50256, 554, 262, 4252, 18250, 8812, 2114, 286,
            617, 34680, 27271, 13
        ]
    );
    assert_eq!(
        tok.encode("Hello, world. Is this-- a test?")?,
        vec![15496, 11, 995, 13, 1148, 428, 438, 257, 1332, 30]
    );
    assert_eq!(tok.vocab_size(), 50257);
    Ok(())
}

/// encode then decode is the identity on any UTF-8 text.
#[test]
fn gpt2_round_trips_utf8() -> Result<()> {
    let tok = gpt2()?;
    let edge =
        std::fs::read_to_string(common::repo().join("tests/fixtures/unicode_edge_cases.txt"))?;
    let verdict = std::fs::read_to_string(common::mirror().join("the-verdict/the-verdict.txt"))?;
    for text in [
        edge.as_str(),
        verdict.as_str(),
        "",
        " ",
        "\r\n\t",
        "a\u{0301}",
        "🤖<|endoftext|>🤖",
    ] {
        assert_eq!(tok.decode(&tok.encode(text)?)?, text);
    }
    Ok(())
}

/// A tokenizer.json written by us loads back (through the tokenizers crate) with the same ids.
#[test]
fn gpt2_tokenizer_json_round_trips() -> Result<()> {
    let tok = gpt2()?;
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("tokenizer.json");
    tok.save(&path)?;
    let loaded = BpeTokenizer::load(path.to_str().unwrap())?;
    let text =
        std::fs::read_to_string(common::repo().join("tests/fixtures/unicode_edge_cases.txt"))?;
    assert_eq!(loaded.encode(&text)?, tok.encode(&text)?);
    Ok(())
}

/// Book §2.3–2.4: the simple tokenizers on the-verdict's vocabulary.
#[test]
fn simple_tokenizers_follow_the_book() -> Result<()> {
    let verdict = std::fs::read_to_string(common::mirror().join("the-verdict/the-verdict.txt"))?;
    let vocab = build_simple_vocab(&verdict, false);
    assert_eq!(vocab.len(), 1130, "the book's vocabulary size");
    let v1 = SimpleTokenizerV1::new(vocab);
    let text = "\"It's the last he painted, you know,\" Mrs. Gisburn said with pardonable pride.";
    let ids = v1.encode(text)?;
    assert_eq!(
        ids,
        vec![
            1, 56, 2, 850, 988, 602, 533, 746, 5, 1126, 596, 5, 1, 67, 7, 38, 851, 1108, 754, 793,
            7
        ]
    );
    assert_eq!(
        v1.decode(&ids)?,
        "\" It' s the last he painted, you know,\" Mrs. Gisburn said with pardonable pride."
    );
    assert!(
        v1.encode("Hello, do you like tea?").is_err(),
        "V1 has no <|unk|>"
    );

    let vocab = build_simple_vocab(&verdict, true);
    assert_eq!(vocab.len(), 1132);
    let v2 = SimpleTokenizerV2::new(vocab)?;
    let text = "Hello, do you like tea? <|endoftext|> In the sunlit terraces of the palace.";
    let ids = v2.encode(text);
    assert_eq!(
        ids,
        vec![1131, 5, 355, 1126, 628, 975, 10, 1130, 55, 988, 956, 984, 722, 988, 1131, 7]
    );
    assert_eq!(
        v2.decode(&ids)?,
        "<|unk|>, do you like tea? <|endoftext|> In the sunlit terraces of the <|unk|>."
    );
    Ok(())
}

/// A BPE vocabulary trained on the-verdict has the asked size, keeps <|endoftext|> special, and
/// round-trips text (including bytes never seen in training).
#[test]
fn trained_bpe_round_trips_and_saves() -> Result<()> {
    let verdict = common::mirror().join("the-verdict/the-verdict.txt");
    let tok = train_bpe(std::slice::from_ref(&verdict), 500, 2)?;
    assert_eq!(tok.vocab_size(), 500);
    let text = std::fs::read_to_string(&verdict)?;
    let ids = tok.encode(&text)?;
    assert!(
        ids.len() < text.len() / 2,
        "merges compress the training text ({} ids)",
        ids.len()
    );
    assert_eq!(tok.decode(&ids)?, text);
    let unseen = "naïve 🤖 大型<|endoftext|>";
    assert_eq!(tok.decode(&tok.encode(unseen)?)?, unseen);
    assert_eq!(tok.encode("<|endoftext|>")?.len(), 1);
    let dir = tempfile::tempdir()?;
    tok.save(&dir.path().join("tok.json"))?;
    let back = BpeTokenizer::from_tokenizer_json(&dir.path().join("tok.json"))?;
    assert_eq!(back.encode(&text)?, ids);
    Ok(())
}

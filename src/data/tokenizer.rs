//! Tokenizers (book ch02 §2.2–2.5).
//!
//! * [`SimpleTokenizerV1`] / [`SimpleTokenizerV2`]: the book's teaching tokenizers (regex split,
//!   vocabulary from a corpus, V2 adds `<|unk|>` and `<|endoftext|>`).
//! * [`BpeTokenizer`]: GPT-2 byte-level BPE on the Hugging Face `tokenizers` crate, built from
//!   OpenAI's `encoder.json` + `vocab.bpe` or from a `tokenizer.json`; `<|endoftext|>` (50256) is an
//!   allowed special token, as with tiktoken's `allowed_special={"<|endoftext|>"}`.
//! * [`train_bpe`]: a byte-level BPE vocabulary trained on your own corpus.
use crate::error::LlmError;
use anyhow::{Context, Result};
use regex::Regex;
use std::collections::{BTreeSet, HashMap};
use std::path::Path;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{BpeTrainer, BPE};
use tokenizers::models::TrainerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{AddedToken, Tokenizer};

/// The GPT-2 end-of-text token and its id.
pub const END_OF_TEXT: &str = "<|endoftext|>";
pub const END_OF_TEXT_ID: u32 = 50256;
/// Llama 3's pre-tokenizer split (`tokenizer.ggml.pre = llama-bpe`).
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// The book's unknown-word token (SimpleTokenizerV2).
pub const UNK: &str = "<|unk|>";

/// The book's split pattern: punctuation, `--` and whitespace are their own pieces.
fn split_pieces(text: &str) -> Vec<&str> {
    // Same pattern as the book: r'([,.:;?_!"()\']|--|\s)'; empty and blank pieces are dropped.
    static_regex(r#"([,.:;?_!"()']|--|\s)"#)
        .split_inclusive_keep(text)
        .into_iter()
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect()
}

fn static_regex(pattern: &str) -> Regex {
    Regex::new(pattern).expect("hard-coded regex is valid")
}

/// `re.split` with a capture group: the separators are kept as pieces of their own.
trait SplitKeep {
    fn split_inclusive_keep<'t>(&self, text: &'t str) -> Vec<&'t str>;
}

impl SplitKeep for Regex {
    fn split_inclusive_keep<'t>(&self, text: &'t str) -> Vec<&'t str> {
        let mut out = Vec::new();
        let mut last = 0;
        for m in self.find_iter(text) {
            out.push(&text[last..m.start()]);
            out.push(m.as_str());
            last = m.end();
        }
        out.push(&text[last..]);
        out
    }
}

/// Builds the book's vocabulary: sorted unique pieces of a corpus, ids in sorted order.
/// With `extended`, `<|endoftext|>` and `<|unk|>` are appended (book §2.4).
pub fn build_simple_vocab(text: &str, extended: bool) -> HashMap<String, u32> {
    let mut words: BTreeSet<String> = split_pieces(text).into_iter().map(String::from).collect();
    let mut vocab: Vec<String> = std::mem::take(&mut words).into_iter().collect();
    if extended {
        vocab.push(END_OF_TEXT.to_string());
        vocab.push(UNK.to_string());
    }
    vocab
        .into_iter()
        .enumerate()
        .map(|(i, w)| (w, i as u32))
        .collect()
}

/// Decoding rule shared by V1 and V2: join with spaces, then remove the space before punctuation.
fn simple_decode(pieces: Vec<&str>) -> String {
    let joined = pieces.join(" ");
    static_regex(r#"\s+([,.?!"()'])"#)
        .replace_all(&joined, "$1")
        .into_owned()
}

/// The book's `SimpleTokenizerV1`: fails on words not in the vocabulary.
pub struct SimpleTokenizerV1 {
    str_to_int: HashMap<String, u32>,
    int_to_str: HashMap<u32, String>,
}

impl SimpleTokenizerV1 {
    pub fn new(vocab: HashMap<String, u32>) -> Self {
        let int_to_str = vocab.iter().map(|(s, &i)| (i, s.clone())).collect();
        Self {
            str_to_int: vocab,
            int_to_str,
        }
    }

    pub fn encode(&self, text: &str) -> Result<Vec<u32>, LlmError> {
        split_pieces(text)
            .into_iter()
            .map(|p| {
                self.str_to_int.get(p).copied().ok_or_else(|| {
                    LlmError::Usage(format!(
                        "'{p}' is not in the vocabulary (SimpleTokenizerV1 has no <|unk|>; use V2)"
                    ))
                })
            })
            .collect()
    }

    pub fn decode(&self, ids: &[u32]) -> Result<String, LlmError> {
        let pieces = ids
            .iter()
            .map(|i| {
                self.int_to_str.get(i).map(String::as_str).ok_or_else(|| {
                    LlmError::Usage(format!("token id {i} is not in the vocabulary"))
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(simple_decode(pieces))
    }
}

/// The book's `SimpleTokenizerV2`: unknown words become `<|unk|>`.
pub struct SimpleTokenizerV2 {
    inner: SimpleTokenizerV1,
    unk: u32,
}

impl SimpleTokenizerV2 {
    pub fn new(vocab: HashMap<String, u32>) -> Result<Self, LlmError> {
        let unk = *vocab.get(UNK).ok_or_else(|| {
            LlmError::Usage("SimpleTokenizerV2 needs <|unk|> in its vocabulary".into())
        })?;
        Ok(Self {
            inner: SimpleTokenizerV1::new(vocab),
            unk,
        })
    }

    pub fn encode(&self, text: &str) -> Vec<u32> {
        split_pieces(text)
            .into_iter()
            .map(|p| self.inner.str_to_int.get(p).copied().unwrap_or(self.unk))
            .collect()
    }

    pub fn decode(&self, ids: &[u32]) -> Result<String, LlmError> {
        self.inner.decode(ids)
    }
}

/// Byte-level BPE tokenizer (GPT-2 and custom-trained vocabularies).
#[derive(Debug, Clone)]
pub struct BpeTokenizer {
    inner: Tokenizer,
}

impl BpeTokenizer {
    /// GPT-2's tokenizer from OpenAI's `encoder.json` (token → id) and `vocab.bpe` (merges).
    pub fn from_gpt2_files(encoder_json: &Path, vocab_bpe: &Path) -> Result<Self> {
        for p in [encoder_json, vocab_bpe] {
            if !p.is_file() {
                return Err(LlmError::Io {
                    path: p.to_path_buf(),
                    source: std::io::Error::new(std::io::ErrorKind::NotFound, "file not found"),
                }
                .into());
            }
        }
        let bpe = BPE::from_file(
            &encoder_json.to_string_lossy(),
            &vocab_bpe.to_string_lossy(),
        )
        .build()
        .map_err(|e| anyhow::anyhow!("{e}"))
        .with_context(|| {
            format!(
                "building GPT-2 BPE from {} and {}",
                encoder_json.display(),
                vocab_bpe.display()
            )
        })?;
        let mut tok = Tokenizer::new(bpe);
        tok.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
        tok.with_decoder(Some(ByteLevelDecoder::default()));
        tok.add_special_tokens(&[AddedToken::from(END_OF_TEXT, true)]);
        Ok(Self { inner: tok })
    }

    /// The GPT-2 tokenizer from a folder holding `encoder.json` and `vocab.bpe`.
    pub fn gpt2_from_dir(dir: &Path) -> Result<Self> {
        Self::from_gpt2_files(&dir.join("encoder.json"), &dir.join("vocab.bpe"))
    }

    /// The GPT-2 tokenizer from the data registry (mirror, cache or download).
    pub fn gpt2() -> Result<Self> {
        let dir = crate::data::registry::Registry::builtin()?.fetch("gpt2-bpe")?;
        Self::gpt2_from_dir(&dir)
    }

    /// A Hugging Face `tokenizer.json`.
    pub fn from_tokenizer_json(path: &Path) -> Result<Self> {
        if !path.is_file() {
            return Err(LlmError::Io {
                path: path.to_path_buf(),
                source: std::io::Error::new(std::io::ErrorKind::NotFound, "file not found"),
            }
            .into());
        }
        let inner = Tokenizer::from_file(path)
            .map_err(|e| anyhow::anyhow!("{e}"))
            .with_context(|| format!("reading tokenizer {}", path.display()))?;
        Ok(Self { inner })
    }

    /// The tokenizer stored in a GGUF file's metadata: `tokenizer.ggml.model` `gpt2` (byte-level
    /// BPE) with its tokens, merges and token types (control and user-defined tokens become
    /// special tokens), and the pre-tokenizer named by `tokenizer.ggml.pre` (as llama.cpp reads
    /// it: `gpt2`/`default`, `smollm` (digits split one by one), `llama-bpe` (Llama 3)).
    pub fn from_gguf(g: &crate::weights::gguf::GgufFile) -> Result<Self> {
        let bad = |message: String| LlmError::BadFile {
            path: g.path.clone(),
            message,
        };
        let model = g.get_str("tokenizer.ggml.model")?;
        if model != "gpt2" {
            return Err(bad(format!(
                "tokenizer.ggml.model = '{model}': llmlab reads byte-level BPE ('gpt2') tokenizers; SentencePiece ('llama') is not supported"
            ))
            .into());
        }
        let tokens = g.get_strings("tokenizer.ggml.tokens")?;
        let merges = g.get_strings("tokenizer.ggml.merges")?;
        let types: Vec<i64> = match g
            .get("tokenizer.ggml.token_type")
            .and_then(|v| v.as_array())
        {
            Some(a) => a.iter().map(|v| v.as_i64().unwrap_or(1)).collect(),
            None => vec![1; tokens.len()],
        };
        let pre = g
            .get("tokenizer.ggml.pre")
            .and_then(|v| v.as_str())
            .unwrap_or("default");
        let byte_level = |use_regex: bool| serde_json::json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": use_regex});
        let (pre_tokenizer, ignore_merges) = match pre {
            "default" | "gpt2" | "gpt-2" => (byte_level(true), false),
            "smollm" => (
                serde_json::json!({"type": "Sequence", "pretokenizers": [
                    {"type": "Digits", "individual_digits": true}, byte_level(true)]}),
                false,
            ),
            "llama-bpe" | "llama3" => (
                serde_json::json!({"type": "Sequence", "pretokenizers": [
                    {"type": "Split", "pattern": {"Regex": LLAMA3_SPLIT}, "behavior": "Isolated", "invert": false},
                    byte_level(false)]}),
                true,
            ),
            other => {
                return Err(bad(format!(
                    "tokenizer.ggml.pre = '{other}' is not supported; expected one of: default, gpt2, smollm, llama-bpe"
                ))
                .into())
            }
        };
        let vocab: serde_json::Map<String, serde_json::Value> = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.to_string(), serde_json::Value::from(i)))
            .collect();
        // 3 = control, 4 = user-defined (llama.cpp's token types): matched before BPE.
        let added: Vec<serde_json::Value> = tokens
            .iter()
            .zip(&types)
            .enumerate()
            .filter(|(_, (_, &t))| t == 3 || t == 4)
            .map(|(i, (tok, &t))| {
                serde_json::json!({"id": i, "content": tok, "single_word": false, "lstrip": false,
                    "rstrip": false, "normalized": false, "special": t == 3})
            })
            .collect();
        let json = serde_json::json!({
            "version": "1.0", "truncation": null, "padding": null,
            "added_tokens": added, "normalizer": null, "pre_tokenizer": pre_tokenizer,
            "post_processor": null,
            "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
            "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
                "ignore_merges": ignore_merges, "vocab": vocab, "merges": merges},
        });
        let inner: Tokenizer = json.to_string().parse().map_err(|e| {
            bad(format!(
                "its tokenizer metadata does not form a valid BPE tokenizer: {e}"
            ))
        })?;
        Ok(Self { inner })
    }

    /// Resolves a tokenizer spec: `gpt2` (the registry's GPT-2 files), a folder with
    /// `encoder.json` + `vocab.bpe` or `tokenizer.json`, or a `tokenizer.json` path.
    pub fn load(spec: &str) -> Result<Self> {
        if spec == "gpt2" {
            return Self::gpt2();
        }
        let p = Path::new(spec);
        if p.is_dir() {
            if p.join("tokenizer.json").is_file() {
                return Self::from_tokenizer_json(&p.join("tokenizer.json"));
            }
            return Self::gpt2_from_dir(p);
        }
        if p.is_file() {
            return Self::from_tokenizer_json(p);
        }
        Err(LlmError::Unknown {
            what: "tokenizer",
            name: spec.into(),
            expected: vec![
                "gpt2".into(),
                "a folder with encoder.json + vocab.bpe".into(),
                "a tokenizer.json file".into(),
            ],
        }
        .into())
    }

    /// Token ids of `text`; special tokens written in the text (`<|endoftext|>`) are recognised.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| anyhow::anyhow!("tokenizer failed: {e}"))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Text of `ids` (special tokens included).
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner
            .decode(ids, false)
            .map_err(|e| anyhow::anyhow!("decoding failed: {e}"))
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// Saves as a Hugging Face `tokenizer.json` (atomically).
    pub fn save(&self, path: &Path) -> Result<()> {
        let json = self
            .inner
            .to_string(true)
            .map_err(|e| anyhow::anyhow!("serializing tokenizer: {e}"))?;
        crate::error::write_atomic(path, json.as_bytes())?;
        Ok(())
    }
}

/// Trains a byte-level BPE vocabulary on text files (`tokenizers`' BPE trainer); the result has
/// `<|endoftext|>` as a special token and decodes every byte sequence.
pub fn train_bpe(
    files: &[std::path::PathBuf],
    vocab_size: usize,
    min_frequency: u64,
) -> Result<BpeTokenizer> {
    for f in files {
        crate::error::read_text(f)?; // clear error for missing / non-UTF-8 input
    }
    let mut tok = Tokenizer::new(BPE::default());
    tok.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
    tok.with_decoder(Some(ByteLevelDecoder::default()));
    let trainer = BpeTrainer::builder()
        .vocab_size(vocab_size)
        .min_frequency(min_frequency)
        .show_progress(false)
        .special_tokens(vec![AddedToken::from(END_OF_TEXT, true)])
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .build();
    let mut trainer: TrainerWrapper = trainer.into();
    let names = files
        .iter()
        .map(|f| f.to_string_lossy().into_owned())
        .collect();
    tok.train_from_files(&mut trainer, names)
        .map_err(|e| anyhow::anyhow!("BPE training failed: {e}"))?;
    Ok(BpeTokenizer { inner: tok })
}

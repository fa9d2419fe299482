//! Resolving a model spec to weights: a preset (fresh weights), an llmlab model folder or run
//! folder (`model.safetensors` + `model.yaml`), a checkpoint file, or `gpt2:DIR` (Hugging Face).
use crate::error::LlmError;
use crate::models::gpt::{GptConfig, GptModel};
use anyhow::Result;
use std::path::{Path, PathBuf};
use tch::nn::VarStore;
use tch::Device;

/// File names of an llmlab model folder.
pub const WEIGHTS_FILE: &str = "model.safetensors";
pub const CONFIG_FILE: &str = "model.yaml";

/// Where a model's weights come from.
#[derive(Debug, Clone, PartialEq)]
pub enum ModelSource {
    /// A built-in preset or config YAML, randomly initialised.
    Fresh(String),
    /// An llmlab folder with `model.safetensors` + `model.yaml` (a run, a checkpoint).
    Folder(PathBuf),
    /// A Hugging Face GPT-2 folder (`config.json` + `model.safetensors`).
    HfGpt2(PathBuf),
}

impl ModelSource {
    /// Parses `gpt2:DIR`, a folder, a `model.safetensors` path, or a preset/config name.
    pub fn parse(spec: &str) -> Result<Self> {
        if let Some(dir) = spec.strip_prefix("gpt2:") {
            return Ok(Self::HfGpt2(PathBuf::from(dir)));
        }
        let p = Path::new(spec);
        if p.is_dir() {
            if p.join(WEIGHTS_FILE).is_file() {
                return Ok(Self::Folder(p.to_path_buf()));
            }
            if p.join("config.json").is_file() {
                return Ok(Self::HfGpt2(p.to_path_buf()));
            }
            return Err(LlmError::Io {
                path: p.join(WEIGHTS_FILE),
                source: std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "the folder has neither model.safetensors + model.yaml (llmlab) nor config.json (Hugging Face)",
                ),
            }
            .into());
        }
        if p.is_file() && spec.ends_with(".safetensors") {
            let dir = p
                .parent()
                .map(Path::to_path_buf)
                .unwrap_or_else(|| PathBuf::from("."));
            return Ok(Self::Folder(dir));
        }
        if p.is_file() || GptConfig::preset_names().iter().any(|n| n == spec) {
            return Ok(Self::Fresh(spec.to_string()));
        }
        Err(LlmError::Unknown {
            what: "model",
            name: spec.into(),
            expected: GptConfig::preset_names()
                .into_iter()
                .chain([
                    "a run or model folder".into(),
                    "a .safetensors checkpoint".into(),
                    "gpt2:DIR".into(),
                ])
                .collect(),
        }
        .into())
    }

    /// The model's config (without loading weights).
    pub fn config(&self) -> Result<GptConfig> {
        match self {
            Self::Fresh(spec) => GptConfig::load(spec),
            Self::Folder(dir) => {
                let path = dir.join(CONFIG_FILE);
                let text = crate::error::read_text(&path)?;
                GptConfig::from_yaml(&text, &path.display().to_string())
            }
            Self::HfGpt2(dir) => crate::weights::gpt2::hf_config(dir),
        }
    }

    /// Builds the model on `device` with `cfg` (normally [`config`](Self::config), possibly
    /// with dropout changed) and fills in the weights.
    pub fn load_with(&self, cfg: &GptConfig, device: Device) -> Result<(VarStore, GptModel)> {
        let vs = VarStore::new(device);
        let model = GptModel::new(&vs.root(), cfg);
        match self {
            Self::Fresh(_) => {}
            Self::Folder(dir) => crate::weights::load_gpt_state_dict(&vs, &dir.join(WEIGHTS_FILE))?,
            Self::HfGpt2(dir) => crate::weights::gpt2::load_hf_gpt2(&vs, dir)?,
        }
        Ok((vs, model))
    }

    pub fn load(&self, device: Device) -> Result<(VarStore, GptModel)> {
        self.load_with(&self.config()?, device)
    }
}

/// Writes an llmlab model folder: `model.safetensors` + `model.yaml`, each atomically.
pub fn save_model_folder(vs: &VarStore, cfg: &GptConfig, dir: &Path) -> Result<()> {
    crate::weights::save_safetensors(vs, &dir.join(WEIGHTS_FILE))?;
    crate::error::write_atomic(
        &dir.join(CONFIG_FILE),
        serde_yaml::to_string(cfg)?.as_bytes(),
    )?;
    Ok(())
}

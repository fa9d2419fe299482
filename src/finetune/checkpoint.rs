//! Fine-tuning checkpoints: the trained tensors with their AdamW moments and the loop's
//! position, written as a folder under a temp name and renamed over `checkpoints/last` (the one
//! it replaces is kept as `checkpoints/previous`). Format 2 (this one) records its format
//! version in `state.json` and the sha256 of its files in `manifest.json`
//! ([`crate::train::checkpoint::write_manifest`], as pretraining's); a resume that finds `last`
//! unreadable or not matching its manifest says so and resumes from `previous`. Format 1
//! folders (before versions: `state.json` holds `[state, step]`, no manifest) still resume.
use crate::error::{read_text, write_atomic, LlmError};
use crate::train::checkpoint::{
    newest_usable, verify_manifest, write_manifest, FORMAT_VERSION, READS_FORMATS,
};
use crate::train::optim::AdamW;
use anyhow::Result;
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::Path;
use tch::Tensor;

const TENSORS: &str = "trainable.safetensors";
const STATE: &str = "state.json";

/// Maps an I/O error to [`LlmError::Io`] naming `path`.
pub use crate::error::io_at as io;

/// Saves the trained tensors, the optimizer moments and `state` as `checkpoints/last`; the
/// checkpoint it replaces becomes `checkpoints/previous`.
pub fn save<S: Serialize>(
    run_dir: &Path,
    trained: &[(String, Tensor)],
    opt: &AdamW,
    state: &S,
) -> Result<()> {
    let ck = run_dir.join("checkpoints");
    std::fs::create_dir_all(&ck).map_err(io(&ck))?;
    let tmp = ck.join(".last.tmp");
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(io(&tmp))?;
    let mut named: Vec<(String, Tensor)> = crate::weights::to_cpu(trained)
        .into_iter()
        .map(|(n, t)| (format!("param.{n}"), t))
        .collect();
    named.extend(opt.state_tensors());
    Tensor::write_safetensors(&named, tmp.join(TENSORS))?;
    let doc = serde_json::json!({"format": FORMAT_VERSION, "state": state, "step": opt.step});
    write_atomic(&tmp.join(STATE), doc.to_string().as_bytes())?;
    write_manifest(&tmp)?;
    let (last, previous) = (ck.join("last"), ck.join("previous"));
    if last.exists() {
        let _ = std::fs::remove_dir_all(&previous);
        std::fs::rename(&last, &previous).map_err(io(&last))?;
    }
    std::fs::rename(&tmp, &last).map_err(io(&last))?;
    Ok(())
}

/// Restores the newest usable checkpoint (`last`, else `previous`) into `trained` and `opt`;
/// `None` when there is none. A checkpoint that fails (a missing or mismatching file, a tensor
/// of another shape) is reported through `log` and the older one tried; when neither loads, the
/// newest one's error is returned.
pub fn load<S: DeserializeOwned>(
    run_dir: &Path,
    trained: &[(String, Tensor)],
    opt: &mut AdamW,
    log: &mut dyn FnMut(&str),
) -> Result<Option<S>> {
    let ck = run_dir.join("checkpoints");
    let dirs: Vec<_> = [ck.join("last"), ck.join("previous")]
        .into_iter()
        .filter(|d| d.is_dir())
        .collect();
    newest_usable(&dirs, log, |dir| load_one(dir, trained, opt))
}

fn load_one<S: DeserializeOwned>(
    dir: &Path,
    trained: &[(String, Tensor)],
    opt: &mut AdamW,
) -> Result<S> {
    let bad = |m: String| LlmError::Checkpoint {
        path: dir.to_path_buf(),
        message: m,
    };
    verify_manifest(dir)?;
    let doc: serde_json::Value = serde_json::from_str(&read_text(&dir.join(STATE))?)
        .map_err(|e| bad(format!("unreadable {STATE} ({e})")))?;
    let (state, step): (S, i64) = match doc {
        // Format 1: `[state, step]`.
        serde_json::Value::Array(_) => {
            serde_json::from_value(doc).map_err(|e| bad(e.to_string()))?
        }
        serde_json::Value::Object(mut m) => {
            let format = m.get("format").and_then(|f| f.as_u64()).unwrap_or(0) as u32;
            if !READS_FORMATS.contains(&format) {
                return Err(bad(format!(
                    "format version {format} (this llmlab reads {} to {})",
                    READS_FORMATS.start(),
                    READS_FORMATS.end()
                ))
                .into());
            }
            let state = serde_json::from_value(m.remove("state").unwrap_or_default())
                .map_err(|e| bad(e.to_string()))?;
            let step = m.get("step").and_then(|s| s.as_i64()).unwrap_or(0);
            (state, step)
        }
        _ => return Err(bad(format!("{STATE} is not a checkpoint state")).into()),
    };
    let tensors: BTreeMap<String, Tensor> = Tensor::read_safetensors(dir.join(TENSORS))
        .map_err(|e| bad(e.to_string()))?
        .into_iter()
        .collect();
    {
        let _g = tch::no_grad_guard();
        for (name, t) in trained {
            let src = tensors
                .get(&format!("param.{name}"))
                .ok_or_else(|| bad(format!("missing tensor '{name}'")))?;
            crate::weights::copy_checked(t, src, name).map_err(bad)?;
        }
    }
    opt.load_state_tensors(&tensors, step).map_err(bad)?;
    Ok(state)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_newer_format_is_refused_naming_its_version() {
        let dir = std::env::temp_dir().join(format!("llmlab-ckpt-{}", std::process::id()));
        let last = dir.join("checkpoints/last");
        std::fs::create_dir_all(&last).expect("temp folder");
        std::fs::write(
            last.join(STATE),
            r#"{"format": 99, "state": {}, "step": 1}"#,
        )
        .expect("state.json");
        let mut opt = AdamW::over(&[], 0.0);
        let mut logs: Vec<String> = Vec::new();
        let err = load::<serde_json::Value>(&dir, &[], &mut opt, &mut |m| logs.push(m.into()))
            .expect_err("format 99 is not read");
        let _ = std::fs::remove_dir_all(&dir);
        let msg = format!("{err:#}");
        assert!(
            msg.contains("format version 99 (this llmlab reads 1 to 2)")
                && msg.contains("pass --restart"),
            "{msg}"
        );
        assert_eq!(logs.len(), 1, "{logs:?}");
    }
}

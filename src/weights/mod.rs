//! Saving and loading weights as safetensors (book ch05 §5.4, done with a portable format).
//!
//! Loading is strict: every variable of the model must be in the file with the same shape, and
//! every tensor of the file must be used; the error names each offending tensor. Values are
//! copied into the existing variables, so the model keeps its dtype and device (tch's
//! `VarStore::load` would adopt the file's dtype).
pub mod gguf;
pub mod gpt2;
pub mod hub;
pub mod llama;

use crate::error::LlmError;
use anyhow::Result;
use std::collections::BTreeMap;
use std::path::Path;
use tch::{nn::VarStore, Tensor};

/// Reads every tensor of a safetensors file (on the CPU).
pub fn read_safetensors(path: &Path) -> Result<BTreeMap<String, Tensor>> {
    if !path.is_file() {
        return Err(LlmError::Io {
            path: path.to_path_buf(),
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "weights file not found"),
        }
        .into());
    }
    let tensors = Tensor::read_safetensors(path).map_err(|e| LlmError::Checkpoint {
        path: path.to_path_buf(),
        message: format!("not a readable safetensors file ({e})"),
    })?;
    Ok(tensors.into_iter().collect())
}

/// Copies `tensors` into the variables of `vs`, by name, strictly; file tensors for which
/// `ignored` is true (non-persistent buffers such as the book's `att.mask`) are skipped.
pub fn load_into(
    vs: &VarStore,
    tensors: &BTreeMap<String, Tensor>,
    origin: &Path,
    ignored: impl Fn(&str) -> bool,
) -> Result<()> {
    let vars = vs.variables();
    let mut problems = Vec::new();
    for (name, var) in &vars {
        match tensors.get(name) {
            None => problems.push(format!("missing tensor '{name}' (shape {:?})", var.size())),
            Some(t) if t.size() != var.size() => problems.push(format!(
                "tensor '{name}' has shape {:?}, the model expects {:?}",
                t.size(),
                var.size()
            )),
            Some(_) => {}
        }
    }
    for name in tensors.keys() {
        if !vars.contains_key(name) && !ignored(name) {
            problems.push(format!(
                "unexpected tensor '{name}' (not a variable of this model)"
            ));
        }
    }
    if !problems.is_empty() {
        problems.sort();
        return Err(LlmError::Checkpoint {
            path: origin.to_path_buf(),
            message: format!("does not match the model: {}", problems.join("; ")),
        }
        .into());
    }
    tch::no_grad(|| {
        for (name, var) in &vars {
            let mut var = var.shallow_clone();
            var.copy_(&tensors[name]);
        }
    });
    Ok(())
}

/// Loads a safetensors file into `vs` (strict, keeps `vs`'s dtype and device).
pub fn load_safetensors(vs: &VarStore, path: &Path) -> Result<()> {
    let tensors = read_safetensors(path)?;
    load_into(vs, &tensors, path, |_| false)
}

/// Loads a GPT state dict written by the book's code or by llmlab: the book's causal-mask
/// buffers (`trf_blocks.{i}.att.mask`) are recomputed here, so they are ignored.
pub fn load_gpt_state_dict(vs: &VarStore, path: &Path) -> Result<()> {
    let tensors = read_safetensors(path)?;
    load_into(vs, &tensors, path, |k| k.ends_with(".att.mask"))
}

/// Writes every variable of `vs` as safetensors, atomically (temp file + rename).
pub fn save_safetensors(vs: &VarStore, path: &Path) -> Result<()> {
    let vars = vs.variables();
    let mut named: Vec<(String, Tensor)> = vars
        .into_iter()
        .map(|(k, v)| (k, v.detach().to_device(tch::Device::Cpu).contiguous()))
        .collect();
    named.sort_by(|a, b| a.0.cmp(&b.0));
    save_tensors(&named, path)
}

/// Detached CPU copies of named tensors, for saving.
pub fn to_cpu(named: &[(String, Tensor)]) -> Vec<(String, Tensor)> {
    named
        .iter()
        .map(|(n, t)| (n.clone(), t.detach().to_device(tch::Device::Cpu)))
        .collect()
}

/// Writes named tensors as safetensors, atomically.
pub fn save_tensors(named: &[(String, Tensor)], path: &Path) -> Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|source| LlmError::Io {
            path: dir.to_path_buf(),
            source,
        })?;
    }
    let tmp = crate::error::temp_path(path);
    Tensor::write_safetensors(named, &tmp).map_err(|e| LlmError::Checkpoint {
        path: path.to_path_buf(),
        message: format!("writing failed: {e}"),
    })?;
    std::fs::rename(&tmp, path).map_err(|source| LlmError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(())
}

/// Copies the tensors of a saved fine-tuning result (`saved_model.safetensors`) into the
/// variables of the same names in `vs`; a tensor that is not a variable of the model, or has
/// another shape, is an error naming the file. Returns how many tensors were copied.
pub fn load_tensors_into(vs: &tch::nn::VarStore, file: &Path, base_model: &str) -> Result<usize> {
    let bad = |message: String| LlmError::BadFile {
        path: file.to_path_buf(),
        message,
    };
    let saved = Tensor::read_safetensors(file).map_err(|e| bad(e.to_string()))?;
    let vars = vs.variables();
    let _g = tch::no_grad_guard();
    for (name, t) in &saved {
        let dst = vars.get(name).ok_or_else(|| {
            bad(format!(
                "tensor '{name}' is not a parameter of {base_model}"
            ))
        })?;
        copy_checked(dst, t, name).map_err(bad)?;
    }
    Ok(saved.len())
}

/// Copies `src` into the variable `dst` (no gradient tracking); a shape mismatch is an error
/// naming the tensor.
pub fn copy_checked(dst: &Tensor, src: &Tensor, name: &str) -> Result<(), String> {
    if dst.size() != src.size() {
        return Err(format!(
            "tensor '{name}' has shape {:?}, the model's has {:?}",
            src.size(),
            dst.size()
        ));
    }
    let _g = tch::no_grad_guard();
    dst.shallow_clone().copy_(src);
    Ok(())
}

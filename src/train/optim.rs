//! AdamW with decoupled weight decay (Loshchilov & Hutter), written with plain tensor ops so its
//! moments are ordinary tensors that a checkpoint can save and restore (tch's optimizers can't
//! export their state: tch-rs issue #360). The update follows `torch.optim.AdamW`
//! (single-tensor path) step for step:
//!
//! ```text
//! p ← p·(1 − lr·wd);  m ← lerp(m, g, 1 − β1);  v ← β2·v + (1 − β2)·g²
//! p ← p − (lr / (1 − β1ᵗ)) · m / (√v / √(1 − β2ᵗ) + ε)
//! ```
//!
//! [`AdamW::step_fused`] does the same update with libtorch's fused kernel
//! (`torch.optim.AdamW(fused=True)`, through [`crate::shim`]) on the same moment tensors. The
//! step count stays the `i64` [`AdamW::step`]; the kernel's per-parameter float step tensors are
//! a cache rewritten from it before every fused update and never saved, so checkpoints are the
//! same whichever path wrote them and a run may switch paths on resume.
use crate::error::LlmError;
use crate::shim::{fused_adamw_step, AdamWHyper, FusedAdamWTensors};
use std::collections::BTreeMap;
use tch::{Kind, Tensor};

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        // torch.optim.AdamW defaults, with the book's weight decay.
        Self {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.1,
        }
    }
}

/// AdamW over named trainable tensors.
#[derive(Debug)]
pub struct AdamW {
    pub cfg: AdamWConfig,
    params: Vec<(String, Tensor)>,
    exp_avg: Vec<Tensor>,
    exp_avg_sq: Vec<Tensor>,
    /// Float scalars on each parameter's device for the fused kernel (created on first use).
    state_steps: Vec<Tensor>,
    /// Number of optimizer steps taken (t in the bias corrections).
    pub step: i64,
}

impl AdamW {
    /// torch.optim.AdamW's defaults with `weight_decay` (the fine-tuning tasks' optimizer) over
    /// the trained tensors (shared, not copied).
    pub fn over(trained: &[(String, Tensor)], weight_decay: f64) -> Self {
        Self::new(
            trained
                .iter()
                .map(|(n, t)| (n.clone(), t.shallow_clone()))
                .collect(),
            AdamWConfig {
                weight_decay,
                ..AdamWConfig::default()
            },
        )
    }

    /// Moments are allocated for the given parameters only: frozen tensors get no state.
    pub fn new(params: Vec<(String, Tensor)>, cfg: AdamWConfig) -> Self {
        let exp_avg = params.iter().map(|(_, p)| p.zeros_like()).collect();
        let exp_avg_sq = params.iter().map(|(_, p)| p.zeros_like()).collect();
        Self {
            cfg,
            params,
            exp_avg,
            exp_avg_sq,
            state_steps: Vec::new(),
            step: 0,
        }
    }

    pub fn params(&self) -> &[(String, Tensor)] {
        &self.params
    }

    /// Sets every gradient to zero (drops them).
    pub fn zero_grad(&mut self) {
        for (_, p) in &mut self.params {
            p.zero_grad();
        }
    }

    /// Global L2 norm of the gradients; when `max_norm` is given and exceeded, scales them to it
    /// (`torch.nn.utils.clip_grad_norm_`). Returns the norm before clipping.
    pub fn clip_grad_norm(&mut self, max_norm: Option<f64>) -> f64 {
        let _g = tch::no_grad_guard();
        let grads: Vec<Tensor> = self
            .params
            .iter()
            .map(|(_, p)| p.grad())
            .filter(Tensor::defined)
            .collect();
        if grads.is_empty() {
            return 0.0;
        }
        let norms: Vec<Tensor> = grads
            .iter()
            .map(|g| g.norm().to_kind(tch::Kind::Float))
            .collect();
        let total = Tensor::stack(&norms, 0).norm().double_value(&[]);
        if let Some(max) = max_norm {
            let coef = max / (total + 1e-6);
            if coef < 1.0 {
                for g in &grads {
                    let _ = g.shallow_clone().g_mul_scalar_(coef);
                }
            }
        }
        total
    }

    /// One update with learning rate `lr`.
    pub fn step(&mut self, lr: f64) {
        let _g = tch::no_grad_guard();
        self.step += 1;
        let AdamWConfig {
            beta1,
            beta2,
            eps,
            weight_decay,
        } = self.cfg;
        let t = self.step as i32;
        let bias_correction1 = 1.0 - beta1.powi(t);
        let bias_correction2_sqrt = (1.0 - beta2.powi(t)).sqrt();
        let step_size = lr / bias_correction1;
        for (i, (_, p)) in self.params.iter().enumerate() {
            let grad = p.grad();
            if !grad.defined() {
                continue;
            }
            let mut p = p.shallow_clone();
            if weight_decay != 0.0 {
                let _ = p.g_mul_scalar_(1.0 - lr * weight_decay);
            }
            let _ = self.exp_avg[i].lerp_(&grad, 1.0 - beta1);
            let _ = self.exp_avg_sq[i].g_mul_scalar_(beta2);
            let _ = self.exp_avg_sq[i].g_add_(&(&grad * &grad * (1.0 - beta2)));
            let denom = self.exp_avg_sq[i].sqrt() / bias_correction2_sqrt + eps;
            let _ = p.g_sub_(&(&self.exp_avg[i] / denom * step_size));
        }
    }

    /// One update with learning rate `lr`: libtorch's fused kernel when `fused`, else
    /// [`step`](Self::step). The training loops resolve `train.fused_adamw` into `fused`.
    pub fn update(&mut self, lr: f64, fused: bool) -> Result<(), LlmError> {
        if fused {
            self.step_fused(lr)
        } else {
            self.step(lr);
            Ok(())
        }
    }

    /// The same update as [`step`](Self::step) with libtorch's fused AdamW kernel (one call for
    /// all parameters; on CUDA a few multi-tensor kernel launches instead of ~10 per parameter).
    /// Parameters without a gradient are skipped, as in `step`.
    pub fn step_fused(&mut self, lr: f64) -> Result<(), LlmError> {
        let _g = tch::no_grad_guard();
        if self.state_steps.len() != self.params.len() {
            self.state_steps = self
                .params
                .iter()
                .map(|(_, p)| Tensor::zeros([], (Kind::Float, p.device())))
                .collect();
        }
        let grads: Vec<Tensor> = self.params.iter().map(|(_, p)| p.grad()).collect();
        let with_grad: Vec<usize> = (0..grads.len()).filter(|&i| grads[i].defined()).collect();
        fn pick<'a>(v: &'a [Tensor], idx: &[usize]) -> Vec<&'a Tensor> {
            idx.iter().map(|&i| &v[i]).collect()
        }
        let params: Vec<&Tensor> = with_grad.iter().map(|&i| &self.params[i].1).collect();
        let (g, m, v, s) = (
            pick(&grads, &with_grad),
            pick(&self.exp_avg, &with_grad),
            pick(&self.exp_avg_sq, &with_grad),
            pick(&self.state_steps, &with_grad),
        );
        let AdamWConfig {
            beta1,
            beta2,
            eps,
            weight_decay,
        } = self.cfg;
        fused_adamw_step(
            &FusedAdamWTensors {
                params: &params,
                grads: &g,
                exp_avgs: &m,
                exp_avg_sqs: &v,
                state_steps: &s,
            },
            self.step + 1,
            AdamWHyper {
                lr,
                beta1,
                beta2,
                weight_decay,
                eps,
            },
        )?;
        self.step += 1;
        Ok(())
    }

    /// Moments by name (`exp_avg.<param>`, `exp_avg_sq.<param>`) for checkpoints.
    pub fn state_tensors(&self) -> Vec<(String, Tensor)> {
        let mut out = Vec::with_capacity(2 * self.params.len());
        for (i, (name, _)) in self.params.iter().enumerate() {
            out.push((
                format!("exp_avg.{name}"),
                self.exp_avg[i].to_device(tch::Device::Cpu),
            ));
            out.push((
                format!("exp_avg_sq.{name}"),
                self.exp_avg_sq[i].to_device(tch::Device::Cpu),
            ));
        }
        out
    }

    /// Restores moments saved by [`state_tensors`](Self::state_tensors); every parameter's
    /// moments must be there with its shape, else the error names the tensor.
    pub fn load_state_tensors(
        &mut self,
        t: &BTreeMap<String, Tensor>,
        step: i64,
    ) -> Result<(), String> {
        let _g = tch::no_grad_guard();
        for (i, (name, p)) in self.params.iter().enumerate() {
            for (key, dst) in [
                (format!("exp_avg.{name}"), &mut self.exp_avg[i]),
                (format!("exp_avg_sq.{name}"), &mut self.exp_avg_sq[i]),
            ] {
                let src = t
                    .get(&key)
                    .ok_or_else(|| format!("missing optimizer tensor '{key}'"))?;
                if src.size() != p.size() {
                    return Err(format!(
                        "optimizer tensor '{key}' has shape {:?}, the parameter has {:?}",
                        src.size(),
                        p.size()
                    ));
                }
                dst.copy_(src);
            }
        }
        self.step = step;
        Ok(())
    }
}

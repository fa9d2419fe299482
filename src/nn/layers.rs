//! The GPT building blocks of book ch04 §4.2–4.3: LayerNorm, GELU, FeedForward.
use super::lora::{Lora, LoraConfig};
use tch::nn::{self, Module};
use tch::Tensor;

thread_local! {
    /// Set inside [`without_init`].
    static SKIP_INIT: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `f` (building a model whose every variable is then loaded from a file) with the layers'
/// random initialisation skipped: their variables start as zeros (as transformers'
/// `no_init_weights`). Drawing SmolLM2's 135 M random values took ~0.6 s of a 2 s load.
pub fn without_init<T>(f: impl FnOnce() -> T) -> T {
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            SKIP_INIT.with(|s| s.set(self.0));
        }
    }
    let _restore = Restore(SKIP_INIT.with(|s| s.replace(true)));
    f()
}

/// `init`, or zeros inside [`without_init`].
pub fn init_or_skip(init: nn::Init) -> nn::Init {
    if SKIP_INIT.with(std::cell::Cell::get) {
        nn::Init::Const(0.0)
    } else {
        init
    }
}

/// `torch.nn.Linear` with PyTorch's initialisation: weights and bias uniform in
/// ±1/√in_dim (kaiming_uniform with a = √5). tch's own default uses the ReLU gain, √6 times wider,
/// which trains differently from the book's runs.
pub fn linear(p: nn::Path, in_dim: i64, out_dim: i64, bias: bool) -> Linear {
    let ws_init = init_or_skip(nn::Init::Kaiming {
        dist: nn::init::NormalOrUniform::Uniform,
        fan: nn::init::FanInOut::FanIn,
        non_linearity: nn::init::NonLinearity::ExplicitGain(1.0 / 3f64.sqrt()),
    });
    // tch's bias default, written out so that `without_init` reaches it too.
    let bound = 1.0 / (in_dim as f64).sqrt();
    let bs_init = Some(init_or_skip(nn::Init::Uniform {
        lo: -bound,
        up: bound,
    }));
    let path = p.clone();
    Linear {
        inner: nn::linear(
            p,
            in_dim,
            out_dim,
            nn::LinearConfig {
                ws_init,
                bs_init,
                bias,
            },
        ),
        lora: None,
        path: path.components().collect::<Vec<_>>().join("."),
    }
}

/// A linear layer (tch's `nn::Linear`, reached through `Deref`: `.ws`, `.bs`) that may carry a
/// LoRA adapter (appendix E). Without one it is exactly `x Wᵀ + b`.
#[derive(Debug)]
pub struct Linear {
    pub inner: nn::Linear,
    pub lora: Option<Lora>,
    /// The variables' name prefix in the `VarStore` (e.g. `trf_blocks.0.att.W_query`).
    pub path: String,
}

impl Linear {
    /// `x Wᵀ + b` plus the adapter's update (its dropout active when `train`).
    pub fn forward_t(&self, x: &Tensor, train: bool) -> Tensor {
        let y = self.inner.forward(x);
        match &self.lora {
            Some(l) => l.add_delta(y, x, train),
            None => y,
        }
    }

    /// Adds a fresh adapter (its variables created under `vs`, beside the layer's own).
    pub fn add_lora(&mut self, vs: &nn::Path, cfg: &LoraConfig) {
        let (out_dim, in_dim) = self.inner.ws.size2().expect("2-d linear weight");
        let mut p = vs.clone();
        for part in self.path.split('.') {
            p = &p / part;
        }
        self.lora = Some(Lora::new(&p, in_dim, out_dim, cfg));
    }

    /// Folds the adapter into the weight (`W += scale · (A B)ᵀ`) and drops it.
    pub fn merge_lora(&mut self) {
        if let Some(l) = self.lora.take() {
            let _g = tch::no_grad_guard();
            let d = l.weight_delta().to_kind(self.inner.ws.kind());
            let _ = self.inner.ws.g_add_(&d);
        }
    }
}

impl std::ops::Deref for Linear {
    type Target = nn::Linear;
    fn deref(&self) -> &nn::Linear {
        &self.inner
    }
}

impl std::ops::DerefMut for Linear {
    fn deref_mut(&mut self) -> &mut nn::Linear {
        &mut self.inner
    }
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> Tensor {
        self.forward_t(x, false)
    }
}

/// Book `LayerNorm`: learnable `scale`/`shift`, eps 1e-5, biased variance. Runs libtorch's fused
/// `layer_norm`, which computes the same normalisation as the book's explicit mean/var formula.
#[derive(Debug)]
pub struct LayerNorm {
    pub scale: Tensor,
    pub shift: Tensor,
    pub eps: f64,
    dim: i64,
}

impl LayerNorm {
    pub fn new(p: &nn::Path, emb_dim: i64) -> Self {
        Self {
            scale: p.ones("scale", &[emb_dim]),
            shift: p.zeros("shift", &[emb_dim]),
            eps: 1e-5,
            dim: emb_dim,
        }
    }

    /// The book's formula, step by step (kept for teaching and for the parity tests).
    pub fn forward_explicit(&self, x: &Tensor) -> Tensor {
        let mean = x.mean_dim(-1, true, x.kind());
        let var = x.var_dim(-1, false, true);
        let norm_x = (x - mean) / (var + self.eps).sqrt();
        norm_x * &self.scale + &self.shift
    }
}

impl Module for LayerNorm {
    fn forward(&self, x: &Tensor) -> Tensor {
        x.layer_norm(
            [self.dim],
            Some(&self.scale),
            Some(&self.shift),
            self.eps,
            true,
        )
    }
}

/// GELU with the tanh approximation used by GPT-2 (book §4.3).
pub fn gelu(x: &Tensor) -> Tensor {
    x.gelu("tanh")
}

/// The book's explicit formula `0.5 x (1 + tanh(√(2/π) (x + 0.044715 x³)))`.
pub fn gelu_explicit(x: &Tensor) -> Tensor {
    let c = (2.0f64 / std::f64::consts::PI).sqrt();
    let cube: Tensor = x.pow_tensor_scalar(3) * 0.044715;
    let inner: Tensor = (x + cube) * c;
    (x * 0.5) * (inner.tanh() + 1.0)
}

/// Book `FeedForward`: `layers.0` (emb → 4·emb), GELU, `layers.2` (4·emb → emb).
#[derive(Debug)]
pub struct FeedForward {
    pub fc1: Linear,
    pub fc2: Linear,
}

impl FeedForward {
    pub fn new(p: &nn::Path, emb_dim: i64) -> Self {
        let layers = p / "layers";
        Self {
            fc1: linear(&layers / 0, emb_dim, 4 * emb_dim, true),
            fc2: linear(&layers / 2, 4 * emb_dim, emb_dim, true),
        }
    }
}

impl FeedForward {
    /// As [`Module::forward`]; `train` switches on the dropout of LoRA adapters.
    pub fn forward_t(&self, x: &Tensor, train: bool) -> Tensor {
        self.fc2
            .forward_t(&gelu(&self.fc1.forward_t(x, train)), train)
    }
}

impl Module for FeedForward {
    fn forward(&self, x: &Tensor) -> Tensor {
        self.forward_t(x, false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn abs_sum(t: &Tensor) -> f64 {
        t.abs().sum(tch::Kind::Double).double_value(&[])
    }

    /// Zeros inside `without_init` only, and the usual random values again after it, even when
    /// the closure panics.
    #[test]
    fn without_init_zeroes_only_inside() {
        let vs = nn::VarStore::new(tch::Device::Cpu);
        let inside = without_init(|| linear(vs.root() / "inside", 8, 4, true));
        assert_eq!(abs_sum(&inside.ws), 0.0);
        assert_eq!(abs_sum(inside.bs.as_ref().expect("a bias")), 0.0);
        let after = linear(vs.root() / "after", 8, 4, true);
        assert!(abs_sum(&after.ws) > 0.0 && abs_sum(after.bs.as_ref().expect("a bias")) > 0.0);
        let panicked = std::panic::catch_unwind(|| without_init(|| panic!("on purpose")));
        assert!(panicked.is_err());
        let after_panic = linear(vs.root() / "after_panic", 8, 4, false);
        assert!(abs_sum(&after_panic.ws) > 0.0);
    }
}

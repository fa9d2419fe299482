//! The GPT building blocks of book ch04 §4.2–4.3: LayerNorm, GELU, FeedForward.
use tch::nn::{self, Module};
use tch::Tensor;

/// `torch.nn.Linear` with PyTorch's initialisation: weights and bias uniform in
/// ±1/√in_dim (kaiming_uniform with a = √5). tch's own default uses the ReLU gain, √6 times wider,
/// which trains differently from the book's runs.
pub fn linear(p: nn::Path, in_dim: i64, out_dim: i64, bias: bool) -> nn::Linear {
    let ws_init = nn::Init::Kaiming {
        dist: nn::init::NormalOrUniform::Uniform,
        fan: nn::init::FanInOut::FanIn,
        non_linearity: nn::init::NonLinearity::ExplicitGain(1.0 / 3f64.sqrt()),
    };
    nn::linear(
        p,
        in_dim,
        out_dim,
        nn::LinearConfig {
            ws_init,
            bs_init: None,
            bias,
        },
    )
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
    pub fc1: nn::Linear,
    pub fc2: nn::Linear,
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

impl Module for FeedForward {
    fn forward(&self, x: &Tensor) -> Tensor {
        gelu(&self.fc1.forward(x)).apply(&self.fc2)
    }
}

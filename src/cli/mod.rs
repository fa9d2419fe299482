//! Command-line interface (clap only; every command calls into the library).
use crate::device::Precision;
use crate::train::spec::FusedAdamW;
use clap::{Args, Parser, Subcommand, ValueEnum};
use std::path::PathBuf;

pub mod commands;

#[derive(Parser, Debug)]
#[command(
    name = "llmlab",
    version,
    about = "Build, pretrain, fine-tune and evaluate GPT-style LLMs the way 'Build a Large Language Model (From Scratch)' teaches it, on libtorch.",
    propagate_version = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Data sets of the book: list them or fetch one (mirror, cache or download).
    Data {
        #[command(subcommand)]
        action: DataAction,
    },
    /// Print the token ids of a text (GPT-2 byte-level BPE by default).
    Tokenize(TokenizeArgs),
    /// Train a byte-level BPE vocabulary on your own text files.
    TrainTokenizer(TrainTokenizerArgs),
    /// Parameter count and memory footprint of a model config (book §4.6).
    ModelInfo(ModelInfoArgs),
    /// Pretrain (or continue pretraining) a GPT on a text (book ch05, appendix D); resumable.
    Pretrain(Box<PretrainArgs>),
    /// Generate text from a model: greedy, temperature, top-k, top-p (KV cache by default).
    Generate(GenerateArgs),
    /// Download OpenAI's GPT-2 weights (Hugging Face format) into the cache; prints the folder.
    Download(DownloadArgs),
    /// Micro-benchmarks (forward tokens/s); `make bench` runs them beside PyTorch.
    Bench(BenchArgs),
}

#[derive(Subcommand, Debug)]
pub enum DataAction {
    /// List the registered data sets with their canonical URLs.
    List {
        #[arg(long, value_enum, default_value_t = Format::Text)]
        format: Format,
    },
    /// Make a data set available locally and print its folder.
    Fetch {
        /// Data set name (see `llmlab data list`).
        name: String,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Format {
    Text,
    Json,
}

/// Device and threads, shared by every compute command.
#[derive(Args, Debug, Clone)]
pub struct ComputeArgs {
    /// auto | cpu | cuda | cuda:N (auto picks CUDA when libtorch sees a GPU).
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// libtorch intra-op threads (default: libtorch's choice).
    #[arg(long)]
    pub threads: Option<usize>,
}

#[derive(Args, Debug)]
pub struct TokenizeArgs {
    /// Text to tokenize.
    #[arg(long, conflicts_with = "file", required_unless_present = "file")]
    pub text: Option<String>,
    /// UTF-8 file to tokenize.
    #[arg(long)]
    pub file: Option<PathBuf>,
    /// `gpt2`, a folder with encoder.json + vocab.bpe (or tokenizer.json), or a tokenizer.json.
    #[arg(long, default_value = "gpt2")]
    pub tokenizer: String,
    #[arg(long, value_enum, default_value_t = Format::Text)]
    pub format: Format,
}

#[derive(Args, Debug)]
pub struct TrainTokenizerArgs {
    /// UTF-8 text files to learn merges from.
    #[arg(long, required = true, num_args = 1..)]
    pub files: Vec<PathBuf>,
    /// Target vocabulary size (256 byte tokens + merges + <|endoftext|>).
    #[arg(long, default_value_t = 1000)]
    pub vocab_size: usize,
    /// Minimum pair frequency for a merge.
    #[arg(long, default_value_t = 2)]
    pub min_frequency: u64,
    /// Where to write the tokenizer.json.
    #[arg(long)]
    pub out: PathBuf,
}

#[derive(Args, Debug)]
pub struct ModelInfoArgs {
    /// Preset name (gpt2-small, gpt2-medium, gpt2-large, gpt2-xl, gpt-mini) or a YAML file.
    #[arg(long, default_value = "gpt2-small")]
    pub config: String,
    #[arg(long, value_enum, default_value_t = Format::Text)]
    pub format: Format,
}

#[derive(Args, Debug)]
pub struct PretrainArgs {
    /// Experiment YAML (`task: pretrain`), e.g. experiments/pretrain_verdict.yaml. Without it,
    /// the flags below describe the run (defaults: gpt-mini on the-verdict).
    pub file: Option<PathBuf>,
    /// Model preset or config YAML (ignored with --init-from).
    #[arg(long)]
    pub config: Option<String>,
    /// Continue pretraining from these weights: a run/model folder, a .safetensors checkpoint, or gpt2:DIR.
    #[arg(long)]
    pub init_from: Option<String>,
    /// A registered data set name or a UTF-8 text file.
    #[arg(long)]
    pub data: Option<String>,
    /// Override the model's context_length (windows are this long; stride equal by default).
    #[arg(long)]
    pub context_length: Option<i64>,
    /// Override the model's drop_rate.
    #[arg(long)]
    pub drop_rate: Option<f64>,
    #[arg(long)]
    pub epochs: Option<usize>,
    #[arg(long)]
    pub batch_size: Option<usize>,
    #[arg(long)]
    pub lr: Option<f64>,
    #[arg(long)]
    pub weight_decay: Option<f64>,
    /// Evaluate every N optimizer steps.
    #[arg(long)]
    pub eval_freq: Option<usize>,
    /// Batches per evaluation.
    #[arg(long)]
    pub eval_iter: Option<usize>,
    /// Micro-batches per optimizer step.
    #[arg(long)]
    pub grad_accum_steps: Option<usize>,
    /// Clip the global gradient norm.
    #[arg(long)]
    pub max_grad_norm: Option<f64>,
    /// Save a checkpoint every N steps (0: at each epoch end).
    #[arg(long)]
    pub checkpoint_every: Option<usize>,
    /// fp32, or bf16 autocast for forward and loss (meant for CUDA).
    #[arg(long, value_enum)]
    pub precision: Option<Precision>,
    /// AdamW kernel: auto (fused on CPU and CUDA), true (libtorch's fused kernel) or false (plain).
    #[arg(long, value_enum)]
    pub fused_adamw: Option<FusedAdamW>,
    #[arg(long)]
    pub seed: Option<u64>,
    /// Prompt of the sample printed after each epoch.
    #[arg(long)]
    pub prompt: Option<String>,
    /// Tokens generated per sample.
    #[arg(long)]
    pub sample_tokens: Option<usize>,
    /// Run name (results in runs/<name> unless --out is given).
    #[arg(long)]
    pub name: Option<String>,
    /// Run folder (default runs/<name>); a folder with a checkpoint is resumed.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Delete the run folder's previous state and start over.
    #[arg(long)]
    pub restart: bool,
    #[command(flatten)]
    pub compute: ComputeArgs,
}

#[derive(Args, Debug)]
pub struct GenerateArgs {
    /// A preset (fresh weights), a run or model folder, a .safetensors checkpoint, or gpt2:DIR.
    #[arg(long)]
    pub model: String,
    #[arg(long)]
    pub prompt: String,
    #[arg(long, default_value_t = 50)]
    pub max_new_tokens: usize,
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f64,
    #[arg(long)]
    pub top_k: Option<i64>,
    #[arg(long)]
    pub top_p: Option<f64>,
    #[arg(long)]
    pub seed: Option<u64>,
    /// Recompute the whole window for each token instead of using the KV cache.
    #[arg(long)]
    pub no_cache: bool,
    /// Keep generating past <|endoftext|>.
    #[arg(long)]
    pub ignore_eos: bool,
    #[arg(long, value_enum, default_value_t = Format::Text)]
    pub format: Format,
    #[command(flatten)]
    pub compute: ComputeArgs,
}

#[derive(Args, Debug)]
pub struct DownloadArgs {
    /// gpt2-small | gpt2-medium | gpt2-large | gpt2-xl
    pub name: String,
}

#[derive(Args, Debug)]
pub struct BenchArgs {
    #[command(subcommand)]
    pub what: BenchWhat,
}

#[derive(Subcommand, Debug)]
pub enum BenchWhat {
    /// Forward-pass tokens/s of a GPT config (eval mode, no grad), printed as one JSON line.
    Forward {
        #[command(flatten)]
        shape: BenchShape,
        /// Use the book's explicit attention instead of the fused SDPA kernel.
        #[arg(long)]
        manual_attention: bool,
        #[command(flatten)]
        compute: ComputeArgs,
    },
    /// Training tokens/s: forward + backward + AdamW step (train mode, the config's dropout).
    Train {
        #[command(flatten)]
        shape: BenchShape,
        /// fp32, or bf16 autocast for forward and loss.
        #[arg(long, value_enum, default_value = "fp32")]
        precision: Precision,
        /// AdamW kernel: auto (fused on CPU and CUDA), true or false.
        #[arg(long, value_enum, default_value = "auto")]
        fused_adamw: FusedAdamW,
        #[command(flatten)]
        compute: ComputeArgs,
    },
    /// Greedy decoding tokens/s after a prompt, batch 1, with or without the KV cache.
    Generate {
        #[arg(long, default_value = "gpt2-small")]
        config: String,
        #[arg(long, default_value_t = 20)]
        prompt_tokens: usize,
        #[arg(long, default_value_t = 64)]
        new_tokens: usize,
        #[arg(long)]
        no_cache: bool,
        #[arg(long, default_value_t = 3)]
        iters: usize,
        #[command(flatten)]
        compute: ComputeArgs,
    },
}

/// Model and input shape of a throughput benchmark.
#[derive(Args, Debug)]
pub struct BenchShape {
    #[arg(long, default_value = "gpt2-small")]
    pub config: String,
    #[arg(long, default_value_t = 2)]
    pub batch: i64,
    #[arg(long, default_value_t = 256)]
    pub seq: i64,
    /// Untimed runs first.
    #[arg(long, default_value_t = 1)]
    pub warmup: usize,
    /// Timed runs (the median is reported).
    #[arg(long, default_value_t = 3)]
    pub iters: usize,
}

//! Command-line interface (clap only; every command calls into the library).
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
    /// Pretrain a GPT on a text with the book's simple loop (ch05 §5.2) and print samples.
    Pretrain(PretrainArgs),
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
    /// Model preset or YAML file.
    #[arg(long, default_value = "gpt-mini")]
    pub config: String,
    /// A registered data set name (its first file) or a UTF-8 text file.
    #[arg(long, default_value = "the-verdict")]
    pub data: String,
    /// Override the preset's context_length (windows are this long, stride equal).
    #[arg(long)]
    pub context_length: Option<i64>,
    #[arg(long, default_value_t = 5)]
    pub epochs: usize,
    #[arg(long, default_value_t = 2)]
    pub batch_size: usize,
    #[arg(long, default_value_t = 4e-4)]
    pub lr: f64,
    #[arg(long, default_value_t = 0.1)]
    pub weight_decay: f64,
    /// Evaluate every N optimizer steps.
    #[arg(long, default_value_t = 5)]
    pub eval_freq: usize,
    /// Batches per evaluation.
    #[arg(long, default_value_t = 5)]
    pub eval_iter: usize,
    #[arg(long, default_value_t = 123)]
    pub seed: u64,
    /// Prompt of the sample printed after each epoch.
    #[arg(long, default_value = "Every effort moves you")]
    pub prompt: String,
    /// Tokens generated per sample.
    #[arg(long, default_value_t = 50)]
    pub sample_tokens: i64,
    /// Folder for model.safetensors, config.yaml and metrics.jsonl.
    #[arg(long)]
    pub out: Option<PathBuf>,
    #[command(flatten)]
    pub compute: ComputeArgs,
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
        #[arg(long, default_value = "gpt2-small")]
        config: String,
        #[arg(long, default_value_t = 2)]
        batch: i64,
        #[arg(long, default_value_t = 256)]
        seq: i64,
        #[arg(long, default_value_t = 2)]
        warmup: usize,
        #[arg(long, default_value_t = 5)]
        iters: usize,
        /// Use the book's explicit attention instead of the fused SDPA kernel.
        #[arg(long)]
        manual_attention: bool,
        #[command(flatten)]
        compute: ComputeArgs,
    },
}

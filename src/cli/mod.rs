//! Command-line interface (clap only; every command calls into the library).
use crate::device::Precision;
use crate::resolve::InferenceDtype;
use crate::train::spec::FusedAdamW;
use clap::{Args, Parser, Subcommand, ValueEnum};
use std::path::PathBuf;

pub mod chat;
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
    /// Run an experiment file: every trial of its sweep, resumable (runs/<experiment>/<trial>/).
    Run(RunArgs),
    /// Summary table of an experiment's trials (terminal; writes summary.md and summary.csv).
    Report(ReportArgs),
    /// Data sets of the book: list them, fetch one (mirror, cache or download), or make DPO
    /// preference data with a teacher model.
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
    /// Chat with a model in the terminal (streams tokens; /reset, /system TEXT, /exit).
    Chat(ChatArgs),
    /// Classify texts with a fine-tuned classifier (a `task: classify` run folder): label and probability.
    Classify(ClassifyArgs),
    /// Evaluate models: judge scores (book ch07 §7.8), pairwise votes and their leaderboard,
    /// perplexity of a text.
    Eval {
        #[command(subcommand)]
        action: EvalAction,
    },
    /// Serve a model over an OpenAI-compatible HTTP API (chat and text completions, streaming,
    /// log-probabilities), with a web chat page at / and continuous batching.
    Serve(ServeArgs),
    /// Download Hugging Face weights (GPT-2, SmolLM2, Llama 3.x) into the cache; prints the folder.
    Download(DownloadArgs),
    /// Micro-benchmarks: tokens/s with MFU (and weight GB/s for decoding); `make bench` runs them beside PyTorch.
    Bench(BenchArgs),
}

#[derive(Args, Debug)]
pub struct RunArgs {
    /// Experiment YAML (e.g. experiments/pretrain_verdict.yaml).
    pub file: PathBuf,
    /// Override a setting: --set train.lr=1e-3 (a dotted key and a YAML value; repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub sets: Vec<String>,
    /// Print the trials that would run, and exit.
    #[arg(long)]
    pub dry_run: bool,
    /// Folder of the experiments' results.
    #[arg(long, default_value = "runs")]
    pub runs: PathBuf,
    /// Start every trial over, even finished ones.
    #[arg(long)]
    pub restart: bool,
    /// Trials to run at once (default 1: one after the other, in this process). With N > 1 each
    /// trial runs in an llmlab process of its own, its output in <trial>/log.txt; the --threads
    /// budget (default: all cores) is split evenly, max(1, threads / N) per trial, and on a
    /// machine with several CUDA GPUs each trial gets one GPU. Same results and report as one by
    /// one given the same threads per trial (e.g. --threads 4 --jobs 2 = --threads 2 --jobs 1 on
    /// CPU). Ctrl-C stops every running trial after its state is saved.
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub jobs: usize,
    /// Fine-tuning trials (classify, instruct, dpo) also save a checkpoint after this many minutes
    /// of training inside an epoch, so a killed process loses at most that much; 0: only at
    /// epoch ends and on Ctrl-C/SIGTERM, which always save. (Pretraining: train.checkpoint_every.)
    #[arg(long, value_name = "MINUTES", default_value_t = crate::finetune::DEFAULT_CHECKPOINT_MINUTES, value_parser = non_negative_minutes)]
    pub checkpoint_minutes: f64,
    /// Run only this trial of the sweep: its folder name (as --dry-run lists it) or its index
    /// (0-based, its place in runs/<experiment>/experiment.json: what a Slurm array task gets).
    /// The experiment's records and summary are left to the run that started the sweep; a
    /// finished trial is skipped, an interrupted one resumes. (`--jobs` and `--backend slurm`
    /// run each trial this way.)
    #[arg(long, value_name = "NAME|INDEX", alias = "only-trial")]
    pub trial: Option<String>,
    /// Where the trials run: `local` (here; --jobs N at once) or `slurm` (one Slurm job array, a
    /// task per unfinished trial; see the Slurm options and the README's "Slurm job arrays").
    #[arg(long, value_enum, default_value_t = Backend::Local)]
    pub backend: Backend,
    #[command(flatten)]
    pub slurm: SlurmArgs,
    #[command(flatten)]
    pub compute: ComputeArgs,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Backend {
    Local,
    Slurm,
}

/// `llmlab run --backend slurm`: what each array task asks Slurm for, and whether to wait.
#[derive(Args, Debug, Default)]
#[command(next_help_heading = "Slurm (--backend slurm)")]
pub struct SlurmArgs {
    /// The partition the tasks run in (default: the cluster's).
    #[arg(long, value_name = "P")]
    pub partition: Option<String>,
    /// Time limit of each task, HH:MM:SS (a task out of time stops like Ctrl-C, its state saved;
    /// submitting again resumes it).
    #[arg(long, value_name = "HH:MM:SS")]
    pub time: Option<String>,
    /// CPUs per task [default: 1]; the trial runs on as many threads.
    #[arg(long, value_name = "N")]
    pub cpus_per_trial: Option<usize>,
    /// GPUs per task (--gres=gpu:N) [default: 0]; Slurm sets CUDA_VISIBLE_DEVICES to them.
    #[arg(long, value_name = "N")]
    pub gpus_per_trial: Option<usize>,
    /// Memory per task, e.g. 8G (sbatch --mem).
    #[arg(long, value_name = "SIZE")]
    pub mem: Option<String>,
    /// At most K tasks of the array at once (--array=...%K).
    #[arg(long, value_name = "K")]
    pub array_parallelism: Option<usize>,
    /// One more sbatch option, written as an #SBATCH line (repeatable):
    /// --sbatch-arg=--qos=short --sbatch-arg=--account=lab.
    #[arg(long = "sbatch-arg", value_name = "ARG", allow_hyphen_values = true)]
    pub sbatch_args: Vec<String>,
    /// Wait until the array is done, showing each trial as it starts and ends, then print the
    /// summary as a local run does.
    #[arg(long)]
    pub wait: bool,
}

impl SlurmArgs {
    /// The first Slurm flag given, if any (they need --backend slurm).
    pub fn first_given(&self) -> Option<&'static str> {
        [
            (self.partition.is_some(), "--partition"),
            (self.time.is_some(), "--time"),
            (self.cpus_per_trial.is_some(), "--cpus-per-trial"),
            (self.gpus_per_trial.is_some(), "--gpus-per-trial"),
            (self.mem.is_some(), "--mem"),
            (self.array_parallelism.is_some(), "--array-parallelism"),
            (!self.sbatch_args.is_empty(), "--sbatch-arg"),
            (self.wait, "--wait"),
        ]
        .into_iter()
        .find_map(|(given, flag)| given.then_some(flag))
    }
}

#[derive(Subcommand, Debug)]
pub enum EvalAction {
    /// Score every `model_response` of a responses file 0-100 with a judge model behind an
    /// OpenAI-compatible or Ollama API (the book's prompt, temperature 0, a seed). Writes every
    /// judged answer to <responses>.judged.json beside the file.
    Judge(JudgeArgs),
    /// Perplexity of a text with Hugging Face's strided sliding window: windows of --max-length
    /// tokens moved by --stride, each scoring only targets no earlier window scored. Prints
    /// {"perplexity", "nll", "tokens", ...} (nll and tokens as the guide's code counts them;
    /// exact_nll: the plain mean over every scored target).
    Perplexity(PerplexityArgs),
    /// MMLU accuracy by log-likelihood: `letter` (lm-evaluation-harness's prompt, " A".." D"
    /// scored) or `cloze` (lighteval's, as SmolLM2's model card: the choice texts scored,
    /// normalised per character), 0-5 shots from each subject's dev split. Prints the micro
    /// accuracy with a 95% interval, the macro accuracy, subjects and categories.
    Mmlu(MmluArgs),
    /// Compare models' responses pairwise with a judge model: for every instruction two models
    /// answered, the judge sees both responses in both orders; a model wins only if both orders
    /// prefer it, otherwise a tie. Appends one Chatbot Arena battle line per comparison to --out
    /// (resumable: comparisons already there are not asked again).
    Pairwise(PairwiseArgs),
    /// A leaderboard from pairwise votes: Bradley-Terry ratings (Chatbot Arena's fit, mean
    /// 1000) with bootstrap 95% intervals, online Elo, rank by the intervals.
    Leaderboard(LeaderboardArgs),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum JudgeApi {
    /// POST {url}/v1/chat/completions (vLLM, llama.cpp server, LM Studio, OpenAI, ...).
    Openai,
    /// POST {url}/api/chat with stream false (Ollama, as in the book).
    Ollama,
}

/// The judge server and how requests to it are made (`eval judge`, `eval pairwise`).
#[derive(Args, Debug)]
pub struct JudgeServerArgs {
    /// The judge server's base URL, e.g. http://localhost:11434 (Ollama) or http://localhost:8000
    /// (OpenAI; http://localhost:8000/v1 too).
    #[arg(long)]
    pub judge_url: String,
    /// The judge model's name on that server, e.g. llama3.
    #[arg(long)]
    pub judge_model: String,
    /// The API the server speaks.
    #[arg(long, value_enum, default_value_t = JudgeApi::Openai)]
    pub api: JudgeApi,
    /// The seed sent with every request (the book: 123).
    #[arg(long, default_value_t = 123)]
    pub seed: u64,
    /// Per-request time limit in seconds.
    #[arg(long, default_value_t = 120)]
    pub timeout: u64,
    /// Retries of a request after a server error (5xx), a timeout or a dropped connection
    /// (waiting 0.5 s, then twice as long each time).
    #[arg(long, default_value_t = 3)]
    pub retries: usize,
}

#[derive(Args, Debug)]
pub struct JudgeArgs {
    /// A responses file: a JSON array of objects with instruction, input, output and
    /// model_response (a `task: instruct` run's responses.json, or the book's
    /// instruction-data-with-response.json).
    #[arg(long)]
    pub responses: PathBuf,
    #[command(flatten)]
    pub server: JudgeServerArgs,
    /// `text`: a progress line per response and a summary; `json`: one object
    /// {"mean_score", "scored", "unparsable", "total"}.
    #[arg(long, value_enum, default_value_t = Format::Text)]
    pub format: Format,
}

#[derive(Args, Debug)]
#[command(group(clap::ArgGroup::new("text").required(true).args(["file", "dataset"])))]
pub struct PerplexityArgs {
    /// smollm2-135m-instruct, a .gguf file, hf:DIR, gpt2:DIR, a run or model folder, a
    /// .safetensors checkpoint, or a preset (fresh weights): anything `generate` loads.
    #[arg(long)]
    pub model: String,
    /// A UTF-8 text file.
    #[arg(long)]
    pub file: Option<PathBuf>,
    /// A registered text data set: the-verdict, tinyshakespeare, middlemarch.
    #[arg(long)]
    pub dataset: Option<String>,
    /// Tokens per window (default: the model's context length).
    #[arg(long)]
    pub max_length: Option<usize>,
    /// Tokens each window's start moves, 1..=max-length (default: max-length / 2, the guide's
    /// 512 of 1024).
    #[arg(long)]
    pub stride: Option<usize>,
    /// Windows per forward pass.
    #[arg(long, default_value_t = 1)]
    pub batch_size: usize,
    /// `text`: the figures for a reader; `json`: one object.
    #[arg(long, value_enum, default_value_t = Format::Text)]
    pub format: Format,
    /// Also write the JSON result to this file (atomically).
    #[arg(long)]
    pub out: Option<PathBuf>,
    #[command(flatten)]
    pub compute: ComputeArgs,
}

#[derive(Args, Debug)]
pub struct MmluArgs {
    /// smollm2-135m-instruct, a .gguf file, hf:DIR, gpt2:DIR, a run or model folder, a
    /// .safetensors checkpoint: anything `generate` loads.
    #[arg(long)]
    pub model: String,
    /// `all`, or subjects separated by commas (e.g. anatomy,virology).
    #[arg(long, default_value = "all")]
    pub subjects: String,
    /// Examples from each subject's dev split before the question (0-5).
    #[arg(long, default_value_t = 0)]
    pub shots: usize,
    #[arg(long, value_enum, default_value_t = crate::eval::mmlu::Style::Letter)]
    pub style: crate::eval::mmlu::Style,
    /// At most this many test questions per subject (the first ones).
    #[arg(long)]
    pub limit: Option<usize>,
    /// Sequences per forward pass.
    #[arg(long, default_value_t = 4)]
    pub batch_size: usize,
    /// Append one JSON line per question (subject, index, gold, pred, loglik of the four
    /// choices); an interrupted evaluation given the same file resumes from it.
    #[arg(long)]
    pub predictions: Option<PathBuf>,
    /// An MMLU folder (holding data/test, data/dev) instead of the data registry's.
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// `text`: progress and a table; `json`: one object.
    #[arg(long, value_enum, default_value_t = Format::Text)]
    pub format: Format,
    /// Also write the JSON result to this file (atomically).
    #[arg(long)]
    pub out: Option<PathBuf>,
    #[command(flatten)]
    pub compute: ComputeArgs,
}

#[derive(Args, Debug)]
pub struct PairwiseArgs {
    /// A responses file (as `task: instruct` writes: a JSON array of objects with instruction,
    /// input, output and model_response), one per model, at least two: PATH or NAME=PATH.
    /// Without NAME the model is named after the file stem, or, for a file named
    /// responses.json, after its folder (runs/exp/trial/responses.json -> trial).
    #[arg(long = "responses", value_name = "[NAME=]PATH", required = true)]
    pub responses: Vec<String>,
    #[command(flatten)]
    pub server: JudgeServerArgs,
    /// The votes file (JSON lines, appended; comparisons already in it are skipped). Comparisons
    /// with an unparsable reply go to <stem>.unparsable.jsonl beside it.
    #[arg(long)]
    pub out: PathBuf,
    /// `text`: a line per comparison and a summary; `json`: one summary object.
    #[arg(long, value_enum, default_value_t = Format::Text)]
    pub format: Format,
}

#[derive(Args, Debug)]
pub struct LeaderboardArgs {
    /// Votes: JSON lines (`llmlab eval pairwise --out`) or a JSON array, each with model_a,
    /// model_b and winner (model_a | model_b | tie | "tie (bothbad)"), Chatbot Arena's format.
    #[arg(long)]
    pub votes: PathBuf,
    /// Bootstrap resamples of the votes for the 95% intervals (0: no intervals).
    #[arg(long, default_value_t = 1000)]
    pub bootstrap: usize,
    /// Seed of the bootstrap resampling.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// `text`: a table; `json`: {"models": [{"model", "rating", "ci_low", "ci_high", "elo",
    /// "rank", "battles", "wins", "ties", "note"?}], "votes", "bootstrap", "notes"?}.
    #[arg(long, value_enum, default_value_t = Format::Text)]
    pub format: Format,
    /// Also write the JSON result to this file (atomically).
    #[arg(long)]
    pub out: Option<PathBuf>,
}

#[derive(Args, Debug)]
pub struct ClassifyArgs {
    /// A classification run folder (holds saved_model.json and saved_model.safetensors).
    #[arg(long)]
    pub model: PathBuf,
    /// A text to classify (repeatable).
    #[arg(long, required_unless_present = "file")]
    pub text: Vec<String>,
    /// A UTF-8 file with one text per line (empty lines are skipped).
    #[arg(long)]
    pub file: Option<PathBuf>,
    /// `text`: one `label<TAB>probability<TAB>text` line per text; `json`: one
    /// `{"text", "label", "probability"}` object per line.
    #[arg(long, value_enum, default_value_t = Format::Text)]
    pub format: Format,
    #[command(flatten)]
    pub compute: ComputeArgs,
}

#[derive(Args, Debug)]
pub struct ReportArgs {
    /// An experiment's folder (runs/<experiment>).
    pub dir: PathBuf,
    #[arg(long, value_enum, default_value_t = ReportFormat::Table)]
    pub format: ReportFormat,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ReportFormat {
    Table,
    Markdown,
    Csv,
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
    /// Make DPO preference data with a teacher model, as the book does (ch07/04,
    /// create-preference-data-ollama.ipynb).
    ///
    /// For each instruction entry, pick "polite" or "impolite" at random (seeded) and ask a
    /// teacher model to slightly rewrite the output to be more so, with the book's prompt; a
    /// polite rewrite becomes `chosen` (the output `rejected`), an impolite one `rejected` (the
    /// output `chosen`). Writes the book's instruction-data-with-preference.json shape (each
    /// entry's fields + chosen, rejected), atomically after every entry, and records the
    /// settings in <out stem>.progress.json: the same command continues after the entries
    /// already made; other settings (input, --seed, --teacher-model) are refused.
    MakePreferences(MakePreferencesArgs),
}

#[derive(Args, Debug)]
#[command(group(clap::ArgGroup::new("source").required(true).args(["input", "dataset"])))]
pub struct MakePreferencesArgs {
    /// An instruction data file: a JSON array (or JSON lines) of objects with instruction,
    /// input (may be empty) and output, e.g. the book's instruction-data.json.
    #[arg(long)]
    pub input: Option<PathBuf>,
    /// Or a registered instruction data set (`llmlab data list`), e.g. instruction-data.
    #[arg(long)]
    pub dataset: Option<String>,
    /// The teacher server's base URL, e.g. http://localhost:11434 (Ollama) or http://localhost:8000.
    #[arg(long)]
    pub teacher_url: String,
    /// The teacher model's name on that server, e.g. llama3.1:70b (the book's).
    #[arg(long)]
    pub teacher_model: String,
    /// The API the server speaks.
    #[arg(long, value_enum, default_value_t = JudgeApi::Openai)]
    pub api: JudgeApi,
    /// The preference file to write (a JSON array), e.g. instruction-data-with-preference.json.
    #[arg(long)]
    pub out: PathBuf,
    /// Seeds the polite/impolite choice of every entry; also sent with every request
    /// (temperature 0; the book's requests: seed 123).
    #[arg(long, default_value_t = 123)]
    pub seed: u64,
    /// Only the first N entries (a later run with a larger N continues the file).
    #[arg(long, value_name = "N")]
    pub limit: Option<usize>,
    /// Per-request time limit in seconds.
    #[arg(long, default_value_t = 120)]
    pub timeout: u64,
    /// Retries of a request after a server error (5xx), a timeout or a dropped connection
    /// (waiting 0.5 s, then twice as long each time).
    #[arg(long, default_value_t = 3)]
    pub retries: usize,
    /// `text`: a progress line per entry and a summary; `json`: one summary object
    /// {"entries", "made", "resumed", "polite", "impolite", "unchanged", "out", "progress"}.
    #[arg(long, value_enum, default_value_t = Format::Text)]
    pub format: Format,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Format {
    Text,
    Json,
}

/// A number of minutes >= 0 (`--checkpoint-minutes`).
fn non_negative_minutes(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(m) if m.is_finite() && m >= 0.0 => Ok(m),
        _ => Err(format!(
            "{s}: expected a number of minutes >= 0 (0: no timed checkpoints)"
        )),
    }
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
    /// Preset name (gpt2-small|medium|large|xl, gpt-mini, smollm2-135m|360m|1.7b,
    /// llama-3.2-1b|3b, llama-3.1-8b) or a YAML file.
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
    /// Override any setting of the spec, after the flags: --set train.warmup_steps=20 (a dotted
    /// key and a YAML value; repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub sets: Vec<String>,
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
    /// Data-parallel ranks on this machine (train.nproc; book appendix A, DDP with gloo on the
    /// CPU): each trains on --batch-size windows of every global batch. Under torchrun or srun
    /// (RANK/WORLD_SIZE or SLURM_PROCID/SLURM_NTASKS set) the environment gives the ranks.
    #[arg(long)]
    pub nproc: Option<usize>,
    #[command(flatten)]
    pub compute: ComputeArgs,
}

#[derive(Args, Debug)]
pub struct GenerateArgs {
    /// smollm2-135m-instruct, a .gguf file, hf:DIR (Llama or GPT-2), a preset (fresh weights),
    /// a run or model folder, a .safetensors checkpoint, or gpt2:DIR.
    #[arg(long)]
    pub model: String,
    #[arg(long)]
    pub prompt: String,
    /// Wrap the prompt in the model's chat template (as one user message) and stop at the end
    /// of the assistant's turn.
    #[arg(long)]
    pub chat: bool,
    /// System message for --chat (default: the template's own, if it has one).
    #[arg(long, requires = "chat")]
    pub system: Option<String>,
    /// With an instruct run as --model: the entry's input (e.g. the sentence to rewrite); the
    /// prompt is the instruction.
    #[arg(long, conflicts_with_all = ["chat", "raw"])]
    pub input: Option<String>,
    /// With an instruct run as --model: pass the prompt as is instead of formatting it in the
    /// prompt style the run was trained with (alpaca, phi3 or chat).
    #[arg(long)]
    pub raw: bool,
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
    /// Inference weights: f32 (exact), bf16 (half the bytes per token) or q4 (Llama models on
    /// the CPU: weight-only 4-bit, GGUF Q4_1's groups of 32, bf16 activations; fastest decode).
    #[arg(long, value_enum, default_value_t = InferenceDtype::F32)]
    pub dtype: InferenceDtype,
    #[arg(long, value_enum, default_value_t = Format::Text)]
    pub format: Format,
    #[command(flatten)]
    pub compute: ComputeArgs,
}

#[derive(Args, Debug)]
pub struct ChatArgs {
    /// A chat model: smollm2-135m-instruct, a .gguf file or hf:DIR with a chat template.
    #[arg(long, default_value = "smollm2-135m-instruct")]
    pub model: String,
    /// System message (default: the template's own, if it has one).
    #[arg(long)]
    pub system: Option<String>,
    /// Most tokens per answer.
    #[arg(long, default_value_t = 512)]
    pub max_new_tokens: usize,
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.7)]
    pub temperature: f64,
    #[arg(long)]
    pub top_k: Option<i64>,
    #[arg(long, default_value_t = 0.9)]
    pub top_p: f64,
    #[arg(long)]
    pub seed: Option<u64>,
    /// Inference weights: f32 (exact), bf16 (half the bytes per token) or q4 (Llama models on
    /// the CPU: weight-only 4-bit, GGUF Q4_1's groups of 32, bf16 activations; fastest decode).
    #[arg(long, value_enum, default_value_t = InferenceDtype::F32)]
    pub dtype: InferenceDtype,
    #[command(flatten)]
    pub compute: ComputeArgs,
}

/// `llmlab serve`.
#[derive(Args, Debug)]
#[command(
    after_help = "Endpoints: GET / (web chat), GET /health, GET /v1/models, POST /v1/chat/completions, \
POST /v1/completions, POST /tokenize. With a key, every route but / and /health needs \
`Authorization: Bearer KEY`. Ctrl-C or SIGTERM cancels the running requests and exits 0."
)]
pub struct ServeArgs {
    /// smollm2-135m-instruct, a .gguf file, hf:DIR (Llama or GPT-2), a run or model folder, a
    /// .safetensors checkpoint, gpt2:DIR or a preset: anything `generate` loads. Clients name it
    /// by this string.
    #[arg(long)]
    pub model: String,
    /// Address to listen on (127.0.0.1: this machine only; 0.0.0.0: every interface).
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Port to listen on (0: any free port; the ready line names it).
    #[arg(long, default_value_t = 8000)]
    pub port: u16,
    /// Require this key (`Authorization: Bearer KEY`) on every route but / and /health.
    #[arg(long, env = "LLMLAB_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Inference weights: f32 (exact), bf16 (half the bytes per token) or q4 (Llama models on
    /// the CPU: weight-only 4-bit, GGUF Q4_1's groups of 32, bf16 activations; fastest decode).
    #[arg(long, value_enum, default_value_t = InferenceDtype::F32)]
    pub dtype: InferenceDtype,
    /// Requests decoded together (continuous batching: a finished request's slot is refilled
    /// between two decoding steps).
    #[arg(long, value_name = "N", default_value_t = 8, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_batch: u64,
    /// Requests waiting for a slot; one more is answered 429.
    #[arg(long, value_name = "N", default_value_t = 64)]
    pub max_queue: u64,
    /// Longest a request may take, in seconds (queue and generation; 408 after that, or an
    /// error event ending a stream).
    #[arg(long, value_name = "SECS", default_value_t = 600, value_parser = clap::value_parser!(u64).range(1..))]
    pub timeout: u64,
    /// A connection that sends no complete request within this many seconds is closed (slow or
    /// idle kept-alive clients).
    #[arg(long, value_name = "SECS", default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..))]
    pub idle_timeout: u64,
    /// Most new tokens of a chat request that sets neither max_tokens nor
    /// max_completion_tokens (default: until the model ends its turn or the context is full).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub max_tokens: Option<u64>,
    /// Largest request body in MiB (413 beyond).
    #[arg(long, value_name = "MIB", default_value_t = 4, value_parser = clap::value_parser!(u64).range(1..=1024))]
    pub max_body_mib: u64,
    #[command(flatten)]
    pub compute: ComputeArgs,
}

#[derive(Args, Debug)]
pub struct DownloadArgs {
    /// gpt2-small|medium|large|xl, smollm2-135m, smollm2-360m[-instruct], smollm2-1.7b[-instruct],
    /// llama-3.2-1b[-instruct], llama-3.2-3b[-instruct], llama-3.1-8b[-instruct] (Llama: set HF_TOKEN).
    /// Load the folder with `--model hf:DIR`.
    pub name: String,
}

#[derive(Args, Debug)]
pub struct BenchArgs {
    #[command(subcommand)]
    pub what: BenchWhat,
    /// The peak TFLOP/s that MFU (model FLOPs utilisation, nanoGPT's `estimate_mfu`) is a
    /// fraction of, e.g. a datasheet's dense peak (A100 bf16: 312; H100/H200 SXM bf16: 989,
    /// fp32: 67). Default: measured, the best of 5 square matmuls (1024 on the CPU, 8192 on
    /// CUDA) in the benchmark's dtype on its device and threads.
    #[arg(long, global = true, value_name = "TFLOPS", value_parser = positive_tflops)]
    pub peak_tflops: Option<f64>,
    /// `json`: one line (keys sorted; `make bench` reads it); `text`: the figures for a reader.
    #[arg(long, global = true, value_enum, default_value_t = Format::Json)]
    pub format: Format,
}

/// A peak rate > 0 (`--peak-tflops`).
fn positive_tflops(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(t) if t.is_finite() && t > 0.0 => Ok(t),
        _ => Err(format!(
            "{s}: expected TFLOP/s > 0, e.g. 989 (H100 bf16 dense)"
        )),
    }
}

#[derive(Subcommand, Debug)]
pub enum BenchWhat {
    /// Forward-pass tokens/s of a GPT config (eval mode, no grad) and MFU (2N + 4·L·H·Q·T FLOPs a token).
    Forward {
        #[command(flatten)]
        shape: BenchShape,
        /// Use the book's explicit attention instead of the fused SDPA kernel.
        #[arg(long)]
        manual_attention: bool,
        #[command(flatten)]
        compute: ComputeArgs,
    },
    /// Training tokens/s: forward + backward + AdamW step (train mode, the config's dropout) and MFU
    /// (nanoGPT's 6N + 12·L·H·Q·T FLOPs a token).
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
    /// Greedy decoding tokens/s after a prompt, batch 1, with or without the KV cache; MFU, and
    /// the weights' bandwidth (bytes of weights read per decoded token × tokens/s, GB/s).
    Generate {
        #[arg(long, default_value = "gpt2-small")]
        config: String,
        /// Benchmark this model instead of a fresh GPT config (e.g. smollm2-135m-instruct).
        #[arg(long)]
        model: Option<String>,
        #[arg(long, default_value_t = 20)]
        prompt_tokens: usize,
        #[arg(long, default_value_t = 64)]
        new_tokens: usize,
        #[arg(long)]
        no_cache: bool,
        #[arg(long, default_value_t = 3)]
        iters: usize,
        /// Inference weights: f32 (exact), bf16 (half the bytes per token) or q4 (Llama models on
        /// the CPU: weight-only 4-bit, GGUF Q4_1's groups of 32, bf16 activations; fastest decode).
        #[arg(long, value_enum, default_value_t = InferenceDtype::F32)]
        dtype: InferenceDtype,
        /// After the timed runs, profile one more with libtorch's operator profiler and write
        /// it here (chrome://tracing JSON; scripts/op_profile.py sums it per operator).
        #[arg(long)]
        profile: Option<PathBuf>,
        /// Also decode this many copies of the prompt together and report their total tokens/s
        /// (batched decoding, as `llmlab serve` runs concurrent requests).
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(i64).range(1..))]
        batch: i64,
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

//! What each subcommand does: parse nothing, validate at the boundary, call the library.
use super::*;
use crate::chat::Message;
use crate::data::{registry::Registry, tokenizer::train_bpe, BpeTokenizer};
use crate::device::{device_name, parse_device, set_threads};
use crate::error::{read_text, LlmError};
use crate::generate::GenerateSpec;
use crate::models::{gpt::ParamStats, GptConfig};
use crate::request::{build_prompt, Answer, Mode, PromptError};
use crate::resolve::LoadedLm;
use crate::train::PretrainSpec;
use anyhow::Result;
use std::path::Path;
use std::time::Instant;

pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Run(a) => run_experiment(a),
        Command::Report(a) => report(a),
        Command::Data { action } => data(action),
        Command::Tokenize(a) => tokenize(a),
        Command::TrainTokenizer(a) => train_tokenizer(a),
        Command::ModelInfo(a) => model_info(a),
        Command::Pretrain(a) => pretrain(*a),
        Command::Generate(a) => generate_cmd(a),
        Command::Chat(a) => super::chat::chat(a),
        Command::Classify(a) => classify_cmd(a),
        Command::Eval { action } => match action {
            EvalAction::Judge(a) => judge_cmd(a),
            EvalAction::Perplexity(a) => perplexity_cmd(a),
            EvalAction::Mmlu(a) => mmlu_cmd(a),
            EvalAction::Pairwise(a) => pairwise_cmd(a),
            EvalAction::Leaderboard(a) => leaderboard_cmd(a),
        },
        Command::Serve(a) => serve_cmd(a),
        Command::Download(a) => download(a),
        Command::Bench(a) => bench(a),
    }
}

fn run_experiment(a: RunArgs) -> Result<()> {
    use crate::experiment::{jobs, prepare, report, runner, status, value_text, Experiment};
    use anyhow::Context as _;
    if a.jobs == 0 {
        return Err(LlmError::Usage(
            "--jobs 0: give the number of trials to run at once, at least 1".into(),
        )
        .into());
    }
    let slurm = slurm_options(&a)?;
    let exp = Experiment::load(&a.file, &a.sets)?;
    let trials = prepare::prepare(&exp)?;
    if a.dry_run {
        println!(
            "experiment {} (task {}): {} trial(s) -> {}",
            exp.name,
            exp.task,
            trials.len(),
            a.runs.join(&exp.name).display()
        );
        for (i, (t, _)) in trials.iter().enumerate() {
            let vals: Vec<String> = t
                .values
                .iter()
                .map(|(k, v)| format!("{k}={}", value_text(v)))
                .collect();
            let status = status::read_status(&a.runs.join(&exp.name).join(&t.slug))
                .map(|s| format!(" [{}]", s.status))
                .unwrap_or_default();
            println!("  {i:>3}  {}  {}{status}", t.slug, vals.join(" "));
        }
        return Ok(());
    }
    let device = parse_device(&a.compute.device)?;
    let dir = a.runs.join(&exp.name);
    if !a.restart {
        prepare::check_existing_configs(&trials, &dir)?;
    }
    let only_trial = match &a.trial {
        Some(t) => Some(runner::resolve_trial(
            t,
            &trials.iter().map(|(t, _)| t.clone()).collect::<Vec<_>>(),
            &dir,
            &a.file,
        )?),
        None => None,
    };
    let opts = runner::RunOptions {
        runs_root: a.runs.clone(),
        device,
        threads: a.compute.threads,
        restart: a.restart,
        only_trial: only_trial.clone(),
        trial_command: Some(trial_command(&a)?),
    };
    crate::signal::install();
    crate::finetune::set_checkpoint_minutes(a.checkpoint_minutes);
    // `runs/<experiment>/experiment.json`: the trials, in order (`--trial INDEX`, the report).
    let record_trials = || -> Result<Vec<crate::experiment::Trial>> {
        std::fs::create_dir_all(&dir).map_err(|source| LlmError::Io {
            path: dir.clone(),
            source,
        })?;
        let plain: Vec<_> = trials.iter().map(|(t, _)| t.clone()).collect();
        report::write_record(&dir, &report::record(&exp, &plain))?;
        Ok(plain)
    };
    if let Some(slug) = &only_trial {
        // One trial (of a `--jobs` sweep, a Slurm array, or by hand): the run that started the
        // sweep writes the experiment's records; a trial run by hand first writes the list of
        // trials `llmlab report` reads, if nothing has yet.
        if !dir.join("experiment.json").is_file() {
            record_trials()?;
        }
        let results = runner::run(&exp, &trials, &opts)?;
        if let Some(r) = results
            .iter()
            .find(|r| matches!(r.outcome, runner::Outcome::Failed(_)))
        {
            anyhow::bail!(
                "trial {} failed; its error is in {}",
                r.slug,
                r.dir.join("status.json").display()
            );
        }
        if results.iter().all(|r| r.slug != *slug) {
            anyhow::bail!("trial {slug} did not run");
        }
        return Ok(());
    }
    let plain = record_trials()?;
    if let Some(slurm) = slurm {
        return run_on_slurm(&a, &exp, &plain, &dir, &slurm);
    }
    let results = if a.jobs > 1 {
        let launch = jobs::Launch {
            jobs: a.jobs,
            gpus: jobs::visible_gpus(&a.compute.device),
            command: opts
                .trial_command
                .as_deref()
                .context("the trial command is set")?,
        };
        jobs::run_parallel(&exp, &trials, &opts, &launch)?
    } else {
        runner::run(&exp, &trials, &opts)?
    };
    finish_sweep(&dir, &results)
}

/// The same run (file, overrides, folders, device) for one trial, on its share of threads: the
/// processes of `--jobs` and the other ranks of a `train.nproc` trial.
fn trial_command(a: &RunArgs) -> Result<Box<crate::experiment::task::TrialCommand>> {
    // The running binary itself, even when `cargo build` has replaced the file since the
    // sweep started (Linux: /proc/self/exe still names the running program).
    let exe = match std::path::Path::new("/proc/self/exe") {
        p if p.exists() => p.to_path_buf(),
        _ => std::env::current_exe().map_err(|source| LlmError::Io {
            path: "current executable".into(),
            source,
        })?,
    };
    let (file, sets, runs) = (a.file.clone(), a.sets.clone(), a.runs.clone());
    let (device, minutes, restart) = (a.compute.device.clone(), a.checkpoint_minutes, a.restart);
    Ok(Box::new(move |slug: &str, threads: usize| {
        let mut c = std::process::Command::new(&exe);
        c.arg("run").arg(&file);
        for s in &sets {
            c.arg("--set").arg(s);
        }
        c.arg("--runs").arg(&runs);
        c.args(["--device", &device]);
        c.args(["--threads", &threads.to_string(), "--trial", slug]);
        c.args(["--checkpoint-minutes", &minutes.to_string()]);
        if restart {
            c.arg("--restart");
        }
        c
    }))
}

/// The Slurm options of `llmlab run`, checked: `None` for a local run (and then no Slurm flag
/// may be given).
fn slurm_options(a: &RunArgs) -> Result<Option<crate::experiment::slurm::SlurmOptions>> {
    if a.backend != Backend::Slurm {
        if let Some(flag) = a.slurm.first_given() {
            return Err(LlmError::Usage(format!(
                "{flag}: a Slurm option; add --backend slurm to submit the trials as a job array"
            ))
            .into());
        }
        return Ok(None);
    }
    if a.jobs > 1 {
        return Err(LlmError::Usage(format!(
            "--jobs {}: with --backend slurm each trial is a task of the job array; \
             --array-parallelism K limits how many run at once",
            a.jobs
        ))
        .into());
    }
    if let Some(t) = &a.trial {
        return Err(LlmError::Usage(format!(
            "--trial {t}: runs one trial here; drop --backend slurm (the array's tasks run \
             --trial themselves)"
        ))
        .into());
    }
    if let Some(t) = a.compute.threads {
        return Err(LlmError::Usage(format!(
            "--threads {t}: with --backend slurm each trial runs on the CPUs of its task; give \
             --cpus-per-trial N"
        ))
        .into());
    }
    let opts = crate::experiment::slurm::SlurmOptions {
        partition: a.slurm.partition.clone(),
        time: a.slurm.time.clone(),
        cpus_per_trial: a.slurm.cpus_per_trial.unwrap_or(1),
        gpus_per_trial: a.slurm.gpus_per_trial.unwrap_or(0),
        mem: a.slurm.mem.clone(),
        array_parallelism: a.slurm.array_parallelism,
        sbatch_args: a.slurm.sbatch_args.clone(),
    };
    opts.validate()?;
    Ok(Some(opts))
}

/// `--backend slurm`: submits the unfinished trials as one job array and prints its id; with
/// `--wait`, waits for it and ends as a local run does.
fn run_on_slurm(
    a: &RunArgs,
    exp: &crate::experiment::Experiment,
    trials: &[crate::experiment::Trial],
    dir: &Path,
    opts: &crate::experiment::slurm::SlurmOptions,
) -> Result<()> {
    use crate::experiment::{report, slurm};
    slurm::find_sbatch()?;
    let abs = |p: &Path| {
        std::fs::canonicalize(p).map_err(|source| LlmError::Io {
            path: p.to_path_buf(),
            source,
        })
    };
    let exe = std::env::current_exe().map_err(|source| LlmError::Io {
        path: "current executable".into(),
        source,
    })?;
    let mut args: Vec<String> = vec![
        "run".into(),
        abs(&a.file)?.display().to_string(),
        "--runs".into(),
        abs(&a.runs)?.display().to_string(),
        "--device".into(),
        a.compute.device.clone(),
        "--checkpoint-minutes".into(),
        a.checkpoint_minutes.to_string(),
    ];
    for s in &a.sets {
        args.extend(["--set".into(), s.clone()]);
    }
    if a.restart {
        args.push("--restart".into());
    }
    let cmd = slurm::TaskCommand {
        exe,
        args,
        cwd: std::env::current_dir().map_err(|source| LlmError::Io {
            path: ".".into(),
            source,
        })?,
    };
    // The script names the experiment's folder absolutely (its logs, the tasks' records).
    let dir = &abs(dir)?;
    let rec = report::record(exp, trials);
    let tasks = slurm::pending(dir, &rec, &exp.evaluate, a.restart);
    let n = rec.trials.len();
    for (i, (slug, _)) in rec.trials.iter().enumerate() {
        if !tasks.iter().any(|(j, _)| *j == i) {
            eprintln!("[{}/{n}] {slug}: finished before, skipped", i + 1);
        }
    }
    if let Err(e) = crate::experiment::events::write_tb_experiment(exp, dir) {
        eprintln!("TensorBoard: {e:#}");
    }
    let Some(sub) = slurm::submit(dir, &rec, &tasks, opts, &cmd)? else {
        eprintln!("every trial is finished: nothing to submit");
        return finish_sweep(dir, &[]);
    };
    eprintln!(
        "submitted job array {} ({} task(s): {}); script and logs: {}; progress: llmlab report {}",
        sub.job_id,
        sub.tasks.len(),
        slurm::array_spec(
            &sub.tasks.iter().map(|(i, _)| *i).collect::<Vec<_>>(),
            opts.array_parallelism
        ),
        slurm::slurm_dir(dir).display(),
        dir.display()
    );
    println!("{}", sub.job_id);
    if !a.slurm.wait {
        return Ok(());
    }
    let results = slurm::wait(dir, &rec, &sub)?;
    finish_sweep(dir, &results)
}

/// The end of a sweep: the summary table (stdout; summary.md, summary.csv), and an error when
/// trials failed.
fn finish_sweep(dir: &Path, results: &[crate::experiment::runner::TrialResult]) -> Result<()> {
    use crate::experiment::{report, runner};
    println!("{}", report::write_summaries(dir)?);
    // A trial that did not get to record its end (a Slurm task cancelled or out of time) has
    // its state saved, not an error.
    let (failed, unfinished) = results
        .iter()
        .filter(|r| matches!(r.outcome, runner::Outcome::Failed(_)))
        .partition::<Vec<_>, _>(|r| crate::experiment::status::read_status(&r.dir).is_some());
    let failed = failed.len();
    eprintln!(
        "results: {} (summary.md, summary.csv); TensorBoard: make tensorboard",
        dir.display()
    );
    if !unfinished.is_empty() {
        anyhow::bail!(
            "{} of {} trial(s) stopped before finishing ({}){}; submit again to resume them",
            unfinished.len(),
            results.len(),
            unfinished
                .iter()
                .map(|r| r.slug.as_str())
                .collect::<Vec<_>>()
                .join(", "),
            if failed > 0 {
                format!(", {failed} failed (errors in status.json)")
            } else {
                String::new()
            }
        );
    }
    if failed > 0 {
        anyhow::bail!(
            "{failed} of {} trial(s) failed; their errors are in status.json; run the file again to retry them",
            results.len()
        );
    }
    Ok(())
}

fn report(a: ReportArgs) -> Result<()> {
    use crate::experiment::report as r;
    let (rec, rows) = r::rows(&a.dir)?;
    match a.format {
        ReportFormat::Table => print!("{}", r::write_summaries(&a.dir)?),
        ReportFormat::Markdown => print!("{}", r::markdown(&rec, &rows)),
        ReportFormat::Csv => print!("{}", r::csv(&rec, &rows)),
    }
    Ok(())
}

fn data(action: DataAction) -> Result<()> {
    let reg = Registry::builtin()?;
    match action {
        DataAction::List { format } => {
            if format == Format::Json {
                let list: Vec<_> = reg
                    .datasets
                    .iter()
                    .map(|(name, ds)| {
                        serde_json::json!({
                            "name": name,
                            "description": ds.description,
                            "files": ds.files.len(),
                            "url": ds.archive.as_ref().map(|a| a.url.clone())
                                .or_else(|| ds.files.first().and_then(|f| f.url.clone())),
                        })
                    })
                    .collect();
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else {
                for (name, ds) in &reg.datasets {
                    let url = ds
                        .archive
                        .as_ref()
                        .map(|a| a.url.as_str())
                        .or_else(|| ds.files.first().and_then(|f| f.url.as_deref()))
                        .unwrap_or("");
                    println!(
                        "{name:<22} {:>4} file(s)  {}\n{:<22} {url}",
                        ds.files.len(),
                        ds.description,
                        ""
                    );
                }
                match crate::data::registry::mirror_root() {
                    Some(m) => println!("\nmirror: LLMLAB_DATA_MIRROR={}", m.display()),
                    None => println!(
                        "\ncache: {}",
                        crate::data::registry::cache_root().join("data").display()
                    ),
                }
            }
        }
        DataAction::Fetch { name } => {
            let dir = reg.fetch(&name)?;
            println!("{}", dir.display());
        }
        DataAction::MakePreferences(a) => make_preferences_cmd(a, &reg)?,
    }
    Ok(())
}

fn make_preferences_cmd(a: MakePreferencesArgs, reg: &Registry) -> Result<()> {
    use crate::instruct::make_preferences::{dataset_file, make_preferences, PreferenceSpec};
    use crate::remote::{ChatConfig, Role};
    let input = match (&a.input, &a.dataset) {
        (Some(p), _) => {
            if !p.exists() {
                let name = p.to_string_lossy();
                let hint = if reg.get(&name).is_ok() {
                    format!("; for the registered data set, give --dataset {name}")
                } else {
                    String::new()
                };
                return Err(LlmError::Usage(format!(
                    "--input {}: no such file{hint}",
                    p.display()
                ))
                .into());
            }
            p.clone()
        }
        (None, Some(name)) => dataset_file(name)?,
        (None, None) => unreachable!("clap: --input or --dataset is required"),
    };
    let mut teacher = ChatConfig::new(
        Role::Teacher,
        &a.teacher_url,
        &a.teacher_model,
        a.api.into(),
    );
    teacher.seed = a.seed;
    teacher.timeout = std::time::Duration::from_secs(a.timeout.max(1));
    teacher.retries = a.retries;
    let spec = PreferenceSpec {
        input,
        out: a.out.clone(),
        seed: a.seed,
        limit: a.limit,
    };
    let text = a.format == Format::Text;
    let s = make_preferences(&spec, teacher, &mut |i, n, choice| {
        if text {
            eprintln!("[{i}/{n}] {}", choice.name());
        }
    })?;
    if text {
        println!(
            "{} entries in {} ({} made now, {} already there): {} polite (rewrite chosen), {} impolite (rewrite rejected), {} unchanged by the teacher",
            s.entries,
            s.out.display(),
            s.made,
            s.resumed,
            s.polite,
            s.impolite,
            s.unchanged
        );
        println!("settings: {}", s.progress.display());
    } else {
        println!("{}", serde_json::to_string(&s)?);
    }
    Ok(())
}

fn tokenize(a: TokenizeArgs) -> Result<()> {
    let text = match (&a.text, &a.file) {
        (Some(t), _) => t.clone(),
        (None, Some(f)) => read_text(f)?,
        (None, None) => {
            return Err(LlmError::Usage("give --text TEXT or --file PATH".into()).into())
        }
    };
    let tok = BpeTokenizer::load(&a.tokenizer)?;
    let ids = tok.encode(&text)?;
    match a.format {
        Format::Json => println!("{}", serde_json::json!({ "ids": ids })),
        Format::Text => println!(
            "{}",
            ids.iter().map(u32::to_string).collect::<Vec<_>>().join(" ")
        ),
    }
    Ok(())
}

fn train_tokenizer(a: TrainTokenizerArgs) -> Result<()> {
    if a.vocab_size < 257 {
        return Err(LlmError::Usage(format!(
            "--vocab-size {} is too small: a byte-level BPE needs at least 257 (256 bytes + <|endoftext|>)",
            a.vocab_size
        ))
        .into());
    }
    let tok = train_bpe(&a.files, a.vocab_size, a.min_frequency)?;
    tok.save(&a.out)?;
    println!(
        "wrote {} (vocabulary of {} tokens)",
        a.out.display(),
        tok.vocab_size()
    );
    Ok(())
}

fn model_info(a: ModelInfoArgs) -> Result<()> {
    let llama = match crate::resolve::LmSpec::parse(&a.config) {
        Ok(crate::resolve::LmSpec::LlamaFresh(_)) => Some(if Path::new(&a.config).is_file() {
            crate::models::llama::load_config_file(Path::new(&a.config))?
        } else {
            crate::models::LlamaConfig::preset(&a.config)?
        }),
        _ => None,
    };
    if let Some(cfg) = llama {
        let n = cfg.num_params();
        match a.format {
            Format::Json => println!(
                "{}",
                serde_json::json!({"config": a.config, "family": "llama", "total_params": n,
                    "size_mb_f32": n as f64 * 4.0 / 1024.0 / 1024.0, "size_mb_bf16": n as f64 * 2.0 / 1024.0 / 1024.0, "model": cfg})
            ),
            Format::Text => {
                println!("config: {} (Llama family)", a.config);
                println!("Total number of parameters: {n}");
                println!(
                    "Grouped-query attention: {} query heads, {} key/value heads, head_dim {}",
                    cfg.n_heads,
                    cfg.n_kv_groups,
                    cfg.head_dim()
                );
                println!(
                    "Total size of the model: {:.2} MB (f32), {:.2} MB (bf16)",
                    n as f64 * 4.0 / 1024.0 / 1024.0,
                    n as f64 * 2.0 / 1024.0 / 1024.0
                );
            }
        }
        return Ok(());
    }
    let cfg = GptConfig::load(&a.config)?;
    let st = ParamStats::from_config(&cfg);
    match a.format {
        Format::Json => println!("{}", serde_json::json!({ "config": a.config, "stats": st })),
        Format::Text => {
            println!("config: {}", a.config);
            println!("Total number of parameters: {}", st.total_params);
            println!(
                "Number of trainable parameters considering weight tying: {}",
                st.params_without_out_head
            );
            println!("Total size of the model: {:.2} MB", st.size_mb_f32);
        }
    }
    Ok(())
}

/// The pretraining spec: the YAML file (if any, else [`DEFAULT_PRETRAIN`]) with the flags and
/// then each `--set` applied on top as dotted overrides, by the function that applies an
/// experiment's `--set`.
fn pretrain_spec(a: &PretrainArgs) -> Result<PretrainSpec> {
    let spec = match &a.file {
        Some(f) => PretrainSpec::from_file(f)?,
        None => PretrainSpec::from_yaml(
            DEFAULT_PRETRAIN,
            "built-in defaults (gpt-mini on the-verdict)",
        )?,
    };
    let mut doc = serde_yaml::to_value(&spec)?;
    for (key, value) in pretrain_overrides(a)? {
        crate::experiment::set_dotted(&mut doc, key, value)
            .map_err(|m| LlmError::Usage(format!("{key}: {m}")))?;
    }
    for s in &a.sets {
        let (key, value) = crate::experiment::parse_set(s)?;
        crate::experiment::set_dotted(&mut doc, key, value)
            .map_err(|m| LlmError::Usage(format!("--set {s}: {m}")))?;
    }
    let spec: PretrainSpec = serde_yaml::from_value(doc).map_err(|e| LlmError::Config {
        origin: "command line".into(),
        message: e.to_string(),
    })?;
    spec.validate("command line")?;
    Ok(spec)
}

/// `llmlab pretrain`'s flags as dotted keys of the spec and their values, in the order they
/// apply: one line per flag. A flag that picks one of two keys clears the other (null).
fn pretrain_overrides(a: &PretrainArgs) -> Result<Vec<(&'static str, serde_yaml::Value)>> {
    use serde_yaml::Value;
    fn v<T: serde::Serialize>(x: &Option<T>) -> Result<Option<Value>> {
        Ok(x.as_ref().map(serde_yaml::to_value).transpose()?)
    }
    let one_of =
        |key, other, val: Option<Value>| [(other, val.as_ref().map(|_| Value::Null)), (key, val)];
    let (data_path, dataset) = match &a.data {
        Some(d) if Path::new(d).is_file() => (Some(d), None),
        d => (None, d.as_ref()),
    };
    let mut o = Vec::new();
    o.extend(one_of("model.preset", "model.init_from", v(&a.config)?));
    o.extend(one_of("model.init_from", "model.preset", v(&a.init_from)?));
    o.extend(one_of("data.path", "data.dataset", v(&data_path)?));
    o.extend(one_of("data.dataset", "data.path", v(&dataset)?));
    o.extend([
        ("model.overrides.context_length", v(&a.context_length)?),
        ("model.overrides.drop_rate", v(&a.drop_rate)?),
        ("train.epochs", v(&a.epochs)?),
        ("train.batch_size", v(&a.batch_size)?),
        ("train.lr", v(&a.lr)?),
        ("train.weight_decay", v(&a.weight_decay)?),
        ("train.eval_freq", v(&a.eval_freq)?),
        ("train.eval_iter", v(&a.eval_iter)?),
        ("train.grad_accum_steps", v(&a.grad_accum_steps)?),
        ("train.max_grad_norm", v(&a.max_grad_norm)?),
        ("train.checkpoint_every", v(&a.checkpoint_every)?),
        ("train.precision", v(&a.precision)?),
        ("train.fused_adamw", v(&a.fused_adamw)?),
        ("train.threads", v(&a.compute.threads)?),
        ("train.nproc", v(&a.nproc)?),
        ("seed", v(&a.seed)?),
        ("generate.prompt", v(&a.prompt)?),
        ("generate.max_new_tokens", v(&a.sample_tokens)?),
        ("name", v(&a.name)?),
    ]);
    Ok(o.into_iter()
        .filter_map(|(k, val)| val.map(|val| (k, val)))
        .collect())
}

/// What `llmlab pretrain` does without a file: a small GPT on the-verdict.
const DEFAULT_PRETRAIN: &str = "name: pretrain-mini
model: {preset: gpt-mini}
data: {dataset: the-verdict}
train: {epochs: 5, batch_size: 2, lr: 4.0e-4, weight_decay: 0.1, eval_freq: 5, eval_iter: 5}
";

fn pretrain(a: PretrainArgs) -> Result<()> {
    use crate::dist::{launch_local, timeout_from_env, Dist, DistEnv};
    let device = parse_device(&a.compute.device)?;
    let spec = pretrain_spec(&a)?;
    let run_dir = a
        .out
        .clone()
        .unwrap_or_else(|| Path::new("runs").join(&spec.name));
    let env = DistEnv::parse(&|k| std::env::var(k).ok())?;
    let world = env.as_ref().map_or(spec.train.nproc, |e| e.world);
    crate::dist::check_device(world, device)?;
    if env.is_none() && spec.train.nproc > 1 {
        // The launcher: this process only starts the ranks and watches them.
        println!(
            "run {} -> {}: starting {} ranks ({})",
            spec.name,
            run_dir.display(),
            spec.train.nproc,
            if device.is_cuda() {
                "NCCL, a GPU each"
            } else {
                "gloo on the CPU"
            }
        );
        let exe = std::env::current_exe()?;
        let args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
        return match launch_local(&exe, &args, spec.train.nproc) {
            // Ctrl-C: every rank stopped at the same step and rank 0 saved it; exit as a
            // one-process run does (130, the step and where its state is).
            Err(_) if crate::signal::interrupted() => {
                match crate::train::checkpoint::latest_step(&run_dir)? {
                    Some(step) => Err(LlmError::Interrupted { step, dir: run_dir }.into()),
                    None => Err(LlmError::Usage(format!(
                        "--nproc {}: interrupted before the first checkpoint",
                        spec.train.nproc
                    ))
                    .into()),
                }
            }
            r => r.map_err(Into::into),
        };
    }
    let device = crate::dist::rank_device(device, env.as_ref());
    let dist = match &env {
        None => Dist::single(),
        Some(e) => Dist::join(e, timeout_from_env()?, device)?,
    };
    let main = dist.is_main();
    if main {
        println!(
            "run {} -> {} on {}",
            spec.name,
            run_dir.display(),
            device_name(device)
        );
    }
    let t0 = Instant::now();
    crate::signal::install();
    // Rank 0 speaks for the group; the others only report errors.
    let out = crate::train::pretrain_dist(
        &spec,
        &run_dir,
        device,
        a.restart,
        &mut |l: &str| {
            if main {
                println!("{l}")
            }
        },
        &dist,
    )?;
    if !out.already_finished && main {
        if let Some(last) = out.evals.last() {
            println!(
                "done in {:.1} s: {} steps, train loss {:.3}, val loss {:.3} (perplexity {:.1})",
                t0.elapsed().as_secs_f64(),
                out.total_steps,
                last.train_loss,
                last.val_loss,
                crate::train::perplexity(last.val_loss)
            );
        }
        println!(
            "wrote model.safetensors, model.yaml, metrics.jsonl, samples.jsonl, losses.png in {}",
            run_dir.display()
        );
    }
    Ok(())
}

impl From<JudgeApi> for crate::remote::Api {
    fn from(api: JudgeApi) -> Self {
        match api {
            JudgeApi::Openai => Self::Openai,
            JudgeApi::Ollama => Self::Ollama,
        }
    }
}

impl JudgeServerArgs {
    fn config(&self) -> crate::eval::judge::JudgeConfig {
        let mut cfg =
            crate::eval::judge::judge_config(&self.judge_url, &self.judge_model, self.api.into());
        cfg.seed = self.seed;
        cfg.timeout = std::time::Duration::from_secs(self.timeout.max(1));
        cfg.retries = self.retries;
        cfg
    }
}

fn judge_cmd(a: JudgeArgs) -> Result<()> {
    use crate::eval::judge::{judge_file, judged_path};
    let cfg = a.server.config();
    let text = a.format == Format::Text;
    let summary = judge_file(&a.responses, cfg, &mut |i, n, score| {
        if text {
            eprintln!(
                "[{i}/{n}] {}",
                score.map_or("unparsable".to_string(), |s| s.to_string())
            );
        }
    })?;
    if text {
        println!(
            "Number of scores: {} of {} ({} unparsable)",
            summary.scored, summary.total, summary.unparsable
        );
        println!(
            "Average score: {}",
            summary
                .mean_score
                .map_or("n/a".to_string(), |m| format!("{m:.2}"))
        );
        println!("judged answers: {}", judged_path(&a.responses).display());
    } else {
        println!("{}", serde_json::to_string(&summary)?);
    }
    Ok(())
}

/// Prints `value` as one JSON line (`--format json`) and writes it to `out` atomically.
fn emit_json<T: serde::Serialize>(value: &T, json: bool, out: Option<&Path>) -> Result<()> {
    let line = serde_json::to_string(value)?;
    if json {
        println!("{line}");
    }
    if let Some(out) = out {
        crate::error::write_atomic(out, (line + "\n").as_bytes())?;
    }
    Ok(())
}

fn perplexity_cmd(a: PerplexityArgs) -> Result<()> {
    use crate::eval::perplexity::{dataset_text, perplexity, PerplexitySpec};
    let device = parse_device(&a.compute.device)?;
    set_threads(a.compute.threads);
    let text = match (&a.file, &a.dataset) {
        (Some(f), _) => read_text(f)?,
        (None, Some(name)) => dataset_text(name)?,
        (None, None) => unreachable!("clap: --file or --dataset is required"),
    };
    let spec = PerplexitySpec {
        max_length: a.max_length,
        stride: a.stride,
        batch_size: Some(a.batch_size),
    };
    let lm = LoadedLm::load(&a.model, device)?;
    let json = a.format == Format::Json;
    let start = Instant::now();
    let r = perplexity(&lm, &text, &spec, &mut |done, total| {
        if !json {
            eprint!("\r[{done}/{total} windows]");
            if done == total {
                eprintln!();
            }
        }
    })?;
    if !json {
        println!("perplexity: {:.4}", r.perplexity);
        println!(
            "nll: {:.6} nats per token over {} tokens (as the Hugging Face guide counts them)",
            r.nll, r.tokens
        );
        println!(
            "exact nll: {:.6} over all {} scored targets (perplexity {:.4})",
            r.exact_nll,
            r.scored_tokens,
            r.exact_nll.exp()
        );
        println!(
            "{} text tokens, {} windows of {} tokens moved by {} ({:.1} s on {})",
            r.text_tokens,
            r.windows,
            r.max_length,
            r.stride,
            start.elapsed().as_secs_f64(),
            device_name(device)
        );
    }
    emit_json(&r, json, a.out.as_deref())
}

fn mmlu_cmd(a: MmluArgs) -> Result<()> {
    use crate::eval::mmlu::{data_root, evaluate, MmluSpec};
    let device = parse_device(&a.compute.device)?;
    set_threads(a.compute.threads);
    let spec = MmluSpec {
        subjects: a.subjects.clone(),
        shots: a.shots,
        style: a.style,
        limit: a.limit,
        batch_size: a.batch_size,
    };
    spec.validate()?;
    spec.subject_list()?;
    let root = match &a.data {
        Some(d) => d.clone(),
        None => data_root()?,
    };
    let lm = LoadedLm::load(&a.model, device)?;
    let json = a.format == Format::Json;
    let start = Instant::now();
    let mut first: Option<(usize, Instant)> = None;
    let r = evaluate(&lm, &spec, &root, a.predictions.as_deref(), &mut |p| {
        if !json {
            // Questions per second of this process (resumed questions excluded).
            let (d0, t0) = *first.get_or_insert((p.done, Instant::now()));
            let rate = (p.done - d0) as f64 / t0.elapsed().as_secs_f64().max(1e-9);
            eprint!(
                "\r[{}/{} questions] {:<40} {:.1} q/s",
                p.done, p.total, p.subject, rate
            );
        }
    })?;
    if !json {
        eprintln!();
        println!("{:<40} {:>8} {:>6}", "subject", "accuracy", "n");
        for (name, s) in &r.subjects {
            println!("{name:<40} {:>7.2}% {:>6}", 100.0 * s.accuracy, s.n);
        }
        for (name, s) in &r.categories {
            println!(
                "{:<40} {:>7.2}% {:>6}",
                format!("[{name}]"),
                100.0 * s.accuracy,
                s.n
            );
        }
        println!(
            "MMLU ({}, {} shots): accuracy {:.2}% (95% CI {:.2}-{:.2}) over {} questions; macro {:.2}% over {} subjects",
            r.style.name(),
            r.shots,
            100.0 * r.accuracy,
            100.0 * r.ci_low,
            100.0 * r.ci_high,
            r.n,
            100.0 * r.macro_accuracy,
            r.subjects.len()
        );
        if let Some(u) = r.accuracy_unnormalized {
            println!("unnormalised log-likelihood (acc): {:.2}%", 100.0 * u);
        }
        if r.fewer_shots > 0 {
            println!(
                "{} questions had fewer than {} examples: their prompts would not fit the context of {} tokens",
                r.fewer_shots,
                r.shots,
                lm.context_length()
            );
        }
        if !r.skipped.is_empty() {
            println!(
                "{} questions left out: longer than the context of {} tokens even with no examples ({})",
                r.skipped.len(),
                lm.context_length(),
                r.skipped
                    .iter()
                    .map(|s| format!("{}#{}", s.subject, s.index))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        println!(
            "{:.1} s on {}",
            start.elapsed().as_secs_f64(),
            device_name(device)
        );
    }
    emit_json(&r, json, a.out.as_deref())
}

fn pairwise_cmd(a: PairwiseArgs) -> Result<()> {
    use crate::eval::leaderboard::Winner;
    use crate::eval::pairwise::{pairwise, unparsable_path, ResponsesFile};
    let files = a
        .responses
        .iter()
        .map(|r| ResponsesFile::parse(r))
        .collect::<Result<Vec<_>, _>>()?;
    let text = a.format == Format::Text;
    let s = pairwise(&files, a.server.config(), &a.out, &mut |i, n, vote| {
        if text {
            match vote {
                Some(v) => {
                    let who = match v.winner {
                        Winner::ModelA => v.model_a.as_str(),
                        Winner::ModelB => v.model_b.as_str(),
                        Winner::Tie => "tie",
                    };
                    eprintln!("[{i}/{n}] {} vs {}: {who}", v.model_a, v.model_b);
                }
                None => eprintln!("[{i}/{n}] unparsable"),
            }
        }
    })?;
    if text {
        println!(
            "{} comparisons of {} models: {} already in {}, {} new votes, {} unparsable ({} of {} judge replies)",
            s.comparisons,
            s.models.len(),
            s.already_done,
            s.out.display(),
            s.new_votes,
            s.unparsable_comparisons,
            s.replies.unparsable,
            s.replies.parsed + s.replies.unparsable
        );
        if s.unparsable_comparisons > 0 {
            println!(
                "unparsable comparisons: {}",
                unparsable_path(&a.out).display()
            );
        }
    } else {
        println!("{}", serde_json::to_string(&s)?);
    }
    Ok(())
}

fn leaderboard_cmd(a: LeaderboardArgs) -> Result<()> {
    use crate::eval::leaderboard::{leaderboard, read_votes, render_text, LeaderboardSpec};
    let votes = read_votes(&a.votes)?;
    let lb = leaderboard(
        &votes,
        &LeaderboardSpec {
            bootstrap: a.bootstrap,
            seed: a.seed,
        },
    );
    if a.format == Format::Text {
        print!("{}", render_text(&lb));
    }
    emit_json(&lb, a.format == Format::Json, a.out.as_deref())
}

fn classify_cmd(a: ClassifyArgs) -> Result<()> {
    let device = parse_device(&a.compute.device)?;
    set_threads(a.compute.threads);
    let mut texts = a.text.clone();
    if let Some(f) = &a.file {
        texts.extend(
            crate::error::read_text(f)?
                .lines()
                .filter(|l| !l.trim().is_empty())
                .map(String::from),
        );
    }
    if texts.is_empty() {
        return Err(LlmError::Usage(
            "no text to classify: give --text or a non-empty --file".into(),
        )
        .into());
    }
    let saved = crate::classify::train::SavedClassifier::load(&a.model, device)?;
    for (text, (label, prob)) in texts.iter().zip(saved.predict(&texts)?) {
        match a.format {
            Format::Json => println!(
                "{}",
                serde_json::json!({"text": text, "label": label, "probability": prob})
            ),
            Format::Text => println!("{label}\t{prob:.4}\t{text}"),
        }
    }
    Ok(())
}

fn generate_cmd(a: GenerateArgs) -> Result<()> {
    let device = parse_device(&a.compute.device)?;
    set_threads(a.compute.threads);
    let mut spec = GenerateSpec {
        max_new_tokens: a.max_new_tokens,
        temperature: a.temperature,
        top_k: a.top_k,
        top_p: a.top_p,
        seed: a.seed,
        eos_id: None,
        stop_ids: Vec::new(),
        use_cache: !a.no_cache,
    };
    spec.validate()?;
    let mut lm = LoadedLm::load(&a.model, device)?;
    lm.set_dtype(a.dtype)?;
    if !a.ignore_eos {
        spec.eos_id = lm.eos_id;
    }
    // Plain text, the chat template, or an instruct run's prompt style (its response extracted).
    let messages = [Message::new("user", &a.prompt)];
    let mode = if a.chat {
        Mode::Template {
            system: a.system.as_deref(),
            messages: &messages,
        }
    } else if a.raw {
        Mode::Raw(&a.prompt)
    } else {
        Mode::Instruction {
            instruction: &a.prompt,
            input: a.input.as_deref(),
        }
    };
    let prompt = build_prompt(&lm, &mode).map_err(|e| {
        LlmError::Usage(match e {
            PromptError::NoChatTemplate(_) => format!("--chat: the model {e}"),
            PromptError::NotInstructRun(_) => format!("--input: {e}"),
        })
    })?;
    spec.stop_ids.extend(&prompt.stop_ids);
    let prompt_ids = lm.encode_prompt(&prompt.text)?;
    let gen = lm.generate_stream(&prompt_ids, &spec, |_| true)?;
    let text = lm.decode(&gen.ids)?;
    match a.format {
        Format::Json => println!("{}", {
            let mut v = serde_json::json!({"prompt_ids": prompt_ids, "ids": gen.ids, "text": text, "stopped_at_eos": gen.stopped_at_eos});
            if let Answer::Instruct(_) = prompt.answer {
                v["response"] = prompt.response(&text).into();
            }
            v
        }),
        Format::Text => {
            if let Answer::Continuation = prompt.answer {
                let mut all = prompt_ids.clone();
                all.extend(&gen.ids);
                println!("{}", lm.decode(&all)?);
            } else {
                println!("{}", prompt.response(&text));
            }
            let n = gen.ids.len().saturating_sub(1).max(1) as f64;
            eprintln!(
                "[{} new tokens; prompt {:.3} s; decode {:.1} tokens/s; {}]",
                gen.ids.len(),
                gen.prompt_seconds,
                n / gen.decode_seconds.max(1e-9),
                if spec.use_cache {
                    "KV cache"
                } else {
                    "no cache"
                }
            );
        }
    }
    Ok(())
}

fn serve_cmd(a: ServeArgs) -> Result<()> {
    use crate::serve::{engine::EngineConfig, run, ServeConfig};
    let device = parse_device(&a.compute.device)?;
    set_threads(a.compute.threads);
    let secs = std::time::Duration::from_secs;
    run(ServeConfig {
        engine: EngineConfig {
            model: a.model,
            dtype: a.dtype,
            device,
            max_batch: a.max_batch as usize,
            max_queue: a.max_queue as usize,
        },
        host: a.host,
        port: a.port,
        api_key: a.api_key.filter(|k| !k.is_empty()),
        max_body: (a.max_body_mib as usize) << 20,
        timeout: secs(a.timeout),
        idle_timeout: secs(a.idle_timeout),
        default_max_tokens: a.max_tokens.map(|n| n as usize),
    })
}

fn download(a: DownloadArgs) -> Result<()> {
    let dir = crate::weights::hub::download_model(&a.name)?;
    println!("{}", dir.display());
    Ok(())
}

fn bench(a: BenchArgs) -> Result<()> {
    use crate::bench;
    let shape = |s: BenchShape| bench::Shape {
        config: s.config,
        batch: s.batch,
        seq: s.seq,
        warmup: s.warmup,
        iters: s.iters,
    };
    let device = |c: &ComputeArgs| -> Result<tch::Device> {
        let d = parse_device(&c.device)?;
        set_threads(c.threads);
        Ok(d)
    };
    let (json, text) = match a.what {
        BenchWhat::Forward {
            shape: s,
            manual_attention,
            compute,
        } => {
            let r = bench::forward(
                &shape(s),
                manual_attention,
                device(&compute)?,
                a.peak_tflops,
            )?;
            (serde_json::to_value(&r)?, r.text())
        }
        BenchWhat::Train {
            shape: s,
            precision,
            fused_adamw,
            compute,
        } => {
            let d = device(&compute)?;
            let r = bench::train(&shape(s), precision, fused_adamw, d, a.peak_tflops)?;
            (serde_json::to_value(&r)?, r.text())
        }
        BenchWhat::Generate {
            config,
            model,
            prompt_tokens,
            new_tokens,
            no_cache,
            iters,
            dtype,
            profile,
            batch,
            compute,
        } => {
            let b = bench::Decode {
                config,
                model,
                prompt_tokens,
                new_tokens,
                use_cache: !no_cache,
                iters,
                dtype,
                profile,
                batch,
            };
            let r = bench::decode(&b, device(&compute)?, a.peak_tflops)?;
            (serde_json::to_value(&r)?, r.text())
        }
    };
    match a.format {
        // One line whose keys are sorted (`make bench` reads `tokens_per_s`).
        Format::Json => println!("{json}"),
        Format::Text => println!("{text}"),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    /// The spec of `llmlab pretrain FLAGS` (flags split at whitespace).
    fn pretrain_spec_of(flags: &str) -> Result<PretrainSpec> {
        let args = ["llmlab", "pretrain"]
            .into_iter()
            .chain(flags.split_whitespace());
        let cli = Cli::try_parse_from(args)?;
        let Command::Pretrain(a) = cli.command else {
            unreachable!("parsed a pretrain command")
        };
        pretrain_spec(&a)
    }

    /// Every flag lands on its key, typed by the flag (a prompt "true" stays text), and a flag
    /// that picks one of two keys clears the other.
    #[test]
    fn pretrain_flags_set_their_dotted_keys() -> Result<()> {
        let got = pretrain_spec_of(
            "--config gpt2-small --init-from runs/x --data Cargo.toml --context-length 64 \
             --drop-rate 0 --epochs 2 --batch-size 3 --lr 1e-3 --weight-decay 0.5 --eval-freq 4 \
             --eval-iter 6 --grad-accum-steps 7 --max-grad-norm 1.5 --checkpoint-every 8 \
             --precision bf16 --fused-adamw false --threads 3 --seed 9 --prompt true \
             --sample-tokens 11 --name flags",
        )?;
        let mut want = PretrainSpec::from_yaml(DEFAULT_PRETRAIN, "defaults")?;
        want.model.preset = None;
        want.model.init_from = Some("runs/x".into());
        want.data.dataset = None;
        want.data.path = Some("Cargo.toml".into());
        want.model.overrides.context_length = Some(64);
        want.model.overrides.drop_rate = Some(0.0);
        let t = &mut want.train;
        (t.epochs, t.batch_size, t.lr, t.weight_decay) = (2, 3, 1e-3, 0.5);
        (t.eval_freq, t.eval_iter, t.grad_accum_steps) = (4, 6, 7);
        (t.max_grad_norm, t.checkpoint_every, t.threads) = (Some(1.5), 8, Some(3));
        (t.precision, t.fused_adamw) = (Precision::Bf16, FusedAdamW::Off);
        want.seed = 9;
        want.generate.prompt = "true".into();
        want.generate.max_new_tokens = 11;
        want.name = "flags".into();
        assert_eq!(got, want);
        // A name that is no file is a data set.
        let got = pretrain_spec_of("--data no-such-file --config gpt-mini")?;
        assert_eq!(got.data.dataset.as_deref(), Some("no-such-file"));
        assert_eq!((got.data.path, got.model.init_from), (None, None));
        Ok(())
    }

    /// Without flags, a file's spec is what it reads, through the document and back.
    #[test]
    fn a_pretrain_file_without_flags_is_unchanged() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let f = dir.path().join("run.yaml");
        std::fs::write(
            &f,
            "name: r\nmodel: {init_from: runs/x, overrides: {qkv_bias: true}}\n\
             data: {path: a.txt, stride: 3, train_ratio: 0.8}\n\
             train: {epochs: 1, batch_size: 2, lr: 1.0e-3, betas: [0.8, 0.9], eval_freq: 1,\
             eval_iter: 1, fused_adamw: true, precision: bf16,\
             schedule: {kind: cosine, warmup_steps: 3, initial_lr: 1.0e-4, min_lr: 1.0e-5}}\n\
             generate: {prompt: 'null', top_k: 5, top_p: 0.5}\n",
        )?;
        let file = PretrainSpec::from_file(&f)?;
        assert_eq!(pretrain_spec_of(&f.display().to_string())?, file);
        assert_eq!(file.generate.prompt, "null");
        Ok(())
    }

    /// `--set` reaches any key, applies after the flags, and a bad one names itself.
    #[test]
    fn pretrain_set_overrides_any_key_after_the_flags() -> Result<()> {
        let got = pretrain_spec_of(
            "--lr 1e-3 --set train.lr=2e-3 --set train.betas=[0.8,0.95] --set data.stride=7",
        )?;
        assert_eq!(got.train.lr, 2e-3);
        assert_eq!(got.train.betas, (0.8, 0.95));
        assert_eq!(got.data.stride, Some(7));
        let err = pretrain_spec_of("--set train.lr").expect_err("no value");
        assert!(
            format!("{err:#}").contains("--set train.lr: expected key=value"),
            "{err:#}"
        );
        let err = pretrain_spec_of("--set train.epochs=0").expect_err("epochs 0");
        assert!(format!("{err:#}").contains("train.epochs"), "{err:#}");
        Ok(())
    }

    #[test]
    fn a_bad_pretrain_flag_names_its_key() {
        let err = pretrain_spec_of("--lr 0").expect_err("lr 0");
        assert_eq!(
            format!("{err:#}"),
            "invalid config command line: train.lr: 0 must be > 0"
        );
    }
}

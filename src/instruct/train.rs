//! Instruction fine-tuning (book ch07 §7.6 `train_model_simple` on instruction batches): loss on
//! train/validation every `eval_freq` steps, a sample response after each epoch, full
//! fine-tuning or LoRA; then a response for every test entry (`responses.json`, the book's
//! `instruction-data-with-response.json`) and the judge-free figures: validation loss and
//! perplexity on the response tokens, exact match and ROUGE-L against the references.
//! Interrupted runs resume from their last checkpoint (end of each epoch, or where Ctrl-C
//! stopped them), as `task: classify` does.
use super::collate::{self, Batch, CollateOptions, Encoded};
use super::data::{self, Entry, Splits};
use super::spec::{
    GenerationSettings, InstructFinetuneSpec, InstructModelSpec, InstructSpec, Method,
};
use crate::error::{read_text, write_atomic};
use crate::finetune::{self, batches, FinetuneRun, Trainable};
use crate::models::trainable::Weights;
use crate::prompt::{PromptStyle, Prompter};
use crate::resolve::saved::{self, SavedHead, SavedRecord};
use crate::resolve::LoadedLm;
use crate::train::trainer::TrainEvents;
use anyhow::Result;
use serde::{Deserialize, Serialize};
use std::path::Path;
use std::time::Instant;
use tch::{Device, Kind, Tensor};

/// The training rows: one padded example a row (the book), or packed examples.
#[derive(Debug, Clone)]
pub enum Rows {
    Plain(Vec<Encoded>),
    Packed(Vec<(Vec<i64>, Vec<bool>)>),
}

impl Rows {
    pub fn len(&self) -> usize {
        match self {
            Self::Plain(v) => v.len(),
            Self::Packed(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The batch of rows `idx`.
    pub fn batch(&self, idx: &[usize], opts: &CollateOptions) -> Batch {
        match self {
            Self::Plain(v) => {
                collate::collate(&idx.iter().map(|&i| &v[i]).collect::<Vec<_>>(), opts)
            }
            Self::Packed(v) => {
                collate::collate_packed(&idx.iter().map(|&i| &v[i]).collect::<Vec<_>>(), opts)
            }
        }
    }
}

/// A model ready to fine-tune with its encoded splits.
pub struct Prepared {
    pub lm: LoadedLm,
    pub prompter: Prompter,
    pub splits: Splits,
    pub train: Rows,
    pub val: Vec<Encoded>,
    pub opts: CollateOptions,
}

/// Token ids of each entry's full text and the length of its prompt.
pub fn encode(lm: &LoadedLm, prompter: &Prompter, entries: &[Entry]) -> Result<Vec<Encoded>> {
    entries
        .iter()
        .map(|e| {
            let prompt_len = lm.encode_prompt(&prompter.prompt(e))?.len();
            Ok(Encoded::new(
                lm.encode_prompt(&prompter.full_text(e))?,
                prompt_len,
            ))
        })
        .collect()
}

/// Loads the model to tune (then seeds every generator with `seed`), with its dropout and the
/// LoRA adapters `ft` trains, and the prompter of `style` for it.
pub fn load_model(
    model: &InstructModelSpec,
    ft: &InstructFinetuneSpec,
    style: PromptStyle,
    seed: u64,
    device: Device,
) -> Result<(LoadedLm, Prompter)> {
    let mut lm = LoadedLm::load(&model.name, device)?;
    crate::device::seed_everything(seed);
    if let Some(p) = model.dropout {
        lm.model.set_drop_rate(p);
    }
    let adapted = ft.trainable.adapted_blocks(ft.method, lm.model.n_layers());
    if !adapted.is_empty() {
        lm.add_lora_to(&ft.lora, adapted);
    }
    let prompter = Prompter::new(style, lm.chat.clone(), &model.name)?;
    Ok((lm, prompter))
}

/// Loads the model (with dropout and adapters as `spec` says) and the data.
pub fn prepare(spec: &InstructSpec, device: Device) -> Result<Prepared> {
    let entries = spec.data.read()?;
    let splits = spec.data.split(&entries, spec.seed);
    let keys = "data.split and data.max_*";
    finetune::check_splits(splits.train.len(), splits.val.len(), "entries", keys)?;
    let (lm, prompter) = load_model(
        &spec.model,
        &spec.finetune,
        spec.data.prompt_style,
        spec.seed,
        device,
    )?;
    let opts = CollateOptions {
        pad_id: lm.pad_id(),
        ignore_index: -100,
        allowed_max_length: Some(
            spec.data
                .allowed_max_length
                .min(lm.context_length() as usize),
        ),
        mask_instruction: spec.data.mask_instruction,
    };
    let train_enc = encode(&lm, &prompter, &splits.train)?;
    let train = if spec.data.packing {
        let max = opts
            .allowed_max_length
            .unwrap_or(spec.data.allowed_max_length);
        Rows::Packed(collate::pack(
            &train_enc.iter().collect::<Vec<_>>(),
            max,
            &opts,
        ))
    } else {
        Rows::Plain(train_enc)
    };
    let val = encode(&lm, &prompter, &splits.val)?;
    Ok(Prepared {
        lm,
        prompter,
        splits,
        train,
        val,
        opts,
    })
}

/// The book's `calc_loss_batch`: mean cross-entropy over the targets that are not ignored.
pub fn loss_batch(lm: &LoadedLm, b: &Batch, ignore_index: i64, train: bool) -> Tensor {
    let (x, y) = b.tensors(lm.vs.device());
    let logits = lm.model.forward_t(&x, train); // (b, t, vocab)
    logits
        .flatten(0, 1)
        .to_kind(Kind::Float)
        .cross_entropy_loss::<Tensor>(
            &y.flatten(0, 1),
            None,
            tch::Reduction::Mean,
            ignore_index,
            0.0,
        )
}

/// The book's `calc_loss_loader`: mean batch loss over the first `max_batches` batches (all
/// when `None`), in eval mode; batches without a counted target are skipped.
pub fn loss_loader(
    lm: &LoadedLm,
    rows: &Rows,
    opts: &CollateOptions,
    batch: usize,
    max_batches: Option<usize>,
) -> f64 {
    let _g = tch::no_grad_guard();
    let bs = batches(rows.len(), batch, false, false, 0, 0);
    let n = max_batches.unwrap_or(bs.len()).min(bs.len());
    let (mut total, mut k) = (0.0, 0usize);
    for idx in &bs[..n] {
        let b = rows.batch(idx, opts);
        if b.n_targets(opts.ignore_index) == 0 {
            continue;
        }
        total += loss_batch(lm, &b, opts.ignore_index, false).double_value(&[]);
        k += 1;
    }
    if k == 0 {
        f64::NAN
    } else {
        total / k as f64
    }
}

/// One line of `metrics.jsonl` written at each evaluation: pretraining's record.
pub type InstructEval = crate::train::EvalRecord;

/// The last line of `metrics.jsonl`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct InstructFinal {
    pub step: usize,
    /// Losses (all batches) as trained (with or without instruction masking).
    pub train_loss: f64,
    pub val_loss: f64,
    /// The validation loss before the first step (all batches, same settings).
    pub initial_val_loss: f64,
    /// Loss and perplexity on the validation responses only (instruction and input masked).
    pub val_response_loss: f64,
    pub val_response_perplexity: f64,
    /// Over the test responses: share equal to the reference (case and spacing ignored), mean
    /// ROUGE-L F-measure; NaN without responses.
    pub exact_match: f64,
    pub rouge_l: f64,
    pub test_responses: usize,
    /// Wall time of this invocation's training (not reproducible).
    pub train_seconds: f64,
}

/// What a finished run reports.
pub type InstructOutcome = finetune::Outcome<InstructEval, InstructFinal>;

/// Marks what the run trains (`finetune.trainable` with `finetune.method`; the language-model
/// head is kept) and freezes the rest; returns the trained variables by name.
pub fn set_trainable(lm: &LoadedLm, ft: &InstructFinetuneSpec) -> Vec<(String, Tensor)> {
    crate::finetune::set_trainable(lm, ft.trainable, ft.method, None, None)
}

/// The response the model generates for `entry` (greedy by default), as the book extracts it.
pub fn respond(
    lm: &LoadedLm,
    prompter: &Prompter,
    entry: &Entry,
    gen: &crate::generate::GenerateSpec,
) -> Result<String> {
    let ids = lm.encode_prompt(&prompter.prompt(entry))?;
    let g = lm.generate_stream(&ids, gen, |_| true)?;
    Ok(prompter.extract_response(&lm.decode(&g.ids)?))
}

/// The generation settings with the model's stop tokens: end-of-text (the padding token the
/// examples end with), the model's end-of-sequence and end-of-turn tokens.
pub fn generation_spec(
    settings: &GenerationSettings,
    seed: u64,
    lm: &LoadedLm,
    max_new: usize,
) -> crate::generate::GenerateSpec {
    let mut g = settings.to_spec(seed, lm.eos_id, lm.response_stops());
    g.max_new_tokens = max_new;
    g
}

/// Fine-tunes (or resumes, or reports as finished) the model `spec` describes in `run_dir`:
/// the book's `train_model_simple` on instruction batches, resumable, then the test responses.
pub fn run(
    spec: &InstructSpec,
    run_dir: &Path,
    device: Device,
    restart: bool,
    events: &mut dyn TrainEvents,
) -> Result<InstructOutcome> {
    spec.validate()?;
    if let Some(done) = finetune::open(spec, spec.train.threads, run_dir, restart, events)? {
        return Ok(done);
    }
    let p = prepare(spec, device)?;
    data::write_splits(run_dir, &p.splits)?;
    let t = &spec.train;
    let opts = p.opts;
    let val_rows = Rows::Plain(p.val.clone());
    let trained = set_trainable(&p.lm, &spec.finetune);
    let rows = p.train.len();
    let mut run = FinetuneRun::start(run_dir, trained, t, spec.seed, device, rows, events)?;
    let initial_path = run_dir.join("initial.json");
    let initial_val_loss = if run.resumed {
        read_text(&initial_path)
            .ok()
            .and_then(|s| serde_json::from_str::<f64>(&s).ok())
            .unwrap_or(f64::NAN)
    } else {
        let val = loss_loader(&p.lm, &val_rows, &opts, t.batch_size, None);
        let train_loss = loss_loader(&p.lm, &p.train, &opts, t.batch_size, Some(t.eval_iter));
        write_atomic(&initial_path, serde_json::to_string(&val)?.as_bytes())?;
        run.events.log(&format!(
            "Initial losses: training {train_loss:.3}, validation {val:.3}"
        ));
        run.events
            .scalars(0, &[("train/loss", train_loss), ("val/loss", val)]);
        val
    };
    let (n_trained, n_total) = run.parameter_counts(&p.lm.vs);
    run.events.log(&format!(
        "{} train / {} val / {} test entries ({} rows{}), prompt style {}, {}instruction masking, {n_trained} of {n_total} parameters trained ({}{})",
        p.splits.train.len(),
        p.splits.val.len(),
        p.splits.test.len(),
        p.train.len(),
        if spec.data.packing { ", packed" } else { "" },
        spec.data.prompt_style.name(),
        if opts.mask_instruction { "" } else { "no " },
        spec.finetune.method.name(),
        match spec.finetune.trainable {
            Trainable::All => String::new(),
            other => format!(", {}", other.name()),
        }
    ));
    let sample_spec = generation_spec(
        &spec.generation,
        spec.seed,
        &p.lm,
        spec.generation.max_new_tokens.min(50),
    );
    let ignore = opts.ignore_index;
    run.begin();
    for epoch in run.epochs() {
        let order = batches(p.train.len(), t.batch_size, true, true, spec.seed, epoch);
        for g in run.groups(epoch) {
            let grad_norm = run.step(&order, epoch, g, |idx| {
                let b = p.train.batch(idx, &opts);
                let tokens = b.rows * b.cols;
                if b.n_targets(ignore) == 0 {
                    return Ok((None, tokens));
                }
                Ok((Some(loss_batch(&p.lm, &b, ignore, true)), tokens))
            })?;
            if run.eval_due() {
                let train_loss =
                    loss_loader(&p.lm, &p.train, &opts, t.batch_size, Some(t.eval_iter));
                let val_loss =
                    loss_loader(&p.lm, &val_rows, &opts, t.batch_size, Some(t.eval_iter));
                let rec = InstructEval {
                    step: run.state.step,
                    epoch: epoch + 1,
                    tokens_seen: run.state.seen,
                    train_loss,
                    val_loss,
                    lr: run.lr(),
                    grad_norm,
                    tokens_per_sec: run.throughput(),
                };
                let per_sec = rec.tokens_per_sec;
                run.record_eval(
                    epoch,
                    rec,
                    (train_loss, val_loss),
                    grad_norm,
                    &[("train/tokens_per_sec", per_sec)],
                    "",
                )?;
            }
            if run.epoch_done(g) {
                // The book's generate_and_print_sample: the first validation entry.
                let sample = respond(&p.lm, &p.prompter, &p.splits.val[0], &sample_spec)?;
                run.events
                    .log(&format!("Sample after epoch {}: {sample:?}", epoch + 1));
                run.events.sample(run.state.step, epoch + 1, &sample);
            }
            run.end_step(g)?;
        }
    }
    let train_seconds = run.train_seconds();

    let train_loss = loss_loader(&p.lm, &p.train, &opts, t.batch_size, None);
    let val_loss = loss_loader(&p.lm, &val_rows, &opts, t.batch_size, None);
    let masked = CollateOptions {
        mask_instruction: true,
        ..opts
    };
    let val_response_loss = loss_loader(&p.lm, &val_rows, &masked, t.batch_size, None);

    // A response for every test entry (the book's instruction-data-with-response.json).
    let (mut exact_match, mut rouge_l) = (f64::NAN, f64::NAN);
    let mut n_responses = 0;
    if spec.generation.responses && !p.splits.test.is_empty() {
        let gen = generation_spec(
            &spec.generation,
            spec.seed,
            &p.lm,
            spec.generation.max_new_tokens,
        );
        let t0 = Instant::now();
        let mut out = Vec::with_capacity(p.splits.test.len());
        let mut responses = Vec::with_capacity(p.splits.test.len());
        for e in &p.splits.test {
            let r = respond(&p.lm, &p.prompter, e, &gen)?;
            let mut rec = e.raw.clone();
            rec.insert("model_response".into(), r.clone().into());
            out.push(serde_json::Value::Object(rec));
            responses.push(r);
            if crate::signal::interrupted() {
                return Err(run.interrupted().into());
            }
        }
        write_atomic(
            &run_dir.join("responses.json"),
            serde_json::to_string_pretty(&out)?.as_bytes(),
        )?;
        (exact_match, rouge_l) = crate::metrics::score_responses(
            responses
                .iter()
                .zip(&p.splits.test)
                .map(|(r, e)| (r.as_str(), e.output.as_str())),
        );
        n_responses = responses.len();
        run.events.log(&format!(
            "{n_responses} test responses in {:.1}s -> {}",
            t0.elapsed().as_secs_f64(),
            run_dir.join("responses.json").display()
        ));
    }
    let result = InstructFinal {
        step: run.state.step,
        train_loss,
        val_loss,
        initial_val_loss,
        val_response_loss,
        val_response_perplexity: val_response_loss.exp(),
        exact_match,
        rouge_l,
        test_responses: n_responses,
        train_seconds,
    };
    run.events.log(&format!(
        "Validation loss {initial_val_loss:.3} -> {val_loss:.3}; on the responses {val_response_loss:.3} (perplexity {:.2}); test exact match {:.1}%, ROUGE-L {rouge_l:.3}",
        result.val_response_perplexity,
        exact_match * 100.0
    ));
    let scalars = [
        ("final/val_loss", val_loss),
        ("final/val_response_loss", val_response_loss),
        (
            "final/val_response_perplexity",
            result.val_response_perplexity,
        ),
        ("final/exact_match", exact_match),
        ("final/rouge_l", rouge_l),
    ];
    let groups = run.groups_per_epoch();
    run.finish(result, &scalars, |evals, trained| {
        save_language_model(
            run_dir,
            &spec.task,
            &spec.model.name,
            &spec.finetune,
            p.prompter.style,
            trained,
        )?;
        // The book's Figure 7.17.
        finetune::plot_curves(
            evals,
            groups,
            run_dir,
            &spec.name,
            "Tokens seen",
            |r: &InstructEval| (r.step, r.tokens_seen),
            &[("loss.png", "loss", &|r: &InstructEval| {
                (r.train_loss, r.val_loss)
            })],
        )
    })
}

/// Writes the saved model of a language-model run (`saved_model.json` +
/// `saved_model.safetensors`, see [`crate::resolve::saved`]): the trained tensors (the adapters
/// with LoRA, the trained blocks' weights with full fine-tuning) and the prompt style.
pub fn save_language_model(
    dir: &Path,
    task: &str,
    base_model: &str,
    ft: &InstructFinetuneSpec,
    prompt_style: PromptStyle,
    trained: &[(String, Tensor)],
) -> Result<()> {
    let rec = SavedRecord {
        format: saved::SAVED_FORMAT,
        task: task.into(),
        base_model: base_model.into(),
        weights: Weights::Pretrained,
        trainable: ft.trainable,
        method: ft.method,
        lora: (ft.method == Method::Lora).then(|| ft.lora.clone()),
        tensors: saved::SAVED_TENSORS.into(),
        full: ft.trainable == Trainable::All && ft.method == Method::Full,
        head: SavedHead::CausalLm {
            prompt_style: Some(prompt_style),
        },
    };
    saved::save(dir, &rec, trained)
}

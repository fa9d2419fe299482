//! Fine-tuning for classification (book ch06 §6.7 `train_classifier_simple`): loss and accuracy
//! on train/validation every `eval_freq` steps, accuracy on every split at the end, the trained
//! tensors saved beside a reference to the base model. Interrupted runs resume from their last
//! checkpoint (end of each epoch, or where Ctrl-C stopped them).
//!
//! Frozen-prefix reuse: when the blocks before the first trained one are frozen and run without
//! dropout, their output for an example never changes, so it is computed once (batched, no
//! gradients), kept, and fed to the trained blocks at every step and evaluation. The outputs are
//! also written to a cache folder the runner shares between the trials of an experiment, so a
//! sweep over `finetune.trainable` computes each prefix once for all of them.
use super::data::{self, Encoded, Padding, Splits};
use super::model::{check_trainable, class_loss, correct, Classifier, Trainable};
use super::spec::{ClassifySpec, Weights};
use crate::error::LlmError;
use crate::finetune::{self, FinetuneRun, Method};
use crate::resolve::saved::{self, ClassifierHead, SavedHead, SavedRecord};
use crate::resolve::LoadedLm;
use crate::train::trainer::TrainEvents;
use anyhow::Result;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;
use tch::{Device, Kind, Tensor};

/// A model ready to fine-tune with its encoded splits.
pub struct Prepared {
    pub clf: Classifier,
    pub labels: Vec<String>,
    pub splits: Splits,
    pub train: Encoded,
    pub val: Encoded,
    pub test: Encoded,
    /// The padded length (`None`: no padding).
    pub pad_to: Option<usize>,
}

/// Re-initialises every weight GPT-2 style: matrices N(0, 0.02), norm scales 1, the rest 0.
fn randomize(vs: &tch::nn::VarStore) {
    let _g = tch::no_grad_guard();
    for (name, mut t) in vs.variables() {
        if t.dim() >= 2 {
            let _ = t.normal_(0.0, 0.02);
        } else if name.contains("norm") && (name.ends_with(".scale") || name.ends_with(".weight")) {
            let _ = t.fill_(1.0);
        } else {
            let _ = t.zero_();
        }
    }
}

/// Loads the model (with its head, dropout, causal mask and adapters as `spec` says) and the data.
pub fn prepare(spec: &ClassifySpec, device: Device) -> Result<Prepared> {
    let (examples, labels) = spec.data.read()?;
    let splits = data::split(&examples, labels.len(), &spec.data, spec.seed);
    let keys = "data.split and data.max_per_class";
    finetune::check_splits(splits.train.len(), splits.val.len(), "examples", keys)?;
    let lm = LoadedLm::load(&spec.model.name, device)?;
    if spec.model.weights == Weights::Random {
        crate::device::seed_everything(spec.seed);
        randomize(&lm.vs);
    }
    crate::device::seed_everything(spec.seed);
    let mut clf = Classifier::new(lm, labels.len() as i64, spec.finetune.token);
    check_trainable(spec.finetune.trainable, clf.n_layers())?;
    if let Some(p) = spec.model.dropout {
        clf.set_dropout(p);
    }
    clf.set_causal(spec.finetune.causal_mask);
    let ft = &spec.finetune;
    let adapted = ft.trainable.adapted_blocks(ft.method, clf.n_layers());
    if !adapted.is_empty() {
        clf.lm.add_lora_to(&ft.lora, adapted);
    }
    let ctx = clf.context_length() as usize;
    let limit = spec.data.max_length.unwrap_or(ctx).min(ctx);
    let bos = clf.lm.bos_id;
    let pad = clf.lm.pad_id();
    let tok = &clf.lm.tokenizer;
    let mut train = data::encode(&splits.train, tok, bos, Some(limit), None, pad)?;
    let pad_to = match spec.data.padding {
        Padding::Longest => Some(train.lens.iter().copied().max().unwrap_or(1) as usize),
        Padding::Fixed => Some(limit),
        Padding::Context => Some(ctx),
        Padding::None => None,
    };
    let cut = pad_to.or(Some(limit));
    train.pad_to = pad_to;
    let val = data::encode(&splits.val, tok, bos, cut, pad_to, pad)?;
    let test = data::encode(&splits.test, tok, bos, cut, pad_to, pad)?;
    Ok(Prepared {
        clf,
        labels,
        splits,
        train,
        val,
        test,
        pad_to,
    })
}

/// One line of `metrics.jsonl` written at each evaluation.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ClassifyEval {
    pub step: usize,
    pub epoch: usize,
    pub examples_seen: usize,
    pub train_loss: f64,
    pub val_loss: f64,
    pub train_accuracy: f64,
    pub val_accuracy: f64,
    pub lr: f64,
    pub grad_norm: f64,
    pub examples_per_sec: f64,
}

/// The last line of `metrics.jsonl`: accuracy and loss on all three splits.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ClassifyFinal {
    pub step: usize,
    pub train_accuracy: f64,
    pub val_accuracy: f64,
    pub test_accuracy: f64,
    pub train_loss: f64,
    pub val_loss: f64,
    pub test_loss: f64,
    /// Wall time of this invocation's training (not reproducible).
    pub train_seconds: f64,
    /// Whether the frozen prefix was computed once and reused.
    pub reused_frozen: bool,
}

/// Inputs of the first trained block for every example of a split (`(T_i, emb)` each).
pub type Prefix = Vec<Tensor>;

/// Computes the outputs of blocks `0..to` for a split in batches without gradients, saving the
/// boundaries in `keep` that it passes (block index → per-example tensors).
fn compute_prefix(
    clf: &Classifier,
    enc: &Encoded,
    from: Option<(usize, &Prefix)>,
    to: usize,
    keep: &[usize],
    batch: usize,
) -> BTreeMap<usize, Prefix> {
    let _g = tch::no_grad_guard();
    let dev = clf.lm.vs.device();
    let mut out: BTreeMap<usize, Prefix> = BTreeMap::new();
    let idx: Vec<usize> = (0..enc.len()).collect();
    for chunk in idx.chunks(batch.max(1)) {
        // Unpadded data has its own length per example: run those one by one.
        let groups: Vec<Vec<usize>> = if enc.pad_to.is_none() {
            chunk.iter().map(|&i| vec![i]).collect()
        } else {
            vec![chunk.to_vec()]
        };
        for g in groups {
            let (start, mut x) = match from {
                Some((b, p)) => (
                    b,
                    Tensor::stack(&g.iter().map(|&i| &p[i]).collect::<Vec<_>>(), 0),
                ),
                None => {
                    let (ids, _, _) = enc.batch(&g, dev);
                    (0, clf.embed(&ids, false))
                }
            };
            for blk in start..to {
                x = clf.blocks(&x, blk, blk + 1, false);
                if keep.contains(&(blk + 1)) || blk + 1 == to {
                    let e = out.entry(blk + 1).or_default();
                    for j in 0..g.len() {
                        e.push(x.get(j as i64).copy());
                    }
                }
            }
            if start == to {
                let e = out.entry(to).or_default();
                for j in 0..g.len() {
                    e.push(x.get(j as i64).copy());
                }
            }
        }
    }
    out
}

fn prefix_file(dir: &Path, boundary: usize) -> PathBuf {
    dir.join(format!("after-block-{boundary}.safetensors"))
}

fn save_prefix(dir: &Path, boundary: usize, splits: &[&Prefix; 3]) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|source| LlmError::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    let mut named: Vec<(String, Tensor)> = Vec::new();
    for (s, p) in ["train", "val", "test"].iter().zip(splits.iter()) {
        for (i, t) in p.iter().enumerate() {
            named.push((format!("{s}.{i}"), t.to_device(Device::Cpu)));
        }
    }
    let path = prefix_file(dir, boundary);
    let tmp = crate::error::temp_path(&path);
    Tensor::write_safetensors(&named, &tmp)?;
    std::fs::rename(&tmp, &path).map_err(|source| LlmError::Io { path, source })?;
    Ok(())
}

fn load_prefix(dir: &Path, boundary: usize, sizes: [usize; 3], dev: Device) -> Option<[Prefix; 3]> {
    let path = prefix_file(dir, boundary);
    let tensors: BTreeMap<String, Tensor> =
        Tensor::read_safetensors(&path).ok()?.into_iter().collect();
    let mut out: [Prefix; 3] = Default::default();
    for (k, (s, n)) in ["train", "val", "test"].iter().zip(sizes).enumerate() {
        for i in 0..n {
            out[k].push(tensors.get(&format!("{s}.{i}"))?.to(dev));
        }
    }
    Some(out)
}

/// `<cache>/.computing` (holding the process id) while one process computes a key's prefixes;
/// removed when dropped. A lock whose process is gone is taken over. Like cargo's file locks, a
/// live holder is waited for without a timeout (computing a prefix can take half an hour on a
/// CPU, so no timeout tells a slow holder from a hung one); the waiting message names the file
/// to delete to stop waiting, and Ctrl-C stops the waiter.
struct PrefixLock {
    path: PathBuf,
    /// Whether another process held the lock first (its results may now be cached).
    waited: bool,
}

impl PrefixLock {
    /// Takes the lock, waiting while a live process holds it; `None` when the folder can't
    /// hold a lock file or a stop was requested while waiting (the caller then computes alone).
    fn acquire(dir: &Path, log: &mut dyn TrainEvents) -> Option<Self> {
        std::fs::create_dir_all(dir).ok()?;
        let path = dir.join(".computing");
        let mut waited = false;
        loop {
            match std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&path)
            {
                Ok(mut f) => {
                    use std::io::Write;
                    let _ = write!(f, "{}", std::process::id());
                    return Some(Self { path, waited });
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    let holder = std::fs::read_to_string(&path)
                        .ok()
                        .and_then(|s| s.trim().parse::<u32>().ok());
                    let fresh = std::fs::metadata(&path)
                        .and_then(|m| m.modified())
                        .ok()
                        .and_then(|t| t.elapsed().ok())
                        .is_some_and(|age| age.as_secs() < 10);
                    let alive = match holder {
                        Some(pid) => crate::signal::process_alive(pid),
                        None => fresh, // just created; the id follows
                    };
                    if !alive {
                        let _ = std::fs::remove_file(&path);
                        continue;
                    }
                    if !waited {
                        log.log(&format!(
                            "frozen prefix: waiting for process {} to finish computing it (same frozen blocks); if that process hangs, delete {} to compute it here",
                            holder.map_or("?".to_string(), |p| p.to_string()),
                            path.display()
                        ));
                        waited = true;
                    }
                    if crate::signal::interrupted() {
                        return None;
                    }
                    std::thread::sleep(std::time::Duration::from_millis(500));
                }
                Err(_) => return None,
            }
        }
    }
}

impl Drop for PrefixLock {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// The cache key of a prefix: everything that changes the frozen blocks' outputs.
pub fn prefix_key(spec: &ClassifySpec) -> String {
    let key = serde_json::json!({
        "model": spec.model.name,
        "weights": spec.model.weights,
        "seed": spec.seed,
        "data": spec.data,
        "causal_mask": spec.finetune.causal_mask,
    });
    crate::data::registry::sha256_hex(key.to_string().as_bytes())[..16].to_string()
}

/// Where and with whom a trial shares frozen-prefix outputs.
#[derive(Debug, Clone, Default)]
pub struct PrefixSharing {
    /// The experiment's cache folder (`runs/<experiment>/.frozen-prefix/<key>/`).
    pub dir: Option<PathBuf>,
    /// Where the other trials with the same key start training, as a number of blocks from the
    /// end (`0`: only the head and final norm train); their prefixes are computed in the same pass.
    pub from_end: Vec<usize>,
}

/// The frozen prefix of every split, from the shared cache or computed (and cached).
fn frozen_prefix(
    p: &Prepared,
    boundary: usize,
    sharing: &PrefixSharing,
    batch: usize,
    log: &mut dyn TrainEvents,
) -> Result<[Prefix; 3]> {
    let dev = p.clf.lm.vs.device();
    let sizes = [p.train.len(), p.val.len(), p.test.len()];
    if let Some(dir) = &sharing.dir {
        if let Some(hit) = load_prefix(dir, boundary, sizes, dev) {
            log.log(&format!(
                "frozen blocks 0..{boundary}: outputs reused from {}",
                dir.display()
            ));
            return Ok(hit);
        }
    }
    // One process computes a key's prefixes at a time (trials of a `--jobs` sweep start
    // together); the others wait for its files.
    let _lock = match &sharing.dir {
        Some(dir) => {
            let lock = PrefixLock::acquire(dir, log);
            if lock.as_ref().is_some_and(|l| l.waited) {
                if let Some(hit) = load_prefix(dir, boundary, sizes, dev) {
                    log.log(&format!(
                        "frozen blocks 0..{boundary}: outputs reused from {}",
                        dir.display()
                    ));
                    return Ok(hit);
                }
            }
            lock
        }
        None => None,
    };
    let t0 = Instant::now();
    // Start from the deepest cached boundary below this one, and pass the others' boundaries.
    let n = p.clf.n_layers();
    let mut keep: Vec<usize> = sharing
        .from_end
        .iter()
        .filter(|&&k| k < n)
        .map(|&k| n - k)
        .collect();
    keep.push(boundary);
    keep.sort_unstable();
    keep.dedup();
    let to = *keep.last().unwrap_or(&boundary);
    let start = sharing.dir.as_ref().and_then(|dir| {
        (1..boundary)
            .rev()
            .find_map(|b| load_prefix(dir, b, sizes, dev).map(|pre| (b, pre)))
    });
    let mut results: [BTreeMap<usize, Prefix>; 3] = Default::default();
    for (k, enc) in [&p.train, &p.val, &p.test].into_iter().enumerate() {
        let from = start.as_ref().map(|(b, pre)| (*b, &pre[k]));
        results[k] = compute_prefix(&p.clf, enc, from, to, &keep, batch);
    }
    log.log(&format!(
        "frozen blocks 0..{boundary}: outputs computed once for {} examples in {:.1}s",
        sizes.iter().sum::<usize>(),
        t0.elapsed().as_secs_f64()
    ));
    if let Some(dir) = &sharing.dir {
        for &b in &keep {
            if let (Some(a), Some(v), Some(t)) =
                (results[0].get(&b), results[1].get(&b), results[2].get(&b))
            {
                if !prefix_file(dir, b).is_file() {
                    save_prefix(dir, b, &[a, v, t])?;
                }
            }
        }
    }
    let mut take = |k: usize| results[k].remove(&boundary).unwrap_or_default();
    Ok([take(0), take(1), take(2)])
}

/// Loss and number correct of examples `idx` of a split.
fn batch_logits(
    clf: &Classifier,
    enc: &Encoded,
    pre: Option<(usize, &Prefix)>,
    idx: &[usize],
    train: bool,
) -> (Tensor, Tensor) {
    let dev = clf.lm.vs.device();
    let (ids, lens, ys) = enc.batch(idx, dev);
    let logits = match pre {
        Some((b, p)) => {
            let x = Tensor::stack(&idx.iter().map(|&i| &p[i]).collect::<Vec<_>>(), 0);
            clf.logits_from(&x, b, &lens, train)
        }
        None => clf.logits(&ids, &lens, train),
    };
    (logits, ys)
}

/// Mean loss and accuracy over the first `max_batches` batches (all when `None`), in eval mode:
/// the book's `calc_loss_loader` and `calc_accuracy_loader` in one pass.
#[doc(alias = "calc_accuracy_loader")]
#[doc(alias = "calc_loss_loader")]
pub fn evaluate_model(
    clf: &Classifier,
    enc: &Encoded,
    pre: Option<(usize, &Prefix)>,
    batch: usize,
    max_batches: Option<usize>,
    ignore_index: i64,
) -> (f64, f64) {
    let _g = tch::no_grad_guard();
    let bs = data::batches(enc.len(), batch, false, false, 0, 0);
    let n = max_batches.unwrap_or(bs.len()).min(bs.len());
    let (mut loss, mut right, mut seen) = (0.0, 0i64, 0usize);
    for b in &bs[..n] {
        let (logits, ys) = batch_logits(clf, enc, pre, b, false);
        loss += class_loss(&logits, &ys, ignore_index).double_value(&[]);
        right += correct(&logits, &ys);
        seen += b.len();
    }
    if n == 0 {
        return (f64::NAN, f64::NAN);
    }
    (loss / n as f64, right as f64 / seen.max(1) as f64)
}

/// What a finished run reports.
pub type ClassifyOutcome = finetune::Outcome<ClassifyEval, ClassifyFinal>;

/// Fine-tunes (or resumes, or reports as finished) the classifier `spec` describes in `run_dir`:
/// the book's `train_classifier_simple`, resumable.
pub fn run(
    spec: &ClassifySpec,
    run_dir: &Path,
    device: Device,
    restart: bool,
    sharing: &PrefixSharing,
    events: &mut dyn TrainEvents,
) -> Result<ClassifyOutcome> {
    spec.validate()?;
    if let Some(done) = finetune::open(spec, spec.train.threads, run_dir, restart, events)? {
        return Ok(done);
    }
    let mut p = prepare(spec, device)?;
    data::write_splits(run_dir, &p.splits)?;
    let (t, ft) = (&spec.train, &spec.finetune);
    let trained = p.clf.set_trainable_with(ft.trainable, ft.method);
    let boundary = ft.trainable.first_trained_block(p.clf.n_layers());
    let reuse = ft.reuse_frozen && boundary > 0 && p.clf.drop_rate() == 0.0;
    let rows = p.train.len();
    let mut run = FinetuneRun::start(run_dir, trained, t, spec.seed, device, rows, events)?;
    let prefix = if reuse {
        Some(frozen_prefix(
            &p,
            boundary,
            sharing,
            t.batch_size,
            &mut *run.events,
        )?)
    } else {
        None
    };
    let pre = |k: usize| prefix.as_ref().map(|pr| (boundary, &pr[k]));
    let (n_trained, n_total) = run.parameter_counts(&p.clf.lm.vs);
    run.events.log(&format!(
        "{} classes, {} train / {} val / {} test examples, {} tokens each, {n_trained} of {n_total} parameters trained ({}{}), {}",
        p.labels.len(),
        p.train.len(),
        p.val.len(),
        p.test.len(),
        p.pad_to.map_or("unpadded".to_string(), |n| n.to_string()),
        ft.trainable.name(),
        if ft.method == Method::Lora { ", lora" } else { "" },
        if reuse {
            format!("frozen blocks 0..{boundary} computed once")
        } else {
            "every block run at every step".to_string()
        }
    ));
    let ignore = ft.ignore_index;
    run.begin();
    for epoch in run.epochs() {
        let order = data::batches(p.train.len(), t.batch_size, true, true, spec.seed, epoch);
        for g in run.groups(epoch) {
            let grad_norm = run.step(&order, epoch, g, |b| {
                let (logits, ys) = batch_logits(&p.clf, &p.train, pre(0), b, true);
                Ok((Some(class_loss(&logits, &ys, ignore)), b.len()))
            })?;
            if run.eval_due() {
                let (train_loss, train_acc) = evaluate_model(
                    &p.clf,
                    &p.train,
                    pre(0),
                    t.batch_size,
                    Some(t.eval_iter),
                    ignore,
                );
                let (val_loss, val_acc) = evaluate_model(
                    &p.clf,
                    &p.val,
                    pre(1),
                    t.batch_size,
                    Some(t.eval_iter),
                    ignore,
                );
                let rec = ClassifyEval {
                    step: run.state.step,
                    epoch: epoch + 1,
                    examples_seen: run.state.seen,
                    train_loss,
                    val_loss,
                    train_accuracy: train_acc,
                    val_accuracy: val_acc,
                    lr: run.lr(),
                    grad_norm,
                    examples_per_sec: run.throughput(),
                };
                let per_sec = rec.examples_per_sec;
                run.record_eval(
                    epoch,
                    rec,
                    (train_loss, val_loss),
                    grad_norm,
                    &[
                        ("train/accuracy", train_acc),
                        ("val/accuracy", val_acc),
                        ("train/examples_per_sec", per_sec),
                    ],
                    &format!(
                        ", Train acc {:.2}%, Val acc {:.2}%",
                        train_acc * 100.0,
                        val_acc * 100.0
                    ),
                )?;
            }
            run.end_step(g)?;
        }
    }
    let train_seconds = run.train_seconds();

    let (train_loss, train_acc) =
        evaluate_model(&p.clf, &p.train, pre(0), t.batch_size, None, ignore);
    let (val_loss, val_acc) = evaluate_model(&p.clf, &p.val, pre(1), t.batch_size, None, ignore);
    let (test_loss, test_acc) = if p.test.is_empty() {
        (f64::NAN, f64::NAN)
    } else {
        evaluate_model(&p.clf, &p.test, pre(2), t.batch_size, None, ignore)
    };
    run.events.log(&format!(
        "Training accuracy: {:.2}%  Validation accuracy: {:.2}%  Test accuracy: {:.2}%",
        train_acc * 100.0,
        val_acc * 100.0,
        test_acc * 100.0
    ));
    let result = ClassifyFinal {
        step: run.state.step,
        train_accuracy: train_acc,
        val_accuracy: val_acc,
        test_accuracy: test_acc,
        train_loss,
        val_loss,
        test_loss,
        train_seconds,
        reused_frozen: reuse,
    };
    let scalars = [
        ("final/train_accuracy", train_acc),
        ("final/val_accuracy", val_acc),
        ("final/test_accuracy", test_acc),
    ];
    let groups = run.groups_per_epoch();
    run.finish(result, &scalars, |evals, trained| {
        save_classifier(&mut p, spec, trained, run_dir)?;
        finetune::plot_curves(
            evals,
            groups,
            run_dir,
            &spec.name,
            "Examples seen",
            |r: &ClassifyEval| (r.step, r.examples_seen),
            &[
                ("loss.png", "loss", &|r: &ClassifyEval| {
                    (r.train_loss, r.val_loss)
                }),
                ("accuracy.png", "accuracy", &|r: &ClassifyEval| {
                    (r.train_accuracy, r.val_accuracy)
                }),
            ],
        )
    })
}

/// Writes the saved model (`saved_model.json` + `saved_model.safetensors`, see
/// [`crate::resolve::saved`]): the trained tensors only, unless the run trained everything (or
/// started from random weights), when every tensor is saved.
fn save_classifier(
    p: &mut Prepared,
    spec: &ClassifySpec,
    trained: &[(String, Tensor)],
    dir: &Path,
) -> Result<()> {
    let ft = &spec.finetune;
    let full = (ft.trainable == Trainable::All && ft.method == Method::Full)
        || spec.model.weights == Weights::Random;
    let named: Vec<(String, Tensor)> = if full {
        let mut v: Vec<(String, Tensor)> = p.clf.lm.vs.variables().into_iter().collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    } else {
        trained
            .iter()
            .map(|(n, t)| (n.clone(), t.shallow_clone()))
            .collect()
    };
    let rec = SavedRecord {
        format: saved::SAVED_FORMAT,
        task: spec.task.clone(),
        base_model: spec.model.name.clone(),
        weights: spec.model.weights,
        trainable: ft.trainable,
        method: ft.method,
        lora: (ft.trainable == Trainable::Lora || ft.method == Method::Lora)
            .then(|| ft.lora.clone()),
        tensors: saved::SAVED_TENSORS.into(),
        full,
        head: SavedHead::Classifier(ClassifierHead {
            labels: p.labels.clone(),
            token: ft.token,
            causal_mask: ft.causal_mask,
            pad_to: p.pad_to,
            max_length: p.pad_to.unwrap_or_else(|| {
                spec.data
                    .max_length
                    .unwrap_or(p.clf.context_length() as usize)
            }),
            pad_id: p.train.pad_id,
        }),
    };
    saved::save(dir, &rec, &named)
}

/// A fine-tuned classifier loaded from a run folder.
pub struct SavedClassifier {
    pub clf: Classifier,
    pub rec: ClassifierHead,
}

impl SavedClassifier {
    /// Loads a classification run's saved model ([`saved::load_saved`]).
    pub fn load(dir: &Path, device: Device) -> Result<Self> {
        let s = saved::load_saved(dir, device)?;
        let rec = s.record.classifier(dir)?.clone();
        let head = s.head.expect("a classifier record loads a head");
        let clf = Classifier {
            lm: s.lm,
            head,
            token: rec.token,
            num_classes: rec.labels.len() as i64,
        };
        Ok(Self { clf, rec })
    }

    /// `(label, probability)` of each text (the book's `classify_review`).
    #[doc(alias = "classify_review")]
    pub fn predict(&self, texts: &[String]) -> Result<Vec<(String, f64)>> {
        let _g = tch::no_grad_guard();
        let dev = self.clf.lm.vs.device();
        let mut out = Vec::with_capacity(texts.len());
        for text in texts {
            let mut ids: Vec<i64> = self.clf.lm.bos_id.into_iter().collect();
            ids.extend(
                self.clf
                    .lm
                    .tokenizer
                    .encode(text)?
                    .into_iter()
                    .map(i64::from),
            );
            ids.truncate(self.rec.max_length);
            let len = ids.len() as i64;
            if let Some(t) = self.rec.pad_to {
                ids.resize(t.max(ids.len()), self.rec.pad_id);
            }
            let x = Tensor::from_slice(&ids).view([1, -1]).to(dev);
            let lens = Tensor::from_slice(&[len]).to(dev);
            let probs = self
                .clf
                .logits(&x, &lens, false)
                .softmax(-1, Kind::Float)
                .squeeze_dim(0);
            let best = probs.argmax(0, false).int64_value(&[]) as usize;
            out.push((
                self.rec.labels[best].clone(),
                probs.double_value(&[best as i64]),
            ));
        }
        Ok(out)
    }
}

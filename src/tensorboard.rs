//! TensorBoard event files: scalars, text samples and the HParams dashboard's data.
//!
//! An event file (`events.out.tfevents.{secs}.{host}.{pid}.{n}`) is a sequence of TFRecords
//! (length, masked CRC-32C of the length, a serialized `Event`, masked CRC-32C of the event),
//! the first event holding `file_version = "brain.Event:2"`. The record framing comes from
//! `tensorboard-rs` ([`RecordWriter`]), the protobuf types from `tensorboard-proto`, the crate
//! `tensorboard-rs` is built on. We write the file ourselves rather than through
//! `tensorboard_rs::summary_writer::SummaryWriter` because that one writes from a background
//! thread that panics on any I/O error, takes `f32`/`usize` steps, and leaves `add_text` and
//! `add_hparams` unimplemented; every call here returns an error naming the file instead.
//!
//! What each summary looks like (TensorBoard 2.x reads them this way; see its
//! `tensorboard/plugins/{text,hparams}/summary.py` and `backend/event_processing/data_compat.py`):
//! - **scalar**: `Summary.Value{tag, simple_value}`, an `f32` as in PyTorch's `SummaryWriter`.
//! - **text**: `Summary.Value{tag, metadata.plugin_data{plugin_name: "text"}, tensor}` with a
//!   `DT_STRING` scalar tensor holding the UTF-8 bytes (rendered as Markdown).
//! - **hparams**: `Summary.Value{tag, metadata.plugin_data{plugin_name: "hparams", content:
//!   HParamsPluginData}, tensor: an empty DT_FLOAT tensor}` under the tags
//!   `_hparams_/experiment`, `_hparams_/session_start_info`, `_hparams_/session_end_info`.
//!
//! How the HParams dashboard finds a sweep (`tensorboard/plugins/hparams/backend_context.py`,
//! `list_session_groups.py`), with `tensorboard --logdir SWEEP`:
//! - the **experiment** (hparam names, types and domains; metric tags) is written once, in the
//!   sweep's top-level folder `SWEEP/` (the run `.`), by [`TbWriter::hparams_experiment`];
//! - each **trial** is one folder below it, `SWEEP/<trial>/`, holding exactly one session: its
//!   start ([`TbWriter::hparams_session_start`], the trial's hparam values) and its end
//!   ([`TbWriter::hparams_session_end`], the status). The session's name is the folder's path
//!   relative to `SWEEP`;
//! - a **metric** is a scalar tag: the dashboard shows, per trial, the last value of each metric
//!   tag written in that trial's folder (metric group `""` = the trial folder itself);
//! - trials with the same non-empty `group_name` are one session group (repeats, e.g. seeds);
//!   an empty group name makes each trial its own group.
//!
//! **Resumed runs** ([`TbWriter::prune_earlier_files`], [`TbWriter::session_restart`]): a run
//! killed after step `S` may have logged steps past its last checkpoint `C`; the resumed process
//! logs `C+1..` again. TensorBoard would show both (with `file_version` 2 it purges orphaned
//! points only at a `SessionLog.START` event, `plugin_event_accumulator._MaybePurgeOrphanedData`,
//! and only in a reader that is already running; RustBoard does not purge at all). So a resumed
//! run rewrites the folder's earlier event files keeping only the events of steps `<= C` (and
//! drops their hparams session start/end, which the new file writes again: the dashboard keeps the
//! first instance of a tag's metadata, so a stale `RUNNING` end would win over the final one), then
//! writes `SessionLog.START` at step `C+1` for a TensorBoard that had read the stale points.
//!
//! Tags follow STYLE.md: `train/loss`, `val/loss`, `train/lr`, `train/grad_norm`,
//! `train/tokens_per_sec`, `val/accuracy`, by global step.
use crate::error::LlmError;
use anyhow::{bail, Context, Result};
use protobuf::well_known_types::{ListValue, Value};
use protobuf::Message;
use std::collections::BTreeMap;
use std::fs::File;
use std::io::BufWriter;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};
use tensorboard_proto::api::{
    DataType as HDataType, Experiment, HParamInfo, Interval, MetricInfo, MetricName, Status,
};
use tensorboard_proto::event::{Event, SessionLog, SessionLog_SessionStatus};
use tensorboard_proto::plugin_hparams::{HParamsPluginData, SessionEndInfo, SessionStartInfo};
use tensorboard_proto::summary::{
    Summary, SummaryMetadata, SummaryMetadata_PluginData, Summary_Value,
};
use tensorboard_proto::tensor::TensorProto;
use tensorboard_proto::tensor_shape::{TensorShapeProto, TensorShapeProto_Dim};
use tensorboard_proto::types::DataType;
use tensorboard_rs::masked_crc32c::masked_crc32c;
use tensorboard_rs::record_writer::RecordWriter;

/// Tags of the hparams plugin (`tensorboard/plugins/hparams/metadata.py`).
pub const EXPERIMENT_TAG: &str = "_hparams_/experiment";
pub const SESSION_START_INFO_TAG: &str = "_hparams_/session_start_info";
pub const SESSION_END_INFO_TAG: &str = "_hparams_/session_end_info";
/// `PLUGIN_DATA_VERSION` of the hparams plugin and `PROTO_VERSION` of the text plugin.
const HPARAMS_PLUGIN_DATA_VERSION: i32 = 0;

/// A hyper-parameter value of one trial (`google.protobuf.Value`: number, string or bool).
#[derive(Debug, Clone, PartialEq)]
pub enum HValue {
    Number(f64),
    Str(String),
    Bool(bool),
}

impl From<f64> for HValue {
    fn from(v: f64) -> Self {
        HValue::Number(v)
    }
}
impl From<i64> for HValue {
    fn from(v: i64) -> Self {
        HValue::Number(v as f64)
    }
}
impl From<bool> for HValue {
    fn from(v: bool) -> Self {
        HValue::Bool(v)
    }
}
impl From<&str> for HValue {
    fn from(v: &str) -> Self {
        HValue::Str(v.to_string())
    }
}
impl From<String> for HValue {
    fn from(v: String) -> Self {
        HValue::Str(v)
    }
}

impl HValue {
    fn data_type(&self) -> HDataType {
        match self {
            HValue::Number(_) => HDataType::DATA_TYPE_FLOAT64,
            HValue::Str(_) => HDataType::DATA_TYPE_STRING,
            HValue::Bool(_) => HDataType::DATA_TYPE_BOOL,
        }
    }

    fn to_proto(&self) -> Value {
        let mut v = Value::new();
        match self {
            HValue::Number(x) => v.set_number_value(*x),
            HValue::Str(s) => v.set_string_value(s.clone()),
            HValue::Bool(b) => v.set_bool_value(*b),
        }
        v
    }
}

/// The values a hyper-parameter of the experiment can take (`HParamInfo.domain`).
#[derive(Debug, Clone, PartialEq)]
pub enum HParamDomain {
    /// A finite set (a sweep's grid axis); all values of one kind.
    Discrete(Vec<HValue>),
    /// A real interval `[min, max]`.
    Interval { min: f64, max: f64 },
}

/// How a trial ended (`tensorboard.hparams.Status`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionStatus {
    Unknown,
    Success,
    Failure,
    Running,
}

impl SessionStatus {
    fn to_proto(self) -> Status {
        match self {
            SessionStatus::Unknown => Status::STATUS_UNKNOWN,
            SessionStatus::Success => Status::STATUS_SUCCESS,
            SessionStatus::Failure => Status::STATUS_FAILURE,
            SessionStatus::Running => Status::STATUS_RUNNING,
        }
    }
}

/// One event file in one run folder. Every call writes one event and flushes it to the OS,
/// so TensorBoard sees it while training runs and a crash loses nothing already logged.
pub struct TbWriter {
    dir: PathBuf,
    path: PathBuf,
    records: RecordWriter<BufWriter<File>>,
}

/// Distinguishes files a process opens in the same folder within the same second.
static FILE_SEQ: AtomicUsize = AtomicUsize::new(0);

fn now_secs() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

impl TbWriter {
    /// Creates `run_dir` if needed and a new event file in it (never overwriting one).
    pub fn new(run_dir: impl AsRef<Path>) -> Result<Self> {
        let dir = run_dir.as_ref().to_path_buf();
        std::fs::create_dir_all(&dir)
            .map_err(|source| LlmError::Io {
                path: dir.clone(),
                source,
            })
            .with_context(|| format!("cannot create the TensorBoard folder {}", dir.display()))?;
        let wall = now_secs();
        let host = gethostname::gethostname()
            .to_string_lossy()
            .replace(['/', '\\'], "_");
        let name = format!(
            "events.out.tfevents.{:010}.{host}.{}.{}",
            wall as u64,
            std::process::id(),
            FILE_SEQ.fetch_add(1, Ordering::Relaxed)
        );
        let path = dir.join(name);
        let file = File::options()
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(|source| LlmError::Io {
                path: path.clone(),
                source,
            })
            .with_context(|| format!("cannot create the event file {}", path.display()))?;
        let mut w = TbWriter {
            dir,
            path,
            records: RecordWriter::new(BufWriter::new(file)),
        };
        let mut ev = Event::new();
        ev.set_wall_time(wall);
        ev.set_file_version("brain.Event:2".to_string());
        w.write_event(ev)?;
        Ok(w)
    }

    /// The run folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The event file being written.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A scalar (loss, accuracy, lr, gradient norm, tokens/s) at a global step; stored as `f32`.
    pub fn scalar(&mut self, tag: &str, value: f64, step: i64) -> Result<()> {
        let mut v = Summary_Value::new();
        v.set_tag(tag.to_string());
        v.set_simple_value(value as f32);
        self.write_value(v, step)
    }

    /// A text (e.g. a generated sample) for the Text dashboard; Markdown is rendered.
    pub fn text(&mut self, tag: &str, text: &str, step: i64) -> Result<()> {
        let mut tensor = TensorProto::new();
        tensor.set_dtype(DataType::DT_STRING);
        tensor.set_tensor_shape(TensorShapeProto::new()); // [] : a scalar string
        tensor.mut_string_val().push(text.as_bytes().to_vec());
        // TextPluginData{version: 0} serializes to no bytes.
        let mut v = plugin_value(tag, "text", Vec::new());
        v.set_tensor(tensor);
        self.write_value(v, step)
    }

    /// The experiment: every hparam's name, type and domain, and the metric tags to compare.
    /// Write it once, with a writer on the sweep's top-level folder (the trials' parent).
    pub fn hparams_experiment<S: AsRef<str>, T: AsRef<str>>(
        &mut self,
        hparams: &[(S, HParamDomain)],
        metrics: &[T],
    ) -> Result<()> {
        let mut exp = Experiment::new();
        exp.set_time_created_secs(now_secs());
        for (name, domain) in hparams {
            exp.mut_hparam_infos()
                .push(hparam_info(name.as_ref(), domain)?);
        }
        for tag in metrics {
            let mut name = MetricName::new();
            name.set_group(String::new()); // the trial folder itself
            name.set_tag(tag.as_ref().to_string());
            let mut info = MetricInfo::new();
            info.set_name(name);
            info.set_display_name(tag.as_ref().to_string());
            exp.mut_metric_infos().push(info);
        }
        let mut data = HParamsPluginData::new();
        data.set_version(HPARAMS_PLUGIN_DATA_VERSION);
        data.set_experiment(exp);
        self.write_hparams(EXPERIMENT_TAG, &data)
    }

    /// The start of this folder's trial (session) with its hparam values. Trials sharing a
    /// non-empty `group_name` are aggregated as one group; `""` = a group of its own.
    pub fn hparams_session_start(
        &mut self,
        hparams: &BTreeMap<String, HValue>,
        group_name: &str,
    ) -> Result<()> {
        let mut info = SessionStartInfo::new();
        for (name, value) in hparams {
            info.mut_hparams().insert(name.clone(), value.to_proto());
        }
        info.set_group_name(group_name.to_string());
        info.set_start_time_secs(now_secs());
        let mut data = HParamsPluginData::new();
        data.set_version(HPARAMS_PLUGIN_DATA_VERSION);
        data.set_session_start_info(info);
        self.write_hparams(SESSION_START_INFO_TAG, &data)
    }

    /// The end of this folder's trial and how it ended.
    pub fn hparams_session_end(&mut self, status: SessionStatus) -> Result<()> {
        let mut info = SessionEndInfo::new();
        info.set_status(status.to_proto());
        info.set_end_time_secs(now_secs());
        let mut data = HParamsPluginData::new();
        data.set_version(HPARAMS_PLUGIN_DATA_VERSION);
        data.set_session_end_info(info);
        self.write_hparams(SESSION_END_INFO_TAG, &data)
    }

    /// Marks a restart at `step` (`SessionLog.START`): a TensorBoard reading the folder drops the
    /// points of steps `>= step` it read before, the orphans of an interrupted run.
    pub fn session_restart(&mut self, step: i64) -> Result<()> {
        let mut log = SessionLog::new();
        log.set_status(SessionLog_SessionStatus::START);
        let mut ev = Event::new();
        ev.set_wall_time(now_secs());
        ev.set_step(step);
        ev.set_session_log(log);
        self.write_event(ev)
    }

    /// Rewrites the folder's other event files (an earlier process's) keeping only the events of
    /// steps `<= keep_through` (`None`: none), without their hparams session start/end; a file
    /// left without summaries is deleted. Returns whether there were earlier files. A record cut
    /// short by a killed writer ends its file, as it does for TensorBoard's reader.
    pub fn prune_earlier_files(&self, keep_through: Option<i64>) -> Result<bool> {
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| LlmError::Io { path, source }
        };
        let mut found = false;
        for entry in std::fs::read_dir(&self.dir).map_err(io(&self.dir))? {
            let path = entry.map_err(io(&self.dir))?.path();
            let is_events = path
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("events.out.tfevents."));
            if path == self.path || !is_events || !path.is_file() {
                continue;
            }
            found = true;
            let bytes = std::fs::read(&path).map_err(io(&path))?;
            let records = read_records(&bytes);
            let kept: Vec<&(&[u8], Event)> = records
                .iter()
                .filter(|(_, ev)| keep_event(ev, keep_through))
                .collect();
            if !kept.iter().any(|(_, ev)| ev.has_summary()) {
                std::fs::remove_file(&path).map_err(io(&path))?;
            } else if kept.iter().map(|(r, _)| r.len()).sum::<usize>() < bytes.len() {
                let body: Vec<u8> = kept.iter().flat_map(|(r, _)| r.iter().copied()).collect();
                // The temp name has no "tfevents" in it: TensorBoard must never read it.
                let tmp = self
                    .dir
                    .join(format!(".llmlab-prune.{}.tmp", std::process::id()));
                std::fs::write(&tmp, &body)
                    .and_then(|()| File::open(&tmp)?.sync_all())
                    .and_then(|()| std::fs::rename(&tmp, &path))
                    .map_err(io(&path))
                    .with_context(|| format!("cannot rewrite the event file {}", path.display()))?;
            }
        }
        Ok(found)
    }

    /// Flushes the file's buffer to the OS (each call above already does).
    pub fn flush(&mut self) -> Result<()> {
        self.records.flush().map_err(|source| self.io_error(source))
    }

    fn write_hparams(&mut self, tag: &str, data: &HParamsPluginData) -> Result<()> {
        let content = data
            .write_to_bytes()
            .with_context(|| format!("encoding the hparams summary {tag}"))?;
        let mut v = plugin_value(tag, "hparams", content);
        // What TensorBoard's own hparams summaries carry (`metadata.NULL_TENSOR`).
        let mut null = TensorProto::new();
        null.set_dtype(DataType::DT_FLOAT);
        let mut dim = TensorShapeProto_Dim::new();
        dim.set_size(0);
        null.mut_tensor_shape().mut_dim().push(dim);
        v.set_tensor(null);
        self.write_value(v, 0)
    }

    fn write_value(&mut self, value: Summary_Value, step: i64) -> Result<()> {
        let mut summary = Summary::new();
        summary.mut_value().push(value);
        let mut ev = Event::new();
        ev.set_wall_time(now_secs());
        ev.set_step(step);
        ev.set_summary(summary);
        self.write_event(ev)
    }

    fn write_event(&mut self, ev: Event) -> Result<()> {
        let bytes = ev
            .write_to_bytes()
            .with_context(|| format!("encoding an event for {}", self.path.display()))?;
        self.records
            .write(&bytes)
            .and_then(|()| self.records.flush())
            .map_err(|source| self.io_error(source))
    }

    fn io_error(&self, source: std::io::Error) -> anyhow::Error {
        anyhow::Error::new(LlmError::Io {
            path: self.path.clone(),
            source,
        })
        .context(format!(
            "cannot write the event file {}",
            self.path.display()
        ))
    }
}

/// The complete records of an event file: the framed bytes and the event of each, up to the first
/// record that is cut short or fails a CRC.
fn read_records(bytes: &[u8]) -> Vec<(&[u8], Event)> {
    let mut out = Vec::new();
    let mut at = 0;
    while let Some(header) = bytes.get(at..at + 12) {
        let (len_bytes, len_crc) = header.split_at(8);
        if masked_crc32c(len_bytes).to_le_bytes() != len_crc {
            break;
        }
        let len = u64::from_le_bytes(len_bytes.try_into().expect("8 bytes"));
        let Some(end) = usize::try_from(len)
            .ok()
            .and_then(|n| (at + 16).checked_add(n))
        else {
            break;
        };
        let Some(record) = bytes.get(at..end) else {
            break;
        };
        let (data, crc) = record[12..].split_at(record.len() - 16);
        if masked_crc32c(data).to_le_bytes() != crc {
            break;
        }
        let Ok(ev) = Event::parse_from_bytes(data) else {
            break;
        };
        out.push((record, ev));
        at = end;
    }
    out
}

/// Whether an earlier process's event survives a resume after step `keep_through`.
fn keep_event(ev: &Event, keep_through: Option<i64>) -> bool {
    if ev.has_file_version() {
        return true;
    }
    if keep_through.is_none_or(|k| ev.get_step() > k) {
        return false;
    }
    !ev.get_summary()
        .get_value()
        .iter()
        .any(|v| v.get_tag() == SESSION_START_INFO_TAG || v.get_tag() == SESSION_END_INFO_TAG)
}

/// A `Summary.Value` owned by a plugin (`metadata.plugin_data`).
fn plugin_value(tag: &str, plugin: &str, content: Vec<u8>) -> Summary_Value {
    let mut pd = SummaryMetadata_PluginData::new();
    pd.set_plugin_name(plugin.to_string());
    pd.set_content(content);
    let mut meta = SummaryMetadata::new();
    meta.set_plugin_data(pd);
    let mut v = Summary_Value::new();
    v.set_tag(tag.to_string());
    v.set_metadata(meta);
    v
}

fn hparam_info(name: &str, domain: &HParamDomain) -> Result<HParamInfo> {
    let mut info = HParamInfo::new();
    info.set_name(name.to_string());
    info.set_display_name(name.to_string());
    match domain {
        HParamDomain::Discrete(values) => {
            let Some(first) = values.first() else {
                bail!("hparam '{name}': a discrete domain needs at least one value");
            };
            let ty = first.data_type();
            if let Some(other) = values.iter().find(|v| v.data_type() != ty) {
                bail!("hparam '{name}': discrete values mix kinds ({first:?} and {other:?})");
            }
            let mut list = ListValue::new();
            for v in values {
                list.mut_values().push(v.to_proto());
            }
            info.set_field_type(ty);
            info.set_domain_discrete(list);
        }
        HParamDomain::Interval { min, max } => {
            if min.is_nan() || max.is_nan() || min > max {
                bail!("hparam '{name}': interval [{min}, {max}] is empty");
            }
            let mut iv = Interval::new();
            iv.set_min_value(*min);
            iv.set_max_value(*max);
            info.set_field_type(HDataType::DATA_TYPE_FLOAT64);
            info.set_domain_interval(iv);
        }
    }
    Ok(info)
}

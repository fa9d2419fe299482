//! Preference data for DPO (book ch07, `04_preference-tuning-with-dpo/
//! create-preference-data-ollama.ipynb`): for every entry of an instruction data file
//! (`instruction`, `input`, `output`), pick "polite" or "impolite" at random and ask a teacher
//! model to slightly rewrite the output to be more so, with the notebook's prompt. A polite
//! rewrite becomes `chosen` and the original output `rejected`; an impolite one `rejected`, the
//! output `chosen`. The result has the shape of the book's `instruction-data-with-preference.json`:
//! each entry's fields plus `chosen` and `rejected`, a JSON array.
//!
//! Differences from the notebook, and why:
//! - the choice is seeded (`random.choice` there is not), so a run can be repeated and resumed;
//! - the file is written (atomically) after every entry, not once at the end, and beside it
//!   `<stem>.progress.json` records what the entries were made from (input checksum and length,
//!   seed, teacher model and seed): the same command continues after the entries already made,
//!   and a run with other settings is refused rather than mixed into them;
//! - the teacher is any OpenAI-compatible or Ollama server ([`crate::remote`]); the notebook's
//!   `query_model` sends Ollama seed 123 and temperature 0, as the client does by default.
use crate::error::{read_text, write_atomic, LlmError};
use crate::prompt::{format_input, Entry};
use crate::remote::{Api, ChatClient, ChatConfig};
use anyhow::{Context, Result};
use rand::rngs::StdRng;
use rand::seq::IndexedRandom;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// The rewrite asked for an entry (the notebook's `politeness`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Politeness {
    /// The rewrite is `chosen`, the output `rejected`.
    Polite,
    /// The rewrite is `rejected`, the output `chosen`.
    Impolite,
}

impl Politeness {
    pub fn name(&self) -> &'static str {
        match self {
            Self::Polite => "polite",
            Self::Impolite => "impolite",
        }
    }
}

/// The notebook's prompt, byte for byte: its f-string has no space after the first two
/// sentences and says "return return"; the teacher sees what the book's teacher saw.
pub fn preference_prompt(entry: &Entry, politeness: Politeness) -> String {
    format!(
        "Given the input `{}` and correct output `{}`, slightly rewrite the output to be more {}.Keep the modification minimal.Only return return the generated response and nothing else.",
        format_input(entry),
        entry.output,
        politeness.name()
    )
}

/// The choice for each of `n` entries: `random.choice(["polite", "impolite"])` in order, from
/// one generator seeded with `seed` (entry i gets the i-th draw, however many entries follow).
pub fn politeness_choices(seed: u64, n: usize) -> Vec<Politeness> {
    let mut rng = StdRng::seed_from_u64(seed);
    let options = [Politeness::Polite, Politeness::Impolite];
    (0..n)
        .map(|_| *options.choose(&mut rng).expect("two options"))
        .collect()
}

/// `(chosen, rejected)` for an entry's output and the teacher's rewrite.
pub fn chosen_rejected<'a>(
    politeness: Politeness,
    output: &'a str,
    response: &'a str,
) -> (&'a str, &'a str) {
    match politeness {
        Politeness::Polite => (response, output),
        Politeness::Impolite => (output, response),
    }
}

/// What a run makes.
#[derive(Debug, Clone)]
pub struct PreferenceSpec {
    /// The instruction data file.
    pub input: PathBuf,
    /// The preference file (a JSON array).
    pub out: PathBuf,
    /// Seeds the polite/impolite choices.
    pub seed: u64,
    /// Only the first N entries of the input.
    pub limit: Option<usize>,
}

/// The figures of a run (`--format json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PreferenceSummary {
    /// Entries in the output file now.
    pub entries: usize,
    /// Made by this run.
    pub made: usize,
    /// Already in the file when the run started.
    pub resumed: usize,
    /// Of the file's entries, those with a polite rewrite (chosen) and an impolite one
    /// (rejected).
    pub polite: usize,
    pub impolite: usize,
    /// Of the file's entries, those where the teacher returned the output unchanged
    /// (chosen = rejected: no preference to learn from).
    pub unchanged: usize,
    pub out: PathBuf,
    /// The record of the run's settings beside it.
    pub progress: PathBuf,
}

/// `prefs.json` → `prefs.progress.json` (beside it).
pub fn progress_path(out: &Path) -> PathBuf {
    let stem = out
        .file_stem()
        .map(|s| s.to_string_lossy().to_string())
        .unwrap_or_else(|| "preferences".into());
    out.with_file_name(format!("{stem}.progress.json"))
}

/// What the entries of an output file were made from: a run continues a file only when its
/// own settings agree on every checked field.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Record {
    format: u32,
    /// Checked: the input's sha256 and entry count (the same data in the same order).
    input_sha256: String,
    input_entries: usize,
    /// Checked: the choices' seed, the teacher model and its request seed.
    seed: u64,
    teacher_model: String,
    teacher_seed: u64,
    /// For the reader only: a server may move (another port) and serve the same model.
    input: String,
    teacher_url: String,
    api: Api,
}

const RECORD_FORMAT: u32 = 1;

impl Record {
    /// The first checked field where `self` (the file's) and `now` (this run's) differ:
    /// `(key, file's value, this run's value)`.
    fn mismatch(&self, now: &Record) -> Option<(&'static str, String, String)> {
        let pairs = [
            ("format", self.format.to_string(), now.format.to_string()),
            (
                "input_sha256",
                self.input_sha256.clone(),
                now.input_sha256.clone(),
            ),
            (
                "input_entries",
                self.input_entries.to_string(),
                now.input_entries.to_string(),
            ),
            ("seed", self.seed.to_string(), now.seed.to_string()),
            (
                "teacher_model",
                self.teacher_model.clone(),
                now.teacher_model.clone(),
            ),
            (
                "teacher_seed",
                self.teacher_seed.to_string(),
                now.teacher_seed.to_string(),
            ),
        ];
        pairs.into_iter().find(|(_, a, b)| a != b)
    }
}

/// Reads an instruction data file: a JSON array of objects, or one object a line (JSONL), each
/// with string `instruction` and `output` and an optional `input` (missing or `null`: empty).
/// A bad entry is named by its 1-based number and its index in the array.
pub fn read_instruction_file(path: &Path) -> Result<Vec<Entry>> {
    parse_instruction_file(path, &read_text(path)?)
}

/// [`read_instruction_file`] on the text of `path`, already read.
fn parse_instruction_file(path: &Path, text: &str) -> Result<Vec<Entry>> {
    let bad = |m: String| LlmError::BadFile {
        path: path.to_path_buf(),
        message: m,
    };
    let records: Vec<serde_json::Value> = if text.trim_start().starts_with('[') {
        serde_json::from_str(text).map_err(|e| bad(format!("not a JSON array ({e})")))?
    } else {
        let mut out = Vec::new();
        for (i, line) in text.lines().enumerate() {
            if !line.trim().is_empty() {
                out.push(
                    serde_json::from_str(line)
                        .map_err(|e| bad(format!("line {}: not a JSON object ({e})", i + 1)))?,
                );
            }
        }
        out
    };
    if records.is_empty() {
        return Err(bad("no entries".into()).into());
    }
    let mut entries = Vec::with_capacity(records.len());
    for (i, rec) in records.into_iter().enumerate() {
        let at = format!("entry {} (index {i})", i + 1);
        let serde_json::Value::Object(obj) = rec else {
            return Err(bad(format!("{at}: expected a JSON object, found {rec}")).into());
        };
        let field = |name: &str, required: bool| -> Result<String, LlmError> {
            match obj.get(name) {
                Some(serde_json::Value::String(s)) => Ok(s.clone()),
                None | Some(serde_json::Value::Null) if !required => Ok(String::new()),
                None => Err(bad(format!(
                    "{at}: no '{name}' field; every entry needs 'instruction' and 'output' strings ('input' may be empty)"
                ))),
                Some(other) => Err(bad(format!("{at}: '{name}' is {other}, expected a string"))),
            }
        };
        entries.push(Entry {
            instruction: field("instruction", true)?,
            input: field("input", false)?,
            output: field("output", true)?,
            raw: obj.clone(),
        });
    }
    Ok(entries)
}

/// The registered data set's instruction file (`instruction-data`: the book's 1,100 entries),
/// fetched through the data registry.
pub fn dataset_file(name: &str) -> Result<PathBuf> {
    let spec = super::data::InstructDataSpec {
        dataset: Some(name.to_string()),
        ..Default::default()
    };
    spec.file()
}

/// An output entry: the input entry's fields (the book's first: `instruction`, `input`,
/// `output`, then any others), then `chosen` and `rejected`.
fn output_record(entry: &Entry, chosen: &str, rejected: &str) -> Vec<(String, serde_json::Value)> {
    let first = ["instruction", "input", "output"];
    let mut rec: Vec<(String, serde_json::Value)> = first
        .iter()
        .filter_map(|k| entry.raw.get(*k).map(|v| (k.to_string(), v.clone())))
        .collect();
    rec.extend(
        entry
            .raw
            .iter()
            .filter(|(k, _)| !first.contains(&k.as_str()) && *k != "chosen" && *k != "rejected")
            .map(|(k, v)| (k.clone(), v.clone())),
    );
    rec.push(("chosen".into(), chosen.into()));
    rec.push(("rejected".into(), rejected.into()));
    rec
}

/// Serializes records as a JSON array of objects whose keys keep their order, indented by four
/// spaces as the notebook's `json.dump(json_data, file, indent=4)`.
fn to_json(records: &[Vec<(String, serde_json::Value)>]) -> Result<Vec<u8>> {
    struct Obj<'a>(&'a [(String, serde_json::Value)]);
    impl Serialize for Obj<'_> {
        fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            use serde::ser::SerializeMap;
            let mut m = s.serialize_map(Some(self.0.len()))?;
            for (k, v) in self.0 {
                m.serialize_entry(k, v)?;
            }
            m.end()
        }
    }
    let objs: Vec<Obj> = records.iter().map(|r| Obj(r)).collect();
    let mut buf = Vec::new();
    let fmt = serde_json::ser::PrettyFormatter::with_indent(b"    ");
    let mut ser = serde_json::Serializer::with_formatter(&mut buf, fmt);
    objs.serialize(&mut ser)?;
    Ok(buf)
}

/// The entries an earlier run wrote to `out`, checked against the input and the choices: the
/// same `instruction`, `input` and `output` in the same order, and the original output on the
/// side its choice puts it.
fn read_made(
    out: &Path,
    entries: &[Entry],
    choices: &[Politeness],
) -> Result<Vec<Vec<(String, serde_json::Value)>>> {
    let bad = |m: String| LlmError::BadFile {
        path: out.to_path_buf(),
        message: m,
    };
    let made: Vec<serde_json::Map<String, serde_json::Value>> =
        serde_json::from_str(&read_text(out)?).map_err(|e| {
            bad(format!(
                "not a JSON array of objects ({e}); it was not written by `llmlab data make-preferences`: give another --out or remove it"
            ))
        })?;
    if made.len() > entries.len() {
        return Err(bad(format!(
            "holds {} entries, the input only {}: it was made from other data; give another --out",
            made.len(),
            entries.len()
        ))
        .into());
    }
    let mut records = Vec::with_capacity(made.len());
    for (i, (obj, entry)) in made.iter().zip(entries).enumerate() {
        let at = format!("entry {} (index {i})", i + 1);
        for key in ["instruction", "input", "output"] {
            if obj.get(key) != entry.raw.get(key) {
                return Err(bad(format!(
                    "{at}: its '{key}' is not the input's entry {}'s; the file was made from other data or another order: give another --out",
                    i + 1
                ))
                .into());
            }
        }
        let s = |k: &str| obj.get(k).and_then(|v| v.as_str());
        let (Some(chosen), Some(rejected)) = (s("chosen"), s("rejected")) else {
            return Err(bad(format!("{at}: needs 'chosen' and 'rejected' strings")).into());
        };
        let original = match choices[i] {
            Politeness::Polite => rejected,
            Politeness::Impolite => chosen,
        };
        if original != entry.output {
            return Err(bad(format!(
                "{at}: the seed chose '{}' for it, which keeps the output as '{}', but that field differs from the output; the file was made with another seed: give another --out",
                choices[i].name(),
                if choices[i] == Politeness::Polite { "rejected" } else { "chosen" }
            ))
            .into());
        }
        records.push(output_record(entry, chosen, rejected));
    }
    Ok(records)
}

/// Makes (or continues) the preference file of `spec` with the teacher of `teacher` (see the
/// module doc); `progress(done, total, choice)` hears about each entry made by this run.
pub fn make_preferences(
    spec: &PreferenceSpec,
    teacher: ChatConfig,
    progress: &mut dyn FnMut(usize, usize, Politeness),
) -> Result<PreferenceSummary> {
    if spec.limit == Some(0) {
        return Err(LlmError::Usage("--limit 0: give at least 1 entry".into()).into());
    }
    let text = read_text(&spec.input)?;
    let entries = parse_instruction_file(&spec.input, &text)?;
    let choices = politeness_choices(spec.seed, entries.len());
    let n = spec.limit.map_or(entries.len(), |l| l.min(entries.len()));
    let side = progress_path(&spec.out);
    let record = Record {
        format: RECORD_FORMAT,
        input_sha256: crate::data::registry::sha256_hex(text.as_bytes()),
        input_entries: entries.len(),
        seed: spec.seed,
        teacher_model: teacher.model.clone(),
        teacher_seed: teacher.seed,
        input: spec.input.display().to_string(),
        teacher_url: teacher.url.clone(),
        api: teacher.api,
    };
    let mut records = if spec.out.exists() {
        if !side.exists() {
            return Err(LlmError::Usage(format!(
                "{} exists but {} does not, so it is not known what its entries were made from; give another --out, or remove {} to start over",
                spec.out.display(),
                side.display(),
                spec.out.display()
            ))
            .into());
        }
        let earlier: Record =
            serde_json::from_str(&read_text(&side)?).map_err(|e| LlmError::BadFile {
                path: side.clone(),
                message: format!("not a make-preferences record ({e})"),
            })?;
        if let Some((key, was, now)) = earlier.mismatch(&record) {
            return Err(LlmError::Usage(format!(
                "{}: {key} is {was}, this run's is {now}: the entries in {} were made with other settings (input, --seed or --teacher-model) and would be mixed with new ones; run with the same settings to continue, or give another --out (or remove both files) to start over",
                side.display(),
                spec.out.display()
            ))
            .into());
        }
        read_made(&spec.out, &entries, &choices)?
    } else {
        write_atomic(&side, serde_json::to_string_pretty(&record)?.as_bytes())?;
        Vec::new()
    };
    let resumed = records.len();
    if resumed < n {
        let client = ChatClient::new(teacher);
        client.probe()?;
        for i in resumed..n {
            let (entry, choice) = (&entries[i], choices[i]);
            let response = client
                .ask(&preference_prompt(entry, choice))
                .with_context(|| {
                    format!(
                        "entry {} (index {i}) of {}: the {i} entries made so far are in {}; run the same command again to continue",
                        i + 1,
                        spec.input.display(),
                        spec.out.display()
                    )
                })?;
            let (chosen, rejected) = chosen_rejected(choice, &entry.output, &response);
            records.push(output_record(entry, chosen, rejected));
            write_atomic(&spec.out, &to_json(&records)?)?;
            progress(i + 1, n, choice);
        }
    }
    let field = |r: &[(String, serde_json::Value)], k: &str| -> Option<serde_json::Value> {
        r.iter().find(|(key, _)| key == k).map(|(_, v)| v.clone())
    };
    let polite = choices
        .iter()
        .take(records.len())
        .filter(|c| **c == Politeness::Polite)
        .count();
    Ok(PreferenceSummary {
        entries: records.len(),
        made: records.len() - resumed,
        resumed,
        polite,
        impolite: records.len() - polite,
        unchanged: records
            .iter()
            .filter(|r| field(r, "chosen") == field(r, "rejected"))
            .count(),
        out: spec.out.clone(),
        progress: side,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn choices_are_seeded_and_a_prefix_of_longer_runs() {
        let a = politeness_choices(7, 40);
        assert_eq!(a, politeness_choices(7, 40));
        assert_eq!(&politeness_choices(7, 10)[..], &a[..10]);
        assert_ne!(a, politeness_choices(8, 40));
        let polite = a.iter().filter(|c| **c == Politeness::Polite).count();
        assert!((5..=35).contains(&polite), "{polite} of 40 polite");
    }

    #[test]
    fn polite_rewrites_are_chosen_impolite_ones_rejected() {
        assert_eq!(
            chosen_rejected(Politeness::Polite, "out", "re"),
            ("re", "out")
        );
        assert_eq!(
            chosen_rejected(Politeness::Impolite, "out", "re"),
            ("out", "re")
        );
    }

    #[test]
    fn output_keeps_the_books_key_order_and_indent() {
        let mut e = Entry::new("Say hi.", "", "Hi");
        e.raw.insert("id".into(), 3.into());
        let json = to_json(&[output_record(&e, "Hello!", "Hi")]).expect("serializes");
        assert_eq!(
            String::from_utf8(json).expect("UTF-8"),
            "[\n    {\n        \"instruction\": \"Say hi.\",\n        \"input\": \"\",\n        \"output\": \"Hi\",\n        \"id\": 3,\n        \"chosen\": \"Hello!\",\n        \"rejected\": \"Hi\"\n    }\n]"
        );
    }
}

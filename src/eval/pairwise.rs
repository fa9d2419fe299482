//! Pairwise comparison of instruction responses by a judge model (LLM-as-a-judge, Zheng et al.
//! 2023, "Judging LLM-as-a-Judge with MT-Bench and Chatbot Arena", §3.1 "pairwise comparison"),
//! written as Chatbot Arena battles for [`super::leaderboard`].
//!
//! Every instruction that two models answered (two responses files, as `task: instruct` writes
//! them, matched on instruction and input) is shown to the judge with both responses and the
//! reference answer, twice: once with model_a's response as "A", once swapped. Each reply's
//! verdict is the last `[[A]]`, `[[B]]` or `[[C]]` (tie) in it (MT-Bench's format), or a reply
//! that is only `A`, `B`, `C` or `tie`; anything else is unparsable. As MT-Bench does to cancel
//! position bias, a model wins only when both orders prefer it; disagreement or a tie in either
//! order is a tie. One vote line per comparison goes to `--out`:
//! `{"model_a", "model_b", "winner": "model_a"|"model_b"|"tie", "instruction", "input",
//! "verdicts": [first order, swapped order]}`, appended and synced line by line. A comparison
//! with an unparsable reply gets no vote; it goes, with both replies, to
//! `<out stem>.unparsable.jsonl` beside it. Both files are read first: a comparison already in
//! either is not asked again (delete the unparsable file to retry those).
//!
//! The HTTP client, its retries and the count of unparsable replies are `eval judge`'s
//! ([`super::judge::Judge`]).
use super::judge::{ask_parsed, read_responses, Judge, JudgeConfig, Tally};
use super::leaderboard::Winner;
use crate::error::{read_text, LlmError};
use crate::prompt::Entry;
use anyhow::Result;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

/// A responses file and the model name its votes carry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResponsesFile {
    pub name: String,
    pub path: PathBuf,
}

impl ResponsesFile {
    /// `NAME=PATH`, or a path whose name is derived: the file stem, except for a file named
    /// `responses.json` (what every `task: instruct` trial writes), which takes its folder's
    /// name (the trial: `runs/exp/lr-0.001/responses.json` → `lr-0.001`). An existing file
    /// whose name contains `=` is a path.
    pub fn parse(arg: &str) -> Result<Self, LlmError> {
        if !Path::new(arg).is_file() {
            if let Some((name, path)) = arg.split_once('=') {
                if name.is_empty() || path.is_empty() {
                    return Err(LlmError::Usage(format!(
                        "--responses {arg}: expected PATH or NAME=PATH"
                    )));
                }
                return Ok(Self {
                    name: name.into(),
                    path: path.into(),
                });
            }
        }
        let path = PathBuf::from(arg);
        let stem = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        let name = if stem == "responses" {
            path.parent()
                .and_then(|p| p.file_name())
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or(stem)
        } else {
            stem
        };
        if name.is_empty() {
            return Err(LlmError::Usage(format!(
                "--responses {arg}: no model name in the path; give NAME={arg}"
            )));
        }
        Ok(Self { name, path })
    }
}

/// The judge's instructions (a system message; MT-Bench's pairwise judge, with the reference
/// answer the book's judge prompt also gives).
pub const SYSTEM_PROMPT: &str = "You are an impartial judge. Compare the responses of two AI assistants, A and B, to the instruction below; the reference answer shows what a correct response contains. Decide which response follows the instruction and answers it better: correctness first, then helpfulness, relevance and detail. Do not let the order of the responses, their length or the assistants' names influence you. Explain your decision briefly, then end with your verdict in exactly this format: \"[[A]]\" if response A is better, \"[[B]]\" if response B is better, \"[[C]]\" for a tie.";

/// The user message showing one instruction, its reference answer and two responses.
pub fn pairwise_prompt(entry: &Entry, response_a: &str, response_b: &str) -> String {
    let input = if entry.input.is_empty() {
        String::new()
    } else {
        format!("\n\n[Input]\n{}", entry.input)
    };
    format!(
        "[Instruction]\n{}{input}\n\n[Reference answer]\n{}\n\n[The start of response A]\n{response_a}\n[The end of response A]\n\n[The start of response B]\n{response_b}\n[The end of response B]",
        entry.instruction, entry.output
    )
}

/// A verdict about the responses as shown: `A`, `B` or a tie.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shown {
    A,
    B,
    Tie,
}

/// The last `[[A]]`/`[[B]]`/`[[C]]` in the reply, or a reply that is only `A`, `B`, `C` or
/// `tie` (brackets, quotes and a final period aside); `None` otherwise.
pub fn parse_verdict(reply: &str) -> Option<Shown> {
    let last = [
        ("[[A]]", Shown::A),
        ("[[B]]", Shown::B),
        ("[[C]]", Shown::Tie),
    ]
    .iter()
    .filter_map(|(m, v)| reply.rfind(m).map(|at| (at, *v)))
    .max_by_key(|(at, _)| *at);
    if let Some((_, v)) = last {
        return Some(v);
    }
    let bare = reply
        .trim()
        .trim_end_matches('.')
        .trim_matches(|c| matches!(c, '[' | ']' | '"' | '\'' | '*' | ' '))
        .to_ascii_lowercase();
    match bare.as_str() {
        "a" => Some(Shown::A),
        "b" => Some(Shown::B),
        "c" | "tie" => Some(Shown::Tie),
        _ => None,
    }
}

/// Both orders' verdicts in model terms → the vote (a win only when both agree).
pub fn combine(first: Winner, swapped: Winner) -> Winner {
    if first == swapped {
        first
    } else {
        Winner::Tie
    }
}

/// A vote line of `--out`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VoteLine {
    pub model_a: String,
    pub model_b: String,
    pub winner: Winner,
    pub instruction: String,
    #[serde(default)]
    pub input: String,
    /// The verdicts with model_a's response shown first, then second.
    #[serde(default)]
    pub verdicts: Vec<Winner>,
}

/// What `llmlab eval pairwise` reports.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PairwiseSummary {
    pub models: Vec<String>,
    /// Instructions × model pairs answered by both models.
    pub comparisons: usize,
    /// Of these, found in --out (or the unparsable file) from an earlier run.
    pub already_done: usize,
    /// Votes written by this run.
    pub new_votes: usize,
    /// Judge replies of this run, parsed and unparsable.
    pub replies: Tally,
    /// Comparisons of this run without a vote because a reply was unparsable.
    pub unparsable_comparisons: usize,
    pub out: PathBuf,
}

/// `votes.jsonl` → `votes.unparsable.jsonl` beside it.
pub fn unparsable_path(out: &Path) -> PathBuf {
    let stem = out
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "votes".into());
    out.with_file_name(format!("{stem}.unparsable.jsonl"))
}

/// A comparison's identity across runs: the two models (either order), the instruction and
/// input, and which repetition of that instruction in the files it is.
type Key = (String, String, String, String);

fn key(a: &str, b: &str, instruction: &str, input: &str) -> Key {
    let (x, y) = if a <= b { (a, b) } else { (b, a) };
    (x.into(), y.into(), instruction.into(), input.into())
}

/// Reads the comparisons already in a JSON-lines file (missing file: none). A last line cut
/// short by a crash (no newline, not JSON) is removed from the file; any other bad line is an
/// error naming the file and line.
fn done_in(path: &Path, done: &mut HashMap<Key, usize>) -> Result<()> {
    if !path.exists() {
        return Ok(());
    }
    let text = read_text(path)?;
    let bad = |m: String| LlmError::BadFile {
        path: path.to_path_buf(),
        message: m,
    };
    let lines: Vec<&str> = text.split_inclusive('\n').collect();
    let mut keep = text.len();
    for (i, line) in lines.iter().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let v: serde_json::Value = match serde_json::from_str(line) {
            Ok(v) => v,
            Err(_) if i + 1 == lines.len() && !line.ends_with('\n') => {
                keep = text.len() - line.len();
                break;
            }
            Err(e) => return Err(bad(format!("line {}: not JSON ({e})", i + 1)).into()),
        };
        let s = |k: &str| v.get(k).and_then(|x| x.as_str());
        let (Some(a), Some(b), Some(instruction)) = (s("model_a"), s("model_b"), s("instruction"))
        else {
            return Err(bad(format!(
                "line {}: needs string fields model_a, model_b and instruction",
                i + 1
            ))
            .into());
        };
        *done
            .entry(key(a, b, instruction, s("input").unwrap_or("")))
            .or_default() += 1;
    }
    if keep < text.len() {
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(path)
            .map_err(|source| LlmError::Io {
                path: path.to_path_buf(),
                source,
            })?;
        f.set_len(keep as u64).map_err(|source| LlmError::Io {
            path: path.to_path_buf(),
            source,
        })?;
    } else if !text.is_empty() && !text.ends_with('\n') {
        append(path, "\n")?;
    }
    Ok(())
}

/// Appends `text` to `path` and syncs it to disk.
fn append(path: &Path, text: &str) -> Result<(), LlmError> {
    let io = |source| LlmError::Io {
        path: path.to_path_buf(),
        source,
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(io)?;
    }
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(io)?;
    f.write_all(text.as_bytes()).map_err(io)?;
    f.sync_data().map_err(io)
}

/// One comparison to make: model indices and the entry (from model i's file) with both
/// responses.
struct Comparison<'a> {
    i: usize,
    j: usize,
    entry: &'a Entry,
    response_i: &'a str,
    response_j: &'a str,
}

/// Compares every pair of models on the instructions both answered (see the module doc),
/// appending votes to `out`; `progress(done, total, vote)` hears about each comparison of this
/// run (`None`: unparsable).
pub fn pairwise(
    files: &[ResponsesFile],
    cfg: JudgeConfig,
    out: &Path,
    progress: &mut dyn FnMut(usize, usize, Option<&VoteLine>),
) -> Result<PairwiseSummary> {
    if files.len() < 2 {
        return Err(
            LlmError::Usage("give at least two --responses files (one per model)".into()).into(),
        );
    }
    let mut seen: HashMap<&str, &Path> = HashMap::new();
    for f in files {
        if let Some(p) = seen.insert(&f.name, &f.path) {
            return Err(LlmError::Usage(format!(
                "two --responses files are both named '{}' ({} and {}); name them with NAME=PATH",
                f.name,
                p.display(),
                f.path.display()
            ))
            .into());
        }
    }
    let data: Vec<Vec<(Entry, String)>> = files
        .iter()
        .map(|f| read_responses(&f.path))
        .collect::<Result<_>>()?;
    // Each model's responses by (instruction, input), repetitions in file order.
    let index: Vec<HashMap<(&str, &str), Vec<usize>>> = data
        .iter()
        .map(|entries| {
            let mut m: HashMap<(&str, &str), Vec<usize>> = HashMap::new();
            for (k, (e, _)) in entries.iter().enumerate() {
                m.entry((e.instruction.as_str(), e.input.as_str()))
                    .or_default()
                    .push(k);
            }
            m
        })
        .collect();
    let mut done: HashMap<Key, usize> = HashMap::new();
    let side = unparsable_path(out);
    done_in(out, &mut done)?;
    done_in(&side, &mut done)?;

    let mut todo = Vec::new();
    let mut comparisons = 0;
    for i in 0..files.len() {
        for j in (i + 1)..files.len() {
            let mut rep: HashMap<(&str, &str), usize> = HashMap::new();
            for (e, response_i) in &data[i] {
                let at = (e.instruction.as_str(), e.input.as_str());
                let r = rep.entry(at).or_default();
                let nth = *r;
                *r += 1;
                let Some(&k) = index[j].get(&at).and_then(|ks| ks.get(nth)) else {
                    continue;
                };
                comparisons += 1;
                let key = key(&files[i].name, &files[j].name, at.0, at.1);
                if done.get(&key).is_some_and(|&n| n > nth) {
                    continue;
                }
                todo.push(Comparison {
                    i,
                    j,
                    entry: e,
                    response_i,
                    response_j: &data[j][k].1,
                });
            }
        }
    }
    let mut summary = PairwiseSummary {
        models: files.iter().map(|f| f.name.clone()).collect(),
        comparisons,
        already_done: comparisons - todo.len(),
        new_votes: 0,
        replies: Tally::default(),
        unparsable_comparisons: 0,
        out: out.to_path_buf(),
    };
    if todo.is_empty() {
        return Ok(summary);
    }
    let judge = Judge::new(cfg);
    judge.probe()?;
    let total = todo.len();
    for (n, c) in todo.iter().enumerate() {
        let (a, b) = (&files[c.i].name, &files[c.j].name);
        let mut ask = |first: &str, second: &str| {
            let prompt = pairwise_prompt(c.entry, first, second);
            ask_parsed(
                &judge,
                &[("system", SYSTEM_PROMPT), ("user", &prompt)],
                parse_verdict,
                &mut summary.replies,
            )
        };
        let (reply1, v1) = ask(c.response_i, c.response_j)?;
        let (reply2, v2) = ask(c.response_j, c.response_i)?;
        // In model terms: shown first is model_a in order 1, model_b in order 2.
        let as_model = |v: Shown, a_first: bool| match (v, a_first) {
            (Shown::Tie, _) => Winner::Tie,
            (Shown::A, true) | (Shown::B, false) => Winner::ModelA,
            _ => Winner::ModelB,
        };
        match (v1, v2) {
            (Some(v1), Some(v2)) => {
                let verdicts = vec![as_model(v1, true), as_model(v2, false)];
                let line = VoteLine {
                    model_a: a.clone(),
                    model_b: b.clone(),
                    winner: combine(verdicts[0], verdicts[1]),
                    instruction: c.entry.instruction.clone(),
                    input: c.entry.input.clone(),
                    verdicts,
                };
                append(out, &(serde_json::to_string(&line)? + "\n"))?;
                summary.new_votes += 1;
                progress(n + 1, total, Some(&line));
            }
            (v1, v2) => {
                let rec = serde_json::json!({
                    "model_a": a, "model_b": b,
                    "instruction": c.entry.instruction, "input": c.entry.input,
                    "verdicts": [v1.map(|v| as_model(v, true)), v2.map(|v| as_model(v, false))],
                    "replies": [reply1, reply2],
                });
                append(&side, &(rec.to_string() + "\n"))?;
                summary.unparsable_comparisons += 1;
                progress(n + 1, total, None);
            }
        }
    }
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verdicts_parse_like_mt_bench() {
        assert_eq!(parse_verdict("A is clearer. [[A]]"), Some(Shown::A));
        assert_eq!(
            parse_verdict("Format: [[A]], [[B]] or [[C]]. My verdict: [[B]]"),
            Some(Shown::B)
        );
        assert_eq!(parse_verdict("[[C]]"), Some(Shown::Tie));
        assert_eq!(parse_verdict(" b. "), Some(Shown::B));
        assert_eq!(parse_verdict("Tie"), Some(Shown::Tie));
        assert_eq!(parse_verdict("Both are fine."), None);
        assert_eq!(combine(Winner::ModelA, Winner::ModelA), Winner::ModelA);
        assert_eq!(combine(Winner::ModelA, Winner::ModelB), Winner::Tie);
        assert_eq!(combine(Winner::Tie, Winner::ModelB), Winner::Tie);
    }

    #[test]
    fn model_names_come_from_the_path_or_the_argument() {
        let n = |s: &str| ResponsesFile::parse(s).expect("present").name;
        assert_eq!(n("runs/instruct-sweep/lr-0.001/responses.json"), "lr-0.001");
        assert_eq!(n("out/gpt2-medium.json"), "gpt2-medium");
        assert_eq!(n("base=runs/x/responses.json"), "base");
        assert_eq!(
            ResponsesFile::parse("base=runs/x/responses.json")
                .expect("present")
                .path,
            PathBuf::from("runs/x/responses.json")
        );
        assert!(ResponsesFile::parse("=x.json").is_err());
    }
}

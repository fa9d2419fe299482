//! A leaderboard from pairwise votes, as Chatbot Arena computes it (Chiang et al. 2024, "Chatbot
//! Arena: An Open Platform for Evaluating LLMs by Human Preference"; its notebook's
//! `compute_mle_elo`, `compute_online_elo`, `get_bootstrap_result`).
//!
//! - **rating**: the Bradley–Terry maximum-likelihood fit, `P(i beats j) = 1 / (1 + 10^((R_j -
//!   R_i) / 400))`. The Arena fits it as a logistic regression without intercept on rows `+ln 10`
//!   at model_a, `-ln 10` at model_b, each battle twice, a tie once as a win each way; that is
//!   the likelihood `Σ_{i,j} W_ij · ln σ(ln 10 · (β_i - β_j))` with `W_ij` = wins of i over j +
//!   half their ties, which we maximise by Newton's method (to a gradient of 1e-9 per battle).
//!   `rating = 1000 + 400 β`. The likelihood does not change when every β moves by the same
//!   amount; the Arena's solver (L-BFGS from 0, whose steps are sums of gradients, which sum to
//!   0) ends at Σβ = 0, so the ratings' mean is 1000, and so is ours (the Arena then shifts
//!   everything to pin one named model at 1114; we don't).
//! - **ci_low, ci_high**: the 2.5 and 97.5 percentiles (linear interpolation, as pandas'
//!   `quantile`) of the ratings fitted to `N` resamples of the votes with replacement (seeded).
//! - **elo**: the online Elo rating, K = 32, every model starting at 1000, votes in file order
//!   (a tie scores 0.5).
//! - **rank**: 1 + the number of models statistically better: whose `ci_low` is above this
//!   model's `ci_high` (the Arena's "rank (UB)").
//! - **battles**, **wins**, **ties**: counts over the votes; `wins` are outright wins (a tie is
//!   counted in `ties`, not as half a win).
//!
//! **No finite rating.** The maximum-likelihood ratings are finite only for models whose
//! win graph (an edge i → j when i won or tied at least once against j) is strongly connected:
//! a model that won every battle has its MLE at +∞ (the Arena's solver just stops somewhere
//! large). We fit the largest strongly connected group of models; every other model gets
//! `rating`/`ci_low`/`ci_high` null and a `note` saying why (above the fitted models: it or its
//! group never lost to them; below; or not linked to them by any battle), and is ranked by
//! the win graph: a model outside the fitted group counts as statistically better than another
//! when it reaches it in the win graph and not the other way round. A bootstrap resample in
//! which the fitted group is no longer strongly connected has no finite MLE either: it is
//! skipped and counted (`bootstrap.skipped`).
use crate::error::{read_text, LlmError};
use anyhow::Result;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;

/// The outcome of a battle (Chatbot Arena's `winner` column).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Winner {
    ModelA,
    ModelB,
    Tie,
}

impl Winner {
    /// `model_a`, `model_b`, `tie`, or the Arena's `tie (bothbad)` (a tie).
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "model_a" => Some(Self::ModelA),
            "model_b" => Some(Self::ModelB),
            "tie" | "tie (bothbad)" => Some(Self::Tie),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::ModelA => "model_a",
            Self::ModelB => "model_b",
            Self::Tie => "tie",
        }
    }

    /// model_a's score: 1, 0 or 0.5.
    fn score_a(self) -> f64 {
        match self {
            Self::ModelA => 1.0,
            Self::ModelB => 0.0,
            Self::Tie => 0.5,
        }
    }
}

/// One battle: the fields of a vote line a leaderboard needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Vote {
    pub model_a: String,
    pub model_b: String,
    pub winner: Winner,
}

impl Vote {
    pub fn new(model_a: &str, model_b: &str, winner: Winner) -> Self {
        Self {
            model_a: model_a.into(),
            model_b: model_b.into(),
            winner,
        }
    }
}

/// Parses one vote object; `Err` is the message (without the place).
pub fn parse_vote(v: &serde_json::Value) -> Result<Vote, String> {
    let field = |k: &str| -> Result<&str, String> {
        match v.get(k) {
            Some(serde_json::Value::String(s)) if !s.is_empty() => Ok(s),
            Some(other) => Err(format!("'{k}' must be a non-empty string, found {other}")),
            None => Err(format!(
                "missing '{k}' (a vote has model_a, model_b and winner)"
            )),
        }
    };
    if !v.is_object() {
        return Err(format!("expected a JSON object, found {v}"));
    }
    let (a, b, w) = (field("model_a")?, field("model_b")?, field("winner")?);
    let winner = Winner::parse(w).ok_or_else(|| {
        format!("unknown winner '{w}'; expected model_a, model_b, tie or \"tie (bothbad)\"")
    })?;
    if a == b {
        return Err(format!("model_a and model_b are both '{a}'"));
    }
    Ok(Vote::new(a, b, winner))
}

/// Reads a votes file: JSON lines (`llmlab eval pairwise --out`; blank lines skipped) or a JSON
/// array of vote objects (Chatbot Arena's published battles). Errors name the file and the line
/// (or array entry).
pub fn read_votes(path: &Path) -> Result<Vec<Vote>> {
    let text = read_text(path)?;
    let bad = |m: String| LlmError::BadFile {
        path: path.to_path_buf(),
        message: m,
    };
    let mut votes = Vec::new();
    if text.trim_start().starts_with('[') {
        let all: Vec<serde_json::Value> = serde_json::from_str(&text)
            .map_err(|e| bad(format!("not a JSON array of votes ({e})")))?;
        for (i, v) in all.iter().enumerate() {
            votes.push(parse_vote(v).map_err(|m| bad(format!("entry {}: {m}", i + 1)))?);
        }
    } else {
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let v: serde_json::Value = serde_json::from_str(line)
                .map_err(|e| bad(format!("line {}: not JSON ({e})", i + 1)))?;
            votes.push(parse_vote(&v).map_err(|m| bad(format!("line {}: {m}", i + 1)))?);
        }
    }
    if votes.is_empty() {
        return Err(bad("no votes".into()).into());
    }
    Ok(votes)
}

/// Leaderboard settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaderboardSpec {
    /// Bootstrap resamples for the intervals (0: none; the interval is the rating itself).
    pub bootstrap: usize,
    pub seed: u64,
}

impl Default for LeaderboardSpec {
    fn default() -> Self {
        Self {
            bootstrap: 1000,
            seed: 42,
        }
    }
}

/// One model's line.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelRating {
    pub model: String,
    /// Bradley–Terry rating (null: no finite MLE, see `note`).
    pub rating: Option<f64>,
    pub ci_low: Option<f64>,
    pub ci_high: Option<f64>,
    /// Online Elo (K = 32, start 1000, file order).
    pub elo: f64,
    pub rank: usize,
    pub battles: usize,
    /// Outright wins (ties are in `ties`).
    pub wins: usize,
    pub ties: usize,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BootstrapInfo {
    pub rounds: usize,
    /// Rounds without a finite MLE for the fitted models (left out of the intervals).
    pub skipped: usize,
    pub seed: u64,
}

/// What `llmlab eval leaderboard` prints.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Leaderboard {
    /// Best first: by rank, then rating.
    pub models: Vec<ModelRating>,
    pub votes: usize,
    pub bootstrap: BootstrapInfo,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<String>,
}

const SCALE: f64 = 400.0;
const INIT_RATING: f64 = 1000.0;
const ELO_K: f64 = 32.0;

/// Online Elo over the votes in order (the Arena's `compute_online_elo` with K = 32).
pub fn online_elo(votes: &[Vote]) -> BTreeMap<String, f64> {
    let mut rating: BTreeMap<String, f64> = BTreeMap::new();
    for v in votes {
        let ra = *rating.get(&v.model_a).unwrap_or(&INIT_RATING);
        let rb = *rating.get(&v.model_b).unwrap_or(&INIT_RATING);
        let ea = 1.0 / (1.0 + 10f64.powf((rb - ra) / SCALE));
        let eb = 1.0 / (1.0 + 10f64.powf((ra - rb) / SCALE));
        let sa = v.winner.score_a();
        rating.insert(v.model_a.clone(), ra + ELO_K * (sa - ea));
        rating.insert(v.model_b.clone(), rb + ELO_K * (1.0 - sa - eb));
    }
    rating
}

/// Battles as model indices and a win-weight matrix: `w[i][j]` = wins of i over j + half
/// their ties.
fn win_matrix(
    p: usize,
    battles: &[(usize, usize, Winner)],
    pick: &mut dyn Iterator<Item = usize>,
) -> Vec<Vec<f64>> {
    let mut w = vec![vec![0.0; p]; p];
    for k in pick {
        let (a, b, win) = battles[k];
        match win {
            Winner::ModelA => w[a][b] += 1.0,
            Winner::ModelB => w[b][a] += 1.0,
            Winner::Tie => {
                w[a][b] += 0.5;
                w[b][a] += 0.5;
            }
        }
    }
    w
}

/// `reach[i][j]`: j can be reached from i along edges i → j where `w[i][j] > 0`, restricted to
/// `members` (a node reaches itself).
fn reachability(w: &[Vec<f64>], members: &[usize]) -> Vec<Vec<bool>> {
    let p = w.len();
    let mut reach = vec![vec![false; p]; p];
    for &s in members {
        let mut stack = vec![s];
        reach[s][s] = true;
        while let Some(i) = stack.pop() {
            for &j in members {
                if w[i][j] > 0.0 && !reach[s][j] {
                    reach[s][j] = true;
                    stack.push(j);
                }
            }
        }
    }
    reach
}

fn strongly_connected(w: &[Vec<f64>], members: &[usize]) -> bool {
    let reach = reachability(w, members);
    members
        .iter()
        .all(|&i| members.iter().all(|&j| reach[i][j]))
}

/// `ln σ(x)`, stable for large |x|.
fn log_sigmoid(x: f64) -> f64 {
    if x >= 0.0 {
        -(-x).exp().ln_1p()
    } else {
        x - x.exp().ln_1p()
    }
}

fn sigmoid(x: f64) -> f64 {
    if x >= 0.0 {
        1.0 / (1.0 + (-x).exp())
    } else {
        let e = x.exp();
        e / (1.0 + e)
    }
}

/// Bradley–Terry MLE of `members` (a strongly connected set under `w`, at least 2) by Newton's
/// method with a backtracking line search: β (in log10 units, `rating = 1000 + 400 β`) with
/// Σβ = 0, or `None` if it did not converge.
pub fn bradley_terry(w: &[Vec<f64>], members: &[usize]) -> Option<Vec<f64>> {
    let m = members.len();
    if m < 2 {
        return (m == 1).then(|| vec![0.0]);
    }
    let s = std::f64::consts::LN_10;
    let total: f64 = members
        .iter()
        .flat_map(|&i| members.iter().map(move |&j| w[i][j]))
        .sum();
    let loglik = |beta: &[f64]| -> f64 {
        let mut l = 0.0;
        for (x, &i) in members.iter().enumerate() {
            for (y, &j) in members.iter().enumerate() {
                if w[i][j] > 0.0 {
                    l += w[i][j] * log_sigmoid(s * (beta[x] - beta[y]));
                }
            }
        }
        l
    };
    // β_0 is held at 0 (the likelihood only sees differences); the others are solved for.
    let mut beta = vec![0.0; m];
    let mut ll = loglik(&beta);
    for _ in 0..200 {
        // Gradient and (negated) Hessian of the log-likelihood.
        let mut g = vec![0.0; m];
        let mut h = vec![vec![0.0; m]; m];
        for x in 0..m {
            for y in (x + 1)..m {
                let (i, j) = (members[x], members[y]);
                let n = w[i][j] + w[j][i];
                if n == 0.0 {
                    continue;
                }
                let p = sigmoid(s * (beta[x] - beta[y]));
                let gx = s * (w[i][j] - n * p);
                g[x] += gx;
                g[y] -= gx;
                let c = s * s * n * p * (1.0 - p);
                h[x][x] += c;
                h[y][y] += c;
                h[x][y] -= c;
                h[y][x] -= c;
            }
        }
        let gmax = g.iter().fold(0.0f64, |a, v| a.max(v.abs()));
        if gmax <= 1e-9 * total.max(1.0) {
            let mean = beta.iter().sum::<f64>() / m as f64;
            return Some(beta.iter().map(|b| b - mean).collect());
        }
        // Newton step on the free coordinates 1..m: (-H) d = g.
        let a: Vec<Vec<f64>> = (1..m).map(|x| h[x][1..].to_vec()).collect();
        let d = solve(a, g[1..].to_vec())?;
        let mut t = 1.0;
        loop {
            let cand: Vec<f64> = std::iter::once(0.0)
                .chain(beta[1..].iter().zip(&d).map(|(b, d)| b + t * d))
                .collect();
            let lc = loglik(&cand);
            if lc >= ll - 1e-12 * ll.abs() || t < 1e-10 {
                beta = cand;
                ll = lc;
                break;
            }
            t *= 0.5;
        }
    }
    None
}

/// Solves `a x = b` by Gaussian elimination with partial pivoting (`None` if singular).
fn solve(mut a: Vec<Vec<f64>>, mut b: Vec<f64>) -> Option<Vec<f64>> {
    let n = b.len();
    for col in 0..n {
        let piv = (col..n).max_by(|&r, &q| a[r][col].abs().total_cmp(&a[q][col].abs()))?;
        if a[piv][col].abs() < 1e-300 {
            return None;
        }
        a.swap(col, piv);
        b.swap(col, piv);
        for r in (col + 1)..n {
            let f = a[r][col] / a[col][col];
            if f != 0.0 {
                let (top, rest) = a.split_at_mut(r);
                for (x, p) in rest[0][col..].iter_mut().zip(&top[col][col..]) {
                    *x -= f * p;
                }
                b[r] -= f * b[col];
            }
        }
    }
    let mut x = vec![0.0; n];
    for r in (0..n).rev() {
        let s: f64 = ((r + 1)..n).map(|c| a[r][c] * x[c]).sum();
        x[r] = (b[r] - s) / a[r][r];
    }
    Some(x)
}

/// SplitMix64 (Steele et al.): a small generator whose stream is fixed for good, so a seed
/// gives the same intervals in every llmlab version.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (Lemire's multiply-shift; bias below n / 2^64).
    fn below(&mut self, n: usize) -> usize {
        ((u128::from(self.next()) * n as u128) >> 64) as usize
    }
}

/// The `q` quantile of sorted values, linear interpolation (numpy's and pandas' default).
fn quantile(sorted: &[f64], q: f64) -> f64 {
    let h = (sorted.len() - 1) as f64 * q;
    let lo = h.floor() as usize;
    let hi = (lo + 1).min(sorted.len() - 1);
    sorted[lo] + (h - lo as f64) * (sorted[hi] - sorted[lo])
}

/// The leaderboard of `votes` (see the module doc).
pub fn leaderboard(votes: &[Vote], spec: &LeaderboardSpec) -> Leaderboard {
    // Models in name order; battles as indices.
    let mut names: Vec<String> = votes
        .iter()
        .flat_map(|v| [v.model_a.clone(), v.model_b.clone()])
        .collect();
    names.sort();
    names.dedup();
    let p = names.len();
    let idx = |n: &str| names.binary_search_by(|x| x.as_str().cmp(n)).unwrap_or(0);
    let battles: Vec<(usize, usize, Winner)> = votes
        .iter()
        .map(|v| (idx(&v.model_a), idx(&v.model_b), v.winner))
        .collect();
    let (mut count, mut wins, mut ties) = (vec![0; p], vec![0; p], vec![0; p]);
    for &(a, b, w) in &battles {
        count[a] += 1;
        count[b] += 1;
        match w {
            Winner::ModelA => wins[a] += 1,
            Winner::ModelB => wins[b] += 1,
            Winner::Tie => {
                ties[a] += 1;
                ties[b] += 1;
            }
        }
    }
    let all: Vec<usize> = (0..p).collect();
    let w = win_matrix(p, &battles, &mut (0..battles.len()));
    let reach = reachability(&w, &all);
    // Strongly connected groups; the fitted one is the largest (then most battles, then first
    // by name).
    let mut group = vec![usize::MAX; p];
    let mut groups: Vec<Vec<usize>> = Vec::new();
    for i in 0..p {
        if group[i] == usize::MAX {
            let g: Vec<usize> = (0..p).filter(|&j| reach[i][j] && reach[j][i]).collect();
            for &j in &g {
                group[j] = groups.len();
            }
            groups.push(g);
        }
    }
    let wr = &w;
    let battles_in = |g: &[usize]| -> f64 {
        g.iter()
            .flat_map(|&i| g.iter().map(move |&j| wr[i][j]))
            .sum()
    };
    let main: Vec<usize> = groups
        .iter()
        .max_by(|a, b| {
            a.len()
                .cmp(&b.len())
                .then(battles_in(a).total_cmp(&battles_in(b)))
                .then(b[0].cmp(&a[0]))
        })
        .filter(|g| g.len() >= 2)
        .cloned()
        .unwrap_or_default();
    let in_main = |i: usize| main.contains(&i);
    let mut notes = Vec::new();

    // The fit on every vote, then the bootstrap.
    let mut rating = vec![None; p];
    let mut ci = vec![None; p];
    let mut skipped = 0;
    if let Some(beta) = bradley_terry(&w, &main).filter(|_| !main.is_empty()) {
        for (x, &i) in main.iter().enumerate() {
            rating[i] = Some(INIT_RATING + SCALE * beta[x]);
        }
        let mut rng = SplitMix64(spec.seed);
        let mut samples: Vec<Vec<f64>> = vec![Vec::with_capacity(spec.bootstrap); main.len()];
        let n = battles.len();
        for _ in 0..spec.bootstrap {
            let ks: Vec<usize> = (0..n).map(|_| rng.below(n)).collect();
            let wb = win_matrix(p, &battles, &mut ks.into_iter());
            let fit = strongly_connected(&wb, &main)
                .then(|| bradley_terry(&wb, &main))
                .flatten();
            match fit {
                Some(b) => {
                    for (x, s) in samples.iter_mut().enumerate() {
                        s.push(INIT_RATING + SCALE * b[x]);
                    }
                }
                None => skipped += 1,
            }
        }
        for (x, &i) in main.iter().enumerate() {
            let mut s = std::mem::take(&mut samples[x]);
            ci[i] = if s.is_empty() {
                rating[i].map(|r| (r, r))
            } else {
                s.sort_by(f64::total_cmp);
                Some((quantile(&s, 0.025), quantile(&s, 0.975)))
            };
        }
        if skipped > 0 {
            notes.push(format!(
                "{skipped} of {} bootstrap resamples left a fitted model without a finite rating (it won or lost all its resampled battles) and were left out of the intervals",
                spec.bootstrap
            ));
        }
        if spec.bootstrap > 0 && skipped == spec.bootstrap {
            notes.push("no bootstrap resample had finite ratings: the intervals are the ratings themselves".into());
        }
    } else if !main.is_empty() {
        notes.push("the Bradley–Terry fit did not converge; ratings are left out".into());
    }
    if main.is_empty() && p > 1 {
        notes.push(
            "no two models have a finite Bradley–Terry rating difference (every pair that met has a model that never lost to the other); ranks follow the win graph"
                .into(),
        );
    } else if main.len() < p {
        notes.push(format!(
            "{} of {p} models are outside the fitted group and have no finite rating (see their notes)",
            p - main.len()
        ));
    }

    // Statistically better: both fitted, by interval; otherwise, by the win graph.
    let better = |y: usize, x: usize| -> bool {
        match (ci[y], ci[x]) {
            (Some((ylo, _)), Some((_, xhi))) => ylo > xhi,
            _ => reach[y][x] && !reach[x][y],
        }
    };
    let elo = online_elo(votes);
    let mut rows: Vec<ModelRating> = (0..p)
        .map(|i| {
            let note = (!in_main(i)).then(|| {
                let (up, down) = match main.first() {
                    Some(&m) => (reach[i][m], reach[m][i]),
                    None => (false, false),
                };
                let what = if wins[i] == count[i] {
                    "won every battle"
                } else if wins[i] + ties[i] == 0 {
                    "lost every battle"
                } else {
                    "has no finite maximum-likelihood rating"
                };
                let rel = if up {
                    "ranked above the fitted models: it (or its group) never lost to them"
                } else if down {
                    "ranked below the fitted models: it (or its group) never beat or tied them"
                } else if main.is_empty() {
                    "ranked by the win graph"
                } else {
                    "no battles link it to the fitted models"
                };
                format!("{what}: no finite Bradley–Terry rating; {rel}")
            });
            ModelRating {
                model: names[i].clone(),
                rating: rating[i],
                ci_low: ci[i].map(|c| c.0),
                ci_high: ci[i].map(|c| c.1),
                elo: elo[&names[i]],
                rank: 1 + (0..p).filter(|&y| y != i && better(y, i)).count(),
                battles: count[i],
                wins: wins[i],
                ties: ties[i],
                note,
            }
        })
        .collect();
    rows.sort_by(|a, b| {
        a.rank
            .cmp(&b.rank)
            .then(
                b.rating
                    .unwrap_or(f64::NEG_INFINITY)
                    .total_cmp(&a.rating.unwrap_or(f64::NEG_INFINITY)),
            )
            .then(b.elo.total_cmp(&a.elo))
            .then(a.model.cmp(&b.model))
    });
    Leaderboard {
        models: rows,
        votes: votes.len(),
        bootstrap: BootstrapInfo {
            rounds: spec.bootstrap,
            skipped,
            seed: spec.seed,
        },
        notes,
    }
}

/// The leaderboard as a text table (what `--format text` prints).
pub fn render_text(lb: &Leaderboard) -> String {
    let num = |x: Option<f64>| x.map_or("-".to_string(), |v| format!("{v:.1}"));
    let width = lb
        .models
        .iter()
        .map(|m| m.model.chars().count())
        .max()
        .unwrap_or(5)
        .max(5);
    let mut out = format!(
        "{:>4}  {:<width$}  {:>8}  {:>17}  {:>8}  {:>7}  {:>5}  {:>5}\n",
        "rank", "model", "rating", "95% CI", "elo", "battles", "wins", "ties"
    );
    for m in &lb.models {
        let ci = match (m.ci_low, m.ci_high) {
            (Some(l), Some(h)) => format!("[{l:.1}, {h:.1}]"),
            _ => "-".into(),
        };
        out += &format!(
            "{:>4}  {:<width$}  {:>8}  {:>17}  {:>8.1}  {:>7}  {:>5}  {:>5}\n",
            m.rank,
            m.model,
            num(m.rating),
            ci,
            m.elo,
            m.battles,
            m.wins,
            m.ties
        );
    }
    out += &format!(
        "{} votes; Bradley–Terry ratings (mean 1000), 95% intervals from {} bootstrap resamples (seed {}); elo: online, K = 32\n",
        lb.votes, lb.bootstrap.rounds, lb.bootstrap.seed
    );
    for m in &lb.models {
        if let Some(n) = &m.note {
            out += &format!("note: {}: {n}\n", m.model);
        }
    }
    for n in &lb.notes {
        out += &format!("note: {n}\n");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn votes(spec: &[(&str, &str, Winner, usize)]) -> Vec<Vote> {
        spec.iter()
            .flat_map(|&(a, b, w, n)| std::iter::repeat_n(Vote::new(a, b, w), n))
            .collect()
    }

    /// Two models, A wins 3 of 4: R_A - R_B = 400·log10(3/1), centred on 1000.
    #[test]
    fn two_models_rating_gap_is_the_log_odds() {
        let v = votes(&[
            ("A", "B", Winner::ModelA, 2),
            ("B", "A", Winner::ModelB, 1),
            ("A", "B", Winner::ModelB, 1),
        ]);
        let lb = leaderboard(
            &v,
            &LeaderboardSpec {
                bootstrap: 0,
                seed: 1,
            },
        );
        let r: BTreeMap<_, _> = lb
            .models
            .iter()
            .map(|m| (m.model.as_str(), m.rating.expect("present")))
            .collect();
        let gap = 400.0 * 3f64.log10();
        assert!((r["A"] - r["B"] - gap).abs() < 1e-6, "{r:?}");
        assert!((r["A"] + r["B"] - 2000.0).abs() < 1e-9);
        // A tie is half a win each way: 2 wins, 1 loss, 2 ties = 3 : 2.
        let v = votes(&[
            ("A", "B", Winner::ModelA, 2),
            ("A", "B", Winner::ModelB, 1),
            ("B", "A", Winner::Tie, 2),
        ]);
        let lb = leaderboard(
            &v,
            &LeaderboardSpec {
                bootstrap: 0,
                seed: 1,
            },
        );
        let a = lb.models.iter().find(|m| m.model == "A").expect("present");
        assert!((a.rating.expect("present") - 1000.0 - 200.0 * 1.5f64.log10()).abs() < 1e-6);
        assert_eq!((a.battles, a.wins, a.ties), (5, 2, 2));
    }

    /// Online Elo by hand: A beats B from 1000/1000 → 1016/984; then B beats A.
    #[test]
    fn online_elo_by_hand() {
        let e = online_elo(&votes(&[("A", "B", Winner::ModelA, 1)]));
        assert_eq!((e["A"], e["B"]), (1016.0, 984.0));
        let e = online_elo(&votes(&[
            ("A", "B", Winner::ModelA, 1),
            ("B", "A", Winner::ModelA, 1),
        ]));
        let ea = 1.0 / (1.0 + 10f64.powf((984.0 - 1016.0) / 400.0));
        assert!((e["A"] - (1016.0 - 32.0 * ea)).abs() < 1e-12);
    }

    /// An undefeated model has no finite MLE: null rating, a note, rank 1; the others are
    /// fitted among themselves and ranked below it. No NaN anywhere.
    #[test]
    fn undefeated_model_gets_a_note_not_a_nan() {
        let v = votes(&[
            ("A", "B", Winner::ModelA, 3),
            ("A", "C", Winner::ModelA, 2),
            ("B", "C", Winner::ModelA, 3),
            ("C", "B", Winner::ModelA, 1),
            ("D", "C", Winner::ModelB, 2),
        ]);
        let lb = leaderboard(
            &v,
            &LeaderboardSpec {
                bootstrap: 50,
                seed: 7,
            },
        );
        let m: BTreeMap<_, _> = lb.models.iter().map(|m| (m.model.as_str(), m)).collect();
        assert_eq!(m["A"].rating, None);
        assert!(m["A"]
            .note
            .as_deref()
            .expect("present")
            .contains("won every battle"));
        assert_eq!(m["A"].rank, 1);
        assert_eq!(m["D"].rating, None);
        assert!(m["D"]
            .note
            .as_deref()
            .expect("present")
            .contains("lost every battle"));
        assert!(m["B"].rating.expect("present") > m["C"].rating.expect("present"));
        assert_eq!(m["B"].rank, 2);
        assert!(m["D"].rank > m["C"].rank);
        let json = serde_json::to_string(&lb).expect("present");
        assert!(!json.contains("NaN") && !json.contains("inf"), "{json}");
        assert_eq!(lb.models[0].model, "A");
    }

    #[test]
    fn bad_winner_is_named() {
        let v = serde_json::json!({"model_a": "x", "model_b": "y", "winner": "draw"});
        assert!(parse_vote(&v)
            .expect_err("an error")
            .contains("unknown winner 'draw'"));
        let v = serde_json::json!({"model_a": "x", "model_b": "y", "winner": "tie (bothbad)"});
        assert_eq!(parse_vote(&v).expect("present").winner, Winner::Tie);
    }

    #[test]
    fn quantile_interpolates_like_numpy() {
        let s = [1.0, 2.0, 3.0, 4.0];
        assert_eq!(quantile(&s, 0.5), 2.5);
        assert!((quantile(&s, 0.025) - 1.075).abs() < 1e-12);
    }
}

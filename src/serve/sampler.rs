//! Choosing a request's next token from its row of logits, on the CPU with the request's own
//! random generator, so that a seeded request gives the same tokens whatever else runs in the
//! batch; and the log-probabilities OpenAI's `logprobs` report.
//!
//! The filters are [`crate::generate::sample_next`]'s (the book's `generate`): top-k, then
//! temperature, then top-p (a token is dropped when the mass of the tokens before it already
//! reaches p); temperature 0 is the argmax (the first maximum, as `torch.argmax`).
use super::engine::Sampling;
use rand::rngs::StdRng;
use rand::Rng;

/// The index of the first maximum (greedy decoding).
pub fn argmax(logits: &[f32]) -> usize {
    let mut best = 0;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] {
            best = i;
        }
    }
    best
}

/// The next token under `s`.
pub fn pick(logits: &[f32], s: &Sampling, rng: &mut StdRng) -> usize {
    if s.temperature <= 0.0 {
        // Top-k keeps the maximum, so greedy is the argmax either way.
        return argmax(logits);
    }
    // Candidates, best first when a filter needs the order.
    let mut cand: Vec<(usize, f32)> = logits.iter().copied().enumerate().collect();
    if let Some(k) = s.top_k {
        let k = (k as usize).clamp(1, cand.len());
        if k < cand.len() {
            cand.select_nth_unstable_by(k - 1, |a, b| b.1.total_cmp(&a.1));
            // Ties with the k-th value stay, as `logits >= min(top_k)` keeps them.
            let kth = cand[k - 1].1;
            cand = logits
                .iter()
                .copied()
                .enumerate()
                .filter(|&(_, l)| l >= kth)
                .collect();
        }
    }
    let t = s.temperature as f32;
    let max = cand.iter().map(|c| c.1).fold(f32::NEG_INFINITY, f32::max) / t;
    let mut probs: Vec<(usize, f64)> = cand
        .iter()
        .map(|&(i, l)| (i, ((l / t - max) as f64).exp()))
        .collect();
    let total: f64 = probs.iter().map(|p| p.1).sum();
    probs.iter_mut().for_each(|p| p.1 /= total);
    if s.top_p < 1.0 {
        probs = nucleus(probs, s.top_p);
        let kept: f64 = probs.iter().map(|p| p.1).sum();
        probs.iter_mut().for_each(|p| p.1 /= kept);
    }
    let mut u: f64 = rng.random();
    for &(i, p) in &probs {
        if u < p {
            return i;
        }
        u -= p;
    }
    probs.last().map_or(0, |p| p.0)
}

/// The smallest set of most likely tokens whose mass reaches `p`, best first. Sorting a whole
/// vocabulary per token is avoided: the nucleus is looked for in the top 64 first.
fn nucleus(mut probs: Vec<(usize, f64)>, p: f64) -> Vec<(usize, f64)> {
    let by_prob = |a: &(usize, f64), b: &(usize, f64)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
    let head = 64.min(probs.len());
    if head < probs.len() {
        probs.select_nth_unstable_by(head - 1, by_prob);
    }
    let mut top: Vec<(usize, f64)> = probs[..head].to_vec();
    top.sort_by(by_prob);
    if top.iter().map(|t| t.1).sum::<f64>() < p && head < probs.len() {
        top = probs;
        top.sort_by(by_prob);
    }
    let mut before = 0.0;
    let mut out = Vec::new();
    for t in top {
        // Dropped when the mass before it already reaches p (keeps at least one).
        if before >= p && !out.is_empty() {
            break;
        }
        before += t.1;
        out.push(t);
    }
    out
}

/// `log Σ exp(logits)`.
pub fn log_sum_exp(logits: &[f32]) -> f64 {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let sum: f64 = logits.iter().map(|&l| (l as f64 - max).exp()).sum();
    max + sum.ln()
}

/// The `n` most likely tokens and their log-probabilities, best first (ties: lower id first).
pub fn top_logprobs(logits: &[f32], lse: f64, n: usize) -> Vec<(usize, f32)> {
    let n = n.min(logits.len());
    if n == 0 {
        return Vec::new();
    }
    let by = |a: &(usize, f32), b: &(usize, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
    let mut all: Vec<(usize, f32)> = logits.iter().copied().enumerate().collect();
    if n < all.len() {
        all.select_nth_unstable_by(n - 1, by);
        all.truncate(n);
    }
    all.sort_by(by);
    all.into_iter()
        .map(|(i, l)| (i, (l as f64 - lse) as f32))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn sampling(temperature: f64, top_p: f64, top_k: Option<i64>) -> Sampling {
        Sampling {
            temperature,
            top_p,
            top_k,
            ..Sampling::default()
        }
    }

    #[test]
    fn greedy_is_the_first_maximum() {
        let mut rng = StdRng::seed_from_u64(0);
        assert_eq!(
            pick(&[0.1, 3.0, 3.0, -1.0], &sampling(0.0, 1.0, None), &mut rng),
            1
        );
    }

    #[test]
    fn top_k_and_top_p_keep_only_their_tokens_and_a_seed_repeats() {
        let logits = [2.0f32, 1.0, 0.5, 0.0, -1.0, 1.9];
        for _ in 0..50 {
            let mut rng = StdRng::from_os_rng();
            let k = pick(&logits, &sampling(1.0, 1.0, Some(2)), &mut rng);
            assert!(k == 0 || k == 5, "top-2 picked {k}");
        }
        // softmax: token 0 has ≈ 0.35 and token 5 ≈ 0.32: top_p 0.3 keeps token 0 alone.
        let mut rng = StdRng::seed_from_u64(1);
        for _ in 0..20 {
            assert_eq!(pick(&logits, &sampling(1.0, 0.3, None), &mut rng), 0);
        }
        let draw = |seed| {
            let mut rng = StdRng::seed_from_u64(seed);
            (0..20)
                .map(|_| pick(&logits, &sampling(1.0, 0.95, None), &mut rng))
                .collect::<Vec<_>>()
        };
        assert_eq!(draw(7), draw(7));
        assert_ne!(draw(7), draw(8));
    }

    #[test]
    fn sampling_follows_the_softmax() {
        // Temperature 0.5 on logits ln(1), ln(3): probabilities 1/10 and 9/10.
        let logits = [0.0f32, 3f32.ln()];
        let mut rng = StdRng::seed_from_u64(3);
        let n = 20_000;
        let ones = (0..n)
            .filter(|_| pick(&logits, &sampling(0.5, 1.0, None), &mut rng) == 1)
            .count();
        let f = ones as f64 / n as f64;
        assert!((f - 0.9).abs() < 0.01, "frequency {f}");
    }

    #[test]
    fn logprobs_are_log_softmax() {
        let logits = [1.0f32, 2.0, 3.0];
        let lse = log_sum_exp(&logits);
        let top = top_logprobs(&logits, lse, 2);
        let z: f64 = logits.iter().map(|&l| (l as f64).exp()).sum();
        assert_eq!(top[0].0, 2);
        assert_eq!(top[1].0, 1);
        assert!((top[0].1 as f64 - (3.0 - z.ln())).abs() < 1e-6);
        assert!((top[1].1 as f64 - (2.0 - z.ln())).abs() < 1e-6);
        assert!(top_logprobs(&logits, lse, 0).is_empty());
    }
}

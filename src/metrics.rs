//! Judge-free figures of generated responses against reference outputs: exact match and ROUGE-L
//! (Lin, 2004: the F-measure of the longest common subsequence), on lowercased whitespace tokens.

/// Lowercased whitespace tokens.
fn tokens(text: &str) -> Vec<String> {
    text.split_whitespace().map(str::to_lowercase).collect()
}

/// Length of the longest common subsequence of two token lists.
fn lcs(a: &[String], b: &[String]) -> usize {
    let mut prev = vec![0usize; b.len() + 1];
    let mut cur = vec![0usize; b.len() + 1];
    for x in a {
        for (j, y) in b.iter().enumerate() {
            cur[j + 1] = if x == y {
                prev[j] + 1
            } else {
                cur[j].max(prev[j + 1])
            };
        }
        std::mem::swap(&mut prev, &mut cur);
    }
    prev[b.len()]
}

/// ROUGE-L F-measure (β = 1) of `candidate` against `reference`: `2PR / (P + R)` with
/// `P = LCS / |candidate|` and `R = LCS / |reference|`; 0 when either is empty (1 when both are).
pub fn rouge_l(candidate: &str, reference: &str) -> f64 {
    let (c, r) = (tokens(candidate), tokens(reference));
    if c.is_empty() || r.is_empty() {
        return if c.is_empty() && r.is_empty() {
            1.0
        } else {
            0.0
        };
    }
    let l = lcs(&c, &r) as f64;
    if l == 0.0 {
        return 0.0;
    }
    let (p, rec) = (l / c.len() as f64, l / r.len() as f64);
    2.0 * p * rec / (p + rec)
}

/// Whether the response equals the reference, ignoring case and whitespace differences.
pub fn exact_match(candidate: &str, reference: &str) -> bool {
    tokens(candidate) == tokens(reference)
}

/// Mean exact match and mean ROUGE-L of `(response, reference)` pairs (NaN when empty).
pub fn score_responses<'a>(pairs: impl IntoIterator<Item = (&'a str, &'a str)>) -> (f64, f64) {
    let (mut em, mut rl, mut n) = (0.0, 0.0, 0usize);
    for (c, r) in pairs {
        em += f64::from(u8::from(exact_match(c, r)));
        rl += rouge_l(c, r);
        n += 1;
    }
    if n == 0 {
        return (f64::NAN, f64::NAN);
    }
    (em / n as f64, rl / n as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rouge_l_by_hand() {
        // LCS("the cat sat on the mat", "the cat is on the mat") = the cat on the mat = 5.
        let f = rouge_l("The cat sat on the mat", "the cat is on the mat");
        assert!((f - 5.0 / 6.0).abs() < 1e-12, "{f}");
        assert_eq!(rouge_l("a b", "c d"), 0.0);
        assert_eq!(rouge_l("", "x"), 0.0);
        // P = 2/2, R = 2/4 → F = 2/3.
        assert!((rouge_l("a b", "a x b y") - 2.0 / 3.0).abs() < 1e-12);
        assert!(exact_match(" Hello  World", "hello world"));
        assert!(!exact_match("hello", "hello world"));
    }
}

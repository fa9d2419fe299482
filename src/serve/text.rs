//! The answer's text as it streams: each new token's text is released once it can no longer be
//! the start of a stop string or the first bytes of a UTF-8 character, so a client never sees a
//! stop string, nor half of a character.
//!
//! The text is the decoding of all the answer's tokens so far (byte-level BPE decodes a prefix
//! of tokens to a prefix of the text, except for an incomplete character at the end, which
//! decodes to U+FFFD until its last byte arrives).

/// What one new token does to the streamed text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Text to send now (possibly empty).
    More(String),
    /// A stop string was found: the text before it, to send, and the answer ends.
    Stopped(String),
}

#[derive(Debug, Default)]
pub struct StopText {
    stop: Vec<String>,
    /// Bytes of the text already sent.
    sent: usize,
}

impl StopText {
    pub fn new(stop: Vec<String>) -> Self {
        Self {
            stop: stop.into_iter().filter(|s| !s.is_empty()).collect(),
            ..Self::default()
        }
    }

    /// Takes the whole decoded text so far.
    pub fn step(&mut self, text: &str) -> Step {
        let from = self.sent.min(text.len());
        // A stop string may begin in the held-back tail, before `sent` never.
        let found = self
            .stop
            .iter()
            .filter_map(|s| {
                text[floor(text, from)..]
                    .find(s.as_str())
                    .map(|i| i + floor(text, from))
            })
            .min();
        if let Some(end) = found {
            let out = text[floor(text, from)..end].to_string();
            self.sent = end;
            return Step::Stopped(out);
        }
        let mut end = text.len();
        if text.ends_with('\u{FFFD}') {
            end -= '\u{FFFD}'.len_utf8();
        }
        end = end.min(text.len() - self.held(text));
        let end = floor(text, end).max(from);
        let out = text[floor(text, from)..end].to_string();
        self.sent = end;
        Step::More(out)
    }

    /// At the end of the answer (end of turn, `max_tokens`): what is still held back.
    pub fn finish(&mut self, text: &str) -> String {
        let from = floor(text, self.sent.min(text.len()));
        self.sent = text.len();
        text[from..].to_string()
    }

    /// The length in bytes of the longest end of `text` that begins some stop string.
    fn held(&self, text: &str) -> usize {
        let mut best = 0;
        for s in &self.stop {
            for (i, _) in s.char_indices().skip(1) {
                if i > best && text.ends_with(&s[..i]) {
                    best = i;
                }
            }
        }
        best
    }
}

/// The largest char boundary of `text` at or below `i`.
fn floor(text: &str, mut i: usize) -> usize {
    while i > 0 && !text.is_char_boundary(i) {
        i -= 1;
    }
    i
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds growing prefixes of `text`, cut at `cuts`, and collects what is released.
    fn stream(stop: &[&str], pieces: &[&str]) -> (String, bool) {
        let mut st = StopText::new(stop.iter().map(|s| s.to_string()).collect());
        let mut text = String::new();
        let mut out = String::new();
        for p in pieces {
            text.push_str(p);
            match st.step(&text) {
                Step::More(t) => out.push_str(&t),
                Step::Stopped(t) => {
                    out.push_str(&t);
                    return (out, true);
                }
            }
        }
        out.push_str(&st.finish(&text));
        (out, false)
    }

    #[test]
    fn a_stop_string_split_across_tokens_is_never_sent() {
        assert_eq!(
            stream(
                &["\n\nUser:"],
                &["Hello", " there", "\n", "\nUs", "er:", " more"]
            ),
            ("Hello there".to_string(), true)
        );
        // A partial match that does not complete is released.
        assert_eq!(
            stream(&["STOP"], &["a ST", "OR", "Y"]),
            ("a STORY".to_string(), false)
        );
        // The earliest of several stop strings wins.
        assert_eq!(stream(&["cd", "b"], &["abcd"]), ("a".to_string(), true));
    }

    #[test]
    fn an_incomplete_character_is_held_until_complete() {
        let mut st = StopText::new(vec![]);
        assert_eq!(st.step("caf\u{FFFD}"), Step::More("caf".into()));
        assert_eq!(st.step("café"), Step::More("é".into()));
        assert_eq!(st.finish("café!"), "!");
    }
}

//! Where a dotted key sits in a YAML text (1-based line and column), for error messages.
//!
//! Block mappings are followed by indentation (`train:` then `  lr: ...` is `train.lr`); a key
//! inside a flow mapping on its parent's line (`train: {lr: 1e-3}`) is found on that line; a
//! literal dotted key (`train.lr:` under `sweep:`) matches as written.

/// `(line, column)` of `key` in `text`, if it is written there.
pub fn locate(text: &str, key: &str) -> Option<(usize, usize)> {
    let mut stack: Vec<(usize, String)> = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = raw.split(" #").next().unwrap_or(raw);
        let trimmed = line.trim_start();
        if trimmed.is_empty() || trimmed.starts_with('#') || trimmed.starts_with('-') {
            continue;
        }
        let indent = line.len() - trimmed.len();
        let Some((k, rest)) = trimmed.split_once(':') else {
            continue;
        };
        let k = k.trim().trim_matches(['"', '\'']);
        if k.is_empty() || k.contains(' ') {
            continue;
        }
        while stack.last().is_some_and(|(ind, _)| *ind >= indent) {
            stack.pop();
        }
        let path: String = stack
            .iter()
            .map(|(_, k)| k.as_str())
            .chain([k])
            .collect::<Vec<_>>()
            .join(".");
        if path == key {
            return Some((i + 1, indent + 1));
        }
        // A flow mapping on this line: `parent: {a: 1, b: 2}`.
        if let Some(inner) = key.strip_prefix(&format!("{path}.")) {
            if rest.trim_start().starts_with('{') {
                let first = inner.split('.').next().unwrap_or(inner);
                for pat in [
                    format!("{{{first}:"),
                    format!(" {first}:"),
                    format!(",{first}:"),
                ] {
                    if let Some(pos) = line.find(&pat) {
                        return Some((i + 1, pos + 2));
                    }
                }
            }
        }
        stack.push((indent, k.to_string()));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::locate;

    #[test]
    fn finds_block_flow_and_dotted_keys() {
        let text = "name: x\ntrain:\n  epochs: 2\n  lrr: 1e-3   # typo\nmodel: {preset: gpt-mini, dropout: 0.1}\nsweep:\n  train.lr: [1, 2]\n";
        assert_eq!(locate(text, "name"), Some((1, 1)));
        assert_eq!(locate(text, "train.lrr"), Some((4, 3)));
        assert_eq!(locate(text, "train.epochs"), Some((3, 3)));
        assert_eq!(locate(text, "model.dropout"), Some((5, 27)));
        assert_eq!(locate(text, "sweep.train.lr"), Some((7, 3)));
        assert_eq!(locate(text, "train.missing"), None);
    }
}

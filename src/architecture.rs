//! The layering of the crate, checked: a module may name (`use crate::…` or a `crate::…` path
//! in code) only modules of lower layers, never one above it or a sibling of its own layer
//! (a task does not reach into another task). The foundation's small utilities may use each
//! other. Comments are not read, so docs may link anywhere.
//!
//! The README's chapter map lists the same layers.

/// Module paths (a top-level module, or `module::submodule` where one part of a module sits
/// lower than the rest), from the bottom up.
const LAYERS: &[&[&str]] = &[
    // Foundation: errors, device and threads, signals, the C++ shim, data-parallel groups, plots, TensorBoard files,
    // text metrics, the data registry (downloads and the cache), the chat client of a teacher or
    // judge model behind an HTTP server.
    &[
        "error",
        "device",
        "signal",
        "shim",
        "dist",
        "plot",
        "tensorboard",
        "metrics",
        "data::registry",
        "remote",
    ],
    &["nn"],
    &["models"],
    &["weights"],
    &["data"],
    &["chat"],
    &["prompt"],
    &["resolve"],
    &["generate", "request"],
    &["train"],
    &["finetune"],
    &["classify", "instruct"],
    &["eval", "bench"],
    &["serve"],
    &["experiment"],
    &["cli"],
];

/// The layer and the name (its entry in [`LAYERS`]) of a module path such as
/// `data::tokenizer::BpeTokenizer`; the longest entry that prefixes it wins.
fn layer_of(path: &str) -> Option<(usize, &'static str)> {
    let mut best: Option<(usize, &'static str)> = None;
    for (i, layer) in LAYERS.iter().enumerate() {
        for &m in *layer {
            let hit = path == m || path.starts_with(&format!("{m}::"));
            if hit && best.is_none_or(|(_, b)| m.len() > b.len()) {
                best = Some((i, m));
            }
        }
    }
    best
}

/// The module path of a source file: `src/data/registry.rs` → `data::registry`.
fn module_of(file: &str) -> String {
    file.trim_start_matches("src/")
        .trim_end_matches(".rs")
        .trim_end_matches("/mod")
        .replace('/', "::")
}

/// Every `crate::a::b` path named in the code (not the comments) of `text`, with its line.
fn crate_paths(text: &str) -> Vec<(usize, String)> {
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let code = line.split("//").next().unwrap_or("");
        let mut rest = code;
        while let Some(i) = rest.find("crate::") {
            let tail = &rest[i + "crate::".len()..];
            let path: String = tail
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_' || *c == ':')
                .collect();
            let path = path.trim_end_matches(':').to_string();
            // A grouped import (`use crate::{a, b}`) names its modules after the brace.
            if path.is_empty() && tail.starts_with('{') {
                let group = tail[1..].split('}').next().unwrap_or("");
                for item in group.split(',') {
                    let item = item.trim();
                    if !item.is_empty() {
                        out.push((n + 1, item.to_string()));
                    }
                }
            } else if !path.is_empty() {
                out.push((n + 1, path));
            }
            rest = &tail[1..];
        }
    }
    out
}

/// The upward (or sideways) references of one file, as `file:line: ...` messages.
fn violations(file: &str, text: &str) -> Vec<String> {
    let module = module_of(file);
    let Some((own, own_name)) = layer_of(&module) else {
        return vec![format!(
            "{file}: module `{module}` is in no layer of src/architecture.rs; add it"
        )];
    };
    let mut out = Vec::new();
    for (line, path) in crate_paths(text) {
        let Some((theirs, their_name)) = layer_of(&path) else {
            continue; // items of lib.rs (`crate::LlmError`)
        };
        let same_tree = their_name.split("::").next() == own_name.split("::").next();
        let allowed = theirs < own || (theirs == own && (own == 0 || same_tree));
        if !allowed {
            out.push(format!(
                "{file}:{line}: `{module}` (layer {own}: {}) uses `crate::{path}` (layer {theirs}: {}), which is {}",
                LAYERS[own].join("|"),
                LAYERS[theirs].join("|"),
                if theirs > own { "above it" } else { "a sibling of its layer" }
            ));
        }
    }
    out
}

fn rust_files(dir: &std::path::Path, out: &mut Vec<std::path::PathBuf>) {
    for e in std::fs::read_dir(dir).expect("src/ is readable").flatten() {
        let p = e.path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

#[test]
fn no_module_imports_from_a_layer_above_it() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = Vec::new();
    rust_files(&root.join("src"), &mut files);
    files.sort();
    let mut problems = Vec::new();
    let mut checked = 0;
    for f in &files {
        let rel = f
            .strip_prefix(root)
            .expect("under the crate")
            .to_string_lossy()
            .to_string();
        if ["src/lib.rs", "src/main.rs", "src/architecture.rs"].contains(&rel.as_str()) {
            continue;
        }
        let text = std::fs::read_to_string(f).expect("a UTF-8 source file");
        problems.extend(violations(&rel, &text));
        checked += 1;
    }
    assert!(checked > 50, "only {checked} files read");
    assert!(problems.is_empty(), "\n{}", problems.join("\n"));
}

#[test]
fn a_planted_upward_import_is_named() {
    // The resolver reaching up into a task, as `models/lm.rs` once did.
    let text = "//! docs may say crate::instruct freely\nuse crate::error::LlmError;\nuse crate::instruct::train::load_finetuned;\n";
    let v = violations("src/resolve/mod.rs", text);
    assert_eq!(v.len(), 1, "{v:?}");
    assert!(
        v[0].starts_with("src/resolve/mod.rs:3: `resolve`")
            && v[0].contains("uses `crate::instruct::train::load_finetuned`")
            && v[0].ends_with("above it"),
        "{}",
        v[0]
    );
    // A task reaching into a sibling task, and a grouped import from above.
    let v = violations(
        "src/instruct/train.rs",
        "let p = crate::classify::train::pad_id(&lm);\nuse crate::{eval, error};\n",
    );
    assert_eq!(v.len(), 2, "{v:?}");
    assert!(v[0].contains("a sibling of its layer"), "{}", v[0]);
    assert!(v[1].contains("uses `crate::eval`"), "{}", v[1]);
    // Lower layers and the foundation are fine; so is the module's own tree.
    let ok = "use crate::finetune::run::FinetuneRun;\nuse crate::data::registry::cache_root;\nuse crate::instruct::collate;\n";
    assert!(violations("src/instruct/train.rs", ok).is_empty());
    // `data::registry` is foundation, the rest of `data` sits above the weights.
    assert!(violations("src/weights/hub.rs", "use crate::data::registry::x;").is_empty());
    assert_eq!(
        violations("src/weights/hub.rs", "use crate::data::tokenizer::x;").len(),
        1
    );
}

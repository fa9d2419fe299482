//! The cache of Python reference runs (`common::Reference`): the same inputs are a hit that
//! does not run Python and gives back its stdout and files; a changed input, argument or script
//! is a miss that runs it.
use crate::common::{Outcome, Reference, ReferenceCache};
use anyhow::Result;
use std::path::Path;

/// Reads a file (or a folder's files), writes their text upper-cased plus a random nonce to
/// `OUT/sub/result.txt`, and prints the nonce, the tag and the output folder. A run that did
/// not execute Python can only give back an earlier run's nonce.
const PROBE: &str = r#"
import os, sys
src, out, tag = sys.argv[1], sys.argv[2], sys.argv[3]
if os.path.isdir(src):
    parts = []
    for root, dirs, files in sorted(os.walk(src)):
        for n in sorted(files):
            parts.append(open(os.path.join(root, n), encoding="utf-8").read())
    text = "|".join(parts)
else:
    text = open(src, encoding="utf-8").read()
nonce = os.urandom(16).hex()
os.makedirs(os.path.join(out, "sub"))
with open(os.path.join(out, "sub", "result.txt"), "w", encoding="utf-8") as f:
    f.write(text.upper() + " " + nonce)
print(nonce, tag, out)
"#;

struct Run {
    nonce: String,
    result: String,
    outcome: Outcome,
}

fn probe(cache: &ReferenceCache, code: &str, input: &Path, tag: &str) -> Result<Run> {
    let out = tempfile::tempdir()?; // a new output folder every time
    let (stdout, outcome) = Reference::code(code)
        .input(input)
        .output(out.path())
        .arg(tag)
        .run_with(cache)?;
    let words: Vec<&str> = stdout.split_whitespace().collect();
    assert_eq!(words.len(), 3, "{stdout}");
    assert_eq!(words[1], tag);
    assert_eq!(
        Path::new(words[2]),
        out.path(),
        "stdout names this run's output folder ({outcome:?})"
    );
    let result = std::fs::read_to_string(out.path().join("sub/result.txt"))?;
    assert!(result.ends_with(words[0]), "{result} / {stdout}");
    Ok(Run {
        nonce: words[0].to_string(),
        result,
        outcome,
    })
}

fn entries(dir: &Path) -> Result<Vec<String>> {
    let mut names: Vec<String> = std::fs::read_dir(dir)?
        .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
        .collect::<Result<_, _>>()?;
    names.sort();
    Ok(names)
}

#[test]
fn a_changed_input_is_a_miss_and_the_same_input_a_hit() -> Result<()> {
    let root = tempfile::tempdir()?;
    let cache = ReferenceCache::at(&root.path().join("cache"));
    let input = root.path().join("in.txt");
    std::fs::write(&input, "abc")?;

    let a = probe(&cache, PROBE, &input, "t")?;
    assert_eq!(a.outcome, Outcome::Miss);
    assert!(a.result.starts_with("ABC "), "{}", a.result);
    // The same inputs: no run, the stored stdout and files (in another output folder).
    let b = probe(&cache, PROBE, &input, "t")?;
    assert_eq!(b.outcome, Outcome::Hit);
    assert_eq!(
        (b.nonce.as_str(), b.result.as_str()),
        (a.nonce.as_str(), a.result.as_str())
    );
    // Changed input bytes: a run. The old bytes again: the old entry (content, not mtime).
    std::fs::write(&input, "abd")?;
    let c = probe(&cache, PROBE, &input, "t")?;
    assert_eq!(c.outcome, Outcome::Miss);
    assert_ne!(c.nonce, a.nonce);
    assert!(c.result.starts_with("ABD "), "{}", c.result);
    std::fs::write(&input, "abc")?;
    let d = probe(&cache, PROBE, &input, "t")?;
    assert_eq!(
        (d.outcome, d.nonce.as_str()),
        (Outcome::Hit, a.nonce.as_str())
    );
    // Another argument, another script text: runs.
    let e = probe(&cache, PROBE, &input, "u")?;
    assert_eq!(e.outcome, Outcome::Miss);
    assert_ne!(e.nonce, a.nonce);
    let changed = format!("{PROBE}# an edit\n");
    let f = probe(&cache, &changed, &input, "t")?;
    assert_eq!(f.outcome, Outcome::Miss);
    assert_ne!(f.nonce, a.nonce);

    // A folder input: a file changed deep inside it is a miss; changed back, a hit.
    let tree = root.path().join("tree");
    std::fs::create_dir_all(tree.join("x/y"))?;
    std::fs::write(tree.join("a.txt"), "one")?;
    std::fs::write(tree.join("x/y/b.txt"), "two")?;
    let g = probe(&cache, PROBE, &tree, "t")?;
    assert_eq!(g.outcome, Outcome::Miss);
    assert!(g.result.starts_with("ONE|TWO "), "{}", g.result);
    std::fs::write(tree.join("x/y/b.txt"), "twO")?;
    let h = probe(&cache, PROBE, &tree, "t")?;
    assert_eq!(h.outcome, Outcome::Miss);
    assert_ne!(h.nonce, g.nonce);
    std::fs::write(tree.join("x/y/b.txt"), "two")?;
    let i = probe(&cache, PROBE, &tree, "t")?;
    assert_eq!(
        (i.outcome, i.nonce.as_str()),
        (Outcome::Hit, g.nonce.as_str())
    );

    // One entry per miss, no temporary folders left.
    let dir = cache.dir().expect("a cache folder");
    let stored = entries(dir)?;
    assert_eq!(stored.len(), 6, "{stored:?}");
    assert!(stored.iter().all(|n| n.len() == 64), "{stored:?}");

    // Off: runs every time and stores nothing.
    let off = probe(&ReferenceCache::off(), PROBE, &input, "t")?;
    assert_eq!(off.outcome, Outcome::Off);
    assert_ne!(off.nonce, a.nonce);
    assert_eq!(entries(dir)?, stored);
    Ok(())
}

/// The settings of `LLMLAB_REFERENCE_CACHE`, and the arguments that would make a cached result
/// unsound: an output folder with files in it, a temporary path passed as plain text.
#[test]
fn the_reference_cache_refuses_what_it_cannot_key() -> Result<()> {
    let root = tempfile::tempdir()?;
    let dir = root.path().join("cache");
    assert_eq!(ReferenceCache::for_setting(None, &dir)?.dir(), Some(&*dir));
    assert_eq!(
        ReferenceCache::for_setting(Some("on"), &dir)?.dir(),
        Some(&*dir)
    );
    assert_eq!(ReferenceCache::for_setting(Some("off"), &dir)?.dir(), None);
    assert!(ReferenceCache::for_setting(Some("yes"), &dir).is_err());

    let cache = ReferenceCache::at(&dir);
    let input = root.path().join("in.txt");
    std::fs::write(&input, "abc")?;
    let out = tempfile::tempdir()?;
    std::fs::write(out.path().join("old.txt"), "x")?;
    let err = Reference::code(PROBE)
        .input(&input)
        .output(out.path())
        .arg("t")
        .run_with(&cache)
        .expect_err("a folder with a file in it");
    assert!(
        format!("{err:#}").contains("not an empty folder"),
        "{err:#}"
    );
    let fresh = tempfile::tempdir()?;
    let err = Reference::code(PROBE)
        .arg(input.to_str().expect("UTF-8 path"))
        .output(fresh.path())
        .arg("t")
        .run_with(&cache)
        .expect_err("a temporary path as text");
    assert!(format!("{err:#}").contains("temporary path"), "{err:#}");
    assert!(!dir.exists(), "nothing was run or stored");
    // The modules of tests/reference/ a script imports (directly or not) are part of its key.
    assert_eq!(Reference::script("gen_gpt.py").modules()?, ["book_gpt"]);
    assert_eq!(
        Reference::script("bench.py").modules()?,
        ["book_gpt", "opt_gpt", "yaml_lite"]
    );
    assert!(Reference::script("hf_llama.py").modules()?.is_empty());
    assert_eq!(
        Reference::code("import os, yaml_lite").modules()?,
        ["yaml_lite"]
    );
    let k = Reference::script("gen_gpt.py").arg("--out").key()?;
    assert_eq!(k.len(), 64);
    assert_eq!(k, Reference::script("gen_gpt.py").arg("--out").key()?);
    assert_ne!(k, Reference::script("gen_gpt.py").arg("--in").key()?);
    Ok(())
}

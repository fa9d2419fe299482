//! Python reference runs, cached by what they read (llm.c's idea of a reference state file,
//! computed once): a second `make test` does not run PyTorch, transformers or PEFT again.
//!
//! A [`Reference`] names a script of `tests/reference/` (or inline code), its plain arguments,
//! the files or folders it reads ([`Reference::input`]) and the ones it writes
//! ([`Reference::output`]). The cache key is the SHA-256 of
//! - the script's text and the text of every module of `tests/reference/` it imports (directly
//!   or through another one),
//! - the Python environment: the interpreter's path, `tests/reference/requirements*.txt`, and,
//!   in a virtual environment, its `pyvenv.cfg` and the installed versions of the pinned
//!   packages (see [`python_environment`]),
//! - the plain arguments,
//! - each input's path and bytes (a folder: every file in it, by relative path),
//! - the position of each output among the arguments (not its path, which is a fresh temporary
//!   folder in every run).
//!
//! On a hit, the reference's stdout is returned and the files it wrote are copied to the
//! outputs; on a miss the script runs and both are stored in `target/reference-cache/<key>/`
//! (written to a temporary folder, then renamed). So a test still compares llmlab with the real
//! reference's results for exactly these inputs: if a reference reads something llmlab wrote
//! and llmlab writes different bytes, the key changes and the reference runs again. An output
//! must not exist or be an empty folder before the run (what was in it could be an input).
//! `LLMLAB_REFERENCE_CACHE=off` runs every reference afresh and stores nothing;
//! `cargo clean` (`make clean`) empties the cache.
//!
//! References whose inputs change in every run (TensorBoard event files carry wall-clock times
//! and a host name) run through [`run_reference_uncached`].
use super::{python, repo};
use anyhow::{bail, ensure, Context, Result};
use sha2::{Digest, Sha256};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;

/// Stands for output `N`'s path in a stored stdout.
fn placeholder(i: usize) -> String {
    format!("<llmlab-reference-output-{i}>")
}

/// What a run of a reference did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Found in the cache: the script did not run.
    Hit,
    /// Not found: the script ran and its results were stored.
    Miss,
    /// The cache is off: the script ran, nothing was stored.
    Off,
}

/// Where cached references live, if anywhere.
#[derive(Clone, Debug)]
pub struct ReferenceCache {
    dir: Option<PathBuf>,
}

impl ReferenceCache {
    /// `target/reference-cache`, unless `LLMLAB_REFERENCE_CACHE=off`.
    pub fn from_env() -> Result<Self> {
        Self::for_setting(
            std::env::var("LLMLAB_REFERENCE_CACHE").ok().as_deref(),
            &target_dir().join("reference-cache"),
        )
    }

    /// The cache a value of `LLMLAB_REFERENCE_CACHE` selects: `off` none, unset/empty/`on` `dir`.
    pub fn for_setting(setting: Option<&str>, dir: &Path) -> Result<Self> {
        match setting.map(str::trim) {
            None | Some("") | Some("on") => Ok(Self::at(dir)),
            Some("off") => Ok(Self::off()),
            Some(other) => bail!("LLMLAB_REFERENCE_CACHE = {other:?}: use off or on"),
        }
    }

    pub fn at(dir: &Path) -> Self {
        Self {
            dir: Some(dir.to_path_buf()),
        }
    }

    pub fn off() -> Self {
        Self { dir: None }
    }

    pub fn dir(&self) -> Option<&Path> {
        self.dir.as_deref()
    }
}

/// The cargo target folder (`target/`, or `CARGO_TARGET_DIR`): two levels above the binary.
fn target_dir() -> PathBuf {
    let bin = Path::new(env!("CARGO_BIN_EXE_llmlab"));
    bin.parent()
        .and_then(Path::parent)
        .map(Path::to_path_buf)
        .unwrap_or_else(|| repo().join("target"))
}

#[derive(Clone, Debug)]
enum Script {
    /// A file of `tests/reference/`.
    File(String),
    /// `python -c CODE`.
    Code(String),
}

#[derive(Clone, Debug)]
enum Arg {
    Text(String),
    Input(PathBuf),
    Output(PathBuf),
}

/// A reference run: a script, its arguments, what it reads and writes. See the module docs.
#[derive(Clone, Debug)]
pub struct Reference {
    script: Script,
    args: Vec<Arg>,
}

impl Reference {
    /// `tests/reference/<name>`.
    pub fn script(name: &str) -> Self {
        Self {
            script: Script::File(name.to_string()),
            args: Vec::new(),
        }
    }

    /// `python -c <code>`.
    pub fn code(code: &str) -> Self {
        Self {
            script: Script::Code(code.to_string()),
            args: Vec::new(),
        }
    }

    /// A plain argument (not a path of a temporary folder: declare those as inputs or outputs).
    pub fn arg(mut self, arg: impl AsRef<str>) -> Self {
        self.args.push(Arg::Text(arg.as_ref().to_string()));
        self
    }

    pub fn args<S: AsRef<str>>(mut self, args: impl IntoIterator<Item = S>) -> Self {
        for a in args {
            self = self.arg(a);
        }
        self
    }

    /// A file or folder the script reads, passed as an argument: its path and bytes are part
    /// of the key.
    pub fn input(mut self, path: impl AsRef<Path>) -> Self {
        self.args.push(Arg::Input(path.as_ref().to_path_buf()));
        self
    }

    /// A file or folder the script writes, passed as an argument: stored on a miss, restored
    /// on a hit.
    pub fn output(mut self, path: impl AsRef<Path>) -> Self {
        self.args.push(Arg::Output(path.as_ref().to_path_buf()));
        self
    }

    /// Runs the reference through the cache `LLMLAB_REFERENCE_CACHE` selects; returns its stdout.
    pub fn run(&self) -> Result<String> {
        Ok(self.run_with(&ReferenceCache::from_env()?)?.0)
    }

    /// Runs the reference through `cache`; returns its stdout and whether it ran.
    pub fn run_with(&self, cache: &ReferenceCache) -> Result<(String, Outcome)> {
        for out in self.outputs() {
            ensure!(
                !out.exists() || (out.is_dir() && std::fs::read_dir(out)?.next().is_none()),
                "reference output {} exists and is not an empty folder",
                out.display()
            );
        }
        let Some(dir) = cache.dir() else {
            return Ok((self.execute()?, Outcome::Off));
        };
        let key = self.key()?;
        let entry = dir.join(&key);
        if entry.is_dir() {
            return Ok((self.restore(&entry)?, Outcome::Hit));
        }
        let stdout = self.execute()?;
        self.store(dir, &key, &stdout)
            .with_context(|| format!("storing a reference in {}", dir.display()))?;
        Ok((stdout, Outcome::Miss))
    }

    fn outputs(&self) -> impl Iterator<Item = &Path> {
        self.args.iter().filter_map(|a| match a {
            Arg::Output(p) => Some(p.as_path()),
            _ => None,
        })
    }

    fn describe(&self) -> String {
        match &self.script {
            Script::File(name) => name.clone(),
            Script::Code(_) => "python -c".to_string(),
        }
    }

    fn execute(&self) -> Result<String> {
        let mut cmd = Command::new(python());
        match &self.script {
            Script::File(name) => cmd.arg(repo().join("tests/reference").join(name)),
            Script::Code(code) => cmd.arg("-c").arg(code),
        };
        for a in &self.args {
            match a {
                Arg::Text(s) => cmd.arg(s),
                Arg::Input(p) | Arg::Output(p) => cmd.arg(p),
            };
        }
        let out = cmd
            .env("PYTHONPATH", repo().join("tests/reference"))
            .output()
            .with_context(|| format!("running {} with {}", self.describe(), python().display()))?;
        if !out.status.success() {
            bail!(
                "{} failed ({}):\n{}",
                self.describe(),
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8(out.stdout)?)
    }

    /// The modules of `tests/reference/` the script imports, directly or through each other
    /// (their text is part of the key).
    pub fn modules(&self) -> Result<Vec<String>> {
        Ok(local_modules(&self.source()?)?
            .into_iter()
            .map(|(name, _)| name)
            .collect())
    }

    fn source(&self) -> Result<String> {
        Ok(match &self.script {
            Script::File(name) => {
                let path = repo().join("tests/reference").join(name);
                std::fs::read_to_string(&path)
                    .with_context(|| format!("reading {}", path.display()))?
            }
            Script::Code(code) => code.clone(),
        })
    }

    /// The cache key (hex SHA-256); see the module docs for what goes in.
    pub fn key(&self) -> Result<String> {
        let mut h = Keyed(Sha256::new());
        h.field(b"llmlab reference cache v1");
        h.field(python_environment()?.as_bytes());
        match &self.script {
            Script::File(name) => {
                h.field(b"script");
                h.field(name.as_bytes());
            }
            Script::Code(_) => h.field(b"code"),
        }
        let code = self.source()?;
        h.field(code.as_bytes());
        for (name, text) in local_modules(&code)? {
            h.field(b"module");
            h.field(name.as_bytes());
            h.field(text.as_bytes());
        }
        let tmp = std::env::temp_dir();
        let mut n_out = 0;
        for a in &self.args {
            match a {
                Arg::Text(s) => {
                    ensure!(
                        !s.contains(tmp.to_string_lossy().as_ref()),
                        "{}: argument {s:?} names a temporary path; pass it with .input() or .output()",
                        self.describe()
                    );
                    h.field(b"text");
                    h.field(s.as_bytes());
                }
                Arg::Input(p) => {
                    h.field(b"input");
                    h.field(p.to_string_lossy().as_bytes());
                    hash_tree(&mut h, p)
                        .with_context(|| format!("hashing reference input {}", p.display()))?;
                }
                Arg::Output(_) => {
                    h.field(b"output");
                    h.field(&(n_out as u64).to_le_bytes());
                    n_out += 1;
                }
            }
        }
        Ok(h.0.finalize().iter().map(|b| format!("{b:02x}")).collect())
    }

    fn store(&self, dir: &Path, key: &str, stdout: &str) -> Result<()> {
        static SEQ: AtomicUsize = AtomicUsize::new(0);
        std::fs::create_dir_all(dir)?;
        let tmp = dir.join(format!(
            ".tmp-{key}-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::SeqCst)
        ));
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp)?;
        let mut text = stdout.to_string();
        for (i, out) in self.outputs().enumerate() {
            let shown = out.to_string_lossy();
            if !shown.is_empty() {
                text = text.replace(shown.as_ref(), &placeholder(i));
            }
            if out.exists() {
                copy_tree(out, &tmp.join(format!("out-{i}")))?;
            }
        }
        std::fs::write(tmp.join("stdout"), text)?;
        let args: Vec<String> = self
            .args
            .iter()
            .map(|a| match a {
                Arg::Text(s) => s.clone(),
                Arg::Input(p) => format!("<input {}>", p.display()),
                Arg::Output(_) => "<output>".to_string(),
            })
            .collect();
        std::fs::write(
            tmp.join("about.json"),
            serde_json::to_string_pretty(&serde_json::json!({
                "script": self.describe(),
                "args": args,
                "environment": python_environment()?,
            }))?,
        )?;
        match std::fs::rename(&tmp, dir.join(key)) {
            Ok(()) => Ok(()),
            // Stored meanwhile by another run of the same reference.
            Err(_) if dir.join(key).is_dir() => {
                let _ = std::fs::remove_dir_all(&tmp);
                Ok(())
            }
            Err(e) => Err(e.into()),
        }
    }

    fn restore(&self, entry: &Path) -> Result<String> {
        let mut text = std::fs::read_to_string(entry.join("stdout"))
            .with_context(|| format!("reading {}", entry.join("stdout").display()))?;
        for (i, out) in self.outputs().enumerate() {
            text = text.replace(&placeholder(i), out.to_string_lossy().as_ref());
            let stored = entry.join(format!("out-{i}"));
            if stored.exists() {
                copy_tree(&stored, out)?;
            }
        }
        Ok(text)
    }
}

/// Runs a script of `tests/reference/` with plain arguments, without the cache; returns its
/// stdout. For references whose inputs differ in every run (see the module docs).
pub fn run_reference_uncached(script: &str, args: &[&str]) -> Result<String> {
    let path = repo().join("tests/reference").join(script);
    let out = Command::new(python())
        .arg(&path)
        .args(args)
        .env("PYTHONPATH", repo().join("tests/reference"))
        .output()
        .with_context(|| format!("running {} with {}", path.display(), python().display()))?;
    if !out.status.success() {
        bail!(
            "{} failed ({}):\n{}",
            script,
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8(out.stdout)?)
}

/// A SHA-256 fed with length-prefixed fields (so that no two field lists feed the same bytes).
struct Keyed(Sha256);

impl Keyed {
    fn field(&mut self, bytes: &[u8]) {
        self.0.update((bytes.len() as u64).to_le_bytes());
        self.0.update(bytes);
    }
}

/// A file's bytes, or a folder's files by relative path (symbolic links followed).
fn hash_tree(h: &mut Keyed, path: &Path) -> Result<()> {
    let meta = std::fs::metadata(path)?;
    if meta.is_dir() {
        h.field(b"dir");
        let mut names: Vec<_> = std::fs::read_dir(path)?
            .map(|e| e.map(|e| e.file_name()))
            .collect::<Result<_, _>>()?;
        names.sort();
        for name in names {
            h.field(name.to_string_lossy().as_bytes());
            hash_tree(h, &path.join(&name))?;
        }
    } else {
        h.field(b"file");
        let mut file = std::fs::File::open(path)?;
        h.0.update(meta.len().to_le_bytes());
        std::io::copy(&mut file, &mut h.0)?;
    }
    Ok(())
}

/// Copies a file, or a folder's files recursively, to `to` (created if missing).
fn copy_tree(from: &Path, to: &Path) -> Result<()> {
    if std::fs::metadata(from)?.is_dir() {
        std::fs::create_dir_all(to)?;
        for e in std::fs::read_dir(from)? {
            let e = e?;
            copy_tree(&e.path(), &to.join(e.file_name()))?;
        }
    } else {
        std::fs::copy(from, to)
            .with_context(|| format!("copying {} to {}", from.display(), to.display()))?;
    }
    Ok(())
}

/// The modules of `tests/reference/` that `code` imports, directly or through each other, with
/// their text, by name.
fn local_modules(code: &str) -> Result<Vec<(String, String)>> {
    let dir = repo().join("tests/reference");
    let mut seen = BTreeSet::new();
    let mut todo = imported_names(code);
    let mut out = Vec::new();
    while let Some(name) = todo.pop() {
        let path = dir.join(format!("{name}.py"));
        if !seen.insert(name.clone()) || !path.is_file() {
            continue;
        }
        let text = std::fs::read_to_string(&path)?;
        todo.extend(imported_names(&text));
        out.push((name, text));
    }
    out.sort();
    Ok(out)
}

/// Top-level module names of `import a, b.c` and `from a.b import c` lines (also indented ones).
fn imported_names(code: &str) -> Vec<String> {
    let first = |s: &str| -> String {
        s.trim()
            .split(|c: char| c == '.' || c.is_whitespace())
            .next()
            .unwrap_or("")
            .to_string()
    };
    let mut names = Vec::new();
    for line in code.lines().map(str::trim_start) {
        if let Some(rest) = line.strip_prefix("import ") {
            names.extend(rest.split(',').map(first));
        } else if let Some(rest) = line.strip_prefix("from ") {
            names.push(first(rest));
        }
    }
    names.retain(|n| !n.is_empty());
    names
}

/// The Python environment's part of the key (computed once per test process): the
/// interpreter's path, the pins of `tests/reference/requirements*.txt` and, in a virtual
/// environment, its `pyvenv.cfg` (the interpreter's version) and the installed versions of the
/// pinned distributions (`<venv>/lib/pythonX.Y/site-packages/<name>-<version>.dist-info`), so a
/// package changed by hand is noticed too. Other installed packages are left out: installing an
/// unrelated one does not make every reference run again.
fn python_environment() -> Result<String> {
    static ENV: OnceLock<String> = OnceLock::new();
    if let Some(s) = ENV.get() {
        return Ok(s.clone());
    }
    let norm = |name: &str| name.to_ascii_lowercase().replace(['-', '.'], "_");
    let py = python();
    let mut s = format!("python {}\n", py.display());
    let mut pinned = BTreeSet::new();
    for req in ["requirements.txt", "requirements-nodeps.txt"] {
        let p = repo().join("tests/reference").join(req);
        let text = std::fs::read_to_string(&p).unwrap_or_default();
        for line in text.lines().map(str::trim) {
            if let Some((name, _)) = line.split_once("==") {
                if !line.starts_with('#') {
                    pinned.insert(norm(name.trim()));
                }
            }
        }
        s += &format!("{req}\n{text}\n");
    }
    if let Some(venv) = py.parent().and_then(Path::parent) {
        if let Ok(cfg) = std::fs::read_to_string(venv.join("pyvenv.cfg")) {
            s += &format!("pyvenv.cfg\n{cfg}\n");
            let mut dists = BTreeSet::new();
            for lib in std::fs::read_dir(venv.join("lib"))?.flatten() {
                let Ok(site) = std::fs::read_dir(lib.path().join("site-packages")) else {
                    continue;
                };
                for e in site.flatten() {
                    let name = e.file_name().to_string_lossy().into_owned();
                    let Some(dist) = name.strip_suffix(".dist-info") else {
                        continue;
                    };
                    // <name>-<version>: the name has no '-' (wheels write it with '_').
                    if dist
                        .split_once('-')
                        .is_some_and(|(n, _)| pinned.contains(&norm(n)))
                    {
                        dists.insert(name);
                    }
                }
            }
            for d in dists {
                s += &d;
                s.push('\n');
            }
        }
    }
    Ok(ENV.get_or_init(|| s).clone())
}

//! Chapter 2 data pipeline and the data registry.
#![allow(clippy::unwrap_used)] // tests: a panic is the failure report
use crate::common;

use anyhow::Result;
use llmlab::data::registry::{sha256_hex, Registry};
use llmlab::data::{BpeTokenizer, DataLoader, GptDataset};
use llmlab::LlmError;
use tch::Device;

fn verdict_ids() -> Result<Vec<u32>> {
    let tok = BpeTokenizer::gpt2_from_dir(&common::gpt2_bpe_dir())?;
    tok.encode(&std::fs::read_to_string(
        common::mirror().join("the-verdict/the-verdict.txt"),
    )?)
}

fn rows(t: &tch::Tensor) -> Result<Vec<Vec<i64>>> {
    Ok(Vec::<Vec<i64>>::try_from(t)?)
}

/// Book §2.6: the first batches of `create_dataloader_v1` on the-verdict, as the book prints them.
#[test]
fn dataloader_reproduces_book_batches() -> Result<()> {
    let ids = verdict_ids()?;
    let dl = DataLoader::new(GptDataset::new(&ids, 4, 1)?, 1, false, false, 0)?;
    let (x, y) = dl.batch(0, 0, Device::Cpu);
    assert_eq!(rows(&x)?, vec![vec![40, 367, 2885, 1464]]);
    assert_eq!(rows(&y)?, vec![vec![367, 2885, 1464, 1807]]);
    let (x, y) = dl.batch(0, 1, Device::Cpu);
    assert_eq!(rows(&x)?, vec![vec![367, 2885, 1464, 1807]]);
    assert_eq!(rows(&y)?, vec![vec![2885, 1464, 1807, 3619]]);

    let dl = DataLoader::new(GptDataset::new(&ids, 4, 4)?, 8, false, false, 0)?;
    let (x, y) = dl.batch(0, 0, Device::Cpu);
    assert_eq!(
        rows(&x)?,
        vec![
            vec![40, 367, 2885, 1464],
            vec![1807, 3619, 402, 271],
            vec![10899, 2138, 257, 7026],
            vec![15632, 438, 2016, 257],
            vec![922, 5891, 1576, 438],
            vec![568, 340, 373, 645],
            vec![1049, 5975, 284, 502],
            vec![284, 3285, 326, 11],
        ]
    );
    assert_eq!(rows(&y)?[0], vec![367, 2885, 1464, 1807]);
    Ok(())
}

/// Windows, strides and the one-token shift are exact for every window and stride, and the
/// window count is the book's `range(0, len - max_length, stride)`.
#[test]
fn windows_strides_and_shift_are_exact() -> Result<()> {
    let ids: Vec<u32> = (0..103).collect();
    for (max_length, stride) in [(4, 1), (4, 4), (8, 3), (16, 20), (102, 1)] {
        let ds = GptDataset::new(&ids, max_length, stride)?;
        let want: Vec<usize> = (0..103 - max_length).step_by(stride).collect();
        assert_eq!(ds.len(), want.len(), "({max_length}, {stride})");
        for (i, &s) in want.iter().enumerate() {
            let (x, y) = ds.get(i);
            assert_eq!(
                x,
                (s as i64..(s + max_length) as i64)
                    .collect::<Vec<_>>()
                    .as_slice()
            );
            assert_eq!(
                y,
                (s as i64 + 1..(s + max_length + 1) as i64)
                    .collect::<Vec<_>>()
                    .as_slice()
            );
        }
    }
    Ok(())
}

/// Batching: drop_last, the size of the last batch, and a seeded shuffle that is a permutation,
/// repeatable for a seed and different across epochs.
#[test]
fn loader_batches_shuffle_and_drop_last() -> Result<()> {
    let ids: Vec<u32> = (0..50).collect();
    let ds = GptDataset::new(&ids, 4, 4)?; // starts 0,4,..,44: 12 windows
    assert_eq!(ds.len(), 12);
    let keep = DataLoader::new(ds.clone(), 5, false, false, 1)?;
    assert_eq!(keep.num_batches(), 3);
    assert_eq!(keep.batch(0, 2, Device::Cpu).0.size(), vec![2, 4]);
    let drop = DataLoader::new(ds.clone(), 5, true, true, 7)?;
    assert_eq!(drop.num_batches(), 2);
    let firsts = |dl: &DataLoader, epoch| -> Result<Vec<i64>> {
        let mut v = Vec::new();
        for (x, _) in dl.iter_epoch(epoch, Device::Cpu) {
            v.extend(rows(&x)?.into_iter().map(|r| r[0]));
        }
        Ok(v)
    };
    let e0 = firsts(&drop, 0)?;
    assert_eq!(e0.len(), 10);
    assert_eq!(
        e0,
        firsts(&DataLoader::new(ds.clone(), 5, true, true, 7)?, 0)?,
        "same seed, same order"
    );
    assert_ne!(e0, firsts(&drop, 1)?, "a new order each epoch");
    let all = DataLoader::new(ds, 12, true, false, 7)?;
    let mut order = firsts(&all, 3)?;
    order.sort();
    assert_eq!(order, (0..12).map(|i| i * 4).collect::<Vec<i64>>());
    Ok(())
}

/// A text shorter than one window is a clear error.
#[test]
fn text_shorter_than_a_window_is_an_error() {
    let err = GptDataset::new(&[1, 2, 3, 4], 4, 1).unwrap_err();
    assert!(matches!(
        err,
        LlmError::TextTooShort {
            tokens: 4,
            max_length: 4
        }
    ));
    assert!(err.to_string().contains("4 tokens"));
}

/// The mirror serves every registered data set with matching checksums (CI's path).
#[test]
fn registry_reads_every_data_set_from_the_mirror() -> Result<()> {
    let reg = Registry::builtin()?;
    let cache = tempfile::tempdir()?;
    for name in [
        "the-verdict",
        "gpt2-bpe",
        "instruction-data",
        "preference-data",
        "sms-spam-collection",
        "mmlu",
        "tinyshakespeare",
        "middlemarch",
    ] {
        let dir = reg.fetch_with(name, Some(&common::mirror()), cache.path())?;
        for f in &reg.get(name)?.files {
            assert!(dir.join(&f.path).is_file(), "{name}: {}", f.path);
        }
    }
    assert_eq!(reg.get("mmlu")?.files.len(), 173);
    let err = reg
        .fetch_with("wikitext", Some(&common::mirror()), cache.path())
        .unwrap_err();
    assert!(
        format!("{err:#}").contains("the-verdict"),
        "lists the known names: {err:#}"
    );
    Ok(())
}

/// A mirror file with the wrong bytes is rejected, naming the file and both checksums.
#[test]
fn registry_rejects_a_bad_checksum() -> Result<()> {
    let reg = Registry::builtin()?;
    let mirror = tempfile::tempdir()?;
    std::fs::create_dir_all(mirror.path().join("the-verdict"))?;
    std::fs::write(
        mirror.path().join("the-verdict/the-verdict.txt"),
        b"not the verdict",
    )?;
    let err = reg
        .fetch_with("the-verdict", Some(mirror.path()), mirror.path())
        .unwrap_err();
    let msg = format!("{err:#}");
    assert!(
        msg.contains("b41e41a68f0398a3154ae69e2e4c0e2694e17fe0d66730536837f1b01935b31f"),
        "{msg}"
    );
    assert!(msg.contains(&sha256_hex(b"not the verdict")), "{msg}");
    assert!(msg.contains("the-verdict.txt"), "{msg}");
    Ok(())
}

/// Downloads go to the cache only when whole and checksummed: a server that answers with the
/// wrong bytes, or no server at all, leaves no file behind and names the URL.
#[test]
fn registry_download_is_checksummed_and_atomic() -> Result<()> {
    let mut bodies = [b"hello world\n".as_slice(), b"tampered\n".as_slice()].into_iter();
    let server = common::HttpStub::serve_n(2, move |_| {
        common::Response::ok(bodies.next().expect("two answers"))
    })?;
    let port = server.port();
    let yaml = format!(
        "datasets:\n  hello:\n    description: test\n    files:\n      - {{path: hello.txt, url: \"http://127.0.0.1:{port}/hello.txt\", sha256: {}}}\n",
        sha256_hex(b"hello world\n")
    );
    let reg = Registry::from_yaml(&yaml, "test")?;
    let cache = tempfile::tempdir()?;
    let dir = reg.fetch_with("hello", None, cache.path())?;
    assert_eq!(std::fs::read(dir.join("hello.txt"))?, b"hello world\n");
    // Second server answer is tampered: a fresh cache must stay empty.
    let cache2 = tempfile::tempdir()?;
    let msg = format!(
        "{:#}",
        reg.fetch_with("hello", None, cache2.path()).unwrap_err()
    );
    assert!(
        msg.contains(&format!("http://127.0.0.1:{port}/hello.txt"))
            && msg.contains("expected sha256"),
        "{msg}"
    );
    server.join();
    let leftovers: Vec<_> = walk(cache2.path());
    assert!(leftovers.is_empty(), "no partial file: {leftovers:?}");
    // The server is gone: a network failure names the URL and leaves nothing.
    let msg = format!(
        "{:#}",
        reg.fetch_with("hello", None, cache2.path()).unwrap_err()
    );
    assert!(msg.contains("download of http://127.0.0.1"), "{msg}");
    assert!(walk(cache2.path()).is_empty());
    // The cached copy is used without the network.
    assert_eq!(reg.fetch_with("hello", None, cache.path())?, dir);
    Ok(())
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(walk(&p));
            } else {
                out.push(p);
            }
        }
    }
    out
}

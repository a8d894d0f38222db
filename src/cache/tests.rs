use super::*;
use crate::artifact::ArtifactKind;
use std::collections::BTreeSet;

fn cache() -> (tempfile::TempDir, Cache) {
    let d = tempfile::tempdir().unwrap();
    let c = Cache::open(d.path().join("home")).unwrap();
    (d, c)
}

#[test]
fn publish_writes_manifest_last_and_object_is_found() {
    let (_d, c) = cache();
    assert!(c.object("k1").is_none());
    let tmp = c.tmp_dir().unwrap();
    std::fs::write(tmp.path().join("a.txt"), b"hello").unwrap();
    std::fs::create_dir(tmp.path().join("sub")).unwrap();
    std::fs::write(tmp.path().join("sub/b.bin"), b"xy").unwrap();
    let tmp_path = tmp.path().to_path_buf();
    let mut metrics = serde_json::Map::new();
    metrics.insert("loss".into(), 1.5.into());
    let art = c.publish(tmp, "k1", ArtifactKind::Tokenizer, "tokenizer", metrics).unwrap();
    assert!(!tmp_path.exists(), "tmp dir is renamed away");
    assert_eq!(art.dir, c.object_dir("k1"));
    let files: Vec<_> = art.manifest.files.iter().map(|f| f.path.as_str()).collect();
    assert_eq!(files, ["a.txt", "sub/b.bin"]);
    assert_eq!(art.manifest.files[0].blake3, blake3::hash(b"hello").to_hex().to_string());
    let again = c.object("k1").unwrap();
    assert_eq!(again.manifest, art.manifest);
    assert_eq!(again.manifest.metrics["loss"], 1.5);
}

#[test]
fn directory_without_manifest_is_not_an_object() {
    let (_d, c) = cache();
    std::fs::create_dir_all(c.object_dir("half")).unwrap();
    std::fs::write(c.object_dir("half").join("model.safetensors"), b"partial").unwrap();
    assert!(c.object("half").is_none());
    // Publishing over it replaces it.
    let tmp = c.tmp_dir().unwrap();
    std::fs::write(tmp.path().join("x"), b"1").unwrap();
    let art = c.publish(tmp, "half", ArtifactKind::Model, "pretrain", Default::default()).unwrap();
    assert_eq!(art.manifest.files.len(), 1);
    assert!(!c.object_dir("half").join("model.safetensors").exists());
}

#[test]
fn publish_keeps_an_existing_object_and_removes_work_dir() {
    let (_d, c) = cache();
    let work = c.work_dir("k").unwrap();
    std::fs::write(work.join("ckpt"), b"c").unwrap();
    let t1 = c.tmp_dir().unwrap();
    std::fs::write(t1.path().join("f"), b"first").unwrap();
    c.publish(t1, "k", ArtifactKind::Dataset, "prepare", Default::default()).unwrap();
    assert!(!work.exists(), "checkpoints are dropped once the object exists");
    let t2 = c.tmp_dir().unwrap();
    let t2p = t2.path().to_path_buf();
    std::fs::write(t2.path().join("f"), b"second").unwrap();
    let art = c.publish(t2, "k", ArtifactKind::Dataset, "prepare", Default::default()).unwrap();
    assert_eq!(std::fs::read(art.path("f")).unwrap(), b"first");
    assert!(!t2p.exists(), "the losing tmp dir is cleaned up");
}

#[test]
fn dropped_tmp_dir_is_removed() {
    let (_d, c) = cache();
    let t = c.tmp_dir().unwrap();
    let p = t.path().to_path_buf();
    std::fs::write(p.join("f"), b"x").unwrap();
    drop(t);
    assert!(!p.exists());
}

#[test]
fn hash_file_is_memoised_by_size_and_mtime() {
    let (d, c) = cache();
    let f = d.path().join("corpus.txt");
    std::fs::write(&f, b"abc").unwrap();
    let h1 = c.hash_file(&f).unwrap();
    assert_eq!(h1, blake3::hash(b"abc").to_hex().to_string());
    let index = std::fs::read_to_string(c.root().join("hashes-v1/files.jsonl")).unwrap();
    assert_eq!(index.lines().count(), 1);
    // A fresh handle reads the memo instead of rehashing: no new line.
    let c2 = Cache::open(c.root()).unwrap();
    assert_eq!(c2.hash_file(&f).unwrap(), h1);
    assert_eq!(std::fs::read_to_string(c.root().join("hashes-v1/files.jsonl")).unwrap().lines().count(), 1);
    // Changing the content (and size) rehashes.
    std::fs::write(&f, b"abcd").unwrap();
    let h2 = c2.hash_file(&f).unwrap();
    assert_eq!(h2, blake3::hash(b"abcd").to_hex().to_string());
    assert_eq!(std::fs::read_to_string(c.root().join("hashes-v1/files.jsonl")).unwrap().lines().count(), 2);
}

#[test]
fn memo_is_trusted_when_size_and_mtime_match() {
    // Proves the memo is really used: a forged entry with matching size/mtime is returned.
    let (d, c) = cache();
    let f = d.path().join("big.txt");
    std::fs::write(&f, b"real").unwrap();
    let real = c.hash_file(&f).unwrap();
    let text = std::fs::read_to_string(c.root().join("hashes-v1/files.jsonl")).unwrap();
    std::fs::write(c.root().join("hashes-v1/files.jsonl"), text.replace(&real, "forged")).unwrap();
    let c2 = Cache::open(c.root()).unwrap();
    assert_eq!(c2.hash_file(&f).unwrap(), "forged");
}

#[test]
fn key_lock_excludes_a_second_holder() {
    let (_d, c) = cache();
    let l1 = c.try_lock("k").unwrap().expect("free");
    assert!(c.try_lock("k").unwrap().is_none(), "held by l1");
    assert!(c.try_lock("other").unwrap().is_some());
    drop(l1);
    assert!(c.try_lock("k").unwrap().is_some());
}

#[test]
fn lock_waits_for_the_holder() {
    let (_d, c) = cache();
    let l1 = c.lock("k", || panic!("free lock must not wait")).unwrap();
    let c2 = c.clone();
    let waited = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let w2 = waited.clone();
    let h = std::thread::spawn(move || {
        let _l = c2.lock("k", || w2.store(true, std::sync::atomic::Ordering::SeqCst)).unwrap();
    });
    std::thread::sleep(std::time::Duration::from_millis(100));
    drop(l1);
    h.join().unwrap();
    assert!(waited.load(std::sync::atomic::Ordering::SeqCst));
}

fn publish(c: &Cache, key: &str, bytes: usize) {
    let t = c.tmp_dir().unwrap();
    std::fs::write(t.path().join("f"), vec![7u8; bytes]).unwrap();
    c.publish(t, key, ArtifactKind::Dataset, "prepare", Default::default()).unwrap();
}

fn keys(k: &[&str]) -> impl FnOnce() -> Result<BTreeSet<String>, CacheError> {
    let set: BTreeSet<String> = k.iter().map(|s| s.to_string()).collect();
    move || Ok(set)
}

#[test]
fn gc_removes_unreferenced_objects_and_stale_tmp() {
    let (_d, c) = cache();
    publish(&c, "keep", 1000);
    publish(&c, "drop", 1000);
    // A tmp dir left by a dead process.
    let stale = c.bucket(Bucket::Tmp).join("999999999-dead");
    std::fs::create_dir_all(&stale).unwrap();
    std::fs::write(stale.join("x"), vec![0u8; 10]).unwrap();
    let live = c.tmp_dir().unwrap();
    let dry = c.gc(keys(&["keep"]), true).unwrap();
    assert_eq!(dry.removed_objects, ["drop"]);
    assert!(c.object_dir("drop").join("manifest.json").is_file(), "dry run removes nothing");
    let r = c.gc(keys(&["keep"]), false).unwrap();
    assert_eq!(r, dry, "the dry run reports exactly what the real one does");
    assert_eq!(r.removed_objects, ["drop"]);
    let tmp = r.bucket(Bucket::Tmp);
    assert_eq!((tmp.removed, tmp.kept), (1, 1));
    let obj = r.bucket(Bucket::Objects);
    assert_eq!((obj.removed, obj.kept), (1, 1));
    assert!(obj.freed_bytes >= 1000 && r.freed_bytes() >= 1010);
    assert!(!c.object_dir("drop").exists());
    assert!(c.object("keep").is_some());
    assert!(!stale.exists());
    assert!(live.path().exists(), "our own tmp dir is kept");
}

#[test]
fn gc_frees_unreferenced_derived_entries_and_work_and_legacy_dirs() {
    let (_d, c) = cache();
    for key in ["shard-keep", "shard-drop"] {
        c.derived(Bucket::Shards, key, |dir| {
            std::fs::write(dir.join("chunk"), vec![1u8; 500]).ctx("w", dir).map_err(CacheError::from)
        })
        .unwrap();
    }
    c.derived(Bucket::Builtin, "gen-drop", |dir| {
        std::fs::write(dir.join("data.jsonl"), b"{}\n").ctx("w", dir).map_err(CacheError::from)
    })
    .unwrap();
    std::fs::write(c.work_dir("orphan").unwrap().join("ckpt"), b"12345").unwrap();
    std::fs::write(c.work_dir("resumable").unwrap().join("ckpt"), b"12345").unwrap();
    std::fs::create_dir_all(c.root().join("shards/old")).unwrap();
    std::fs::write(c.root().join("hashes.jsonl"), b"{}\n").unwrap();
    std::fs::create_dir_all(c.root().join("my-notes")).unwrap();
    // Another handle: this one's lease pins what it built, as a live run's would.
    let gc = Cache::open(c.root()).unwrap();
    drop(c);
    let r = gc.gc(keys(&["shard-keep", "resumable"]), false).unwrap();
    assert_eq!((r.bucket(Bucket::Shards).removed, r.bucket(Bucket::Shards).kept), (1, 1));
    assert_eq!(r.bucket(Bucket::Builtin).removed, 1);
    assert_eq!((r.bucket(Bucket::Work).removed, r.bucket(Bucket::Work).kept), (1, 1));
    assert_eq!(r.buckets["legacy"].removed, 2);
    assert!(gc.entry_dir(Bucket::Shards, "shard-keep").join("chunk").is_file());
    assert!(!gc.entry_dir(Bucket::Shards, "shard-drop").exists());
    assert!(!gc.entry_dir(Bucket::Builtin, "gen-drop").exists());
    assert!(gc.entry_dir(Bucket::Work, "resumable").exists() && !gc.entry_dir(Bucket::Work, "orphan").exists());
    assert!(!gc.root().join("shards").exists() && !gc.root().join("hashes.jsonl").exists());
    assert!(gc.root().join("my-notes").exists(), "what is not ours is left alone");
    assert!(gc.entries(Bucket::Locks).iter().all(|n| !n.starts_with("shard-drop")), "free key locks are removed");
}

#[test]
fn gc_keeps_what_a_live_process_pinned_and_what_is_being_built() {
    let (_d, c) = cache();
    publish(&c, "in-use", 10);
    publish(&c, "building", 10);
    let run = Cache::open(c.root()).unwrap();
    assert!(run.object("in-use").is_some(), "the lookup pins it");
    let _builder = run.try_lock("building").unwrap().unwrap();
    let gc = Cache::open(c.root()).unwrap();
    drop(c);
    let r = gc.gc(keys(&[]), false).unwrap();
    assert!(r.removed_objects.is_empty(), "{r:?}");
    assert_eq!(r.bucket(Bucket::Objects).kept, 2);
    // Once the run is gone (its lease lock released), the same gc frees both.
    drop(_builder);
    drop(run);
    assert_eq!(gc.gc(keys(&[]), false).unwrap().removed_objects, ["building", "in-use"]);
}

#[test]
fn derived_builds_once_and_rebuilds_a_damaged_entry() {
    let (_d, c) = cache();
    let mut builds = 0;
    let mut build = |dir: &Path| {
        builds += 1;
        std::fs::write(dir.join("a"), b"hello").ctx("w", dir).map_err(CacheError::from)
    };
    let e = c.derived(Bucket::Shards, "k", &mut build).unwrap();
    assert!(e.built && e.replaced.is_none());
    assert!(e.dir.join("manifest.json").is_file());
    assert!(!c.entry_dir(Bucket::Work, "k").exists(), "the work dir became the entry");
    let again = c.derived(Bucket::Shards, "k", &mut build).unwrap();
    assert!(!again.built);
    // A flipped byte, seen by a fresh process (the hash memo is per process).
    std::fs::write(e.dir.join("a"), b"hellO").unwrap();
    let c2 = Cache::open(c.root()).unwrap();
    let fixed = c2.derived(Bucket::Shards, "k", &mut build).unwrap();
    assert!(fixed.built);
    let damage = fixed.replaced.expect("damage reported");
    assert!(damage.problem.contains("content differs"), "{damage}");
    assert_eq!(std::fs::read(fixed.dir.join("a")).unwrap(), b"hello");
    assert_eq!(builds, 2);
}

#[test]
fn derived_continues_an_interrupted_build() {
    let (_d, c) = cache();
    let e = c
        .derived(Bucket::Shards, "k", |dir| -> Result<(), CacheError> {
            std::fs::write(dir.join("part-1"), b"1").ctx("w", dir)?;
            Err(CacheError::Io(crate::fs_error::IoError::new("interrupted", dir, std::io::Error::other("ctrl-c"))))
        })
        .unwrap_err();
    assert!(e.to_string().contains("ctrl-c"));
    assert!(!c.entry_dir(Bucket::Shards, "k").exists(), "nothing half-built is published");
    let e = c
        .derived(Bucket::Shards, "k", |dir| {
            assert!(dir.join("part-1").is_file(), "the next builder sees the finished part");
            std::fs::write(dir.join("part-2"), b"2").ctx("w", dir).map_err(CacheError::from)
        })
        .unwrap();
    assert!(e.dir.join("part-1").is_file() && e.dir.join("part-2").is_file());
}

#[test]
fn lookups_check_sizes_and_verify_checks_content() {
    let (_d, c) = cache();
    publish(&c, "k", 100);
    let art = c.object("k").unwrap();
    assert!(c.verify(&art).is_ok());
    // Same size, different content: a fresh process (no memo) sees it only in full.
    let mut bytes = std::fs::read(art.path("f")).unwrap();
    bytes[50] ^= 1;
    std::fs::write(art.path("f"), &bytes).unwrap();
    let c2 = Cache::open(c.root()).unwrap();
    let art = c2.object("k").expect("sizes match");
    let d = c2.verify(&art).unwrap_err();
    assert!(d.file.ends_with("f") && d.problem.contains("content differs"), "{d}");
    assert!(matches!(c2.lookup("k", Depth::Content), Lookup::Damaged(_)));
    // A missing file is damage at every depth.
    std::fs::remove_file(art.path("f")).unwrap();
    match c2.lookup("k", Depth::Sizes) {
        Lookup::Damaged(d) => assert!(d.problem.contains("missing"), "{d}"),
        other => panic!("{other:?}"),
    }
    assert!(c2.object("k").is_none());
}

#[test]
fn verify_all_reports_and_repairs() {
    let (_d, c) = cache();
    publish(&c, "good", 10);
    publish(&c, "bad", 10);
    c.derived(Bucket::Builtin, "gen", |dir| {
        std::fs::write(dir.join("data.jsonl"), b"x").ctx("w", dir).map_err(CacheError::from)
    })
    .unwrap();
    // A manifest that lists a wrong hash.
    let m = c.object_dir("bad").join("manifest.json");
    let text = std::fs::read_to_string(&m).unwrap();
    let real = blake3::hash(&[7u8; 10]).to_hex().to_string();
    std::fs::write(&m, text.replace(&real, &"0".repeat(64))).unwrap();
    let r = c.verify_all(false).unwrap();
    assert_eq!(r.checked, 3);
    assert_eq!(r.damaged.len(), 1);
    assert_eq!((r.damaged[0].0, r.damaged[0].1.as_str()), (Bucket::Objects, "bad"));
    assert!(c.object_dir("bad").exists(), "without --repair nothing is removed");
    let r = c.verify_all(true).unwrap();
    assert_eq!(r.damaged.len(), 1);
    assert!(!c.object_dir("bad").exists());
    assert!(c.verify_all(false).unwrap().damaged.is_empty());
}

#[test]
fn a_deleted_lock_file_is_never_shared_by_two_holders() {
    let (_d, c) = cache();
    let path = c.bucket(Bucket::Locks).join("k.lock");
    let first = c.try_lock("k").unwrap().unwrap();
    first.remove_file();
    // The file is gone; a new holder gets a fresh one, and the old inode no longer counts.
    let second = c.try_lock("k").unwrap().expect("a fresh lock file");
    assert!(path.is_file());
    assert!(c.try_lock("k").unwrap().is_none());
    drop(second);
}

#[test]
fn buckets_are_versioned_directories() {
    let (_d, c) = cache();
    for b in Bucket::ALL {
        assert!(b.dir_name().ends_with("-v1"), "{b}");
        assert!(c.bucket(b).is_dir());
        assert_eq!(Bucket::from_dir_name(b.dir_name()), Some(b));
    }
    assert!(c.root().join("CACHEDIR.TAG").is_file());
}

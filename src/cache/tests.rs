use super::*;
use crate::artifact::ArtifactKind;

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
    let index = std::fs::read_to_string(c.root().join("hashes.jsonl")).unwrap();
    assert_eq!(index.lines().count(), 1);
    // A fresh handle reads the memo instead of rehashing: no new line.
    let c2 = Cache::open(c.root()).unwrap();
    assert_eq!(c2.hash_file(&f).unwrap(), h1);
    assert_eq!(std::fs::read_to_string(c.root().join("hashes.jsonl")).unwrap().lines().count(), 1);
    // Changing the content (and size) rehashes.
    std::fs::write(&f, b"abcd").unwrap();
    let h2 = c2.hash_file(&f).unwrap();
    assert_eq!(h2, blake3::hash(b"abcd").to_hex().to_string());
    assert_eq!(std::fs::read_to_string(c.root().join("hashes.jsonl")).unwrap().lines().count(), 2);
}

#[test]
fn memo_is_trusted_when_size_and_mtime_match() {
    // Proves the memo is really used: a forged entry with matching size/mtime is returned.
    let (d, c) = cache();
    let f = d.path().join("big.txt");
    std::fs::write(&f, b"real").unwrap();
    let real = c.hash_file(&f).unwrap();
    let text = std::fs::read_to_string(c.root().join("hashes.jsonl")).unwrap();
    std::fs::write(c.root().join("hashes.jsonl"), text.replace(&real, "forged")).unwrap();
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

#[test]
fn gc_removes_unreferenced_objects_and_stale_tmp() {
    let (_d, c) = cache();
    for key in ["keep", "drop"] {
        let t = c.tmp_dir().unwrap();
        std::fs::write(t.path().join("f"), vec![0u8; 1000]).unwrap();
        c.publish(t, key, ArtifactKind::Dataset, "prepare", Default::default()).unwrap();
    }
    // A tmp dir left by a dead process (pid 0 is never a user process we can see as ours).
    let stale = c.root().join("tmp").join("999999999-dead");
    std::fs::create_dir_all(&stale).unwrap();
    std::fs::write(stale.join("x"), vec![0u8; 10]).unwrap();
    let live = c.tmp_dir().unwrap();
    let referenced: BTreeSet<String> = ["keep".to_string()].into();
    let dry = c.gc(&referenced, true).unwrap();
    assert_eq!(dry.removed_objects, ["drop"]);
    assert!(c.object("drop").is_some(), "dry run removes nothing");
    let r = c.gc(&referenced, false).unwrap();
    assert_eq!(r.removed_objects, ["drop"]);
    assert_eq!(r.removed_tmp, 1);
    assert_eq!(r.kept_objects, 1);
    assert!(r.freed_bytes >= 1010);
    assert!(c.object("drop").is_none());
    assert!(c.object("keep").is_some());
    assert!(!stale.exists());
    assert!(live.path().exists(), "our own tmp dir is kept");
}

//! The hub as the data layer sees it: a parquet dataset served by the local test Hub, fetched
//! through the recipe's lock (`hub::lock::fetch_all`), resolved by `data::resolve_fetched` and read by
//! `data::read_examples` into the same examples a JSONL file gives.

use std::sync::Arc;
use std::time::Duration;

use mmrun::data::spec::DatasetSpec;
use mmrun::data::Example;
use mmrun::hub::testserver::TestHub;
use mmrun::hub::{lock, HubOptions, HubUri, RemoteId, RemoteInput, RemoteKind, RepoType};
use parquet::data_type::{ByteArray, ByteArrayType};
use parquet::file::properties::WriterProperties;
use parquet::file::writer::SerializedFileWriter;
use parquet::schema::parser::parse_message_type;

fn alpaca_parquet(rows: &[(&str, &str)]) -> Vec<u8> {
    let schema = Arc::new(
        parse_message_type(
            "message schema { REQUIRED BYTE_ARRAY instruction (UTF8); REQUIRED BYTE_ARRAY input (UTF8); REQUIRED BYTE_ARRAY output (UTF8); }",
        )
        .unwrap(),
    );
    let mut buf = Vec::new();
    let mut w = SerializedFileWriter::new(&mut buf, schema, Arc::new(WriterProperties::builder().build())).unwrap();
    let mut rg = w.next_row_group().unwrap();
    let cols: [Vec<ByteArray>; 3] = [
        rows.iter().map(|r| ByteArray::from(r.0)).collect(),
        rows.iter().map(|_| ByteArray::from("")).collect(),
        rows.iter().map(|r| ByteArray::from(r.1)).collect(),
    ];
    for c in &cols {
        let mut col = rg.next_column().unwrap().unwrap();
        col.typed::<ByteArrayType>().write_batch(c, None, None).unwrap();
        col.close().unwrap();
    }
    rg.close().unwrap();
    w.close().unwrap();
    buf
}

#[test]
fn parquet_from_the_hub_reads_like_jsonl_through_the_lock() {
    let hub = TestHub::start();
    let commit = hub.commit(
        RepoType::Dataset,
        "acme/pq",
        "refs/convert/parquet",
        vec![
            (
                "default/train/0000.parquet".into(),
                alpaca_parquet(&[("发热怎么办？", "多喝水，休息。"), ("q2", "a2")]),
                true,
            ),
            ("default/train/0001.parquet".into(), alpaca_parquet(&[("q3", "a3")]), true),
        ],
    );
    let dir = tempfile::tempdir().unwrap();
    let cache_dir = dir.path().join("hf");
    let opts = HubOptions {
        endpoint: hub.url(),
        token: None,
        cache_dir: cache_dir.clone(),
        offline: false,
        max_retries: 2,
        backoff_base: Duration::from_millis(10),
        backoff_max: Duration::from_millis(50),
        retry_after_max: Duration::from_secs(1),
        connect_timeout: Duration::from_secs(2),
        response_timeout: Duration::from_secs(2),
    };
    let recipe = dir.path().join("r.toml");
    std::fs::write(&recipe, "").unwrap();
    let spec: DatasetSpec = toml::from_str(
        "source = \"hf://datasets/acme/pq@refs%2Fconvert%2Fparquet/default/train/*.parquet\"\nformat = \"alpaca\"",
    )
    .unwrap();
    let input =
        RemoteInput { id: RemoteId::new(RemoteKind::Dataset, "med"), uri: HubUri::parse(&spec.source).unwrap() };
    let all = lock::fetch_all(&recipe, &[input], &opts).unwrap();
    let fetched = all.get(RemoteKind::Dataset, "med").unwrap();
    assert_eq!(fetched.commit, commit);
    assert_eq!(fetched.files.len(), 2);
    let written = lock::LockFile::load(&lock::lock_path(&recipe)).unwrap().unwrap();
    assert_eq!(written.datasets["med"].revision, "refs/convert/parquet");

    let cache = mmrun::cache::Cache::open(dir.path().join("mmrun")).unwrap();
    // What exec hands to data: the files the lock fetched.
    let files: Vec<_> = fetched.files.iter().map(|f| f.local_path.clone()).collect();
    let ds = mmrun::data::resolve_fetched("med", &spec, dir.path(), &cache, Some(files.clone())).unwrap();
    assert_eq!(ds.files, files);
    assert!(ds.files.iter().all(|f| f.starts_with(&cache_dir)));
    let ex = mmrun::data::read_examples(&ds, None).unwrap();
    assert_eq!(ex.len(), 3);
    let Example::Chat { messages, .. } = &ex[0] else { panic!("alpaca rows become chats: {:?}", ex[0]) };
    let text = format!("{messages:?}");
    assert!(text.contains("发热怎么办？") && text.contains("多喝水，休息。"), "{text}");
}

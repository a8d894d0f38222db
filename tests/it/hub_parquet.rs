//! Parquet files written here with the `parquet` writer (no downloads) read back as JSON records.

use std::fs::File;
use std::path::Path;
use std::sync::Arc;

use mmrun::data::parquet::read_parquet_records;
use parquet::basic::Compression;
use parquet::data_type::{ByteArray, ByteArrayType, Int64Type};
use parquet::file::properties::WriterProperties;
use parquet::file::writer::SerializedFileWriter;
use parquet::schema::parser::parse_message_type;
use serde_json::json;

fn write(path: &Path, compression: Compression) {
    let schema = Arc::new(
        parse_message_type(
            "message schema {
                REQUIRED INT64 id;
                REQUIRED BYTE_ARRAY instruction (UTF8);
                OPTIONAL BYTE_ARRAY output (UTF8);
                OPTIONAL group tags (LIST) { REPEATED group list { OPTIONAL BYTE_ARRAY element (UTF8); } }
            }",
        )
        .unwrap(),
    );
    let props = Arc::new(WriterProperties::builder().set_compression(compression).build());
    let mut w = SerializedFileWriter::new(File::create(path).unwrap(), schema, props).unwrap();
    let mut rg = w.next_row_group().unwrap();
    let mut col = rg.next_column().unwrap().unwrap();
    col.typed::<Int64Type>().write_batch(&[0, 1, 2], None, None).unwrap();
    col.close().unwrap();
    let mut col = rg.next_column().unwrap().unwrap();
    let s = |v: &str| ByteArray::from(v);
    col.typed::<ByteArrayType>().write_batch(&[s("发热怎么办？"), s("q2"), s("q3")], None, None).unwrap();
    col.close().unwrap();
    let mut col = rg.next_column().unwrap().unwrap();
    // Row 1 has a null output.
    col.typed::<ByteArrayType>().write_batch(&[s("多喝水"), s("a3")], Some(&[1, 0, 1]), None).unwrap();
    col.close().unwrap();
    let mut col = rg.next_column().unwrap().unwrap();
    // Row 0: ["med", "zh"], row 1: [], row 2: null.
    col.typed::<ByteArrayType>().write_batch(&[s("med"), s("zh")], Some(&[3, 3, 1, 0]), Some(&[0, 1, 0, 0])).unwrap();
    col.close().unwrap();
    rg.close().unwrap();
    w.close().unwrap();
}

#[test]
fn reads_rows_as_json_records() {
    let dir = tempfile::tempdir().unwrap();
    for (name, c) in [
        ("snappy.parquet", Compression::SNAPPY),
        ("zstd.parquet", Compression::ZSTD(Default::default())),
        ("plain.parquet", Compression::UNCOMPRESSED),
    ] {
        let p = dir.path().join(name);
        write(&p, c);
        let rows: Vec<_> = read_parquet_records(&p).unwrap().map(|r| r.unwrap()).collect();
        assert_eq!(rows.len(), 3, "{name}");
        assert_eq!(
            rows[0],
            (0, json!({"id": 0, "instruction": "发热怎么办？", "output": "多喝水", "tags": ["med", "zh"]}))
        );
        assert_eq!(rows[1], (1, json!({"id": 1, "instruction": "q2", "output": null, "tags": []})));
        assert_eq!(rows[2], (2, json!({"id": 2, "instruction": "q3", "output": "a3", "tags": null})));
    }
}

#[test]
fn broken_files_give_one_line_errors() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.parquet");
    write(&good, Compression::SNAPPY);
    let bytes = std::fs::read(&good).unwrap();
    let cut = dir.path().join("cut.parquet");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let e = read_parquet_records(&cut).err().expect("a truncated file is rejected");
    let m = e.to_string();
    assert!(m.contains("cut.parquet") && !m.contains('\n'), "{m}");
    let e = read_parquet_records(&dir.path().join("missing.parquet")).err().unwrap();
    assert!(e.to_string().contains("missing.parquet"));
}

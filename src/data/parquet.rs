//! Parquet files (many Hub datasets, including the Hub's auto-converted `refs/convert/parquet`
//! branch) read row by row into JSON records, so every dataset format that reads JSONL reads parquet
//! too. Uses the `parquet` crate's record API without Arrow (much less to compile); snappy and zstd
//! (the codecs `datasets`/pyarrow write) are enabled.

use std::fs::File;
use std::path::{Path, PathBuf};

use parquet::file::reader::{FileReader, SerializedFileReader};
use parquet::record::reader::RowIter;

/// A parquet file could not be read.
#[derive(Debug, thiserror::Error)]
#[error("{path}: cannot read parquet{}: {reason}; check the file is a complete parquet file (re-fetch it) or convert it to JSONL", .row.map(|r| format!(" (row {r})")).unwrap_or_default())]
pub struct ParquetError {
    /// The file.
    pub path: PathBuf,
    /// The row being read, if past the header.
    pub row: Option<usize>,
    /// What went wrong.
    pub reason: String,
}

/// Iterate the rows of a parquet file as `(row_index, JSON object)` (column name → value; lists and
/// structs become arrays and objects; binary columns become base64 strings, as `to_json` does).
pub fn read_parquet_records(
    path: &Path,
) -> Result<impl Iterator<Item = Result<(usize, serde_json::Value), ParquetError>>, ParquetError> {
    let err = |row: Option<usize>, reason: String| ParquetError { path: path.to_path_buf(), row, reason };
    let file = File::open(path).map_err(|e| err(None, e.to_string()))?;
    let reader = SerializedFileReader::new(file).map_err(|e| err(None, e.to_string()))?;
    let rows: RowIter<'static> = RowIter::from_file_into(Box::new(reader) as Box<dyn FileReader>);
    let path = path.to_path_buf();
    Ok(rows.enumerate().map(move |(i, r)| match r {
        Ok(row) => Ok((i, row.to_json_value())),
        Err(e) => Err(ParquetError { path: path.clone(), row: Some(i), reason: e.to_string() }),
    }))
}

//! Reading datasets: files (jsonl / json array / txt / parquet) → typed [`Example`]s.
//!
//! Framing is decided per file: `.txt` read as `text` gives one document per non-blank line; any other
//! combination parses JSON — a file whose first non-blank byte is `[` is a JSON array, otherwise JSON
//! Lines (so `.json` files that are really JSONL, and JSONL inside `.txt` read with a non-text format,
//! both work). A UTF-8 BOM and CRLF line endings are accepted. Invalid UTF-8 is never replaced: it
//! is a bad record naming the line and byte.
//!
//! Two kinds of problem:
//! * **malformed** records (invalid JSON or UTF-8, missing fields, wrong types, unknown roles, a DPO
//!   pair without a preference): an error `file:line: problem` by default, or with
//!   `on_bad_record = "skip"` skipped, counted and appended to the run's `rejects.jsonl`;
//! * **empty** records (well-formed but nothing to train on: no assistant reply, empty text): always
//!   skipped, counted, logged as a warning and appended to `rejects.jsonl` — real corpora contain
//!   them (e.g. a ShareGPT dialogue with only a user turn) and a training run should not stop for
//!   them, yet nothing is dropped silently.
//!
//! The records' shapes are in [`super::formats`], the types they become in [`super::example`].

pub use super::example::{Example, Message, ReadStats};
use super::formats::{bad, convert, Problem};
use super::{DataError, RejectSink, ResolvedDataset};
use crate::data::spec::{DataFormat, OnBadRecord};
use crate::fs_error::IoContext;
use serde_json::Value;
use std::io::{BufRead, BufReader};
use std::path::Path;

/// Read every example of a dataset into memory. Fails on the first malformed record unless the
/// dataset says `on_bad_record = "skip"`; fails when no example remains.
pub fn read_examples(ds: &ResolvedDataset, sink: Option<&dyn RejectSink>) -> Result<Vec<Example>, DataError> {
    let mut out = Vec::new();
    for_each_example(ds, sink, |e| {
        out.push(e);
        Ok::<_, DataError>(())
    })?;
    Ok(out)
}

/// Stream the examples of a dataset in file order, calling `f` for each. Memory stays bounded by
/// the largest record. Errors when the dataset yields no example at all.
pub fn for_each_example<E: From<DataError>>(
    ds: &ResolvedDataset,
    sink: Option<&dyn RejectSink>,
    mut f: impl FnMut(Example) -> Result<(), E>,
) -> Result<ReadStats, E> {
    let mut stats = ReadStats::default();
    for file in &ds.files {
        read_file(ds, file, sink, &mut stats, &mut f)?;
    }
    if stats.examples == 0 {
        let files = ds.files.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ");
        return Err(DataError::Empty {
            name: ds.name.clone(),
            files,
            skipped: stats.skipped_bad + stats.skipped_empty,
        }
        .into());
    }
    Ok(stats)
}

fn read_file<E: From<DataError>>(
    ds: &ResolvedDataset,
    path: &Path,
    sink: Option<&dyn RejectSink>,
    stats: &mut ReadStats,
    f: &mut impl FnMut(Example) -> Result<(), E>,
) -> Result<(), E> {
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("").to_ascii_lowercase();
    let fmt = ds.spec.format;
    let mut emit = |line: usize, raw: &[u8], res: Result<Example, Problem>| -> Result<(), E> {
        match res {
            Ok(e) => {
                stats.examples += 1;
                f(e)
            }
            Err(p) => {
                let file = display_path(path);
                if !p.empty && ds.spec.on_bad_record == OnBadRecord::Error {
                    return Err(DataError::BadRecord {
                        dataset: ds.name.clone(),
                        file,
                        line,
                        problem: p.msg,
                        format: fmt.as_str().to_string(),
                    }
                    .into());
                }
                if p.empty {
                    stats.skipped_empty += 1;
                    tracing::warn!("{file}:{line}: skipped: {}", p.msg);
                } else {
                    stats.skipped_bad += 1;
                    tracing::debug!("{file}:{line}: skipped bad record: {}", p.msg);
                }
                if let Some(sink) = sink {
                    write_reject(sink, &ds.name, &file, line, &p.msg, raw)
                        .ctx("recording a rejected record in", sink.location())
                        .map_err(DataError::from)?;
                }
                Ok(())
            }
        }
    };
    if ext == "parquet" {
        // Rows are numbered from 1 in messages, like lines.
        let rows = match super::parquet::read_parquet_records(path) {
            Ok(rows) => rows,
            Err(e) => return emit(0, b"", Err(bad(e.to_string()))),
        };
        for row in rows {
            match row {
                Ok((i, v)) => {
                    let raw = serde_json::to_vec(&v).unwrap_or_default();
                    emit(i + 1, &raw, convert(&v, &ds.spec))?;
                }
                Err(e) => {
                    // A decoding error leaves the reader in an unknown state: stop this file.
                    emit(e.row.map_or(0, |r| r + 1), b"", Err(bad(e.reason)))?;
                    break;
                }
            }
        }
        return Ok(());
    }
    let file = std::fs::File::open(path).ctx("opening", path).map_err(DataError::from)?;
    let mut reader = BufReader::with_capacity(1 << 20, file);
    let text_lines = ext == "txt" && fmt == DataFormat::Text;
    if !text_lines && starts_with_array(&mut reader).ctx("reading", path).map_err(DataError::from)? {
        // A JSON array: parse it whole (such files are small; JSONL is the streaming format).
        let mut bytes = Vec::new();
        std::io::Read::read_to_end(&mut reader, &mut bytes).ctx("reading", path).map_err(DataError::from)?;
        let body = strip_bom(&bytes);
        let records: Vec<Value> = match serde_json::from_slice(body) {
            Ok(v) => v,
            Err(e) => return emit(e.line(), body, Err(bad(format!("invalid JSON array: {e}")))),
        };
        for (i, rec) in records.into_iter().enumerate() {
            let raw = serde_json::to_vec(&rec).unwrap_or_default();
            emit(i + 1, &raw, convert(&rec, &ds.spec))?;
        }
        return Ok(());
    }
    let mut buf = Vec::new();
    let mut lineno = 0usize;
    loop {
        buf.clear();
        let n = reader.read_until(b'\n', &mut buf).ctx("reading", path).map_err(DataError::from)?;
        if n == 0 {
            break;
        }
        lineno += 1;
        let mut line: &[u8] = &buf;
        if lineno == 1 {
            line = strip_bom(line);
        }
        while let Some((&last, rest)) = line.split_last() {
            if last == b'\n' || last == b'\r' {
                line = rest;
            } else {
                break;
            }
        }
        if line.iter().all(|b| b.is_ascii_whitespace()) {
            continue;
        }
        let s = match std::str::from_utf8(line) {
            Ok(s) => s,
            Err(e) => {
                let msg = format!(
                    "invalid UTF-8 at byte offset {} of the line (re-encode the file as UTF-8)",
                    e.valid_up_to()
                );
                emit(lineno, line, Err(bad(msg)))?;
                continue;
            }
        };
        let res = if text_lines {
            Ok(Example::Text { text: s.to_string() })
        } else {
            match serde_json::from_str::<Value>(s) {
                Ok(v) => convert(&v, &ds.spec),
                Err(e) => Err(bad(format!("invalid JSON: {e}"))),
            }
        };
        emit(lineno, line, res)?;
    }
    Ok(())
}

/// A path as users want to see it in errors: relative to the working directory when inside it.
fn display_path(path: &Path) -> String {
    let rel = std::env::current_dir().ok().and_then(|cwd| path.strip_prefix(cwd).ok().map(Path::to_path_buf));
    rel.unwrap_or_else(|| path.to_path_buf()).display().to_string()
}

fn strip_bom(b: &[u8]) -> &[u8] {
    b.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(b)
}

/// Whether the first non-blank byte (after a BOM) is `[`, without consuming anything.
fn starts_with_array(r: &mut BufReader<std::fs::File>) -> std::io::Result<bool> {
    let buf = r.fill_buf()?;
    let b = strip_bom(buf);
    Ok(b.iter().find(|c| !c.is_ascii_whitespace()) == Some(&b'['))
}

/// Append one rejected record to the run's `rejects.jsonl` (the sink caps its size).
fn write_reject(
    sink: &dyn RejectSink,
    dataset: &str,
    file: &str,
    line: usize,
    reason: &str,
    raw: &[u8],
) -> std::io::Result<()> {
    sink.reject(dataset, Path::new(file), line, reason, raw)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::spec::DatasetSpec;
    use crate::data::{shared_data, ResolvedDataset};

    fn ds_for(path: &Path, format: DataFormat, skip: bool) -> ResolvedDataset {
        ResolvedDataset {
            name: "t".into(),
            spec: DatasetSpec {
                source: path.display().to_string(),
                format,
                columns: Default::default(),
                on_bad_record: if skip { OnBadRecord::Skip } else { OnBadRecord::Error },
                builtin: Default::default(),
            },
            files: vec![path.to_path_buf()],
            content_hash: String::new(),
        }
    }

    fn read(path: &Path, format: DataFormat) -> Result<(Vec<Example>, ReadStats), DataError> {
        let ds = ds_for(path, format, false);
        let mut v = Vec::new();
        let st = for_each_example(&ds, None, |e| {
            v.push(e);
            Ok::<_, DataError>(())
        })?;
        Ok((v, st))
    }

    fn read_skip(path: &Path, format: DataFormat, cols: &[(&str, &str)]) -> (Vec<Example>, ReadStats, Vec<Value>) {
        let tmp = tempfile::tempdir().unwrap();
        let sink = crate::runs::RunSink::create(tmp.path()).unwrap();
        let mut ds = ds_for(path, format, true);
        ds.spec.columns = cols.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect();
        let mut v = Vec::new();
        let st = for_each_example(&ds, Some(&sink as &dyn RejectSink), |e| {
            v.push(e);
            Ok::<_, DataError>(())
        })
        .unwrap_or_default();
        let rejects = std::fs::read_to_string(tmp.path().join("rejects.jsonl")).unwrap_or_default();
        let rejects = rejects.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        (v, st, rejects)
    }

    fn err_of(path: &Path, format: DataFormat) -> String {
        read(path, format).map(|_| ()).unwrap_err().to_string()
    }

    #[test]
    fn every_real_file_reads_in_its_format() {
        let Some(d) = shared_data() else { return };
        use DataFormat::*;
        // (file, format, examples, skipped_empty)
        let cases: &[(&str, DataFormat, usize, usize)] = &[
            ("medicalgpt/pretrain/fever.txt", Text, 985, 0),
            ("medicalgpt/pretrain/en_article_tail500.txt", Text, 426, 0),
            ("medicalgpt/sft/medical_sft_1K_format.jsonl", Sharegpt, 1000, 0),
            ("medicalgpt/sft/sharegpt_zh_1K_format.jsonl", Sharegpt, 999, 1),
            ("medicalgpt/sft/glaive_toolcall_zh_demo.jsonl", Sharegpt, 300, 0),
            ("medicalgpt/reward/dpo_zh_500.jsonl", Dpo, 500, 0),
            ("medicalgpt/reward/toolcall_dpo_zh_demo.jsonl", Dpo, 11, 0),
            ("medicalgpt/grpo/sample.jsonl", PromptAnswer, 32, 0),
            ("medicalgpt_history/reward/dpo_zh_500.jsonl", Dpo, 500, 0),
            ("medicalgpt_history/reward/test.json", Dpo, 100, 0),
            ("medicalgpt_history/reward/toolcall_dpo_zh_demo.json", Dpo, 11, 0),
            ("medicalgpt_history/sft/glaive_toolcall_zh_demo.json", Sharegpt, 300, 0),
            ("medicalgpt_history/finetune/Belle_open_source_1k.json", Alpaca, 1000, 0),
            ("medicalgpt_history/finetune/numina_cot_sharegpt_data_1k.jsonl", Sharegpt, 1000, 0),
            ("gsm8k/test.jsonl", PromptAnswer, 1319, 0),
            ("gsm8k/train_first1000.jsonl", PromptAnswer, 1000, 0),
            ("tinyshakespeare/input.txt", Text, 32777, 0),
            ("minimind_pr802/tiny_pretrain.jsonl", Text, 4, 0),
            ("minimind_pr802/tiny_sft.jsonl", Sharegpt, 3, 0),
            ("minimind_pr802/tiny_sft.jsonl", Openai, 3, 0),
            ("minimind_pr802/tiny_dpo.jsonl", Dpo, 2, 0),
        ];
        for (f, fmt, n, n_empty) in cases {
            let (ex, st) = read(&d.join(f), *fmt).unwrap_or_else(|e| panic!("{f}: {e}"));
            assert_eq!((ex.len(), st.skipped_empty), (*n, *n_empty), "{f}");
        }
        // JSONL inside a .txt, read with columns remapping.
        let (ex, st, _) = read_skip(
            &d.join("medicalgpt/rag/medical_corpus.txt"),
            PromptAnswer,
            &[("question", "问"), ("answer", "答")],
        );
        assert_eq!((ex.len(), st.skipped_bad), (87, 0));
        assert!(matches!(&ex[0], Example::PromptAnswer { prompt, final_answer: Some(a), .. }
            if prompt.contains("肛门病变") && a == "食管克罗恩病"));
    }

    #[test]
    fn real_file_shapes_are_normalised() {
        let Some(d) = shared_data() else { return };
        // JSON array and JSONL copies of the glaive tool-call data give identical examples.
        let (a, _) = read(&d.join("medicalgpt/sft/glaive_toolcall_zh_demo.jsonl"), DataFormat::Sharegpt).unwrap();
        let (b, _) =
            read(&d.join("medicalgpt_history/sft/glaive_toolcall_zh_demo.json"), DataFormat::Sharegpt).unwrap();
        assert_eq!(a, b);
        let with_call = a
            .iter()
            .find_map(|e| match e {
                Example::Chat { messages, tools } => messages
                    .iter()
                    .find(|m| m.tool_calls.is_some())
                    .map(|m| (m.clone(), tools.clone(), messages.iter().any(|m| m.role == "tool"))),
                _ => None,
            })
            .unwrap();
        assert!(with_call.0.tool_calls.unwrap()[0].get("arguments").unwrap().is_object());
        assert!(with_call.1.is_some() && with_call.2);

        // GSM8K: final answers normalised, commas removed.
        let (g, _) = read(&d.join("gsm8k/test.jsonl"), DataFormat::PromptAnswer).unwrap();
        assert!(matches!(&g[0], Example::PromptAnswer { final_answer: Some(a), .. } if a == "18"));
        let commas = g
            .iter()
            .filter(
                |e| matches!(e, Example::PromptAnswer { answer, .. } if answer.lines().last().unwrap().contains(',')),
            )
            .count();
        assert_eq!(commas, 14);
        assert!(g.iter().all(|e| matches!(e, Example::PromptAnswer { final_answer: Some(a), .. } if !a.contains(','))));
        // The eval's answer extractor agrees with the reader on every gold solution.
        for e in &g {
            let Example::PromptAnswer { answer, final_answer: Some(f), .. } = e else { unreachable!() };
            use crate::eval::answer::{extract_answer, normalize};
            assert_eq!(normalize(&extract_answer(answer)), normalize(f), "{answer}");
        }

        // DPO forms: string (with system prompt), legacy flat, message objects, conversation form.
        let (c, _) = read(&d.join("medicalgpt/reward/dpo_zh_500.jsonl"), DataFormat::Dpo).unwrap();
        let (f, _) = read(&d.join("medicalgpt_history/reward/dpo_zh_500.jsonl"), DataFormat::Dpo).unwrap();
        let sys = |v: &[Example]| {
            v.iter().filter(|e| matches!(e, Example::Preference { prompt, .. } if prompt[0].role == "system")).count()
        };
        assert_eq!((sys(&c), sys(&f)), (84, 84));
        let (m, _) = read(&d.join("medicalgpt_history/reward/toolcall_dpo_zh_demo.json"), DataFormat::Dpo).unwrap();
        let (s, _) = read(&d.join("medicalgpt/reward/toolcall_dpo_zh_demo.jsonl"), DataFormat::Dpo).unwrap();
        let conts = |v: &[Example]| {
            v.iter()
                .map(|e| match e {
                    Example::Preference { chosen, rejected, .. } => {
                        (chosen[0].content.clone(), rejected[0].content.clone())
                    }
                    _ => unreachable!(),
                })
                .collect::<Vec<_>>()
        };
        assert_eq!(conts(&m), conts(&s));
        let (t, _) = read(&d.join("minimind_pr802/tiny_dpo.jsonl"), DataFormat::Dpo).unwrap();
        match &t[1] {
            Example::Preference { prompt, chosen, rejected, .. } => {
                assert_eq!(prompt.len(), 1);
                assert_eq!(prompt[0].role, "user");
                assert_eq!((chosen.len(), rejected.len()), (1, 1));
            }
            e => panic!("{e:?}"),
        }
    }

    #[test]
    fn every_bad_file_has_its_expected_behaviour() {
        let Some(d) = shared_data() else { return };
        let b = |f: &str| d.join("bad").join(f);
        use DataFormat::*;

        let e = err_of(&b("truncated_last_line.jsonl"), Sharegpt);
        assert!(e.contains("truncated_last_line.jsonl:4: invalid JSON"), "{e}");
        assert!(e.contains("on_bad_record = \"skip\""), "{e}");
        let (ex, st, rj) = read_skip(&b("truncated_last_line.jsonl"), Sharegpt, &[]);
        assert_eq!((ex.len(), st.skipped_bad, rj.len()), (3, 1, 1));
        assert_eq!(rj[0]["line"], 4);

        let e = err_of(&b("non_utf8.jsonl"), Sharegpt);
        assert!(e.contains("non_utf8.jsonl:2: invalid UTF-8 at byte offset 43"), "{e}");
        let (ex, st, rj) = read_skip(&b("non_utf8.jsonl"), Sharegpt, &[]);
        assert_eq!((ex.len(), st.skipped_bad), (1, 2));
        assert!(rj[1]["reason"].as_str().unwrap().contains("byte offset 110"), "{rj:?}");
        let e = err_of(&b("non_utf8.txt"), Text);
        assert!(e.contains("non_utf8.txt:2: invalid UTF-8"), "{e}");
        let (ex, st, _) = read_skip(&b("non_utf8.txt"), Text, &[]);
        assert_eq!((ex.len(), st.skipped_bad), (2, 1));

        let e = err_of(&b("missing_field_sft.jsonl"), Sharegpt);
        assert!(e.contains(":2: missing field 'conversations' (format sharegpt)"), "{e}");
        let (ex, _, rj) = read_skip(&b("missing_field_sft.jsonl"), Sharegpt, &[]);
        assert_eq!(ex.len(), 1);
        let reasons: Vec<_> = rj.iter().map(|r| r["reason"].as_str().unwrap().to_string()).collect();
        assert!(reasons[0].contains("missing field 'conversations'"));
        assert!(reasons[1].contains("has no 'value'"), "{reasons:?}");
        assert!(reasons[2].contains("has no 'from'"), "{reasons:?}");
        assert!(reasons[3].contains("missing field"), "{reasons:?}");

        let (ex, _, rj) = read_skip(&b("missing_field_dpo.jsonl"), Dpo, &[]);
        assert_eq!(ex.len(), 1);
        let reasons: Vec<_> = rj.iter().map(|r| r["reason"].as_str().unwrap().to_string()).collect();
        assert!(reasons[0].contains("'rejected'") && reasons[1].contains("'chosen'"), "{reasons:?}");
        assert!(reasons[2].contains("the prompt"), "{reasons:?}");

        // GSM8K: a missing answer key is malformed; a missing or non-numeric `####` is unparsable.
        let e = err_of(&b("missing_field_gsm8k.jsonl"), PromptAnswer);
        assert!(e.contains(":3: missing field 'answer'"), "{e}");
        let (ex, _, _) = read_skip(&b("missing_field_gsm8k.jsonl"), PromptAnswer, &[]);
        let finals: Vec<_> = ex
            .iter()
            .map(|e| match e {
                Example::PromptAnswer { final_answer, .. } => final_answer.clone(),
                _ => unreachable!(),
            })
            .collect();
        assert!(finals[0].is_some());
        assert_eq!(&finals[1..], &[None, None]);

        // Nothing to train on: skipped even in error mode, never an example with no loss tokens.
        let (ex, st) = read(&b("empty_conversations.jsonl"), Sharegpt).unwrap();
        assert_eq!((ex.len(), st.skipped_empty), (2, 4));

        let huge = read(&b("huge_record_1mb.jsonl"), Sharegpt).unwrap().0;
        assert_eq!(huge.len(), 2);

        for f in ["empty.jsonl", "empty.txt", "blank_lines_only.jsonl"] {
            let e = err_of(&b(f), if f.ends_with("txt") { Text } else { Sharegpt });
            assert!(e.contains("no records"), "{f}: {e}");
        }

        let e = err_of(&b("dpo_chosen_equals_rejected.jsonl"), Dpo);
        assert!(e.contains(":2: 'chosen' equals 'rejected'"), "{e}");
        let (ex, _, rj) = read_skip(&b("dpo_chosen_equals_rejected.jsonl"), Dpo, &[]);
        assert_eq!(ex.len(), 1);
        assert!(rj[1]["reason"].as_str().unwrap().contains("'chosen' is empty"), "{rj:?}");
        let (ex, _, rj) = read_skip(&b("dpo_chosen_equals_rejected_conv.jsonl"), Dpo, &[]);
        assert_eq!(ex.len(), 1);
        assert!(rj[0]["reason"].as_str().unwrap().contains("equals"), "{rj:?}");
        assert!(rj[1]["reason"].as_str().unwrap().contains("no assistant turn"), "{rj:?}");

        let (ex, _) = read(&b("bom_crlf.jsonl"), Sharegpt).unwrap();
        assert_eq!(ex.len(), 3);
        assert!(matches!(&ex[0], Example::Chat { messages, .. } if !messages[0].content.ends_with('\r')));

        // One schema per file, chosen by `format`: other shapes are bad records.
        let e = err_of(&b("mixed_schema.jsonl"), Sharegpt);
        assert!(e.contains(":3: missing field 'conversations'"), "{e}");
        let (ex, st, _) = read_skip(&b("mixed_schema.jsonl"), Sharegpt, &[]);
        assert_eq!((ex.len(), st.skipped_bad), (2, 2));
        let (ex, st, _) = read_skip(&b("mixed_schema.jsonl"), Text, &[]);
        assert_eq!((ex.len(), st.skipped_bad), (1, 3));

        let (ex, _, rj) = read_skip(&b("wrong_types.jsonl"), Sharegpt, &[]);
        assert_eq!(ex.len(), 1);
        let reasons: Vec<_> = rj.iter().map(|r| r["reason"].as_str().unwrap().to_string()).collect();
        assert_eq!(reasons.len(), 6, "{reasons:?}");
        assert!(reasons[0].contains("must be a list of messages, got a string"), "{reasons:?}");
        assert!(reasons[1].contains("must be a string, got"), "{reasons:?}");
        assert!(reasons[3].contains("must be a JSON object, got a list"), "{reasons:?}");
        assert!(reasons[4].contains("got a string"), "{reasons:?}");
        assert!(reasons[5].contains("invalid JSON"), "{reasons:?}");

        let (ex, _, rj) = read_skip(&b("bad_roles.jsonl"), Sharegpt, &[]);
        let reasons: Vec<_> = rj.iter().map(|r| r["reason"].as_str().unwrap().to_string()).collect();
        assert!(reasons[0].contains("unknown role 'narrator'"), "{reasons:?}");
        assert!(reasons[1].contains("assistant turn with no user turn"), "{reasons:?}");
        // Two user turns in a row are accepted (only assistant spans are trained).
        assert_eq!((ex.len(), reasons.len()), (2, 2));
    }
}

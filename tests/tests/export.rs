//! `loupe export` on a planted store: the Parquet files and Neuronpedia batches, read back here
//! with the parquet crate and flate2 + serde_json, must match `tests/fixtures/export/fixture.json`,
//! which `make_fixture.py` made from an export of the same store with pyarrow (its docstring says
//! how to regenerate it). An existing export is refused without `--overwrite`; bad input gets one
//! clear error.

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::Path;

use arrow_array::cast::AsArray;
use arrow_array::types::{Float32Type, UInt32Type, UInt64Type};
use arrow_array::{Array, RecordBatch};
use arrow_schema::{DataType, SchemaRef};
use flate2::read::GzDecoder;
use loupe_store::explanations::{explanations_schema, scores_schema};
use loupe_store::export::{ExportOptions, ExportSummary, export};
use loupe_store::{Explanation, Explanations, ModelInfo, Provenance, Score, Store};
use loupe_tests::{assert_one_error, fixture, loupe, snapshot, stderr};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use serde_json::{Map, Value, json};

const DICT: &str = "toy-sae";
const MODEL: &str = "loupe-test-model";

fn hash(n: u128) -> String {
    format!("{n:064x}")
}

fn explanation(feature_id: u32, explainer: &str, text: Result<&str, &str>) -> Explanation {
    let llm = explainer == "delphi";
    Explanation {
        feature_id,
        explainer: explainer.to_string(),
        explanation: text.ok().map(String::from),
        failure: text.err().map(String::from),
        provenance: Provenance {
            model: if llm { "qwen3-4b-instruct" } else { "offline" }.to_string(),
            prompt_hash: hash(u128::from(feature_id) * 1_000_003 + u128::from(llm)),
            temperature: if llm { 0.7 } else { 0.0 },
            max_tokens: if llm { 256 } else { 0 },
            example_rows: vec![u64::from(feature_id) * 100, u64::from(feature_id) * 100 + 17, 1 << 40],
            prompt_tokens: if llm { 812 + u64::from(feature_id) } else { 0 },
            completion_tokens: if llm { 23 } else { 0 },
        },
    }
}

/// `[score, balanced_accuracy, f1, auroc, pearson]`, then `n_examples` and the failure.
fn score(
    feature_id: u32,
    explainer: &str,
    scorer: &str,
    v: [Option<f32>; 5],
    n: u32,
    failure: Option<&str>,
) -> Score {
    Score {
        feature_id,
        explainer: explainer.to_string(),
        scorer: scorer.to_string(),
        score: v[0],
        balanced_accuracy: v[1],
        f1: v[2],
        auroc: v[3],
        pearson: v[4],
        n_examples: n,
        failure: failure.map(String::from),
        provenance: Provenance {
            model: "qwen3-4b-instruct".to_string(),
            prompt_hash: hash((u128::from(feature_id) << 64) | scorer.len() as u128),
            temperature: 0.0,
            max_tokens: 8,
            example_rows: vec![u64::from(feature_id), 5, 9],
            prompt_tokens: 1500,
            completion_tokens: u64::from(n),
        },
    }
}

/// Explanations (one failed, unicode, quotes and a newline) and several scorers per feature (one
/// failed, one without AUROC), committed out of order.
fn planted() -> Explanations {
    Explanations {
        explanations: vec![
            explanation(7, "delphi", Ok("closing brackets `)` and \"]\"\nat the end of code lines")),
            explanation(0, "offline", Ok("tokens « 1», « 2», « 3»; promotes « 4»")),
            explanation(0, "delphi", Ok("numbers and dates")),
            explanation(5, "delphi", Err("HTTP 503 from the LLM server after 3 retries")),
            explanation(3, "delphi", Ok("Japanese kana (ひらがな, カタカナ) — and “curly” quotes ✓")),
        ],
        scores: vec![
            score(0, "delphi", "fuzzing", [Some(0.71), Some(0.71), Some(0.69), None, None], 40, None),
            score(0, "delphi", "detection", [Some(0.83), Some(0.83), Some(0.8), Some(0.91), None], 40, None),
            score(0, "delphi", "simulation", [Some(0.42), None, None, None, Some(0.42)], 640, None),
            score(0, "offline", "detection", [Some(0.6), Some(0.6), Some(0.55), Some(0.64), None], 40, None),
            score(3, "delphi", "detection", [Some(0.95), Some(0.95), Some(0.94), Some(0.99), None], 40, None),
            score(3, "delphi", "embedding", [Some(0.88), None, None, Some(0.88), None], 40, None),
            score(3, "delphi", "fuzzing", [None; 5], 0, Some("no label in the answer")),
            score(5, "delphi", "detection", [None; 5], 0, Some("no explanation to score")),
            score(7, "delphi", "detection", [Some(0.5), Some(0.5), Some(0.0), Some(0.5), None], 40, None),
        ],
    }
}

/// A store at `dir` holding the planted explanations of `DICT`, with model `MODEL`.
fn plant(dir: &Path) -> Store {
    let store = Store::create(dir).unwrap();
    let model = ModelInfo {
        name: MODEL.to_string(),
        architecture: "gpt2".to_string(),
        path: "/nonexistent/model.safetensors".to_string(),
        sha256: "0".repeat(64),
    };
    store.set_model(model, None).unwrap();
    store.commit_explanations(DICT, &planted(), None).unwrap();
    store
}

/// Floats rounded to 6 decimals, as the fixture script does (`round(x, 6)`).
fn rounded(v: Value) -> Value {
    match v {
        Value::Number(n) if n.is_f64() => {
            json!(format!("{:.6}", n.as_f64().unwrap()).parse::<f64>().unwrap())
        }
        Value::Array(a) => Value::Array(a.into_iter().map(rounded).collect()),
        Value::Object(o) => Value::Object(o.into_iter().map(|(k, v)| (k, rounded(v))).collect()),
        v => v,
    }
}

/// One cell of an exported column as JSON (the types the store tables use).
fn cell(col: &dyn Array, i: usize) -> Value {
    if col.is_null(i) {
        return Value::Null;
    }
    match col.data_type() {
        DataType::UInt32 => json!(col.as_primitive::<UInt32Type>().value(i)),
        DataType::UInt64 => json!(col.as_primitive::<UInt64Type>().value(i)),
        DataType::Float32 => rounded(json!(f64::from(col.as_primitive::<Float32Type>().value(i)))),
        DataType::Utf8 => json!(col.as_string::<i32>().value(i)),
        DataType::List(_) => {
            let list = col.as_list::<i32>().value(i);
            Value::Array((0..list.len()).map(|j| cell(&list, j)).collect())
        }
        other => panic!("unexpected column type {other}"),
    }
}

/// A Parquet file as `{"columns", "rows"}`, rows sorted by `keys`; checks its schema is `schema`.
fn parquet_table(path: &Path, keys: &[&str], schema: SchemaRef) -> Value {
    let reader = ParquetRecordBatchReaderBuilder::try_new(File::open(path).unwrap()).unwrap();
    assert_eq!(reader.schema().fields(), schema.fields(), "{} has the store table's schema", path.display());
    let batches: Vec<RecordBatch> = reader.build().unwrap().collect::<Result<_, _>>().unwrap();
    let mut rows = Vec::new();
    for batch in &batches {
        for i in 0..batch.num_rows() {
            let row: Map<String, Value> = schema
                .fields()
                .iter()
                .map(|f| (f.name().clone(), cell(batch.column_by_name(f.name()).unwrap(), i)))
                .collect();
            rows.push(row);
        }
    }
    let key = |row: &Map<String, Value>| -> Vec<(u64, String)> {
        keys.iter()
            .map(|k| (row[*k].as_u64().unwrap_or(0), row[*k].as_str().unwrap_or("").to_string()))
            .collect()
    };
    rows.sort_by_key(key);
    let columns: Vec<&String> = schema.fields().iter().map(|f| f.name()).collect();
    json!({"columns": columns, "rows": rows})
}

/// The Neuronpedia batches as `[{"file", "records"}]`, in file-name order.
fn neuronpedia(dir: &Path) -> Value {
    let mut names: Vec<String> =
        std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    names.sort();
    let batches: Vec<Value> = names
        .iter()
        .map(|name| {
            assert!(name.starts_with("batch-") && name.ends_with(".jsonl.gz"), "unexpected file {name}");
            let lines = BufReader::new(GzDecoder::new(File::open(dir.join(name)).unwrap())).lines();
            let records: Vec<Value> =
                lines.map(|l| rounded(serde_json::from_str(&l.unwrap()).unwrap())).collect();
            json!({"file": name, "records": records})
        })
        .collect();
    Value::Array(batches)
}

/// An export folder in the fixture's canonical form (see `make_fixture.py`).
fn canonical(out: &Path) -> Value {
    json!({
        "explanations": parquet_table(
            &out.join("explanations.parquet"),
            &["feature_id", "explainer"],
            explanations_schema()
        ),
        "scores": parquet_table(&out.join("scores.parquet"), &["feature_id", "explainer", "scorer"], scores_schema()),
        "neuronpedia": neuronpedia(&out.join("neuronpedia")),
    })
}

fn committed_fixture() -> Value {
    let path = fixture("export/fixture.json");
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
}

fn opts(batch_size: usize) -> ExportOptions {
    ExportOptions { batch_size, ..ExportOptions::default() }
}

#[test]
fn library_export_matches_the_fixture() {
    let dir = tempfile::tempdir().unwrap();
    let store = plant(&dir.path().join("store"));
    let out = dir.path().join("out");
    let summary = export(&store, DICT, &out, &opts(3)).unwrap();

    assert_eq!(canonical(&out), committed_fixture());
    assert_eq!(
        (summary.explanations, summary.failed, summary.scores, summary.records),
        (5, 1, 9, 4),
        "{summary:?}"
    );
    assert_eq!((summary.model_id.as_str(), summary.layer.as_str()), (MODEL, DICT));
    let files = [
        "explanations.parquet",
        "scores.parquet",
        "neuronpedia/batch-00000.jsonl.gz",
        "neuronpedia/batch-00001.jsonl.gz",
        "export.json",
    ];
    assert_eq!(summary.files, files);
    let on_disk: Vec<String> = snapshot(&out)
        .into_keys()
        .map(|p| p.strip_prefix(&out).unwrap().to_string_lossy().into_owned())
        .collect();
    let mut expected: Vec<String> = files.iter().map(|f| f.to_string()).collect();
    expected.sort();
    assert_eq!(on_disk, expected, "exactly the listed files, no temporary ones");

    let saved: ExportSummary =
        serde_json::from_str(&std::fs::read_to_string(out.join("export.json")).unwrap()).unwrap();
    assert_eq!(saved, summary);
    let entry = store.explanations_entry(DICT).unwrap();
    assert_eq!(saved.source, entry.files, "export.json names the store tables with their checksums");
    assert_eq!(Path::new(&saved.store), std::path::absolute(store.root()).unwrap());
}

#[test]
fn cli_export_matches_the_fixture_and_overwrites_only_when_asked() {
    let dir = tempfile::tempdir().unwrap();
    let store_dir = dir.path().join("store");
    drop(plant(&store_dir));
    let out = dir.path().join("out");
    let (s, o) = (store_dir.to_str().unwrap(), out.to_str().unwrap());
    let base = ["export", "--store", s, "--dictionary", DICT, "--out", o];
    let args = [&base[..], &["--batch-size", "3"]].concat();

    let run = loupe(&args);
    assert!(run.status.success(), "{}", stderr(&run));
    let stdout = String::from_utf8(run.stdout).unwrap();
    assert_eq!(stdout.lines().count(), 1, "{stdout}");
    assert!(
        stdout.contains("5 explanations (1 failed)") && stdout.contains("4 Neuronpedia records in 2 batches")
    );
    assert_eq!(canonical(&out), committed_fixture());

    // A second export into the same folder is refused and changes nothing.
    let before = snapshot(&out);
    assert_one_error(&store_dir, &args, "--overwrite");
    assert_eq!(snapshot(&out), before);

    // With --overwrite it replaces the export, removing the batches it no longer writes.
    let run = loupe(&[&base[..], &["--overwrite"]].concat());
    assert!(run.status.success(), "{}", stderr(&run));
    let mut expected = committed_fixture();
    let records: Vec<Value> = expected["neuronpedia"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|b| b["records"].as_array().unwrap().clone())
        .collect();
    expected["neuronpedia"] = json!([{"file": "batch-00000.jsonl.gz", "records": records}]);
    assert_eq!(canonical(&out), expected);
}

#[test]
fn options_override_the_record_identity() {
    let dir = tempfile::tempdir().unwrap();
    let store = plant(&dir.path().join("store"));
    let out = dir.path().join("out");
    let opts = ExportOptions {
        model_id: Some("gpt2-small".to_string()),
        layer: Some("6-res-jb".to_string()),
        ..ExportOptions::default()
    };
    let summary = export(&store, DICT, &out, &opts).unwrap();
    assert_eq!(summary.files.len(), 4, "one batch: {:?}", summary.files);
    let records = &neuronpedia(&out.join("neuronpedia"))[0]["records"];
    for r in records.as_array().unwrap() {
        assert_eq!((r["modelId"].as_str(), r["layer"].as_str()), (Some("gpt2-small"), Some("6-res-jb")));
    }
}

#[test]
fn bad_input_is_one_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let store_dir = dir.path().join("store");
    let store = plant(&store_dir);
    store.commit_explanations("empty-sae", &Explanations::default(), None).unwrap();
    let out = dir.path().join("out");
    let err = |dict: &str, opts: &ExportOptions| export(&store, dict, &out, opts).unwrap_err().to_string();

    let e = err("nope", &opts(8));
    assert!(e.contains("no dictionary nope"), "{e}");
    let e = err("empty-sae", &opts(8));
    assert!(e.contains("empty-sae") && e.contains("no explanations"), "{e}");
    let e = err(DICT, &opts(0));
    assert!(e.contains("batch size"), "{e}");
    assert!(!out.exists(), "a refused export writes nothing");

    let bare_dir = dir.path().join("bare");
    let bare = Store::create(&bare_dir).unwrap();
    bare.commit_explanations(DICT, &planted(), None).unwrap();
    let e = export(&bare, DICT, &out, &opts(8)).unwrap_err().to_string();
    assert!(e.contains("--model-id"), "{e}");
    drop((store, bare));

    let (s, o) = (store_dir.to_str().unwrap(), out.to_str().unwrap());
    assert_one_error(&store_dir, &["export", "--store", s, "--dictionary", "nope", "--out", o], "nope");
    let zero = ["export", "--store", s, "--dictionary", DICT, "--out", o, "--batch-size", "0"];
    assert_one_error(&store_dir, &zero, "batch size");
    assert!(!out.exists(), "a refused export writes nothing");
}

/// Not a check: plants the store at `$LOUPE_EXPORT_STORE` to regenerate the fixture (see
/// `tests/fixtures/export/make_fixture.py`).
#[test]
#[ignore = "writes the fixture's store; run by hand with LOUPE_EXPORT_STORE set"]
fn plant_fixture_store() {
    let dir = std::env::var_os("LOUPE_EXPORT_STORE").expect("set LOUPE_EXPORT_STORE to a new folder");
    plant(Path::new(&dir));
}

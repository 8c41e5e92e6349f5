//! `sluice plan` as a user runs it: the real binary, its output and exit status.

use std::process::{Command, Output};

fn sluice(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(args)
        .output()
        .expect("run sluice")
}

#[test]
fn json_plan_for_llama_8b_on_h100() {
    let out = sluice(&[
        "plan",
        "--model",
        "llama-3.1-8b",
        "--gpu",
        "h100-sxm-80gb",
        "--json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(v["kv_bytes_per_token"], 131072);
    let tokens = v["kv_token_capacity"].as_u64().expect("capacity");
    assert!((420_000..=440_000).contains(&tokens), "{tokens}");
}

#[test]
fn table_with_classes() {
    let out = sluice(&[
        "plan",
        "--model",
        "llama-2-7b",
        "--gpu",
        "a100",
        "--class",
        "chat:512/2048:256/1024",
    ]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("524288 (512 KiB)"), "{text}");
    // A p95 sequence of 3,072 tokens fits Llama-2's 4K context.
    assert!(text.contains("chat") && !text.contains("exceeds"), "{text}");

    let out = sluice(&[
        "plan",
        "--model",
        "llama-2-7b",
        "--gpu",
        "a100",
        "--class",
        "rag:2048/4000:256/512",
    ]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("p95 exceeds context"), "{text}");
}

fn assert_one_line_error(out: &Output, needle: &str) {
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(needle), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn bad_model_missing_file_and_bad_toml_fail_cleanly() {
    assert_one_line_error(
        &sluice(&["plan", "--model", "gpt-9", "--gpu", "h100"]),
        "unknown model `gpt-9`",
    );
    assert_one_line_error(
        &sluice(&["plan", "--model", "/no/such/model.toml", "--gpu", "h100"]),
        "cannot read /no/such/model.toml",
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "name = \"x\"\nnum_layers = [\n").expect("write");
    let bad = bad.display().to_string();
    assert_one_line_error(&sluice(&["plan", "--model", &bad, "--gpu", "h100"]), &bad);
    assert_one_line_error(
        &sluice(&["plan", "--model", "llama-3.1-70b", "--gpu", "l4"]),
        "does not fit",
    );
}

//! The official `openai` Python client works through the proxy, streaming
//! and not. Skipped (with a message saying why) when Python or the package
//! is missing; `./dev setup` installs it.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod proxy_common;

use std::process::Command;

use proxy_common::*;

const SCRIPT: &str = r#"
import sys, openai
client = openai.OpenAI(base_url=sys.argv[1] + "/v1", api_key="unused", max_retries=0, timeout=30)
model = sys.argv[2]
r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Say hello"}], max_tokens=5)
assert r.choices[0].message.content, r
assert r.usage.completion_tokens == 5, r.usage
chunks = list(client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Count"}], max_tokens=4, stream=True))
text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
assert text, chunks
chunks = list(client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Count"}], max_tokens=4, stream=True, stream_options={"include_usage": True}))
assert chunks[-1].usage.completion_tokens == 4, chunks[-1]
c = client.completions.create(model=model, prompt="Once upon", max_tokens=3)
assert c.choices[0].text, c
try:
    client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "x"}])
    raise SystemExit("expected NotFoundError")
except openai.NotFoundError as e:
    assert e.status_code == 404 and "no-such-model" in str(e), e
print("openai-client-ok")
"#;

#[test]
fn official_openai_python_client_works_through_the_proxy() {
    let probe = Command::new("python3")
        .args(["-c", "import openai"])
        .output();
    match probe {
        Ok(o) if o.status.success() => {}
        _ => {
            eprintln!(
                "SKIPPED: python3 with the `openai` package is not available (run ./dev setup)"
            );
            return;
        }
    }
    let sims = sims(2, &[]);
    let p = Proxy::over(&sims, &["--model", MODEL]);
    let out = Command::new("python3")
        .args(["-c", SCRIPT, &format!("http://{}", p.api.addr), MODEL])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("openai-client-ok"),
        "stdout: {stdout}\nstderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

//! The dashboard in a real headless Chromium while traffic flows: the numbers follow the SSE
//! stream, the form changes the rate, a dropped stream shows "disconnected" and reconnects.
//! `UPDATE_SCREENSHOT=1` also saves the screenshot as `docs/dashboard.png`.

mod support;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use support::browser::Browser;
use support::{chat_body, client, require_tool, LimitStyle, MockUpstream, Sidecar};

#[tokio::test(flavor = "multi_thread")]
async fn the_dashboard_follows_the_stream_and_its_form_changes_the_rate() {
    if !require_tool("chromium") {
        return;
    }
    let mock = MockUpstream::start(None, LimitStyle::Nvidia).await;
    let mut sidecar = Sidecar::start(&mock.url(), "rate_rpm: 120\nrequest_timeout: 20");

    // Traffic: four clients, bounded in count, until the test says stop.
    let stop = Arc::new(AtomicBool::new(false));
    let traffic: Vec<_> = (0..4)
        .map(|i| {
            let (url, stop) = (sidecar.url("/v1/chat/completions"), stop.clone());
            tokio::spawn(async move {
                let http = client();
                for _ in 0..200 {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let _ = http
                        .post(&url)
                        .header("x-client-id", format!("agent-{i}"))
                        .json(&chat_body())
                        .send()
                        .await;
                }
            })
        })
        .collect();

    let mut browser = Browser::launch().await;
    browser.navigate(&sidecar.admin("/api/dashboard")).await;
    let state = browser
        .wait_text("conn-state", Duration::from_secs(15), |t| t == "live")
        .await;
    assert_eq!(state, "live");
    let first: u64 = browser
        .wait_text("total", Duration::from_secs(10), |t| {
            t.parse::<u64>().is_ok_and(|n| n > 0)
        })
        .await
        .parse()
        .unwrap();
    let later: u64 = browser
        .wait_text("total", Duration::from_secs(10), |t| {
            t.parse::<u64>().is_ok_and(|n| n > first)
        })
        .await
        .parse()
        .unwrap();
    assert!(
        later > first,
        "the total did not move with the stream ({first} -> {later})"
    );
    assert_eq!(browser.text("base-rpm").await, "120.0");
    let queued: u64 = browser.text("queue-normal").await.parse().unwrap();
    assert!(queued <= 4);

    // The form changes the rate.
    browser
        .eval("document.getElementById('rate_rpm').value = '300'; document.getElementById('apply').click(); true")
        .await;
    let result = browser
        .wait_text("form-result", Duration::from_secs(10), |t| {
            t.starts_with("applied")
        })
        .await;
    assert!(result.contains("rate_rpm"), "form answer: {result:?}");
    let shown = browser
        .wait_text("base-rpm", Duration::from_secs(5), |t| t == "300.0")
        .await;
    assert_eq!(shown, "300.0");
    let status: serde_json::Value = sidecar.status().await;
    assert_eq!(status["token_bucket"]["rate_rpm"], 300.0);

    tokio::time::sleep(Duration::from_millis(2500)).await;
    let png = browser.screenshot().await;
    assert!(png.starts_with(b"\x89PNG"), "a PNG screenshot");
    std::fs::write(sidecar.dir.path().join("dashboard.png"), &png).unwrap();
    if std::env::var_os("UPDATE_SCREENSHOT").is_some() {
        std::fs::create_dir_all("docs").unwrap();
        std::fs::write("docs/dashboard.png", &png).unwrap();
    }
    stop.store(true, Ordering::SeqCst);
    for t in traffic {
        let _ = t.await;
    }

    // The stream drops: the page says so, and comes back by itself when the sidecar does.
    sidecar.kill();
    let state = browser
        .wait_text("conn-state", Duration::from_secs(15), |t| {
            t == "disconnected"
        })
        .await;
    assert_eq!(state, "disconnected");
    sidecar.restart();
    let state = browser
        .wait_text("conn-state", Duration::from_secs(20), |t| t == "live")
        .await;
    assert_eq!(state, "live", "the dashboard reconnects by itself");
}

/// A page on another origin tries what a malicious site would: change the live config and
/// reload it with `no-cors` fetches that need no preflight. Nothing changes and nothing is
/// saved; the dashboard's own form (same origin, JSON) still works, as the test above shows.
#[tokio::test(flavor = "multi_thread")]
async fn a_page_on_another_origin_cannot_change_the_config() {
    if !require_tool("chromium") {
        return;
    }
    let mock = MockUpstream::start(None, LimitStyle::Nvidia).await;
    let sidecar = Sidecar::start(&mock.url(), "rate_rpm: 120\nstate_dir: {dir}/state");
    let target = sidecar.admin("");
    let page = format!(
        r#"<!doctype html><html><body><p id="done">running</p><script>
        (async () => {{
          const tries = [
            fetch("{target}/api/admin/config", {{method: "POST", mode: "no-cors",
              headers: {{"Content-Type": "text/plain"}},
              body: '{{"fallback_enabled_passthrough":true,"rate_rpm":99999}}'}}),
            fetch("{target}/api/admin/reload", {{method: "POST", mode: "no-cors"}}),
            fetch("{target}/api/admin/config", {{method: "POST",
              headers: {{"Content-Type": "application/json"}},
              body: '{{"rate_rpm":99999}}'}}),
          ];
          for (const t of tries) {{ try {{ await t; }} catch (e) {{}} }}
          document.getElementById("done").textContent = "done";
        }})();
        </script></body></html>"#
    );
    // The attacker's page, served from another port (another origin).
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let attacker = format!(
        "http://127.0.0.1:{}/",
        listener.local_addr().unwrap().port()
    );
    let server = tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        for _ in 0..20 {
            let Ok((mut stream, _)) = listener.accept().await else {
                return;
            };
            let mut buf = [0u8; 4096];
            let _ = stream.read(&mut buf).await;
            let answer = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{page}",
                page.len()
            );
            let _ = stream.write_all(answer.as_bytes()).await;
        }
    });
    let mut browser = Browser::launch().await;
    browser.navigate(&attacker).await;
    let done = browser
        .wait_text("done", Duration::from_secs(15), |t| t == "done")
        .await;
    assert_eq!(done, "done");
    let status = sidecar.status().await;
    assert_eq!(status["token_bucket"]["rate_rpm"], 120.0, "{status}");
    let config = sidecar.admin_json("/api/admin/config").await;
    assert_eq!(
        config["config"]["fallback_enabled_passthrough"], false,
        "{config}"
    );
    assert!(
        !sidecar.dir.path().join("state/overrides.yaml").exists(),
        "an override was saved"
    );
    server.abort();
}

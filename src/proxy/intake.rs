//! Each request decided once: what the sidecar makes of a request from its head, its body and
//! the route table, before it waits for anything.
//!
//! Both doors take requests in through `Intake::new`: the connection loop when it parks a
//! request (`front::park`), and `request_filter` for every other one. A parked request's
//! intake goes with it to `request_filter`, which takes it as it is when the route table is the
//! one it was made with (`front::Parked::intake_for`), and makes it again after a reload. The
//! body's JSON is read once, by `Intake::read_body`, at whichever door holds the body first.
//!
//! What a request is counted as on its way in is here too (`Arrival`): counted once, at the
//! door that takes it.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Instant;

use pingora::http::RequestHeader;
use prometheus::IntGauge;

use crate::admission::AdmissionGate;
use crate::app::{App, Route, RouteTable};
use crate::limiter::{model_index, Ask, ModelSettings, Priority, TokenAsk};

pub use super::body::BodyPlan;
use super::classify::{self, Asker};
use super::prompt::{self, BodyFields};
use super::respond::Answer;

/// What the sidecar decided about a request from its head (and, once read, its body).
pub struct Intake {
    pub route: Arc<Route>,
    /// Who asks: client, weight, priority, deadline.
    pub who: Asker,
    /// How it goes upstream: for a token, or without one.
    pub mode: Mode,
    /// How its body is read.
    pub body: BodyPlan,
    /// The client sends its body only once it is told `100 Continue`: the request is admitted
    /// first, then its body is read.
    pub continues: bool,
    /// What its body asks for; `None` until the body is read (or known to stream).
    pub asks: Option<Asks>,
}

/// How a request goes upstream.
pub enum Mode {
    /// A passthrough route: forwarded without a token.
    Passthrough,
    /// The route's shared quota is out of reach and the operator chose to fail open.
    FailOpen,
    /// For a token from the route's bucket.
    Gated(Arc<AdmissionGate>),
}

/// What a request's body asks for, as far as the limiter is concerned.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Asks {
    /// The configured model limit (`models`) it falls under.
    pub model: Option<usize>,
    /// The model it names (the body's `"model"`), whose limits are learned.
    pub model_id: Option<Arc<str>>,
    /// `"stream": true`: the answer comes as server-sent events.
    pub stream: bool,
    /// What it will cost in tokens, as far as its body tells (see `prompt`).
    pub tokens: Option<TokenAsk>,
}

/// Longest model id whose limits are learned; a longer one (no real model has one) goes by its
/// key's rate alone, so that clients cannot make the sidecar keep arbitrary text.
const MAX_MODEL_ID: usize = 256;

impl Asks {
    /// What `body` asks for, by the configured `models`: decoded once, here. A body that is
    /// not a JSON object, or whose fields have other types than the API gives them, asks for
    /// no model in particular and is counted by its size; one that is not in hand (`None`:
    /// streamed) is counted by `streamed`, its declared length or the held-body limit.
    pub fn read(body: Option<&[u8]>, models: &[ModelSettings], streamed: Option<TokenAsk>) -> Asks {
        let decoded: Option<BodyFields> = body.and_then(|body| serde_json::from_slice(body).ok());
        let tokens = match (body, &decoded) {
            (Some(body), Some(fields)) => Some(fields.ask(body.len())),
            (Some(body), None) => Some(prompt::ask_of_unread(body.len())),
            (None, _) => streamed,
        };
        let fields = decoded.unwrap_or_default();
        let model_id: Option<Arc<str>> = fields
            .model
            .as_deref()
            .filter(|m| !m.is_empty() && m.len() <= MAX_MODEL_ID)
            .map(Arc::from);
        Asks {
            model: model_id.as_deref().and_then(|id| model_index(models, id)),
            model_id,
            stream: fields.stream == Some(true),
            tokens,
        }
    }
}

impl Intake {
    /// The intake of the request `head` from `peer`, arrived at `started`, by the routes of
    /// `table`; `Err` is the answer that refuses it: what this proxy must not do
    /// (`classify::refusal`), or a client key it does not know (`classify::who_asks`).
    pub fn new(
        head: &RequestHeader,
        peer: Option<IpAddr>,
        started: Instant,
        table: &RouteTable,
    ) -> Result<Intake, Answer> {
        if let Some(answer) = classify::refusal(head, table) {
            return Err(answer);
        }
        let settings = &table.settings;
        let route = table.route_for(head.uri.path()).clone();
        let who = classify::who_asks(head, peer, settings, started)?;
        let mode = match &route.gate {
            None => Mode::Passthrough,
            Some(gate) if settings.fallback_passthrough && gate.is_degraded() => Mode::FailOpen,
            Some(gate) => Mode::Gated(gate.clone()),
        };
        let body = BodyPlan::of(head, settings.max_replay_body);
        // A body that streams through is never read: what it asks is known now, its cost by
        // its declared length, or the held-body limit.
        let asks = matches!(body, BodyPlan::Stream(_)).then(|| {
            let declared = super::body::declared_length(head).map(|l| l as u64);
            let guess = prompt::ask_of_streamed(declared, settings.max_replay_body);
            Asks::read(None, &settings.models, Some(guess))
        });
        Ok(Intake {
            route,
            who,
            mode,
            body,
            continues: classify::expects_continue(head),
            asks,
        })
    }

    /// Reads what the body asks for, once: `body` is the whole body when it is in hand.
    pub fn read_body(&mut self, body: Option<&[u8]>, models: &[ModelSettings]) {
        if self.asks.is_none() {
            // Not in hand although planned to be held (the budget was full): its declared
            // length is the plan's.
            let unread = match self.body {
                BodyPlan::Hold(len) => Some(prompt::ask_of_streamed(Some(len as u64), len)),
                BodyPlan::Empty | BodyPlan::Stream(_) => None,
            };
            self.asks = Some(Asks::read(body, models, unread));
        }
    }

    /// What it asks for; nothing in particular before its body is read.
    pub fn asks(&self) -> &Asks {
        static NOTHING: Asks = Asks {
            model: None,
            model_id: None,
            stream: false,
            tokens: None,
        };
        self.asks.as_ref().unwrap_or(&NOTHING)
    }

    /// A streaming request on a route that keeps waiting streams alive
    /// (`routes[].keepalive_while_queued`, see `keepalive`); never one that waits for
    /// `100 Continue`, whose body (and so whether it streams) comes only once it is admitted.
    pub fn keeps_alive(&self) -> bool {
        self.route.settings.keepalive_while_queued
            && !self.continues
            && matches!(self.mode, Mode::Gated(_))
            && self.asks().stream
    }

    /// What it asks the limiter for.
    pub fn ask(&self) -> Ask {
        let asks = self.asks();
        Ask {
            client: self.who.client.clone(),
            priority: self.who.priority,
            deadline: self.who.deadline,
            weight: self.who.weight,
            model: asks.model,
            model_id: asks.model_id.clone(),
            tokens: asks.tokens,
        }
    }

    pub fn priority(&self) -> Priority {
        self.who.priority
    }
}

/// A request counted as arrived (per client, for `/status` and the dashboard) and as in flight
/// (`inflight_requests`, which a stopping sidecar waits on) for as long as it lives: the gauge
/// goes down when it is dropped, whichever way the request ended, so it cannot stick. Made
/// once per request, by the door that takes it in.
pub struct Arrival(IntGauge);

impl Arrival {
    pub fn count(app: &App, client: &Arc<str>, at: Instant) -> Arrival {
        app.activity.arrived(client, at);
        app.metrics.inflight.inc();
        Arrival(app.metrics.inflight.clone())
    }
}

impl Drop for Arrival {
    fn drop(&mut self) {
        self.0.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config;
    use crate::proxy::body::NotHeld;

    const CONFIG: &str = r#"
upstream_url: http://127.0.0.1:9
rate_rpm: 40
models:
  'meta/*': {rate_rpm: 10}
routes:
  - path_prefix: /v1/models
    passthrough: true
  - path_prefix: /v1/stream
    rate_rpm: 40
    keepalive_while_queued: true
"#;

    fn table(yaml: &str) -> RouteTable {
        let settings = config::load_str(yaml).expect("test config");
        RouteTable::build(Arc::new(settings), None)
    }

    fn head(bytes: &[u8]) -> RequestHeader {
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut req = httparse::Request::new(&mut headers);
        assert!(req.parse(bytes).unwrap().is_complete());
        let mut head =
            RequestHeader::build_no_case(req.method.unwrap(), req.path.unwrap().as_bytes(), None)
                .unwrap();
        for h in req.headers.iter() {
            head.append_header(h.name.to_string(), h.value).unwrap();
        }
        head
    }

    fn take(bytes: &[u8], table: &RouteTable) -> Result<Intake, Answer> {
        let started = Instant::now();
        Intake::new(&head(bytes), Some([10, 0, 0, 7].into()), started, table)
    }

    /// The route, the mode and the body plan of each request, or the status that refuses it.
    #[test]
    fn each_request_is_decided_from_its_head_and_the_table() {
        let table = table(CONFIG);
        type Row = (
            &'static [u8],
            Result<(&'static str, &'static str, BodyPlan), u16>,
        );
        let hold = BodyPlan::Hold;
        let rows: &[Row] = &[
            (
                b"POST /v1/chat/completions HTTP/1.1\r\nContent-Length: 12\r\n\r\n",
                Ok(("default", "gated", hold(12))),
            ),
            (
                b"GET /v1/models HTTP/1.1\r\n\r\n",
                Ok(("/v1/models", "passthrough", BodyPlan::Empty)),
            ),
            (
                b"POST /v1/stream HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
                Ok(("/v1/stream", "gated", BodyPlan::Stream(NotHeld::Chunked))),
            ),
            (
                b"POST /x HTTP/1.1\r\nContent-Length: 99999999999\r\n\r\n",
                Ok(("default", "gated", BodyPlan::Stream(NotHeld::TooLarge))),
            ),
            (
                b"POST /x HTTP/1.1\r\nContent-Length: 0\r\n\r\n",
                Ok(("default", "gated", BodyPlan::Empty)),
            ),
            (b"POST /x HTTP/1.1\r\nContent-Length: +5\r\n\r\n", Err(400)),
            (
                b"POST /x HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\n",
                Err(400),
            ),
            (
                b"POST /x HTTP/1.1\r\nContent-Length: 5, 5\r\n\r\n",
                Err(400),
            ),
            (
                b"GET /v1/models/../chat/completions HTTP/1.1\r\n\r\n",
                Err(400),
            ),
            (b"CONNECT a:443 HTTP/1.1\r\n\r\n", Err(405)),
            (b"GET / HTTP/1.1\r\nHost: evil.example\r\n\r\n", Err(403)),
            (b"GET http://evil.example/ HTTP/1.1\r\n\r\n", Err(403)),
            (
                b"GET http://127.0.0.1:9/v1/models HTTP/1.1\r\n\r\n",
                Ok(("/v1/models", "passthrough", BodyPlan::Empty)),
            ),
        ];
        for (bytes, want) in rows {
            let got = take(bytes, &table).map(|i| {
                let mode = match i.mode {
                    Mode::Passthrough => "passthrough",
                    Mode::FailOpen => "fail_open",
                    Mode::Gated(_) => "gated",
                };
                (i.route.name().to_string(), mode, i.body)
            });
            let got = got.map_err(|answer| answer.status);
            let want = want.map(|(r, m, b)| (r.to_string(), m, b));
            assert_eq!(got, want, "{}", String::from_utf8_lossy(bytes));
        }
    }

    #[test]
    fn who_asks_is_read_from_the_head() {
        let table = table(CONFIG);
        let intake = take(
            b"POST /x HTTP/1.1\r\nX-Client-Id: agent-7\r\nX-Priority: high\r\nX-Request-Timeout: 2\r\n\r\n",
            &table,
        )
        .unwrap();
        assert_eq!(&*intake.who.client, "agent-7");
        assert_eq!(intake.priority(), Priority::High);
        let budget = intake.who.deadline.duration_since(Instant::now());
        assert!(budget.as_secs_f64() <= 2.0, "{budget:?}");
        let by_peer = take(b"GET /x HTTP/1.1\r\n\r\n", &table).unwrap();
        assert_eq!(&*by_peer.who.client, "10.0.0.7");
        assert_eq!(by_peer.priority(), Priority::Normal);
    }

    #[test]
    fn client_keys_refuse_what_they_do_not_know() {
        let dir = std::env::temp_dir().join(format!("intake-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let key = dir.join("team-a");
        std::fs::write(&key, "team-a-secret-key-0001\n").unwrap();
        let table = table(&format!(
            "{CONFIG}clients:\n  - {{id: team-a, key_file: {}, max_priority: normal}}\n",
            key.display()
        ));
        std::fs::remove_dir_all(&dir).unwrap();
        let missing = take(b"GET /x HTTP/1.1\r\n\r\n", &table).map(|_| ());
        assert_eq!(missing.map_err(|a| a.status), Err(401));
        let wrong = take(
            b"GET /x HTTP/1.1\r\nAuthorization: Bearer nope\r\n\r\n",
            &table,
        );
        assert_eq!(wrong.map(|_| ()).map_err(|a| a.status), Err(401));
        let known = take(
            b"GET /x HTTP/1.1\r\nAuthorization: Bearer team-a-secret-key-0001\r\nX-Priority: high\r\n\r\n",
            &table,
        )
        .unwrap();
        assert_eq!(&*known.who.client, "team-a");
        assert_eq!(known.priority(), Priority::Normal, "capped by its key");
    }

    #[test]
    fn expect_continue_is_admitted_first_and_never_kept_alive() {
        let table = table(CONFIG);
        let mut intake = take(
            b"POST /v1/stream HTTP/1.1\r\nContent-Length: 30\r\nExpect: 100-continue\r\n\r\n",
            &table,
        )
        .unwrap();
        assert!(intake.continues);
        intake.read_body(
            Some(br#"{"model":"m","stream":true}"#),
            &table.settings.models,
        );
        assert!(!intake.keeps_alive());
        let mut streaming = take(
            b"POST /v1/stream HTTP/1.1\r\nContent-Length: 30\r\n\r\n",
            &table,
        )
        .unwrap();
        assert!(
            !streaming.keeps_alive(),
            "not before its body says it streams"
        );
        streaming.read_body(
            Some(br#"{"model":"m","stream":true}"#),
            &table.settings.models,
        );
        assert!(streaming.keeps_alive());
        let mut elsewhere =
            take(b"POST /x HTTP/1.1\r\nContent-Length: 30\r\n\r\n", &table).unwrap();
        elsewhere.read_body(
            Some(br#"{"model":"m","stream":true}"#),
            &table.settings.models,
        );
        assert!(
            !elsewhere.keeps_alive(),
            "only on a keepalive_while_queued route"
        );
    }

    #[test]
    fn every_body_has_a_cost_and_one_without_a_body_none() {
        let table = table(CONFIG);
        let models = &table.settings.models;
        let cost = |head: &[u8], body: Option<&[u8]>| {
            let mut intake = take(head, &table).unwrap();
            intake.read_body(body, models);
            intake.ask().tokens
        };
        let get = cost(b"GET /x HTTP/1.1\r\n\r\n", None);
        assert_eq!(get, None, "nothing to count");
        let chat = cost(
            b"POST /x HTTP/1.1\r\nContent-Length: 60\r\n\r\n",
            Some(br#"{"messages":[{"role":"user","content":"abcdefgh"}],"max_tokens":9}"#),
        )
        .unwrap();
        assert_eq!(
            (chat.prompt, chat.completion, chat.known),
            (3 + 4, Some(9), true)
        );
        let junk = cost(
            b"POST /x HTTP/1.1\r\nContent-Length: 9\r\n\r\n",
            Some(b"not json!"),
        )
        .unwrap();
        assert_eq!((junk.prompt, junk.known), (3, true));
        let streamed = cost(
            b"POST /x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
            None,
        )
        .unwrap();
        assert!(!streamed.known && streamed.prompt > 0, "{streamed:?}");
        let too_big = cost(
            b"POST /x HTTP/1.1\r\nContent-Length: 30000000\r\n\r\n",
            None,
        )
        .unwrap();
        assert_eq!((too_big.prompt, too_big.known), (10_000_000, false));
    }

    #[test]
    fn the_body_is_read_once_and_only_json_names_a_model() {
        let table = table(CONFIG);
        let models = &table.settings.models;
        let asks = |body: &[u8]| Asks {
            tokens: None,
            ..Asks::read(Some(body), models, None)
        };
        let meta = asks(
            br#"{"messages":[{"role":"user","content":"hi"}],"model":"meta/x","stream":true}"#,
        );
        assert_eq!(meta.model_id.as_deref(), Some("meta/x"));
        assert_eq!(meta.model, Some(0), "falls under models[0]");
        assert!(meta.stream);
        let other = asks(br#"{"model":"mistral/y"}"#);
        assert_eq!(
            (other.model_id.as_deref(), other.model),
            (Some("mistral/y"), None)
        );
        for nothing in [
            &br#"{"messages":[]}"#[..],
            br#"{"model":7}"#,
            br#"{"stream":"yes"}"#,
            b"not json",
            b"",
            br#"{"model":""}"#,
        ] {
            assert_eq!(
                asks(nothing),
                Asks::default(),
                "{}",
                String::from_utf8_lossy(nothing)
            );
        }
        let long = format!(r#"{{"model":"{}"}}"#, "m".repeat(MAX_MODEL_ID + 1));
        assert_eq!(asks(long.as_bytes()).model_id, None);
        assert_eq!(Asks::read(None, models, None), Asks::default());
        let mut intake = take(b"POST /x HTTP/1.1\r\nContent-Length: 20\r\n\r\n", &table).unwrap();
        intake.read_body(Some(br#"{"model":"meta/a"}"#), models);
        intake.read_body(Some(br#"{"model":"meta/b"}"#), models);
        assert_eq!(
            intake.ask().model_id.as_deref(),
            Some("meta/a"),
            "read once"
        );
    }
}

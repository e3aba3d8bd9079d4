//! Waiting for a verdict while the client may leave: a client that hangs up while it waits
//! gives up its place (and its token, if one came meanwhile).

use std::time::Duration;

use pingora_core::prelude::HttpPeer;
use pingora_core::{Error, ErrorType, Result};
use pingora_proxy::Session;

use super::{keepalive, RequestCtx};
use crate::admission::{Ticket, Verdict};

/// Waits for a ticket's verdict while watching the client; `None` means the client left.
/// `watch_client` is only safe once the request body has been read completely.
pub(super) async fn wait_for_token(
    session: &mut Session,
    ticket: &mut Ticket,
    watch_client: bool,
) -> Option<Verdict> {
    if let Some(verdict) = ticket.immediate() {
        return Some(verdict);
    }
    if !watch_client {
        return Some(ticket.verdict().await);
    }
    tokio::select! {
        verdict = ticket.verdict() => Some(verdict),
        read = session.downstream_session.read_body_or_idle(true) => match read {
            Err(e) if matches!(e.etype(), ErrorType::ConnectionClosed | ErrorType::ReadError) => None,
            // Anything else (pipelined bytes): stop watching, keep waiting.
            _ => Some(ticket.verdict().await),
        },
    }
}

/// `wait_for_token`, keeping a waiting stream alive when the request is one (see `keepalive`).
pub(super) async fn wait_verdict(
    session: &mut Session,
    ticket: &mut Ticket,
    watch_client: bool,
    ctx: &mut RequestCtx,
) -> Result<Option<Verdict>> {
    if ctx.keepalive {
        keepalive::wait_keeping_alive(session, ticket, watch_client, &mut ctx.keepalive_started)
            .await
    } else {
        Ok(wait_for_token(session, ticket, watch_client).await)
    }
}

/// Sleeps for `wait` unless the client leaves first; false when it left.
pub(super) async fn wait_watching_client(session: &mut Session, wait: Duration) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(wait) => true,
        read = session.downstream_session.read_body_or_idle(true) => !matches!(
            read,
            Err(e) if matches!(e.etype(), ErrorType::ConnectionClosed | ErrorType::ReadError)
        ),
    }
}

pub(super) fn client_left(context: &'static str) -> Result<Box<HttpPeer>> {
    Error::e_explain(ErrorType::ConnectionClosed, context).map_err(|e| e.into_down())
}

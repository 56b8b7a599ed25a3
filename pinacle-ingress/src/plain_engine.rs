//! The plain engine: the connection gate's [`PlainRequests`] hook. A request whose framing
//! qualifies ([`PlainRequest::parse`]: a bodiless HTTP/1.1 `GET`/`HEAD`, nothing odd) is judged
//! by [`crate::policy`] like any other, then answered or exchanged here, without Pingora's loop
//! (see [`crate::plain`] for why). Everything else is declined untouched, before judging.

use async_trait::async_trait;
use tokio::io::AsyncWriteExt;

use crate::access::{Ending, Engine, Record};
use crate::connections::{HeaderDeadline, PlainRequests, Served};
use crate::plain::{self, Exchange, Failure, PlainRequest};
use crate::policy::{self, ConnInfo, RequestView, Verdict};
use crate::proxy::Ingress;
use crate::responses::{Answer, UpstreamFailure};
use crate::upstream::{self, Target};

#[async_trait]
impl PlainRequests for Ingress {
    async fn serve(&self, conn: &mut HeaderDeadline, stopping: bool) -> Served {
        let config = self.config();
        if !config.plain_path {
            return Served::Declined;
        }
        let Some(request) = PlainRequest::parse(conn.pending(), config.max_request_header_bytes)
        else {
            return Served::Declined;
        };
        let view = RequestView {
            method: &request.method,
            uri: &request.uri,
            headers: &request.headers,
            host: &request.host,
            head_bytes: conn.pending().len(),
            http2: false,
            malformed: None,
        };
        let info = ConnInfo {
            client: conn.client_addr(),
            tls: conn.is_tls(),
        };
        // Served here from now on, whatever the verdict: a request is judged once.
        let judgement = self.decide(&view, info).await;
        let (mut record, in_flight) = (judgement.record, judgement.in_flight);
        record.engine = Engine::Plain;
        let plan = match judgement.verdict {
            Verdict::Forward(plan) => plan,
            Verdict::Answer(answer) => {
                conn.take_pending_head();
                // The request had no body and asked for keep-alive: the connection stays
                // open as on Pingora's path, unless the ingress is stopping.
                let status = self
                    .answer_plain(conn, &mut record, &answer, stopping)
                    .await;
                let error = if status == 0 { "client_gone" } else { "" };
                drop(in_flight);
                self.finish_plain(conn, &record, (status, 0, error));
                return if status == 0 || stopping {
                    Served::Close
                } else {
                    Served::KeepAlive
                };
            }
        };
        let group = match &plan.target {
            Target::Pod { pod_id, .. } => upstream::group_key(pod_id),
            Target::Dashboard { .. } => 0,
        };
        let mut head = Vec::with_capacity(conn.pending().len() + 256);
        request.upstream_head(
            conn.pending(),
            plan.upstream_target.as_deref(),
            &plan.edits,
            &mut head,
        );
        conn.take_pending_head();
        let timeouts = plan.timeouts();
        record.upstream_started = Some(std::time::Instant::now());
        let exchange = Exchange {
            addr: plan.target.addr(),
            group,
            head: &head,
            head_request: request.method == http::Method::HEAD,
            strip: plan.strip_response_headers(),
            request_id: &record.request_id,
            close_client: stopping,
            add: &plan.add_response,
            cors_origin: plan.cors_origin.as_ref(),
            pod_router: matches!(plan.target, Target::Pod { .. }),
            location_prefix: plan.location_prefix.as_deref(),
            confine: plan.confine(),
            connect_timeout: timeouts.upstream_connect,
            read_timeout: timeouts.upstream_read,
            write_timeout: timeouts.client_read,
        };
        let exchanged = plain::exchange(conn, &self.pool, &exchange);
        let Some(mut done) = self.unless_revoked(exchanged, plan.grant.as_ref()).await else {
            // Access was revoked while the response streamed: it ends here, unfinished.
            drop(in_flight);
            self.metrics.revoked("stream");
            self.finish_plain(conn, &record, (record.status, 0, "access_revoked"));
            return Served::Close;
        };
        record.upstream_duration = done.upstream;
        record.status = done.status;
        record.connect_failed = done.connect_failed;
        if let Some(failure) = done.failure.filter(|f| f.answerable()) {
            let answer = match failure {
                Failure::PortNotAnswering { timed_out } => Answer::PortNotAnswering { timed_out },
                Failure::TimedOut => Answer::upstream(UpstreamFailure::TimedOut),
                _ => Answer::upstream(UpstreamFailure::Refused),
            };
            done.status = self.answer_plain(conn, &mut record, &answer, true).await;
        }
        let error = done.failure.map_or("", Failure::as_str);
        drop(in_flight);
        self.finish_plain(conn, &record, (done.status, done.body_bytes, error));
        if done.keep_client {
            Served::KeepAlive
        } else {
            Served::Close
        }
    }
}

/// How long a response may run before it counts as long-lived (a stream: SSE, a long poll, a
/// large download) and is registered for revocation. Short responses never touch the registry.
const LONG_LIVED: std::time::Duration = std::time::Duration::from_secs(1);

impl Ingress {
    /// Runs `exchanged`; one still running after [`LONG_LIVED`] is registered under `grant` and
    /// dropped (`None`) if access is revoked before it ends.
    async fn unless_revoked<F: std::future::Future>(
        &self,
        exchanged: F,
        grant: Option<&std::sync::Arc<crate::revocation::Grant>>,
    ) -> Option<F::Output> {
        let Some(grant) = grant else {
            return Some(exchanged.await);
        };
        tokio::pin!(exchanged);
        tokio::select! {
            biased;
            done = &mut exchanged => return Some(done),
            () = tokio::time::sleep(LONG_LIVED) => {}
        }
        let mut registration = self.revocations.register(grant.clone());
        tokio::select! {
            biased;
            done = &mut exchanged => Some(done),
            () = registration.revoked() => None,
        }
    }

    /// Ends a request the plain engine served: counts and logs it with its
    /// `(status, body bytes sent, error)`.
    fn finish_plain(
        &self,
        conn: &mut HeaderDeadline,
        record: &Record,
        (status, bytes_out, error): (u16, u64, &str),
    ) {
        conn.request_done();
        self.metrics.plain_request();
        record.finish(
            &self.metrics,
            &Ending {
                status,
                bytes_out,
                error,
                ..Ending::default()
            },
        );
    }

    /// Writes one of our answers, with `connection: close` when `close`; its status, or 0 when
    /// the client is gone.
    async fn answer_plain(
        &self,
        conn: &mut HeaderDeadline,
        record: &mut Record,
        answer: &Answer,
        close: bool,
    ) -> u16 {
        let config = self.config();
        let reply = answer.reply_for(&policy::page(&config, record));
        record.answer = Some(answer.name());
        let mut bytes = reply.http1_bytes(answer.name(), &record.request_id, close);
        if record.method == http::Method::HEAD {
            bytes.truncate(bytes.len().saturating_sub(reply.body.len()));
        }
        let written = tokio::time::timeout(config.timeouts.client_read, async {
            conn.write_all(&bytes).await?;
            conn.flush().await
        })
        .await;
        if matches!(written, Ok(Ok(()))) {
            reply.status
        } else {
            0
        }
    }
}

//! WebSocket load for `benches/load/run.sh`: an echo server (the upstream), an echo load
//! (messages/s and round-trip percentiles over N connections), and a holder of N idle
//! connections (memory per idle WebSocket). Every mode is bounded in time.
//!
//! ```text
//! pinacle-wsload serve ADDR
//! pinacle-wsload echo URL HOST COOKIE CONNECTIONS SECONDS     -> one JSON line
//! pinacle-wsload hold URL HOST COOKIE CONNECTIONS SECONDS     -> "ready N" once all are open
//! ```

#![allow(clippy::print_stdout)] // printing results is this tool's job

use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

type Error = Box<dyn std::error::Error + Send + Sync>;

fn main() -> Result<(), Error> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    match args.first().map(String::as_str) {
        Some("serve") => runtime.block_on(serve(arg(&args, 1)?)),
        Some("echo") => runtime.block_on(echo(Target::from_args(&args)?)),
        Some("hold") => runtime.block_on(hold(Target::from_args(&args)?)),
        _ => Err(
            "usage: pinacle-wsload serve ADDR | echo|hold URL HOST COOKIE CONNECTIONS SECONDS"
                .into(),
        ),
    }
}

fn arg(args: &[String], i: usize) -> Result<&str, Error> {
    args.get(i)
        .map(String::as_str)
        .ok_or_else(|| format!("missing argument {i}").into())
}

struct Target {
    url: String,
    host: String,
    cookie: String,
    connections: usize,
    duration: Duration,
}

impl Target {
    fn from_args(args: &[String]) -> Result<Self, Error> {
        Ok(Self {
            url: arg(args, 1)?.to_owned(),
            host: arg(args, 2)?.to_owned(),
            cookie: arg(args, 3)?.to_owned(),
            connections: arg(args, 4)?.parse()?,
            duration: Duration::from_secs(arg(args, 5)?.parse()?),
        })
    }

    async fn connect(
        &self,
    ) -> Result<
        tokio_tungstenite::WebSocketStream<
            tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
        >,
        Error,
    > {
        let mut request = self.url.as_str().into_client_request()?;
        request.headers_mut().insert("host", self.host.parse()?);
        if !self.cookie.is_empty() {
            request.headers_mut().insert("cookie", self.cookie.parse()?);
        }
        let (ws, _) = tokio::time::timeout(
            Duration::from_secs(10),
            tokio_tungstenite::connect_async(request),
        )
        .await??;
        Ok(ws)
    }
}

async fn serve(addr: &str) -> Result<(), Error> {
    let listener = TcpListener::bind(addr).await?;
    loop {
        let (stream, _) = listener.accept().await?;
        tokio::spawn(async move {
            let Ok(mut ws) = tokio_tungstenite::accept_async(stream).await else {
                return;
            };
            while let Some(Ok(msg)) = ws.next().await {
                if msg.is_close() {
                    break;
                }
                if (msg.is_text() || msg.is_binary()) && ws.send(msg).await.is_err() {
                    break;
                }
            }
        });
    }
}

/// Each connection sends a 64-byte message and waits for its echo, in a loop, until the time
/// is up. Prints messages/s and round-trip percentiles (microseconds).
async fn echo(target: Target) -> Result<(), Error> {
    let mut sockets = Vec::with_capacity(target.connections);
    for _ in 0..target.connections {
        sockets.push(target.connect().await?);
    }
    let deadline = Instant::now() + target.duration;
    let started = Instant::now();
    let tasks: Vec<_> = sockets
        .into_iter()
        .map(|mut ws| {
            tokio::spawn(async move {
                let payload = "x".repeat(64);
                let mut rtts: Vec<u32> = Vec::new();
                while Instant::now() < deadline {
                    let sent = Instant::now();
                    if ws.send(Message::text(payload.clone())).await.is_err() {
                        break;
                    }
                    match tokio::time::timeout(Duration::from_secs(5), ws.next()).await {
                        Ok(Some(Ok(_))) => {
                            rtts.push(u32::try_from(sent.elapsed().as_micros()).unwrap_or(u32::MAX))
                        }
                        _ => break,
                    }
                }
                let _ = ws.close(None).await;
                rtts
            })
        })
        .collect();
    let mut all = Vec::new();
    for task in tasks {
        all.extend(task.await?);
    }
    let elapsed = started.elapsed().as_secs_f64();
    all.sort_unstable();
    let pct = |p: f64| {
        all.get(((all.len() as f64 * p) as usize).min(all.len().saturating_sub(1)))
            .copied()
            .unwrap_or(0)
    };
    println!(
        "{{\"messages\":{},\"seconds\":{elapsed:.3},\"per_second\":{:.0},\"p50_us\":{},\"p99_us\":{}}}",
        all.len(),
        all.len() as f64 / elapsed,
        pct(0.50),
        pct(0.99)
    );
    Ok(())
}

/// Opens the connections, says `ready N`, and keeps them open (idle) for the duration.
async fn hold(target: Target) -> Result<(), Error> {
    let mut sockets = Vec::with_capacity(target.connections);
    for _ in 0..target.connections {
        sockets.push(target.connect().await?);
    }
    println!("ready {}", sockets.len());
    tokio::time::sleep(target.duration).await;
    for mut ws in sockets {
        let _ = ws.close(None).await;
    }
    Ok(())
}

//! The agent's local socket for the CNI plugin: one JSON request line per
//! connection, answered with one JSON line (see [`crate::protocol`]). A
//! malformed or oversized request is answered with `Failed` naming what was
//! wrong; a client that does not finish its line in time is dropped.

use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::core::Event;
use crate::protocol::{AgentRequest, AgentResponse, MAX_LINE, decode};

/// How long a plugin may take to send its request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves plugin connections until `stop`; each request goes to the agent
/// as an [`Event::Plugin`].
pub(crate) async fn serve(
    listener: UnixListener,
    events: mpsc::Sender<Event>,
    stop: CancellationToken,
    tasks: TaskTracker,
) {
    loop {
        let stream = tokio::select! {
            () = stop.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(err) => {
                    tracing::warn!("CNI plugin socket: accept: {err}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let events = events.clone();
        tasks.spawn(async move {
            if let Err(err) = answer(stream, &events).await {
                tracing::debug!("CNI plugin connection: {err}");
            }
        });
    }
}

async fn answer(stream: UnixStream, events: &mpsc::Sender<Event>) -> std::io::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut line = Vec::new();
    let mut reader = BufReader::new(read.take(MAX_LINE as u64 + 1));
    let response =
        match tokio::time::timeout(REQUEST_TIMEOUT, reader.read_until(b'\n', &mut line)).await {
            Err(_) => return Ok(()),
            Ok(result) => {
                result?;
                match decode::<AgentRequest>(&line, "request from the CNI plugin") {
                    Err(message) => AgentResponse::Failed { message },
                    Ok(request) => {
                        let (reply, answer) = oneshot::channel();
                        if events.send(Event::Plugin(request, reply)).await.is_err() {
                            AgentResponse::Unavailable {
                                message: "the node agent is stopping".into(),
                            }
                        } else {
                            answer.await.unwrap_or_else(|_| AgentResponse::Unavailable {
                                message: "the node agent is stopping".into(),
                            })
                        }
                    }
                }
            }
        };
    let mut out = serde_json::to_vec(&response).map_err(std::io::Error::other)?;
    out.push(b'\n');
    write.write_all(&out).await
}

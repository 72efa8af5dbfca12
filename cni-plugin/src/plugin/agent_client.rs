//! The plugin's side of the agent's socket: one request, one answer, within
//! the configured timeout, with plain blocking I/O (a plugin call is one
//! short-lived process: no runtime).

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use crate::protocol::{AgentRequest, AgentResponse, MAX_LINE, decode};

/// Asks the agent at `socket`; `Err` says why it could not be asked or
/// answered (the caller turns it into "try again later").
pub(crate) fn ask(
    socket: &Path,
    timeout: Duration,
    request: &AgentRequest,
) -> Result<AgentResponse, String> {
    let context = |what: &str, err: std::io::Error| {
        format!("node agent at {}: {what}: {err}", socket.display())
    };
    let mut stream = UnixStream::connect(socket).map_err(|err| context("connect", err))?;
    stream
        .set_read_timeout(Some(timeout))
        .and_then(|()| stream.set_write_timeout(Some(timeout)))
        .map_err(|err| context("set timeout", err))?;
    let mut line = serde_json::to_vec(request).map_err(|err| err.to_string())?;
    line.push(b'\n');
    stream
        .write_all(&line)
        .map_err(|err| context("send", err))?;
    let mut answer = Vec::new();
    BufReader::new(Read::take(stream, MAX_LINE as u64 + 1))
        .read_until(b'\n', &mut answer)
        .map_err(|err| context("no answer", err))?;
    if answer.last() != Some(&b'\n') {
        return Err(format!(
            "node agent at {}: the answer ended early",
            socket.display()
        ));
    }
    decode(&answer, "answer from the node agent")
}

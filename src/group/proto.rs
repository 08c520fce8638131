//! The control protocol on a group's socket (`/run/snap/groups/NAME/control.sock`).
//!
//! One request per connection: the client writes one JSON object and a
//! newline (then may shut down its side), the supervisor answers with one
//! JSON object and a newline and closes. Replies are
//! `{"ok": true, "result": …}` or `{"ok": false, "error": "…"}`, so a
//! client written in any language needs nothing but a unix socket and a
//! JSON parser. Requests:
//!
//! * `{"cmd": "ps"}`: the group (name, supervisor, cgroup, members,
//!   checkpoints, …); see `supervisor::Shared::ps`.
//! * `{"cmd": "dump", "dir": "/abs/dir" | null, "compress": false}`: a
//!   checkpoint now, incremental against the last one; the result is the
//!   dump's JSON summary.
//! * `{"cmd": "recover"}`: kill the group and restore its newest good
//!   checkpoint under the supervisor; the result describes the recovery.
//!
//! Only root and the supervisor's own user may talk to it (SO_PEERCRED):
//! a dump writes wherever `dir` says, with the supervisor's rights.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

/// Largest request accepted (a request is a few hundred bytes).
const MAX_REQUEST: u64 = 64 << 10;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "cmd", rename_all = "kebab-case")]
pub enum Request {
    Ps,
    Dump {
        /// Absolute image directory; `None`: the next one under the images root.
        #[serde(default)]
        dir: Option<PathBuf>,
        #[serde(default)]
        compress: bool,
    },
    /// Kill the group and restore its last good checkpoint now.
    Recover,
}

/// Send `req` to the supervisor listening on `sock`, wait for the reply
/// (`timeout`: `None` waits as long as the supervisor works, for dumps) and
/// return its result, or the supervisor's error as an error.
pub fn request(sock: &Path, req: &Request, timeout: Option<Duration>) -> Result<serde_json::Value> {
    let mut s = UnixStream::connect(sock).with_context(|| format!("connecting to {}", sock.display()))?;
    s.set_read_timeout(timeout).context("setting a read timeout")?;
    s.set_write_timeout(Some(Duration::from_secs(10))).context("setting a write timeout")?;
    let mut line = serde_json::to_vec(req)?;
    line.push(b'\n');
    s.write_all(&line).with_context(|| format!("sending to {}", sock.display()))?;
    let _ = s.shutdown(std::net::Shutdown::Write);
    let mut buf = String::new();
    s.read_to_string(&mut buf).with_context(|| format!("reading the reply from {}", sock.display()))?;
    if buf.trim().is_empty() {
        bail!("{} closed the connection without a reply (the supervisor stopped?)", sock.display());
    }
    let v: serde_json::Value =
        serde_json::from_str(buf.trim()).with_context(|| format!("reply from {}: {:?}", sock.display(), buf.trim()))?;
    if v["ok"] == true {
        Ok(v.get("result").cloned().unwrap_or(serde_json::Value::Null))
    } else {
        bail!("{}", v["error"].as_str().unwrap_or("the supervisor gave no reason"))
    }
}

/// Read one request from a client.
pub fn read_request(s: &UnixStream) -> Result<Request> {
    s.set_read_timeout(Some(Duration::from_secs(10))).context("setting a read timeout")?;
    let mut line = String::new();
    BufReader::new(s.take(MAX_REQUEST)).read_line(&mut line).context("reading the request")?;
    serde_json::from_str(line.trim()).with_context(|| format!("bad request {:?}", line.trim()))
}

/// Write the reply to a request.
pub fn write_reply(mut s: &UnixStream, r: std::result::Result<serde_json::Value, String>) -> Result<()> {
    let v = match r {
        Ok(result) => serde_json::json!({ "ok": true, "result": result }),
        Err(error) => serde_json::json!({ "ok": false, "error": error }),
    };
    let mut line = serde_json::to_vec(&v)?;
    line.push(b'\n');
    s.write_all(&line).context("writing the reply")
}

/// Whether the peer of `s` may use the socket: root, or our own user.
pub fn peer_allowed(s: &UnixStream) -> Result<bool> {
    let c = nix::sys::socket::getsockopt(s, nix::sys::socket::sockopt::PeerCredentials).context("SO_PEERCRED")?;
    Ok(c.uid() == 0 || c.uid() == nix::unistd::geteuid().as_raw())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip() {
        let r: Request = serde_json::from_str(r#"{"cmd":"ps"}"#).unwrap();
        assert_eq!(r, Request::Ps);
        let r: Request = serde_json::from_str(r#"{"cmd":"dump"}"#).unwrap();
        assert_eq!(r, Request::Dump { dir: None, compress: false });
        let r: Request = serde_json::from_str(r#"{"cmd":"dump","dir":"/x","compress":true}"#).unwrap();
        assert_eq!(r, Request::Dump { dir: Some("/x".into()), compress: true });
        assert_eq!(serde_json::from_str::<Request>(r#"{"cmd":"recover"}"#).unwrap(), Request::Recover);
        assert!(serde_json::from_str::<Request>(r#"{"cmd":"rm -rf"}"#).is_err());
    }
}

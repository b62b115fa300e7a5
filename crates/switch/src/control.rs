//! The switch's requests: one typed set behind `switch-ctl`, the control
//! socket and the switch's own report. On the socket, one JSON request a
//! line, one JSON answer a line: `{"ok":true,"result":...}` or
//! `{"ok":false,"error":"..."}`.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use crate::{kind_text, parse_port, SwitchError, SwitchState};

/// The longest request line taken.
const MAX_LINE: u64 = 64 * 1024;

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "request", rename_all = "kebab-case")]
pub enum Request {
    /// Each port: kind, socket, PMD, connected.
    Ports,
    /// The MAC table.
    Fdb,
    /// Every counter, the table, the PMDs' placement.
    Stats,
    /// A port as `--ports` takes one: NAME, NAME=client:PATH,
    /// NAME=tap:DEVICE.
    AddPort {
        port: String,
    },
    DelPort {
        name: String,
    },
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Response {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl SwitchState {
    /// Carries a request out.
    pub fn handle(&self, req: &Request) -> Result<serde_json::Value, SwitchError> {
        Ok(match req {
            Request::Ports => serde_json::Value::Array(
                self.ports()
                    .into_iter()
                    .map(|(_, p)| {
                        serde_json::json!({
                            "name": p.name,
                            "kind": kind_text(&p.kind),
                            "socket": p.socket.as_ref().map(|s| s.display().to_string()),
                            "pmd": p.pmd,
                            "connected": p.connected(),
                        })
                    })
                    .collect(),
            ),
            Request::Fdb => self.fdb_json(),
            Request::Stats => self.report(),
            Request::AddPort { port } => {
                let spec = parse_port(port).map_err(|e| SwitchError::Port(port.clone(), e))?;
                self.add_port(&spec)?;
                serde_json::json!({"added": spec.name})
            }
            Request::DelPort { name } => {
                self.del_port(name)?;
                serde_json::json!({"removed": name})
            }
        })
    }

    /// Answers one request line.
    pub fn answer(&self, line: &str) -> Response {
        let done = serde_json::from_str::<Request>(line)
            .map_err(|e| format!("a request that is not one: {e}"))
            .and_then(|r| self.handle(&r).map_err(|e| e.to_string()));
        match done {
            Ok(v) => Response {
                ok: true,
                result: Some(v),
                error: None,
            },
            Err(e) => Response {
                ok: false,
                result: None,
                error: Some(e),
            },
        }
    }
}

/// Serves the control socket at `path` (0600) until the switch stops.
pub fn serve(state: Arc<SwitchState>, path: &Path) -> Result<(), SwitchError> {
    let listener = devices::unix_socket::bind_private(path)
        .map_err(|e| SwitchError::Control(path.to_path_buf(), e.to_string()))?;
    let path = path.to_path_buf();
    std::thread::Builder::new()
        .name("switch-control".into())
        .spawn(move || {
            for conn in listener.incoming() {
                if state.stop.load(Ordering::Acquire) {
                    break;
                }
                match conn {
                    // one client at a time, each held at most 5 s a line
                    Ok(c) => {
                        if let Err(e) = serve_client(&state, c) {
                            tracing::debug!("control socket {}: {e}", path.display());
                        }
                    }
                    Err(e) => tracing::warn!("control socket {}: {e}", path.display()),
                }
            }
        })
        .map_err(|e| SwitchError::Control(PathBuf::new(), e.to_string()))?;
    Ok(())
}

use std::path::PathBuf;

fn serve_client(state: &SwitchState, conn: UnixStream) -> std::io::Result<()> {
    conn.set_read_timeout(Some(Duration::from_secs(5)))?;
    conn.set_write_timeout(Some(Duration::from_secs(5)))?;
    let mut out = conn.try_clone()?;
    let mut reader = BufReader::new(conn);
    loop {
        let mut line = String::new();
        let n = (&mut reader).take(MAX_LINE).read_line(&mut line)?;
        if n == 0 {
            return Ok(());
        }
        let too_long = !line.ends_with('\n') && n as u64 == MAX_LINE;
        let answer = if too_long {
            Response {
                ok: false,
                result: None,
                error: Some(format!("a request longer than {MAX_LINE} bytes")),
            }
        } else {
            state.answer(line.trim())
        };
        let mut text = serde_json::to_string(&answer).unwrap_or_default();
        text.push('\n');
        out.write_all(text.as_bytes())?;
        if too_long {
            // (the rest of that line is not read)
            return Ok(());
        }
    }
}

/// Sends one request to a switch's control socket: its answer.
pub fn request(path: &Path, req: &Request) -> Result<serde_json::Value, String> {
    let conn =
        UnixStream::connect(path).map_err(|e| format!("control socket {}: {e}", path.display()))?;
    let _ = conn.set_read_timeout(Some(Duration::from_secs(30)));
    let mut text = serde_json::to_string(req).map_err(|e| e.to_string())?;
    text.push('\n');
    (&conn)
        .write_all(text.as_bytes())
        .map_err(|e| format!("control socket {}: {e}", path.display()))?;
    let mut line = String::new();
    BufReader::new(&conn)
        .read_line(&mut line)
        .map_err(|e| format!("control socket {}: {e}", path.display()))?;
    let r: Response = serde_json::from_str(&line).map_err(|e| {
        format!(
            "control socket {}: an answer that is not one: {e}",
            path.display()
        )
    })?;
    match (r.ok, r.result, r.error) {
        (true, Some(v), _) => Ok(v),
        (_, _, Some(e)) => Err(e),
        _ => Err("an empty answer".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_read_as_switch_ctl_writes_them() {
        for (text, want) in [
            (r#"{"request":"ports"}"#, Request::Ports),
            (
                r#"{"request":"add-port","port":"vnf3=client:/run/x.sock"}"#,
                Request::AddPort {
                    port: "vnf3=client:/run/x.sock".into(),
                },
            ),
            (
                r#"{"request":"del-port","name":"vnf3"}"#,
                Request::DelPort {
                    name: "vnf3".into(),
                },
            ),
        ] {
            assert_eq!(serde_json::from_str::<Request>(text).unwrap(), want);
        }
        assert!(serde_json::from_str::<Request>(r#"{"request":"reboot"}"#).is_err());
    }
}

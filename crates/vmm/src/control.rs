//! The control socket: a thin frontend over the typed request set
//! (crate::api). Newline-delimited JSON requests and replies (schema
//! version 1), created 0600, callers checked to be this user (SO_PEERCRED).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use crate::api::{self, Request, SCHEMA};
use crate::vm_handle::VmHandle;
use crate::{Error, Result};

/// The uid of a UNIX socket's peer (SO_PEERCRED): the control socket and
/// the REST API take requests only from their own user (or root).
pub use devices::unix_socket::peer_uid;

fn reply(ok: bool, body: serde_json::Value) -> String {
    let mut v = serde_json::json!({ "v": SCHEMA, "ok": ok });
    if let (Some(map), Some(extra)) = (v.as_object_mut(), body.as_object()) {
        map.extend(extra.clone());
    }
    v.to_string()
}

fn refusal(error: impl std::fmt::Display) -> String {
    reply(false, serde_json::json!({ "error": error.to_string() }))
}

/// One control line in, one reply out (migration progress lines go to
/// `emit` meanwhile): parsing and showing only, the work is the API's.
fn handle_line(h: &VmHandle, line: &str, emit: &mut dyn FnMut(String)) -> String {
    let req = match api::parse_line(line) {
        Ok(r) => r,
        Err(e) => return refusal(e),
    };
    let mut progress = |p: &crate::migrate::Progress| {
        emit(serde_json::json!({ "v": SCHEMA, "progress": p }).to_string());
    };
    match api::execute(h, &req, &mut progress) {
        Ok(r) => reply(true, serde_json::to_value(&r).unwrap_or_default()),
        // a failed migration says where it left the guest
        Err(e) if matches!(req, Request::Migrate(_)) => reply(
            false,
            serde_json::json!({ "error": e.to_string(), "state": api::status(h).state }),
        ),
        Err(e) => refusal(e),
    }
}

/// The longest request line taken (a request is a few hundred bytes).
const MAX_REQUEST: u64 = 64 << 10;

/// The next request line; None at the end of the connection; an error for
/// a line over MAX_REQUEST or not UTF-8 (a caller must not make this
/// thread hold an unbounded line in memory).
fn read_request(r: &mut impl BufRead) -> std::result::Result<Option<String>, String> {
    use std::io::Read;
    let mut buf = Vec::new();
    let n = r
        .take(MAX_REQUEST + 1)
        .read_until(b'\n', &mut buf)
        .map_err(|e| format!("reading the request: {e}"))?;
    if n == 0 {
        return Ok(None);
    }
    if buf.last() != Some(&b'\n') && buf.len() as u64 > MAX_REQUEST {
        return Err(format!(
            "a request longer than {} KiB: refused",
            MAX_REQUEST >> 10
        ));
    }
    String::from_utf8(buf)
        .map(Some)
        .map_err(|_| "a request that is not UTF-8: refused".to_string())
}

/// `read_request`, for the fuzz target (crates/fuzzer).
#[cfg(feature = "fuzzing")]
pub fn fuzz_read_request(r: &mut impl BufRead) -> std::result::Result<Option<String>, String> {
    read_request(r)
}

/// Callers connected at once at most: each has a thread, and a local user
/// opening connections in a loop must not exhaust the VMM's threads.
pub const MAX_CALLERS: usize = 16;

/// One connected caller, counted while its thread lives.
struct Caller(Arc<std::sync::atomic::AtomicUsize>);

impl Caller {
    fn new(count: &Arc<std::sync::atomic::AtomicUsize>) -> Caller {
        count.fetch_add(1, Ordering::AcqRel);
        Caller(count.clone())
    }
}

impl Drop for Caller {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Serves the control socket at `path` until the VM stops.
pub fn serve(path: &Path, h: Arc<VmHandle>) -> Result<thread::JoinHandle<()>> {
    let err = |e: std::io::Error| Error::Device(format!("control socket {}: {e}", path.display()));
    let listener = devices::unix_socket::bind_private(path).map_err(err)?;
    listener.set_nonblocking(true).map_err(err)?;
    let owned: PathBuf = path.to_path_buf();
    // SAFETY: getuid cannot fail.
    let me = unsafe { libc::getuid() };
    // requests being answered: the VM's end waits for their answers (a
    // migration's reply is written after the VM stopped here)
    let answering = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let callers = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    thread::Builder::new()
        .name("control".into())
        .spawn(move || {
            while !h.stop.load(Ordering::Acquire) {
                let stream = match listener.accept() {
                    Ok((s, _)) => s,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        thread::sleep(Duration::from_millis(5));
                        continue;
                    }
                    Err(e) => {
                        tracing::warn!("control socket: {e}");
                        continue;
                    }
                };
                if !devices::unix_socket::peer_allowed(&stream) {
                    tracing::warn!("control socket: refused a caller that is not uid {me} or root");
                    let _ = (&stream).write_all((refusal("permission denied") + "\n").as_bytes());
                    continue;
                }
                if callers.load(Ordering::Acquire) >= MAX_CALLERS {
                    devices::limited!(
                        warn,
                        "control socket: {MAX_CALLERS} callers connected already: one refused"
                    );
                    let _ = (&stream).write_all(
                        (refusal(format!("{MAX_CALLERS} callers connected already")) + "\n")
                            .as_bytes(),
                    );
                    continue;
                }
                let _ = stream.set_nonblocking(false);
                let _ = stream.set_read_timeout(Some(Duration::from_secs(30)));
                let mut writer = match stream.try_clone() {
                    Ok(w) => w,
                    Err(_) => continue,
                };
                // one thread per caller: a status must answer while a
                // migration blocks another connection
                let h = h.clone();
                let answering = answering.clone();
                let caller = Caller::new(&callers);
                let spawned = thread::Builder::new()
                    .name("control-conn".into())
                    .spawn(move || {
                        let _caller = caller;
                        let mut reader = BufReader::new(stream);
                        loop {
                            let line = match read_request(&mut reader) {
                                Ok(Some(l)) => l,
                                Ok(None) => break,
                                Err(why) => {
                                    // answered, then the connection ends:
                                    // the rest of an over-long line is junk
                                    let _ = writer.write_all((refusal(why) + "\n").as_bytes());
                                    break;
                                }
                            };
                            if line.trim().is_empty() {
                                continue;
                            }
                            let mut progress_out = writer.try_clone().ok();
                            let mut emit = |l: String| {
                                if let Some(w) = progress_out.as_mut() {
                                    let _ = w.write_all((l + "\n").as_bytes());
                                }
                            };
                            answering.fetch_add(1, Ordering::AcqRel);
                            let answer = handle_line(&h, &line, &mut emit);
                            let sent = writer.write_all((answer + "\n").as_bytes());
                            answering.fetch_sub(1, Ordering::AcqRel);
                            if sent.is_err() {
                                break;
                            }
                        }
                    });
                if let Err(e) = spawned {
                    tracing::warn!("control socket: no thread for a caller: {e}");
                }
            }
            // the answers of requests in hand go out before the VM ends
            // (at most a few seconds: a stuck caller does not hold it)
            let until = std::time::Instant::now() + Duration::from_secs(5);
            while answering.load(Ordering::Acquire) > 0 && std::time::Instant::now() < until {
                thread::sleep(Duration::from_millis(2));
            }
            let _ = std::fs::remove_file(&owned);
        })
        .map_err(|e| Error::Device(format!("spawning the control thread: {e}")))
}

/// One typed request to a VM's control socket; the reply as JSON (a
/// migration's progress lines go to `progress`).
pub fn send(
    path: &Path,
    req: &Request,
    progress: &mut dyn FnMut(&serde_json::Value),
) -> std::result::Result<serde_json::Value, String> {
    let line: serde_json::Value =
        serde_json::from_str(&api::line_of(req)).map_err(|e| e.to_string())?;
    request_with_progress(path, line, progress)
}

/// One request, as raw JSON, to a VM's control socket; the reply as JSON.
pub fn request(
    path: &Path,
    req: serde_json::Value,
) -> std::result::Result<serde_json::Value, String> {
    request_with_progress(path, req, &mut |_| {})
}

/// A request whose reply may be preceded by `{"progress": ...}` lines
/// (migrate): each goes to `progress`; the final reply is returned.
pub fn request_with_progress(
    path: &Path,
    req: serde_json::Value,
    progress: &mut dyn FnMut(&serde_json::Value),
) -> std::result::Result<serde_json::Value, String> {
    let err = |e: &dyn std::fmt::Display| format!("control socket {}: {e}", path.display());
    let mut s = UnixStream::connect(path).map_err(|e| err(&e))?;
    s.write_all((req.to_string() + "\n").as_bytes())
        .map_err(|e| err(&e))?;
    let mut lines = BufReader::new(s);
    loop {
        let mut line = String::new();
        if lines.read_line(&mut line).map_err(|e| err(&e))? == 0 {
            return Err(err(&"the VM closed the connection without a reply"));
        }
        let v: serde_json::Value =
            serde_json::from_str(&line).map_err(|e| err(&format!("bad reply {line:?}: {e}")))?;
        if v.get("progress").is_some() {
            progress(&v["progress"]);
            continue;
        }
        return Ok(v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_lines_are_bounded() {
        let mut ok = std::io::Cursor::new(b"{\"v\":1}\n\nsecond".to_vec());
        assert_eq!(
            read_request(&mut ok).unwrap().as_deref(),
            Some("{\"v\":1}\n")
        );
        assert_eq!(read_request(&mut ok).unwrap().as_deref(), Some("\n"));
        assert_eq!(read_request(&mut ok).unwrap().as_deref(), Some("second"));
        assert_eq!(read_request(&mut ok).unwrap(), None);
        let mut long = std::io::Cursor::new(vec![b'x'; 100 << 10]);
        let e = read_request(&mut long).unwrap_err();
        assert!(e.contains("longer than 64 KiB"), "{e}");
        let mut bad = std::io::Cursor::new(vec![0xff, 0xfe, b'\n']);
        assert!(read_request(&mut bad).unwrap_err().contains("UTF-8"));
    }
}

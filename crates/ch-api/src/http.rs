//! HTTP/1.1 on the API's UNIX socket, as Cloud Hypervisor's clients speak
//! it: one request after another on a keep-alive connection, a body by
//! Content-Length, and file descriptors (a TAP for `vm.add-net`) passed
//! with the request's bytes by SCM_RIGHTS.
//!
//! Written here rather than taken from an HTTP crate: every request must be
//! read with recvmsg and a control buffer (Kata sends the TAP's descriptor
//! in the same sendmsg as the request), which no server crate exposes, and
//! the subset the API needs (no chunking, no pipelining beyond order, no
//! TLS) is small. Every size is bounded before it is trusted.

use std::io::Write;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use vmm_sys_util::sock_ctrl_msg::ScmSocket;

/// The most a request's head (request line and headers) may hold.
pub const MAX_HEAD: usize = 8 << 10;
/// The most a request's body may hold.
pub const MAX_BODY: usize = 64 << 10;
/// Descriptors one read may bring.
const MAX_FDS: usize = 16;

/// One request.
#[derive(Debug)]
pub struct Request {
    pub method: String,
    /// The path, without a query string.
    pub path: String,
    pub body: Vec<u8>,
    /// Descriptors that came with the request's bytes.
    pub fds: Vec<OwnedFd>,
}

/// Why no request could be read.
#[derive(Debug)]
pub enum ReadError {
    /// The client closed the connection between requests.
    Closed,
    /// Nothing came for the idle time (between requests).
    Idle,
    /// A request started but did not finish in time.
    Stalled,
    /// A request that cannot be taken: the answer's text (400).
    Bad(String),
    Io(std::io::Error),
}

/// A connection: the stream and what was read past the last request.
pub struct Conn {
    pub stream: UnixStream,
    buf: Vec<u8>,
    fds: Vec<OwnedFd>,
}

impl Conn {
    pub fn new(stream: UnixStream) -> Conn {
        Conn {
            stream,
            buf: Vec::new(),
            fds: Vec::new(),
        }
    }

    /// Reads more bytes (and descriptors) within `timeout`.
    fn fill(&mut self, timeout: Duration) -> Result<usize, std::io::Error> {
        self.stream.set_read_timeout(Some(timeout))?;
        let mut chunk = [0u8; 4096];
        let mut fds = [-1 as RawFd; MAX_FDS];
        let mut iov = [libc::iovec {
            iov_base: chunk.as_mut_ptr().cast(),
            iov_len: chunk.len(),
        }];
        // SAFETY: the iovec points into `chunk`, which outlives the call;
        // the descriptors received are owned from here on (below).
        let (n, nfds) = unsafe { self.stream.recv_with_fds(&mut iov, &mut fds) }
            .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))?;
        for &fd in &fds[..nfds.min(MAX_FDS)] {
            if fd >= 0 {
                // (beyond MAX_FDS a request is refused: these close)
                // SAFETY: the kernel installed this descriptor for us by
                // SCM_RIGHTS; nothing else owns it.
                self.fds.push(unsafe { OwnedFd::from_raw_fd(fd) });
            }
        }
        self.buf.extend_from_slice(&chunk[..n]);
        Ok(n)
    }

    /// Reads the next request: `idle` for its first byte, then `stall` for
    /// the whole rest of it (a client trickling a byte at a time does not
    /// hold the connection longer).
    pub fn read_request(&mut self, idle: Duration, stall: Duration) -> Result<Request, ReadError> {
        let timed_out = |e: &std::io::Error| {
            matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            )
        };
        let mut started: Option<std::time::Instant> = None;
        let left = |started: &Option<std::time::Instant>| {
            started.map_or(stall, |t| stall.saturating_sub(t.elapsed()))
        };
        // the head
        let head_end = loop {
            if let Some(i) = find(&self.buf, b"\r\n\r\n") {
                break i;
            }
            if self.buf.len() > MAX_HEAD {
                return Err(ReadError::Bad(format!(
                    "the request's head is over {MAX_HEAD} bytes"
                )));
            }
            if !self.buf.is_empty() && started.is_none() {
                started = Some(std::time::Instant::now());
            }
            let wait = if self.buf.is_empty() {
                idle
            } else {
                left(&started)
            };
            if wait.is_zero() {
                return Err(ReadError::Stalled);
            }
            if self.fds.len() > MAX_FDS {
                return Err(ReadError::Bad(format!(
                    "more than {MAX_FDS} descriptors with one request"
                )));
            }
            match self.fill(wait) {
                Ok(0) if self.buf.is_empty() => return Err(ReadError::Closed),
                Ok(0) => return Err(ReadError::Bad("the connection closed mid-request".into())),
                Ok(_) => {}
                Err(e) if timed_out(&e) && self.buf.is_empty() => return Err(ReadError::Idle),
                Err(e) if timed_out(&e) => return Err(ReadError::Stalled),
                Err(e) => return Err(ReadError::Io(e)),
            }
        };
        let head = String::from_utf8_lossy(&self.buf[..head_end]).into_owned();
        let mut lines = head.split("\r\n");
        let request_line = lines.next().unwrap_or_default();
        let mut parts = request_line.split(' ');
        let (method, target, version) = (parts.next(), parts.next(), parts.next());
        let (Some(method), Some(target), Some(version)) = (method, target, version) else {
            return Err(ReadError::Bad(format!(
                "a malformed request line {request_line:?}"
            )));
        };
        if !version.starts_with("HTTP/1.") {
            return Err(ReadError::Bad(format!("{version:?}: HTTP/1.x only")));
        }
        let mut length = 0usize;
        for h in lines {
            let Some((name, value)) = h.split_once(':') else {
                return Err(ReadError::Bad(format!("a malformed header {h:?}")));
            };
            let name = name.trim().to_ascii_lowercase();
            let value = value.trim();
            match name.as_str() {
                "content-length" => {
                    length = value.parse().map_err(|_| {
                        ReadError::Bad(format!("Content-Length {value:?} is not a number"))
                    })?;
                    if length > MAX_BODY {
                        return Err(ReadError::Bad(format!(
                            "a body of {length} bytes: at most {MAX_BODY}"
                        )));
                    }
                }
                "transfer-encoding" if !value.eq_ignore_ascii_case("identity") => {
                    return Err(ReadError::Bad(format!(
                        "Transfer-Encoding {value:?}: send a Content-Length"
                    )))
                }
                _ => {}
            }
        }
        let body_start = head_end + 4;
        let started = started.or_else(|| Some(std::time::Instant::now()));
        while self.buf.len() < body_start + length {
            let wait = left(&started);
            if wait.is_zero() {
                return Err(ReadError::Stalled);
            }
            if self.fds.len() > MAX_FDS {
                return Err(ReadError::Bad(format!(
                    "more than {MAX_FDS} descriptors with one request"
                )));
            }
            match self.fill(wait) {
                Ok(0) => return Err(ReadError::Bad("the connection closed mid-body".into())),
                Ok(_) => {}
                Err(e) if timed_out(&e) => return Err(ReadError::Stalled),
                Err(e) => return Err(ReadError::Io(e)),
            }
        }
        let body = self.buf[body_start..body_start + length].to_vec();
        self.buf.drain(..body_start + length);
        let path = target.split('?').next().unwrap_or_default().to_string();
        Ok(Request {
            method: method.to_string(),
            path,
            body,
            fds: std::mem::take(&mut self.fds),
        })
    }

    /// Writes a response: `body` of `content_type` (None: none, as 204
    /// has).
    pub fn respond_typed(
        &mut self,
        status: u16,
        body: Option<&[u8]>,
        content_type: &str,
    ) -> std::io::Result<()> {
        let mut out = format!(
            "HTTP/1.1 {status} {}\r\nServer: nfvisor API\r\nConnection: keep-alive\r\n",
            reason(status)
        );
        let body = body.unwrap_or_default();
        if status != 204 {
            if !body.is_empty() {
                out.push_str(&format!("Content-Type: {content_type}\r\n"));
            }
            out.push_str(&format!("Content-Length: {}\r\n", body.len()));
        }
        out.push_str("\r\n");
        let mut bytes = out.into_bytes();
        if status != 204 {
            bytes.extend_from_slice(body);
        }
        self.stream.write_all(&bytes)
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        204 => "No Content",
        400 => "Bad Request",
        404 => "Not Found",
        408 => "Request Timeout",
        429 => "Too Many Requests",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair() -> (Conn, UnixStream) {
        let (a, b) = UnixStream::pair().unwrap();
        (Conn::new(a), b)
    }

    const T: Duration = Duration::from_millis(500);

    #[test]
    fn requests_follow_one_another_with_their_bodies_and_descriptors() {
        let (mut c, mut client) = pair();
        let tap = std::fs::File::open("/dev/null").unwrap();
        let first =
            b"PUT /api/v1/vm.add-net HTTP/1.1\r\nHost: localhost\r\nContent-Length: 2\r\n\r\n{}";
        client
            .send_with_fds(&[&first[..]], &[std::os::fd::AsRawFd::as_raw_fd(&tap)])
            .unwrap();
        client
            .write_all(b"GET /api/v1/vmm.ping?x=1 HTTP/1.1\r\n\r\n")
            .unwrap();
        let r = c.read_request(T, T).unwrap();
        assert_eq!(
            (r.method.as_str(), r.path.as_str()),
            ("PUT", "/api/v1/vm.add-net")
        );
        assert_eq!(r.body, b"{}");
        assert_eq!(r.fds.len(), 1);
        let r = c.read_request(T, T).unwrap();
        assert_eq!(
            (r.method.as_str(), r.path.as_str()),
            ("GET", "/api/v1/vmm.ping")
        );
        assert!(r.body.is_empty() && r.fds.is_empty());
        drop(client);
        assert!(matches!(c.read_request(T, T), Err(ReadError::Closed)));
    }

    #[test]
    fn bad_and_stalled_requests_are_named() {
        let (mut c, mut client) = pair();
        client
            .write_all(b"PUT /api/v1/vm.create HTTP/1.1\r\nContent-Length: 999999\r\n\r\n")
            .unwrap();
        assert!(matches!(c.read_request(T, T), Err(ReadError::Bad(e)) if e.contains("at most")));
        let (mut c, mut client) = pair();
        client.write_all(b"PUT /api/v1/vm.cre").unwrap();
        assert!(matches!(c.read_request(T, T), Err(ReadError::Stalled)));
        let (mut c, _client) = pair();
        assert!(matches!(c.read_request(T, T), Err(ReadError::Idle)));
        let (mut c, mut client) = pair();
        client.write_all(b"garbage\r\n\r\n").unwrap();
        assert!(matches!(c.read_request(T, T), Err(ReadError::Bad(_))));
    }
}

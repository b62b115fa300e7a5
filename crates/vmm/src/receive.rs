//! Live migration, the receiving side: listen, greet the source (a token
//! challenge when there is a token), take the stream and its extra
//! connections, have the caller create the VM from the stream's
//! configuration (PREPARED), and gate its start on the two-phase hand-over:
//! READY once everything is verified (or ERROR with the reason), GO from
//! the source, then the guest starts and RUNNING confirms, with when each
//! step happened here.

use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::clock::{now_ns, reported_ns};
use crate::migrate::{Endpoint, Line, Link};
use crate::snapshot::{RestoreSource, SnapshotConfig};
use crate::vm::Vm;
use crate::{fault, Error, Result};

/// Called with the destination's measured state round trip once the VM
/// exists: it tells the source to start sending.
pub type OnPrepared = Box<dyn FnOnce(u64) + Send>;

/// A received VM, ready to run: its start is gated on the hand-over.
pub struct Incoming {
    pub vm: Vm,
    /// Set once the guest started here (after GO).
    pub started: Arc<AtomicBool>,
}

enum Listener {
    Unix(std::os::unix::net::UnixListener, PathBuf),
    Tcp(std::net::TcpListener),
}

impl Listener {
    fn bind(listen: &str) -> Result<Listener> {
        let err = |e: std::io::Error| Error::Config(format!("--listen {listen}: {e}"));
        Ok(match Endpoint::parse(listen).map_err(Error::Config)? {
            Endpoint::Unix(p) => {
                let l = devices::unix_socket::bind_private(&p).map_err(err)?;
                Listener::Unix(l, p)
            }
            Endpoint::Tcp(a) => Listener::Tcp(std::net::TcpListener::bind(a).map_err(err)?),
        })
    }

    fn set_nonblocking(&self) -> std::io::Result<()> {
        match self {
            Listener::Unix(l, _) => l.set_nonblocking(true),
            Listener::Tcp(l) => l.set_nonblocking(true),
        }
    }

    /// One connection that proves it knows the token (others are refused
    /// and waited past); with a deadline, none by then is an error. Each
    /// greeting runs on a thread of its own (at most MAX_GREETINGS at once),
    /// so a peer that drips its answer holds only its own thread, never
    /// the listener: a real source behind it is greeted meanwhile.
    fn accept(
        &self,
        listen: &str,
        token: Option<&[u8]>,
        deadline: Option<Instant>,
        greetings: &Greetings,
    ) -> Result<(Box<dyn Link>, Option<migration::StreamKey>)> {
        loop {
            match greetings.done.1.try_recv() {
                Ok(Ok(greeted)) => {
                    tracing::info!("{listen}: a source connected and greeted");
                    return Ok(greeted);
                }
                // (said by its greeter)
                Ok(Err(_)) => continue,
                Err(_) => {}
            }
            let accepted: std::io::Result<Box<dyn Link>> = match self {
                Listener::Unix(l, _) => l.accept().and_then(|(s, _)| {
                    // guest memory goes to whoever connects: this user or
                    // root only
                    if devices::unix_socket::peer_allowed(&s) {
                        Ok(Box::new(s) as Box<dyn Link>)
                    } else {
                        tracing::warn!(
                            "{listen}: refused a connection from uid {:?}",
                            devices::unix_socket::peer_uid(&s)
                        );
                        Err(std::io::ErrorKind::WouldBlock.into())
                    }
                }),
                Listener::Tcp(l) => l.accept().and_then(|(s, peer)| {
                    tracing::info!("connection from {peer}");
                    s.set_nodelay(true)?;
                    Ok(Box::new(s) as Box<dyn Link>)
                }),
            };
            let link = match accepted {
                Ok(link) => link,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if deadline.is_some_and(|d| Instant::now() > d) {
                        return Err(Error::Device(format!(
                            "the source opened too few connections on {listen} within 5 s"
                        )));
                    }
                    std::thread::sleep(Duration::from_millis(1));
                    continue;
                }
                Err(e) => return Err(Error::Device(format!("accepting on {listen}: {e}"))),
            };
            if greetings.in_flight.load(Ordering::Acquire) >= MAX_GREETINGS {
                devices::limited!(
                    warn,
                    "{listen}: {MAX_GREETINGS} greetings in flight: a connection refused"
                );
                continue;
            }
            greetings.in_flight.fetch_add(1, Ordering::AcqRel);
            let (done, in_flight) = (greetings.done.0.clone(), greetings.in_flight.clone());
            let token = token.map(<[u8]>::to_vec);
            let greeter = seccomp::spawn(
                "migration greeting".to_string(),
                seccomp::Role::Vmm,
                move || {
                    let mut link = link;
                    let greeted = crate::migrate::greet(link.as_mut(), token.as_deref())
                        .map(|key| (link, key));
                    if let Err(e) = &greeted {
                        tracing::warn!("{e}; waiting for another connection");
                    }
                    in_flight.fetch_sub(1, Ordering::AcqRel);
                    // (no one listening: the migration is under way or
                    // over, and this connection is dropped)
                    let _ = done.lock().unwrap_or_else(|e| e.into_inner()).send(greeted);
                },
            );
            if let Err(e) = greeter {
                greetings.in_flight.fetch_sub(1, Ordering::AcqRel);
                tracing::warn!("{listen}: greeting a connection: {e}");
            }
        }
    }
}

/// Greetings at most in flight at once on a listener.
const MAX_GREETINGS: usize = 8;

/// The greetings a listener has under way, across its accepts (a
/// source's next connection may be greeted while its first is taken).
struct Greetings {
    #[allow(clippy::type_complexity)]
    done: (
        Arc<Mutex<std::sync::mpsc::Sender<Result<(Box<dyn Link>, Option<migration::StreamKey>)>>>>,
        std::sync::mpsc::Receiver<Result<(Box<dyn Link>, Option<migration::StreamKey>)>>,
    ),
    in_flight: Arc<std::sync::atomic::AtomicUsize>,
}

impl Greetings {
    fn new() -> Self {
        let (tx, rx) = std::sync::mpsc::channel();
        Greetings {
            done: (Arc::new(Mutex::new(tx)), rx),
            in_flight: Arc::default(),
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Listener::Unix(_, p) = self {
            let _ = std::fs::remove_file(p);
        }
    }
}

fn link_err(what: &str) -> impl Fn(std::io::Error) -> Error + '_ {
    move |e| Error::Device(format!("{what}: {e}"))
}

/// Waits for one migration on `listen`; `make_vm` creates the VM from the
/// stream (its configuration, and the restore source to read the rest
/// from). Any failure before the guest could start is answered to the
/// source with ERROR and the reason, and returned. Each read of the stream
/// waits `io_timeout` at most: a source that stops sending fails the
/// migration here instead of holding this process for ever.
pub fn receive(
    listen: &str,
    token: Option<&[u8]>,
    io_timeout: Duration,
    make_vm: impl FnOnce(RestoreSource, SnapshotConfig, OnPrepared) -> Result<Vm>,
) -> Result<Incoming> {
    let listener = Listener::bind(listen)?;
    if token.is_none() && matches!(listener, Listener::Tcp(_)) {
        tracing::warn!(
            "listening on {listen} without --token-file: anyone who can reach it can send a VM"
        );
    }
    tracing::info!("waiting for a migration on {listen}");
    listener.set_nonblocking().map_err(link_err(listen))?;
    let greetings = Greetings::new();
    let (link, key) = listener.accept(listen, token, None, &greetings)?;
    link.set_timeout(Some(io_timeout))
        .map_err(link_err(listen))?;
    fault::set_link(link.raw_fd());
    fault::at(fault::Phase::Connect);
    // small: a payload read then bypasses the buffer (one copy less)
    let input =
        std::io::BufReader::with_capacity(64 << 10, link.split().map_err(link_err(listen))?);
    let mut prepared = link.split().map_err(link_err(listen))?;
    let mut answer = link;
    let loaded = RestoreSource::new(listen, Box::new(input), key).and_then(|(mut source, cfg)| {
        // the migration's other streams, which the source opens at once
        // (a source opens them right after the first, before it sends
        // anything else: seconds are plenty, even across a WAN)
        let deadline = Instant::now() + Duration::from_secs(5);
        for _ in 1..cfg.connections.clamp(1, 16) {
            // (an accepted socket does not inherit O_NONBLOCK on Linux)
            let (extra, extra_key) = listener
                .accept(listen, token, Some(deadline), &greetings)
                .map_err(|e| {
                    Error::Device(format!(
                        "{e} (it announced {} connections)",
                        cfg.connections
                    ))
                })?;
            extra
                .set_timeout(Some(io_timeout))
                .map_err(link_err(listen))?;
            source.add_stream(
                Box::new(std::io::BufReader::with_capacity(64 << 10, extra)),
                extra_key,
            )?;
        }
        source.live = true;
        // SYNCED answers on the control channel (extra streams answer
        // from their own threads, hence the lock)
        let synced = Mutex::new(answer.split().map_err(link_err(listen))?);
        source.on_sync = Some(Arc::new(move |stream, seq| {
            let mut out = synced.lock().unwrap_or_else(|e| e.into_inner());
            // with this host's clock: the source estimates the offset
            let line = Line::Synced {
                stream,
                seq,
                clock_ns: Some(reported_ns(now_ns()) as i128),
            };
            let _ = out
                .write_all(line.to_wire().as_bytes())
                .and_then(|_| out.flush());
        }));
        let on_prepared: OnPrepared = Box::new(move |state_ns| {
            let _ = prepared
                .write_all(Line::Prepared { state_ns }.to_wire().as_bytes())
                .and_then(|_| prepared.flush());
        });
        make_vm(source, cfg, on_prepared)
    });
    drop(listener);
    let mut vm = match loaded {
        Ok(vm) => vm,
        Err(e) => {
            let _ = answer.write_all(Line::Error { why: e.to_string() }.to_wire().as_bytes());
            return Err(e);
        }
    };
    // The vCPU threads are set up first, then the stream is read to its
    // end and applied (so only its last part lies in the downtime); READY
    // once all is verified, or ERROR with the reason; GO releases the
    // vCPUs; RUNNING confirms, with when each step happened here.
    let handed_over = Arc::new(Mutex::new(None));
    let for_start = handed_over.clone();
    let started = Arc::new(AtomicBool::new(false));
    let started_here = started.clone();
    vm.set_gate(Box::new(move |restored| {
        let device = |what: String| Error::Device(what);
        let restored = match restored {
            Ok(r) => *r,
            Err(e) => {
                let _ = answer
                    .write_all(Line::Error { why: e.to_string() }.to_wire().as_bytes())
                    .and_then(|_| answer.flush());
                return Ok(());
            }
        };
        // (time-stamped as it is sent: the source may read it before the
        // write returns here)
        let ready_ns = now_ns();
        answer
            .write_all(Line::Ready.to_wire().as_bytes())
            .and_then(|_| answer.flush())
            .map_err(|e| device(format!("saying READY: {e}")))?;
        fault::at(fault::Phase::AfterReady);
        let mut line = String::new();
        answer
            .set_timeout(Some(Duration::from_secs(60)))
            .and_then(|_| answer.split())
            .and_then(|back| std::io::BufReader::new(back).read_line(&mut line))
            .map_err(|e| {
                device(format!(
                    "waiting for GO: {e}; the guest was not started here"
                ))
            })?;
        let paused_at = match Line::parse(&line) {
            Ok(Line::Go { paused_at_ns }) => paused_at_ns,
            Ok(other) => {
                return Err(device(format!(
                    "the source did not say GO ({other}); the guest was not started here"
                )))
            }
            Err(e) => {
                return Err(device(format!(
                    "the source did not say GO ({e}); the guest was not started here"
                )))
            }
        };
        let marks = [
            ("stream_end", restored.stream_end_ns),
            ("applied", restored.applied_ns),
            ("ready", ready_ns),
            ("go", now_ns()),
        ]
        .map(|(name, at)| (name, reported_ns(at)));
        fault::at(fault::Phase::AfterGo);
        *handed_over.lock().unwrap_or_else(|e| e.into_inner()) = Some((answer, paused_at, marks));
        Ok(())
    }));
    vm.set_on_start(Box::new(move |resumed_at, h| {
        started_here.store(true, Ordering::Release);
        let Some((mut answer, paused_at, marks)) =
            for_start.lock().unwrap_or_else(|e| e.into_inner()).take()
        else {
            return;
        };
        // (this host's clock against the source's pause: the source takes
        // the offset between them out)
        let downtime = reported_ns(resumed_at) as i128 - paused_at as i128;
        tracing::info!(
            "guest resumed here {:.3} ms after the source paused it",
            downtime as f64 / 1e6
        );
        h.note_migration(crate::vm_handle::LastMigration {
            role: "destination",
            downtime_ms: downtime as f64 / 1e6,
            ..Default::default()
        });
        let line = crate::migrate::running_line(downtime, paused_at, &marks);
        let _ = answer.write_all(line.to_wire().as_bytes());
        let _ = answer.flush();
    }));
    Ok(Incoming { vm, started })
}

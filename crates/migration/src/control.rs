//! The control lines beside the stream, one per line, typed: what each end
//! of a migration says to the other, and its parsing (which never trusts a
//! line: a wrong word or number is an error that quotes it).
//!
//! Destination to source: the greeting (`NFV-MIGRATE 2 OPEN`, or
//! `NFV-MIGRATE 2 CHALLENGE <nonce>` answered by the source's `RESPONSE
//! <mac> <nonce>` and then `OK <proof>` or `DENIED`: each end proves the
//! token to the other over the other's nonce, and the stream that follows
//! is keyed from the token and both nonces); `PREPARED <ns>` once its VM exists
//! (ns: what a state save-and-restore took there); `SYNCED <stream> <seq>
//! <clock ns>` for each Sync frame once all before it is applied; after the
//! stream `READY` or `ERROR <why>`; after GO, `RUNNING <downtime ns>
//! name=<ns>...` (its steps, after the source's pause, on its clock).
//! Source to destination: `GO <pause time, CLOCK_REALTIME ns>`.

use std::fmt;

/// The protocol's version, in the greeting. 2: both ends prove the token,
/// and a migration with a token sends a keyed stream.
pub const PROTOCOL: u32 = 2;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Line {
    /// The destination takes any source.
    Open,
    /// The destination asks the source to prove the token over `nonce`.
    Challenge {
        nonce: String,
    },
    /// The source's proof, and its own nonce for the destination's.
    Response {
        mac: String,
        nonce: String,
    },
    /// The destination took the source's proof, and proves the token too.
    Ok {
        proof: String,
    },
    Denied,
    /// The destination's VM exists; a state round trip took this long.
    Prepared {
        state_ns: u64,
    },
    /// Everything before Sync `seq` on `stream` is applied; the
    /// destination's clock then (stream 0 only).
    Synced {
        stream: usize,
        seq: u64,
        clock_ns: Option<i128>,
    },
    Ready,
    Error {
        why: String,
    },
    Go {
        paused_at_ns: u128,
    },
    /// The guest runs on the destination: the downtime it measured and
    /// when each of its steps happened (ns after the source's pause; signed,
    /// as the clocks of two hosts differ).
    Running {
        /// None where the destination's figure could not be read.
        downtime_ns: Option<i128>,
        steps: Vec<(String, i128)>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("control line {line:?}: {why}")]
pub struct LineError {
    pub line: String,
    pub why: String,
}

impl fmt::Display for Line {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Line::Open => write!(f, "NFV-MIGRATE {PROTOCOL} OPEN"),
            Line::Challenge { nonce } => write!(f, "NFV-MIGRATE {PROTOCOL} CHALLENGE {nonce}"),
            Line::Response { mac, nonce } => write!(f, "RESPONSE {mac} {nonce}"),
            Line::Ok { proof } => write!(f, "OK {proof}"),
            Line::Denied => write!(f, "DENIED"),
            Line::Prepared { state_ns } => write!(f, "PREPARED {state_ns}"),
            Line::Synced {
                stream,
                seq,
                clock_ns,
            } => {
                write!(f, "SYNCED {stream} {seq}")?;
                match clock_ns {
                    Some(ns) => write!(f, " {ns}"),
                    None => Ok(()),
                }
            }
            Line::Ready => write!(f, "READY"),
            // one line: the reason's own line breaks become spaces
            Line::Error { why } => write!(f, "ERROR {}", why.replace(['\n', '\r'], " ")),
            Line::Go { paused_at_ns } => write!(f, "GO {paused_at_ns}"),
            Line::Running { downtime_ns, steps } => {
                write!(f, "RUNNING")?;
                if let Some(ns) = downtime_ns {
                    write!(f, " {ns}")?;
                }
                for (name, ns) in steps {
                    write!(f, " {name}={ns}")?;
                }
                Ok(())
            }
        }
    }
}

impl Line {
    /// The line with its newline, ready to write.
    pub fn to_wire(&self) -> String {
        format!("{self}\n")
    }

    /// Reads one line (with or without its newline).
    pub fn parse(line: &str) -> Result<Line, LineError> {
        let bad = |why: &str| LineError {
            line: line.trim_end().chars().take(200).collect(),
            why: why.to_string(),
        };
        let words: Vec<&str> = line.split_whitespace().collect();
        let unsigned = |w: &str, what: &str| -> Result<u64, LineError> {
            w.parse::<u64>()
                .map_err(|_| bad(&format!("{what} {w:?} is not a number from 0 to 2^64-1")))
        };
        Ok(match words.as_slice() {
            ["NFV-MIGRATE", v, rest @ ..] => {
                if *v != PROTOCOL.to_string() {
                    return Err(bad(&format!(
                        "protocol version {v} (this nfvisor speaks {PROTOCOL})"
                    )));
                }
                match rest {
                    ["OPEN"] => Line::Open,
                    ["CHALLENGE", nonce] => Line::Challenge {
                        nonce: nonce.to_string(),
                    },
                    _ => return Err(bad("a greeting is OPEN or CHALLENGE <nonce>")),
                }
            }
            ["RESPONSE", mac, nonce] => Line::Response {
                mac: mac.to_string(),
                nonce: nonce.to_string(),
            },
            ["OK", proof] => Line::Ok {
                proof: proof.to_string(),
            },
            ["DENIED"] => Line::Denied,
            ["PREPARED", ns] => Line::Prepared {
                state_ns: unsigned(ns, "state time")?,
            },
            // (older destinations did not say how long the state took)
            ["PREPARED"] => Line::Prepared { state_ns: 0 },
            ["SYNCED", stream, seq, clock @ ..] => Line::Synced {
                stream: unsigned(stream, "stream")? as usize,
                seq: unsigned(seq, "sequence number")?,
                // the clock is a measurement: one that cannot be read is
                // no sample, not a broken migration
                clock_ns: match clock {
                    [ns] => ns.parse().ok(),
                    _ => None,
                },
            },
            ["READY"] => Line::Ready,
            ["ERROR", ..] => Line::Error {
                why: line.trim().trim_start_matches("ERROR").trim().to_string(),
            },
            ["GO", ns] => Line::Go {
                paused_at_ns: ns
                    .parse::<u128>()
                    .map_err(|_| bad(&format!("pause time {ns:?} is not a non-negative number")))?,
            },
            // RUNNING means the guest runs there, whatever else the line
            // holds: reading it strictly would call a running guest's
            // outcome unknown. A figure that cannot be read is left out.
            ["RUNNING", rest @ ..] => Line::Running {
                downtime_ns: rest.first().and_then(|ns| ns.parse().ok()),
                steps: rest
                    .iter()
                    .skip(1)
                    .filter_map(|s| {
                        let (name, ns) = s.split_once('=')?;
                        Some((name.to_string(), ns.parse().ok()?))
                    })
                    .collect(),
            },
            [] => return Err(bad("an empty line (the peer closed the connection?)")),
            [word, ..] => return Err(bad(&format!("unknown control word {word:?}"))),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_line_round_trips() {
        for l in [
            Line::Open,
            Line::Challenge {
                nonce: "ab12".into(),
            },
            Line::Response {
                mac: "ff00".into(),
                nonce: "0a".into(),
            },
            Line::Ok { proof: "77".into() },
            Line::Denied,
            Line::Prepared { state_ns: 812_000 },
            Line::Synced {
                stream: 2,
                seq: 7,
                clock_ns: None,
            },
            Line::Synced {
                stream: 0,
                seq: 7,
                clock_ns: Some(1_764_000_000_000_000_000),
            },
            Line::Ready,
            Line::Error {
                why: "device com1: in_buffer = 65 bytes is out of range".into(),
            },
            Line::Go {
                paused_at_ns: 1_764_000_000_123_456_789,
            },
            Line::Running {
                downtime_ns: Some(-1_500_000),
                steps: vec![("stream_end".into(), 300_000), ("go".into(), -20)],
            },
        ] {
            assert_eq!(Line::parse(&l.to_wire()).unwrap(), l, "{l}");
        }
    }

    #[test]
    fn bad_lines_are_refused_quoting_them() {
        for (line, why) in [
            ("", "empty line"),
            ("HELLO", "unknown control word"),
            ("NFV-MIGRATE 1 OPEN", "protocol version 1"),
            ("GO soon", "pause time"),
            ("GO -5", "pause time"),
            ("SYNCED 0 x", "sequence number"),
            ("SYNCED 99999999999999999999999 1", "stream"),
        ] {
            let e = Line::parse(line).unwrap_err();
            assert!(e.to_string().contains(why), "{line}: {e}");
        }
    }

    #[test]
    fn running_means_running_whatever_else_the_line_holds() {
        assert_eq!(
            Line::parse("RUNNING x go=1 junk stream_end=y").unwrap(),
            Line::Running {
                downtime_ns: None,
                steps: vec![("go".into(), 1)],
            }
        );
        // and a clock that cannot be read is no clock sample
        assert_eq!(
            Line::parse("SYNCED 0 3 soon").unwrap(),
            Line::Synced {
                stream: 0,
                seq: 3,
                clock_ns: None
            }
        );
    }

    #[test]
    fn an_error_stays_on_one_line() {
        let l = Line::Error {
            why: "two\nlines".into(),
        };
        assert_eq!(l.to_wire(), "ERROR two lines\n");
    }
}

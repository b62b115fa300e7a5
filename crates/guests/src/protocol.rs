//! The host side of the guest line protocol (version 1).
//!
//! A guest writes, on COM1:
//! ```text
//! #NFV v1 guest=NAME tsc_khz=N          header: protocol version, guest
//! R KIND key=value key=value ...        a record (raw data for the host)
//! free text                             human summary lines
//! #END status=S                         last line; S also goes to port 0xf4
//! ```
//! Records used so far: `R config ...`, `R hist series=S bucket=B count=N`
//! (non-empty buckets only), `R histsum series=S unit=U width=W count min max
//! sum overflow`, `R cpu apic_id=N role=bsp|ap`, `R tick pass page`,
//! `R poke ...`. Unknown record kinds are kept, not rejected.

use std::collections::BTreeMap;

pub const VERSION: u32 = 1;

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ProtocolError {
    #[error("guest output line {line}: protocol version {found} is not supported (this nfvisor reads v{VERSION})")]
    Version { line: usize, found: String },
    #[error("guest output line {line}: malformed field {field:?} in {text:?}")]
    Field {
        line: usize,
        field: String,
        text: String,
    },
}

#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct Record {
    pub kind: String,
    pub fields: BTreeMap<String, String>,
}

impl Record {
    pub fn get(&self, key: &str) -> Option<&str> {
        self.fields.get(key).map(String::as_str)
    }

    pub fn u64(&self, key: &str) -> Option<u64> {
        self.get(key)?.parse().ok()
    }
}

/// Everything a guest said.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct GuestOutput {
    pub guest: Option<String>,
    pub header: BTreeMap<String, String>,
    pub records: Vec<Record>,
    /// Lines that are not protocol lines (the human summary, kernel output).
    pub text: Vec<String>,
    pub end_status: Option<u32>,
}

fn fields(
    line_no: usize,
    text: &str,
    words: &mut dyn Iterator<Item = &str>,
) -> Result<BTreeMap<String, String>, ProtocolError> {
    let mut map = BTreeMap::new();
    for w in words {
        let (k, v) = w.split_once('=').ok_or_else(|| ProtocolError::Field {
            line: line_no,
            field: w.to_string(),
            text: text.to_string(),
        })?;
        map.insert(k.to_string(), v.to_string());
    }
    Ok(map)
}

/// Parses a console transcript. Lines before the header (firmware, kernel
/// output) are kept as text. A guest restored from a snapshot or migrated
/// printed its header on the first host: there, records count when the
/// transcript ends with the protocol's `#END` line.
pub fn parse(transcript: &str) -> Result<GuestOutput, ProtocolError> {
    let mut out = GuestOutput::default();
    let headless = !transcript.lines().any(|l| l.starts_with("#NFV "))
        && transcript.lines().any(|l| l.starts_with("#END"));
    for (i, raw) in transcript.lines().enumerate() {
        let line_no = i + 1;
        let line = raw.trim_end_matches('\r');
        if let Some(rest) = line.strip_prefix("#NFV ") {
            let mut words = rest.split_whitespace();
            let version = words.next().unwrap_or("");
            if version != format!("v{VERSION}") {
                return Err(ProtocolError::Version {
                    line: line_no,
                    found: version.to_string(),
                });
            }
            out.header = fields(line_no, line, &mut words)?;
            out.guest = out.header.get("guest").cloned();
        } else if let Some(rest) = line.strip_prefix("#END") {
            let f = fields(line_no, line, &mut rest.split_whitespace())?;
            out.end_status = f.get("status").and_then(|s| s.parse().ok());
        } else if let Some(rest) = line
            .strip_prefix("R ")
            .filter(|_| out.guest.is_some() || headless)
        {
            let mut words = rest.split_whitespace();
            let kind = words.next().unwrap_or("").to_string();
            let fields = fields(line_no, line, &mut words)?;
            out.records.push(Record { kind, fields });
        } else {
            out.text.push(line.to_string());
        }
    }
    Ok(out)
}

/// Statistics of one histogram series, computed from its buckets.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct SeriesStats {
    pub series: String,
    pub unit: String,
    pub count: u64,
    pub min: u64,
    pub avg: u64,
    pub p50: u64,
    pub p99: u64,
    pub p999: u64,
    pub max: u64,
    pub overflow: u64,
    /// (bucket lower bound, count), non-empty buckets in order.
    pub buckets: Vec<(u64, u64)>,
}

impl GuestOutput {
    pub fn records<'a>(&'a self, kind: &'a str) -> impl Iterator<Item = &'a Record> + 'a {
        self.records.iter().filter(move |r| r.kind == kind)
    }

    /// Every histogram series the guest dumped.
    pub fn histograms(&self) -> Vec<SeriesStats> {
        let mut out = Vec::new();
        for sum in self.records("histsum") {
            let series = sum.get("series").unwrap_or("").to_string();
            let width = sum.u64("width").unwrap_or(1).max(1);
            let mut buckets: Vec<(u64, u64)> = self
                .records("hist")
                .filter(|r| r.get("series") == Some(series.as_str()))
                .filter_map(|r| Some((r.u64("bucket")? * width, r.u64("count")?)))
                .collect();
            buckets.sort_unstable();
            let count = sum.u64("count").unwrap_or(0);
            let max = sum.u64("max").unwrap_or(0);
            let quantile = |q: f64| {
                let want = ((count as f64) * q).ceil().max(1.0) as u64;
                let mut seen = 0;
                for &(v, n) in &buckets {
                    seen += n;
                    if seen >= want {
                        return v.min(max);
                    }
                }
                max // in the overflow
            };
            out.push(SeriesStats {
                unit: sum.get("unit").unwrap_or("").to_string(),
                count,
                min: sum.u64("min").unwrap_or(0),
                avg: sum.u64("sum").unwrap_or(0).checked_div(count).unwrap_or(0),
                p50: quantile(0.5),
                p99: quantile(0.99),
                p999: quantile(0.999),
                max,
                overflow: sum.u64("overflow").unwrap_or(0),
                buckets,
                series,
            });
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_header_records_histograms_and_end() {
        let t = "boot noise\n#NFV v1 guest=latency-probe tsc_khz=2000\nR config metric=timer\nR hist series=timer bucket=3 count=2\nR hist series=timer bucket=5 count=97\nR hist series=timer bucket=40 count=1\nR histsum series=timer unit=ns width=1000 count=100 min=3100 max=40500 sum=600000 overflow=0\nsummary line\n#END status=0\n";
        let o = parse(t).unwrap();
        assert_eq!(o.guest.as_deref(), Some("latency-probe"));
        assert_eq!(o.end_status, Some(0));
        assert_eq!(o.text, vec!["boot noise", "summary line"]);
        let h = &o.histograms()[0];
        assert_eq!((h.count, h.min, h.avg, h.max), (100, 3100, 6000, 40500));
        assert_eq!((h.p50, h.p99, h.p999), (5000, 5000, 40000));
        assert!(h.min <= h.p50 && h.p50 <= h.p99 && h.p99 <= h.max);
    }

    #[test]
    fn a_resumed_guest_without_its_header_still_counts() {
        let o = parse("R histsum series=timer unit=ns width=1000 count=1 min=5 max=5 sum=5 overflow=0\n#END status=0\n").unwrap();
        assert_eq!(o.histograms().len(), 1);
        assert!(parse("R something\n").unwrap().records.is_empty());
    }

    #[test]
    fn a_newer_protocol_or_a_broken_field_is_an_error() {
        assert!(matches!(
            parse("#NFV v9 guest=x\n"),
            Err(ProtocolError::Version { line: 1, .. })
        ));
        assert!(matches!(
            parse("#NFV v1 guest=x\nR hist bucket\n"),
            Err(ProtocolError::Field { line: 2, .. })
        ));
    }
}

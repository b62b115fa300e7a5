//! The migration stream, also the snapshot file format.
//!
//! ```text
//! stream  = header frame*                   ; ends with an End frame
//! header  = "NFVMIGR\0" version:u32le
//! frame   = kind:u8 len:u32le crc32:u32le payload[len]
//! ```
//! The CRC32 covers kind, len and payload, so a flipped bit anywhere in a
//! frame is caught; the End frame carries the number of frames before it,
//! so a stream cut at a frame boundary is caught too. Payloads:
//! - `Config`, `DeviceState`, `VcpuState`: opaque bytes (the VMM's own
//!   serialised state, versioned by the header);
//! - `Pages`: a run of (gpa:u64le, 4096 bytes of data) records;
//! - `ZeroPages`: gpa:u64le records: pages that are (now) all zero.
//!
//! A reader never trusts a length before checking it against the limit, and
//! never hands out a frame whose checksum fails.
//!
//! A migration with a token sends a keyed stream: each frame is followed by
//! a 16-byte tag, BLAKE3 keyed with the stream's key (derived from the
//! token and both ends' nonces) over the frame's number, kind, length and
//! payload. The CRC catches accidents; the tag catches anyone on the path
//! who changes, drops, reorders or adds a frame and fixes the CRC; the End
//! frame's tag authenticates the count. BLAKE3 rather than HMAC-SHA256:
//! it hashes at several GB/s a core, so every page is authenticated
//! without lengthening the migration much (BENCHMARKS.md).

use std::io::{self, Read, Write};

pub mod control;
pub mod report;

pub const MAGIC: &[u8; 8] = b"NFVMIGR\0";
/// 2: state frames in postcard instead of JSON. 3: the state frame holds
/// the VM's KVM state and each device's state keyed by device id.
pub const VERSION: u32 = 3;
pub const PAGE_SIZE: usize = 4096;
/// Largest payload a reader accepts (a frame of 1024 pages plus addresses).
pub const MAX_PAYLOAD: usize = 1024 * (PAGE_SIZE + 8);

/// A Pages frame built in place: the caller reads each page straight into
/// its slot, saving the copies `Writer::pages` makes of pages it is given.
pub struct PageBatch {
    buf: Vec<u8>,
}

impl Default for PageBatch {
    fn default() -> Self {
        PageBatch {
            buf: Vec::with_capacity(MAX_PAYLOAD),
        }
    }
}

impl PageBatch {
    /// The 4 KiB to fill with the page at `gpa` (the record is added now).
    pub fn slot(&mut self, gpa: u64) -> &mut [u8] {
        self.buf.extend_from_slice(&gpa.to_le_bytes());
        let at = self.buf.len();
        self.buf.resize(at + PAGE_SIZE, 0);
        &mut self.buf[at..]
    }

    /// No room for another page: write it (`Writer::page_batch`).
    pub fn is_full(&self) -> bool {
        self.buf.len() + PAGE_SIZE + 8 > MAX_PAYLOAD
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    Config = 1,
    Pages = 2,
    ZeroPages = 3,
    DeviceState = 4,
    VcpuState = 5,
    End = 6,
    /// A live migration's checkpoint (a u64 sequence number): the
    /// destination answers once it has applied everything before it.
    Sync = 7,
}

impl Kind {
    fn from_u8(v: u8) -> Option<Kind> {
        Some(match v {
            1 => Kind::Config,
            2 => Kind::Pages,
            3 => Kind::ZeroPages,
            4 => Kind::DeviceState,
            5 => Kind::VcpuState,
            6 => Kind::End,
            7 => Kind::Sync,
            _ => return None,
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error("not an nfvisor migration stream (bad magic)")]
    BadMagic,
    #[error("stream version {0} is not supported (this nfvisor reads version {VERSION})")]
    Version(u32),
    #[error("frame {index} at byte {offset}: unknown kind {kind}")]
    UnknownKind { index: u64, offset: u64, kind: u8 },
    #[error("frame {index} at byte {offset}: length {len} exceeds the limit {MAX_PAYLOAD}")]
    TooLong { index: u64, offset: u64, len: u32 },
    #[error("frame {index} at byte {offset}: checksum mismatch (stored {stored:#010x}, computed {computed:#010x})")]
    Checksum {
        index: u64,
        offset: u64,
        stored: u32,
        computed: u32,
    },
    #[error("the stream ends at byte {offset}, inside frame {index} (truncated)")]
    Truncated { index: u64, offset: u64 },
    #[error(
        "the stream ends at byte {offset} without its End frame (truncated after {frames} frames)"
    )]
    NoEnd { offset: u64, frames: u64 },
    #[error("End frame says {expected} frames, {seen} were read")]
    FrameCount { expected: u64, seen: u64 },
    #[error("frame {index}: malformed {what}")]
    Malformed { index: u64, what: &'static str },
    #[error("frame {index} at byte {offset}: its authentication tag does not match (changed on the way, or sent without the token)")]
    Forged { index: u64, offset: u64 },
    #[error("I/O: {0}")]
    Io(#[from] io::Error),
}

/// A keyed stream's key.
pub type StreamKey = [u8; 32];
/// Bytes of the tag after each frame of a keyed stream.
pub const TAG_LEN: usize = 16;

fn tag(key: &StreamKey, index: u64, kind: u8, payload: &[u8]) -> [u8; TAG_LEN] {
    let mut h = blake3::Hasher::new_keyed(key);
    h.update(&index.to_le_bytes());
    h.update(&[kind]);
    h.update(&(payload.len() as u32).to_le_bytes());
    h.update(payload);
    let mut out = [0u8; TAG_LEN];
    out.copy_from_slice(&h.finalize().as_bytes()[..TAG_LEN]);
    out
}

/// A frame's CRC32 (over kind, length and payload).
pub fn crc(kind: u8, payload: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&[kind]);
    h.update(&(payload.len() as u32).to_le_bytes());
    h.update(payload);
    h.finalize()
}

/// Writes a stream.
pub struct Writer<W: Write> {
    out: W,
    frames: u64,
    bytes: u64,
    key: Option<StreamKey>,
}

impl<W: Write> Writer<W> {
    pub fn new(mut out: W) -> io::Result<Self> {
        out.write_all(MAGIC)?;
        out.write_all(&VERSION.to_le_bytes())?;
        Ok(Writer {
            out,
            frames: 0,
            bytes: 12,
            key: None,
        })
    }

    /// A keyed stream: every frame carries its tag.
    pub fn keyed(out: W, key: StreamKey) -> io::Result<Self> {
        let mut w = Writer::new(out)?;
        w.key = Some(key);
        Ok(w)
    }

    pub fn frame(&mut self, kind: Kind, payload: &[u8]) -> io::Result<()> {
        assert!(payload.len() <= MAX_PAYLOAD, "frame payload over the limit");
        let k = kind as u8;
        self.out.write_all(&[k])?;
        self.out.write_all(&(payload.len() as u32).to_le_bytes())?;
        self.out.write_all(&crc(k, payload).to_le_bytes())?;
        self.out.write_all(payload)?;
        if let Some(key) = &self.key {
            self.out.write_all(&tag(key, self.frames, k, payload))?;
            self.bytes += TAG_LEN as u64;
        }
        self.frames += 1;
        self.bytes += 9 + payload.len() as u64;
        Ok(())
    }

    /// Writes the Pages frame `batch` holds (if any) and empties it.
    pub fn page_batch(&mut self, batch: &mut PageBatch) -> io::Result<()> {
        if !batch.buf.is_empty() {
            self.frame(Kind::Pages, &batch.buf)?;
            batch.buf.clear();
        }
        Ok(())
    }

    /// Pages as (gpa, data) records, split into frames under the limit.
    pub fn pages<'a>(
        &mut self,
        pages: impl IntoIterator<Item = (u64, &'a [u8])>,
    ) -> io::Result<u64> {
        let mut batch = PageBatch::default();
        let mut n = 0;
        for (gpa, data) in pages {
            if data.len() != PAGE_SIZE {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("page {gpa:#x}: {} bytes, not {PAGE_SIZE}", data.len()),
                ));
            }
            batch.slot(gpa).copy_from_slice(data);
            n += 1;
            if batch.is_full() {
                self.page_batch(&mut batch)?;
            }
        }
        self.page_batch(&mut batch)?;
        Ok(n)
    }

    /// Pages that are zero, as addresses.
    pub fn zero_pages(&mut self, gpas: &[u64]) -> io::Result<()> {
        for chunk in gpas.chunks(MAX_PAYLOAD / 8) {
            let buf: Vec<u8> = chunk.iter().flat_map(|g| g.to_le_bytes()).collect();
            self.frame(Kind::ZeroPages, &buf)?;
        }
        Ok(())
    }

    /// Pushes what is buffered to the sink.
    pub fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }

    /// The End frame; returns the sink and the bytes written.
    pub fn finish(mut self) -> io::Result<(W, u64)> {
        let frames = self.frames;
        self.frame(Kind::End, &frames.to_le_bytes())?;
        self.out.flush()?;
        Ok((self.out, self.bytes))
    }
}

/// A frame as read: kind and verified payload.
#[derive(Debug)]
pub struct Frame {
    pub index: u64,
    pub kind: Kind,
    pub payload: Vec<u8>,
}

impl Frame {
    /// (gpa, page) records of a Pages frame.
    pub fn pages(&self) -> Result<Vec<(u64, &[u8])>, StreamError> {
        if self.kind != Kind::Pages || !self.payload.len().is_multiple_of(PAGE_SIZE + 8) {
            return Err(StreamError::Malformed {
                index: self.index,
                what: "page records",
            });
        }
        Ok(self
            .payload
            .chunks_exact(PAGE_SIZE + 8)
            .map(|r| (u64::from_le_bytes(r[..8].try_into().unwrap()), &r[8..]))
            .collect())
    }

    /// Addresses of a ZeroPages frame.
    pub fn zero_pages(&self) -> Result<Vec<u64>, StreamError> {
        if self.kind != Kind::ZeroPages || !self.payload.len().is_multiple_of(8) {
            return Err(StreamError::Malformed {
                index: self.index,
                what: "zero page list",
            });
        }
        Ok(self
            .payload
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
            .collect())
    }
}

/// Reads a stream, verifying every frame.
pub struct Reader<R: Read> {
    input: R,
    offset: u64,
    frames: u64,
    done: bool,
    /// A payload buffer handed back (`recycle`): the next frame is read
    /// into it, so a stream of 4 MiB frames is not allocated and zeroed
    /// again for each.
    spare: Vec<u8>,
    key: Option<StreamKey>,
}

fn read_full<R: Read>(r: &mut R, buf: &mut [u8]) -> io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

impl<R: Read> Reader<R> {
    pub fn new(mut input: R) -> Result<Self, StreamError> {
        let mut head = [0u8; 12];
        if read_full(&mut input, &mut head)? < 12 || &head[..8] != MAGIC {
            return Err(StreamError::BadMagic);
        }
        let version = u32::from_le_bytes(head[8..].try_into().unwrap());
        if version != VERSION {
            return Err(StreamError::Version(version));
        }
        Ok(Reader {
            input,
            offset: 12,
            frames: 0,
            done: false,
            spare: Vec::new(),
            key: None,
        })
    }

    /// A keyed stream: a frame whose tag does not match is refused.
    pub fn keyed(input: R, key: StreamKey) -> Result<Self, StreamError> {
        let mut r = Reader::new(input)?;
        r.key = Some(key);
        Ok(r)
    }

    /// Hands a frame's payload back once used: the next frame reuses it.
    pub fn recycle(&mut self, payload: Vec<u8>) {
        if payload.capacity() > self.spare.capacity() {
            self.spare = payload;
        }
    }

    /// The next frame before End; None after a valid End frame.
    pub fn next_frame(&mut self) -> Result<Option<Frame>, StreamError> {
        if self.done {
            return Ok(None);
        }
        let (index, offset) = (self.frames, self.offset);
        let mut head = [0u8; 9];
        match read_full(&mut self.input, &mut head)? {
            0 => {
                return Err(StreamError::NoEnd {
                    offset,
                    frames: self.frames,
                })
            }
            9 => {}
            _ => return Err(StreamError::Truncated { index, offset }),
        }
        let kind = Kind::from_u8(head[0]).ok_or(StreamError::UnknownKind {
            index,
            offset,
            kind: head[0],
        })?;
        let len = u32::from_le_bytes(head[1..5].try_into().unwrap());
        if len as usize > MAX_PAYLOAD {
            return Err(StreamError::TooLong { index, offset, len });
        }
        let stored = u32::from_le_bytes(head[5..9].try_into().unwrap());
        let mut payload = std::mem::take(&mut self.spare);
        // (a recycled buffer at least this long is only truncated)
        payload.resize(len as usize, 0);
        if read_full(&mut self.input, &mut payload)? < len as usize {
            return Err(StreamError::Truncated { index, offset });
        }
        let computed = crc(head[0], &payload);
        if computed != stored {
            return Err(StreamError::Checksum {
                index,
                offset,
                stored,
                computed,
            });
        }
        if let Some(key) = &self.key {
            let mut got = [0u8; TAG_LEN];
            if read_full(&mut self.input, &mut got)? < TAG_LEN {
                return Err(StreamError::Truncated { index, offset });
            }
            let want = tag(key, index, head[0], &payload);
            // constant time: no early exit on the first differing byte
            if got.iter().zip(want).fold(0u8, |a, (x, y)| a | (x ^ y)) != 0 {
                return Err(StreamError::Forged { index, offset });
            }
            self.offset += TAG_LEN as u64;
        }
        self.offset += 9 + len as u64;
        if kind == Kind::End {
            let expected = payload
                .as_slice()
                .try_into()
                .map(u64::from_le_bytes)
                .map_err(|_| StreamError::Malformed {
                    index,
                    what: "End frame",
                })?;
            if expected != self.frames {
                return Err(StreamError::FrameCount {
                    expected,
                    seen: self.frames,
                });
            }
            self.done = true;
            return Ok(None);
        }
        self.frames += 1;
        Ok(Some(Frame {
            index,
            kind,
            payload,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<u8> {
        let mut w = Writer::new(Vec::new()).unwrap();
        w.frame(Kind::Config, b"{\"vcpus\":1}").unwrap();
        let page = [7u8; PAGE_SIZE];
        let pages: Vec<(u64, &[u8])> = (0..3).map(|i| (i * 4096, &page[..])).collect();
        w.pages(pages).unwrap();
        w.zero_pages(&[0x5000, 0x6000]).unwrap();
        w.frame(Kind::VcpuState, b"state").unwrap();
        w.finish().unwrap().0
    }

    fn read_all(bytes: &[u8]) -> Result<Vec<Frame>, StreamError> {
        let mut r = Reader::new(bytes)?;
        let mut frames = Vec::new();
        while let Some(f) = r.next_frame()? {
            frames.push(f);
        }
        Ok(frames)
    }

    const KEY: StreamKey = [0x5a; 32];

    fn keyed_sample() -> Vec<u8> {
        let mut w = Writer::keyed(Vec::new(), KEY).unwrap();
        w.frame(Kind::Config, b"{}").unwrap();
        w.pages([(0u64, &[7u8; PAGE_SIZE][..])]).unwrap();
        w.finish().unwrap().0
    }

    fn read_keyed(bytes: &[u8], key: StreamKey) -> Result<Vec<Frame>, StreamError> {
        let mut r = Reader::keyed(bytes, key)?;
        let mut frames = Vec::new();
        while let Some(f) = r.next_frame()? {
            frames.push(f);
        }
        Ok(frames)
    }

    #[test]
    fn a_keyed_stream_round_trips_and_refuses_a_page_changed_with_its_crc_fixed() {
        let s = keyed_sample();
        assert_eq!(read_keyed(&s, KEY).unwrap().len(), 2);
        // someone on the path changes a page byte and fixes the CRC
        let pages_at = 12 + 9 + 2 + TAG_LEN;
        let mut t = s.clone();
        t[pages_at + 9 + 8 + 100] ^= 0xff;
        let len = u32::from_le_bytes(t[pages_at + 1..pages_at + 5].try_into().unwrap()) as usize;
        let fixed = crc(t[pages_at], &t[pages_at + 9..pages_at + 9 + len]);
        t[pages_at + 5..pages_at + 9].copy_from_slice(&fixed.to_le_bytes());
        assert!(
            read_all(&t[..]).is_err(),
            "(a keyed stream is not a plain one)"
        );
        match read_keyed(&t, KEY) {
            Err(e @ StreamError::Forged { index: 1, .. }) => {
                assert!(e.to_string().contains("authentication tag"), "{e}")
            }
            other => panic!("{other:?}"),
        }
        // another key (a source without the token) fails at the first frame
        assert!(matches!(
            read_keyed(&s, [1; 32]),
            Err(StreamError::Forged { index: 0, .. })
        ));
        // a plain stream read as keyed is refused too
        assert!(read_keyed(&sample(), KEY).is_err());
        // and every cut
        for cut in 0..s.len() {
            assert!(read_keyed(&s[..cut], KEY).is_err(), "cut at {cut}");
        }
    }

    #[test]
    fn a_stream_round_trips() {
        let frames = read_all(&sample()).unwrap();
        let kinds: Vec<Kind> = frames.iter().map(|f| f.kind).collect();
        assert_eq!(
            kinds,
            [Kind::Config, Kind::Pages, Kind::ZeroPages, Kind::VcpuState]
        );
        let pages = frames[1].pages().unwrap();
        assert_eq!(pages.len(), 3);
        assert_eq!(pages[2].0, 8192);
        assert!(pages[2].1.iter().all(|&b| b == 7));
        assert_eq!(frames[2].zero_pages().unwrap(), [0x5000, 0x6000]);
    }

    #[test]
    fn another_version_is_refused_by_name() {
        let mut old = sample();
        old[8..12].copy_from_slice(&1u32.to_le_bytes());
        match read_all(&old) {
            Err(e @ StreamError::Version(1)) => {
                assert!(e.to_string().contains("version 1"), "{e}")
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn every_truncation_is_refused() {
        let s = sample();
        for cut in 0..s.len() {
            assert!(
                read_all(&s[..cut]).is_err(),
                "a stream cut at {cut} of {} was accepted",
                s.len()
            );
        }
    }

    #[test]
    fn every_flipped_bit_is_refused() {
        let s = sample();
        for i in 0..s.len() {
            for bit in [0, 3, 7] {
                let mut t = s.clone();
                t[i] ^= 1 << bit;
                assert!(
                    read_all(&t).is_err(),
                    "a flip of bit {bit} at byte {i} was accepted"
                );
            }
        }
    }

    #[test]
    fn errors_name_the_place() {
        let mut s = sample();
        s[8] = 9; // version
        assert!(read_all(&s).unwrap_err().to_string().contains("version 9"));
        let s = sample();
        let e = read_all(&s[..s.len() - 3]).unwrap_err().to_string();
        assert!(e.contains("truncated"), "{e}");
    }
}

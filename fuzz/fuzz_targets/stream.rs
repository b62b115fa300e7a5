//! The migration/snapshot stream parser must refuse any input without a
//! panic: `cargo +nightly fuzz run stream` (kept out of .ci/run).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(mut reader) = migration::Reader::new(data) {
        while let Ok(Some(frame)) = reader.next_frame() {
            let _ = frame.pages();
            let _ = frame.zero_pages();
        }
    }
});

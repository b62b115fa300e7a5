//! The dirty log a migrating frontend hands over (LOG_SHMFD).
//!
//! The `vhost-user-backend` crate's own region bitmap takes a read lock on
//! every write the switch makes into a frontend's memory, logging or not:
//! a third of a 64-byte frame's cost in the PMD. This wrapper keeps that
//! bitmap (and its handling of the log) and skips it with one relaxed load
//! until the frontend has handed a log over; its slices borrow it rather
//! than clone it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use vhost_user_backend::bitmap::{AtomicBitmapMmap, BitmapMmapRegion, BitmapReplace};
use vm_memory::bitmap::{Bitmap, NewBitmap, RefSlice, WithBitmapSlice};

/// A region's dirty bitmap: off until a log is handed over.
#[derive(Debug, Clone, Default)]
pub struct DirtyLog {
    on: Arc<AtomicBool>,
    region: BitmapMmapRegion,
}

impl<'a> WithBitmapSlice<'a> for DirtyLog {
    type S = RefSlice<'a, Self>;
}

impl Bitmap for DirtyLog {
    fn mark_dirty(&self, offset: usize, len: usize) {
        if self.on.load(Ordering::Relaxed) {
            self.region.mark_dirty(offset, len);
        }
    }

    fn dirty_at(&self, offset: usize) -> bool {
        self.on.load(Ordering::Relaxed) && self.region.dirty_at(offset)
    }

    fn slice_at(&self, offset: usize) -> RefSlice<'_, Self> {
        RefSlice::new(self, offset)
    }
}

impl NewBitmap for DirtyLog {
    fn with_len(len: usize) -> Self {
        DirtyLog {
            on: Arc::new(AtomicBool::new(false)),
            region: BitmapMmapRegion::with_len(len),
        }
    }
}

impl BitmapReplace for DirtyLog {
    type InnerBitmap = AtomicBitmapMmap;

    fn replace(&self, bitmap: AtomicBitmapMmap) {
        self.region.replace(bitmap);
        self.on.store(true, Ordering::Release);
        tracing::info!(
            "a frontend handed its dirty log over: its pages the switch writes are logged"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unset_log_marks_nothing() {
        let b = DirtyLog::with_len(1 << 20);
        b.mark_dirty(0, 4096);
        assert!(!b.dirty_at(0));
        assert!(!b.slice_at(4096).dirty_at(0));
    }
}

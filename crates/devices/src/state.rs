//! Each device owns its state: it saves itself into a plain serde struct
//! kept beside it and is rebuilt from one. A snapshot or a migration stream
//! carries those states keyed by device id, as opaque [`DeviceBlob`]s, and
//! never names a device type; the device checks the blob's kind and
//! version and every field before it takes any of it.

use std::collections::BTreeMap;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// One device's saved state as it travels: what kind of state, which
/// version of it, and its bytes (postcard).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceBlob {
    pub kind: String,
    pub version: u16,
    pub data: Vec<u8>,
}

/// Every device's state, keyed by device id.
pub type DeviceStates = BTreeMap<String, DeviceBlob>;

/// Why a device refused a state. Each names the device.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StateError {
    #[error("device {id}: the stream holds {found:?} state, this device is {expected:?}")]
    WrongKind {
        id: String,
        expected: String,
        found: String,
    },
    #[error("device {id}: {kind} state version {found} is not known (this nfvisor reads version {known})")]
    Version {
        id: String,
        kind: String,
        found: u16,
        known: u16,
    },
    #[error("device {id}: malformed {kind} state: {why}")]
    Malformed {
        id: String,
        kind: String,
        why: String,
    },
    #[error("device {id}: {field} = {value} is out of range: {why}")]
    OutOfRange {
        id: String,
        field: String,
        value: String,
        why: String,
    },
    #[error("device {id}: the stream has no state for it (the source VM had no such device)")]
    Missing { id: String },
    #[error("device {id}: the stream holds its state but this VM has no such device")]
    Unknown { id: String },
    #[error("device {id}: restoring its state: {why}")]
    Apply { id: String, why: String },
}

/// A field that a restore found out of range (the device's `validate`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadField {
    pub field: &'static str,
    pub value: String,
    pub why: String,
}

impl BadField {
    pub fn new(field: &'static str, value: impl std::fmt::Display, why: impl Into<String>) -> Self {
        BadField {
            field,
            value: value.to_string(),
            why: why.into(),
        }
    }
}

/// A device whose state can be saved and restored (Firecracker's
/// `Persist`, in one direction per call).
pub trait Persist {
    /// The kind of state, as the stream names it.
    const KIND: &'static str;
    /// The version this build writes and reads.
    const VERSION: u16;
    type State: Serialize + DeserializeOwned;

    fn save(&self) -> Self::State;
    /// Checks every field of `state` before anything is taken.
    fn validate(state: &Self::State) -> Result<(), BadField>;
    /// Takes a validated state.
    fn restore(&self, state: Self::State) -> Result<(), String>;

    /// What the device counts (status, `--json`, the run report).
    fn counters(&self) -> Vec<(&'static str, u64)> {
        Vec::new()
    }

    /// The device's own threads and where they run (the run report shows
    /// them beside the vCPU threads).
    fn threads(&self) -> Vec<DeviceThread> {
        Vec::new()
    }

    /// Why this device cannot be saved or migrated, if it cannot.
    fn unmovable(&self) -> Option<String> {
        None
    }

    /// A device-specific action asked through the control API (ivshmem's
    /// window map/unmap); returns what it did.
    fn control(&self, action: &str) -> Result<String, String> {
        Err(format!("{} takes no action {action:?}", Self::KIND))
    }

    /// The VM pauses: a device with its own threads stops touching guest
    /// memory until `resume` (so a saved state and the memory agree).
    fn pause(&self) {}

    fn resume(&self) {}

    /// Migration: the guest pages written outside this process for the
    /// device (a vhost-user backend) are logged from `on` until off.
    fn dirty_log(&self, on: bool) -> Result<(), String> {
        let _ = on;
        Ok(())
    }

    /// The pages logged since the last call: `mark(first guest-physical
    /// page number of a word of 64, bits)`; returns how many.
    fn harvest_dirty(&self, mark: &mut dyn FnMut(u64, u64)) -> u64 {
        let _ = mark;
        0
    }
}

/// A device's thread as it found itself after placing itself (a queue
/// worker pinned to a CPU, at SCHED_FIFO).
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
pub struct DeviceThread {
    /// The thread's name.
    pub thread: String,
    pub tid: i32,
    /// The CPUs it may run on, read back.
    pub cpus: Vec<usize>,
    pub policy: String,
    pub priority: i32,
    /// Each setting asked for: applied (what) or not (why).
    pub settings: Vec<crate::state::ThreadSetting>,
}

/// One placement setting of a device thread.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
pub struct ThreadSetting {
    pub name: String,
    pub applied: bool,
    pub detail: String,
}

/// The device side the VM sees: any [`Persist`] device, as an object.
pub trait Stateful: Send + Sync {
    fn kind(&self) -> &'static str;
    fn save_blob(&self) -> DeviceBlob;
    /// Decodes and validates `blob`, then restores it; `id` names the
    /// device in the error.
    fn restore_blob(&self, id: &str, blob: &DeviceBlob) -> Result<(), StateError>;
    /// Decodes and validates `blob` without taking it.
    fn check_blob(&self, id: &str, blob: &DeviceBlob) -> Result<(), StateError>;
    fn counters(&self) -> Vec<(&'static str, u64)>;
    fn threads(&self) -> Vec<DeviceThread>;
    fn unmovable(&self) -> Option<String>;
    fn control(&self, action: &str) -> Result<String, String>;
    fn pause(&self);
    fn resume(&self);
    fn dirty_log(&self, on: bool) -> Result<(), String>;
    fn harvest_dirty(&self, mark: &mut dyn FnMut(u64, u64)) -> u64;
}

impl<T: Persist + Send + Sync> Stateful for T {
    fn kind(&self) -> &'static str {
        T::KIND
    }

    fn counters(&self) -> Vec<(&'static str, u64)> {
        Persist::counters(self)
    }

    fn threads(&self) -> Vec<DeviceThread> {
        Persist::threads(self)
    }

    fn unmovable(&self) -> Option<String> {
        Persist::unmovable(self)
    }

    fn control(&self, action: &str) -> Result<String, String> {
        Persist::control(self, action)
    }

    fn pause(&self) {
        Persist::pause(self)
    }

    fn resume(&self) {
        Persist::resume(self)
    }

    fn dirty_log(&self, on: bool) -> Result<(), String> {
        Persist::dirty_log(self, on)
    }

    fn harvest_dirty(&self, mark: &mut dyn FnMut(u64, u64)) -> u64 {
        Persist::harvest_dirty(self, mark)
    }

    fn check_blob(&self, id: &str, blob: &DeviceBlob) -> Result<(), StateError> {
        checked::<T>(id, blob).map(|_| ())
    }

    fn save_blob(&self) -> DeviceBlob {
        DeviceBlob {
            kind: T::KIND.to_string(),
            version: T::VERSION,
            data: encode(&self.save()),
        }
    }

    fn restore_blob(&self, id: &str, blob: &DeviceBlob) -> Result<(), StateError> {
        let state = checked::<T>(id, blob)?;
        self.restore(state).map_err(|why| StateError::Apply {
            id: id.to_string(),
            why,
        })
    }
}

/// Decodes and validates a blob.
fn checked<T: Persist>(id: &str, blob: &DeviceBlob) -> Result<T::State, StateError> {
    let state = decode::<T>(id, blob)?;
    T::validate(&state).map_err(|b| StateError::OutOfRange {
        id: id.to_string(),
        field: b.field.to_string(),
        value: b.value,
        why: b.why,
    })?;
    Ok(state)
}

/// A state's bytes as a blob carries them.
pub fn encode<S: Serialize>(state: &S) -> Vec<u8> {
    postcard::to_stdvec(state).expect("plain data always serialises")
}

/// Checks a blob's kind and version and decodes it.
pub fn decode<T: Persist>(id: &str, blob: &DeviceBlob) -> Result<T::State, StateError> {
    if blob.kind != T::KIND {
        return Err(StateError::WrongKind {
            id: id.to_string(),
            expected: T::KIND.to_string(),
            found: blob.kind.clone(),
        });
    }
    if blob.version != T::VERSION {
        return Err(StateError::Version {
            id: id.to_string(),
            kind: T::KIND.to_string(),
            found: blob.version,
            known: T::VERSION,
        });
    }
    postcard::from_bytes(&blob.data).map_err(|e| StateError::Malformed {
        id: id.to_string(),
        kind: T::KIND.to_string(),
        why: e.to_string(),
    })
}

/// Test helpers every device's state tests share (crosvm runs one suite on
/// every device): a save round-trips, another version and another kind are
/// refused by name, and every truncation of the bytes is refused.
#[cfg(test)]
pub(crate) mod suite {
    use super::*;

    pub fn check<T: Persist + Stateful>(dev: &T, fresh: &T) {
        let blob = dev.save_blob();
        fresh.restore_blob("dev0", &blob).unwrap();
        assert_eq!(
            fresh.save_blob(),
            blob,
            "a restored device saves the same state"
        );
        let mut newer = blob.clone();
        newer.version += 1;
        let e = fresh.restore_blob("dev0", &newer).unwrap_err();
        assert!(matches!(e, StateError::Version { .. }), "{e}");
        assert!(e.to_string().starts_with("device dev0:"), "{e}");
        let mut other = blob.clone();
        other.kind = "something-else".into();
        let e = fresh.restore_blob("dev0", &other).unwrap_err();
        assert!(matches!(e, StateError::WrongKind { .. }), "{e}");
        for cut in 0..blob.data.len() {
            let mut short = blob.clone();
            short.data.truncate(cut);
            assert!(fresh.restore_blob("dev0", &short).is_err(), "cut at {cut}");
        }
    }
}

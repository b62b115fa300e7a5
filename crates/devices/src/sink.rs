//! A device that accepts every access and does nothing: the target of the
//! exit benchmark, so an exit round trip measures the VMM's exit path alone.

use crate::BusDevice;

pub struct Sink {
    name: String,
}

impl Sink {
    pub fn new(name: &str) -> Self {
        Self {
            name: name.to_string(),
        }
    }
}

impl BusDevice for Sink {
    fn name(&self) -> &str {
        &self.name
    }

    fn read(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&self, _offset: u64, _data: &[u8]) {}
}

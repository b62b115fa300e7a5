//! COM1: a 16550 UART (vm-superio) whose output goes into a buffer that a
//! housekeeping thread drains, so a vCPU thread never blocks on the console.

use std::io::{self, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use crate::BusDevice;

/// Bytes the guest wrote, waiting for the housekeeping thread. Bounded: past
/// `capacity` bytes waiting, output is dropped and counted, never waited on.
pub struct ConsoleBuffer {
    pending: Mutex<Vec<u8>>,
    capacity: usize,
    dropped: AtomicU64,
}

impl ConsoleBuffer {
    pub fn new(capacity: usize) -> Arc<Self> {
        Arc::new(Self {
            pending: Mutex::new(Vec::with_capacity(capacity.min(1 << 16))),
            capacity,
            dropped: AtomicU64::new(0),
        })
    }

    fn push(&self, bytes: &[u8]) {
        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        if pending.len() + bytes.len() > self.capacity {
            self.dropped
                .fetch_add(bytes.len() as u64, Ordering::Relaxed);
            return;
        }
        pending.extend_from_slice(bytes);
    }

    /// Takes what is waiting (swaps buffers; the caller keeps `into` for reuse).
    pub fn take_into(&self, into: &mut Vec<u8>) {
        into.clear();
        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        std::mem::swap(&mut *pending, into);
    }

    /// Bytes dropped because the housekeeping thread fell behind.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

/// The UART's output end.
pub struct BufferWriter(Arc<ConsoleBuffer>);

impl Write for BufferWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.push(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Raises the UART's interrupt line through an irqfd.
pub struct IrqFdTrigger(pub EventFd);

impl Trigger for IrqFdTrigger {
    type E = io::Error;

    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

pub struct SerialConsole {
    uart: Mutex<Serial<IrqFdTrigger, vm_superio::serial::NoEvents, BufferWriter>>,
}

impl SerialConsole {
    pub fn new(irq: EventFd, buffer: Arc<ConsoleBuffer>) -> Self {
        Self {
            uart: Mutex::new(Serial::new(IrqFdTrigger(irq), BufferWriter(buffer))),
        }
    }

    /// The UART's registers, for snapshots.
    pub fn state(&self) -> vm_superio::serial::SerialState {
        self.uart.lock().unwrap_or_else(|e| e.into_inner()).state()
    }

    /// Puts the UART's registers back (same interrupt line, same output).
    pub fn restore(&self, state: &vm_superio::serial::SerialState) -> std::io::Result<()> {
        let mut uart = self.uart.lock().unwrap_or_else(|e| e.into_inner());
        let irq = IrqFdTrigger(uart.interrupt_evt().0.try_clone()?);
        let out = BufferWriter(uart.writer().0.clone());
        *uart = Serial::from_state(state, irq, vm_superio::serial::NoEvents, out)
            .map_err(|e| std::io::Error::other(format!("COM1 state: {e:?}")))?;
        Ok(())
    }
}

impl BusDevice for SerialConsole {
    fn name(&self) -> &str {
        "com1"
    }

    fn read(&self, offset: u64, data: &mut [u8]) {
        let v = self
            .uart
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .read(offset as u8);
        data.fill(0);
        data[0] = v;
    }

    fn write(&self, offset: u64, data: &[u8]) {
        if let Some(&v) = data.first() {
            if let Err(e) = self
                .uart
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .write(offset as u8, v)
            {
                tracing::warn!("com1: write at offset {offset}: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_reach_the_buffer_and_overflow_is_counted() {
        let buf = ConsoleBuffer::new(4);
        let com1 = SerialConsole::new(EventFd::new(0).unwrap(), buf.clone());
        for b in b"hello" {
            com1.write(0, &[*b]);
        }
        let mut out = Vec::new();
        buf.take_into(&mut out);
        assert_eq!(out, b"hell");
        assert_eq!(buf.dropped(), 1);
        // LSR: transmitter empty
        let mut lsr = [0u8];
        com1.read(5, &mut lsr);
        assert_ne!(lsr[0] & 0x20, 0);
    }
}

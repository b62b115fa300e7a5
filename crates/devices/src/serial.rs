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

/// COM1's registers and receive FIFO: vm-superio's `SerialState`, which has
/// no serde, field for field.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SerialConsoleState {
    pub baud_divisor_low: u8,
    pub baud_divisor_high: u8,
    pub interrupt_enable: u8,
    pub interrupt_identification: u8,
    pub line_control: u8,
    pub line_status: u8,
    pub modem_control: u8,
    pub modem_status: u8,
    pub scratch: u8,
    pub in_buffer: Vec<u8>,
}

/// The 16550's receive FIFO.
const FIFO_SIZE: usize = 64;

pub struct SerialConsole {
    uart: Mutex<Serial<IrqFdTrigger, vm_superio::serial::NoEvents, BufferWriter>>,
}

impl SerialConsole {
    pub fn new(irq: EventFd, buffer: Arc<ConsoleBuffer>) -> Self {
        Self {
            uart: Mutex::new(Serial::new(IrqFdTrigger(irq), BufferWriter(buffer))),
        }
    }
}

impl crate::Persist for SerialConsole {
    const KIND: &'static str = "uart-16550";
    const VERSION: u16 = 1;
    type State = SerialConsoleState;

    fn save(&self) -> SerialConsoleState {
        let s = self.uart.lock().unwrap_or_else(|e| e.into_inner()).state();
        SerialConsoleState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
    }

    fn validate(s: &SerialConsoleState) -> Result<(), crate::state::BadField> {
        if s.in_buffer.len() > FIFO_SIZE {
            return Err(crate::state::BadField::new(
                "in_buffer",
                format!("{} bytes", s.in_buffer.len()),
                format!("the receive FIFO holds {FIFO_SIZE}"),
            ));
        }
        Ok(())
    }

    /// Same interrupt line, same output; the registers from `s`.
    fn restore(&self, s: SerialConsoleState) -> Result<(), String> {
        let state = vm_superio::serial::SerialState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        };
        let mut uart = self.uart.lock().unwrap_or_else(|e| e.into_inner());
        let irq = IrqFdTrigger(
            uart.interrupt_evt()
                .0
                .try_clone()
                .map_err(|e| format!("its interrupt eventfd: {e}"))?,
        );
        let out = BufferWriter(uart.writer().0.clone());
        *uart = Serial::from_state(&state, irq, vm_superio::serial::NoEvents, out)
            .map_err(|e| format!("{e:?}"))?;
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
                crate::limited!(warn, "com1: write at offset {offset}: {e}");
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

    #[test]
    fn its_state_round_trips_and_bad_state_is_refused_by_name() {
        use crate::{Persist, Stateful};
        let com1 = SerialConsole::new(EventFd::new(0).unwrap(), ConsoleBuffer::new(64));
        com1.write(7, &[0x5a]); // scratch
        com1.write(3, &[0x03]); // 8N1
        let fresh = SerialConsole::new(EventFd::new(0).unwrap(), ConsoleBuffer::new(64));
        crate::state::suite::check(&com1, &fresh);
        assert_eq!(fresh.save().scratch, 0x5a);
        let mut full = com1.save();
        full.in_buffer = vec![0; 65];
        let blob = crate::DeviceBlob {
            data: postcard::to_stdvec(&full).unwrap(),
            ..com1.save_blob()
        };
        let e = fresh.restore_blob("com1", &blob).unwrap_err().to_string();
        assert!(
            e.contains("device com1: in_buffer = 65 bytes is out of range"),
            "{e}"
        );
        assert_eq!(
            fresh.save().scratch,
            0x5a,
            "a refused state changes nothing"
        );
    }
}

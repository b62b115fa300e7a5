//! The virtio-net control queue (virtio 1.2, 5.1.6.5), whoever serves the
//! NIC's frames (the TAP NIC's worker, the vhost-user NIC's thread): the
//! one parser of guest control commands, and the fuzz target's.

use virtio_queue::QueueT;
use vm_memory::{GuestAddress, GuestMemory};

/// The most queue pairs a NIC takes (`queues=`).
pub const MAX_PAIRS: u16 = 16;
/// The longest control command read (class, command, data).
const CTRL_MAX: usize = 64;
pub const CTRL_CLASS_ANNOUNCE: u8 = 3;
pub const CTRL_ANNOUNCE_ACK: u8 = 0;
pub const CTRL_CLASS_MQ: u8 = 4;
pub const CTRL_MQ_VQ_PAIRS_SET: u8 = 0;
pub const CTRL_CLASS_GUEST_OFFLOADS: u8 = 5;
pub const CTRL_GUEST_OFFLOADS_SET: u8 = 0;
pub const CTRL_OK: u8 = 0;
pub const CTRL_ERR: u8 = 1;

/// What the negotiated features let the driver ask for.
#[derive(Debug, Clone, Default)]
pub struct CtrlOffer {
    /// MQ: VQ_PAIRS_SET of 1 to `max_pairs`.
    pub mq: bool,
    pub max_pairs: u16,
    /// GUEST_ANNOUNCE: ANNOUNCE_ACK.
    pub announce: bool,
    /// CTRL_GUEST_OFFLOADS: GUEST_OFFLOADS_SET of a subset of these
    /// (the negotiated GUEST_* feature bits).
    pub guest_offloads: Option<u64>,
}

/// A command the driver asked for, checked against the offer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CtrlCommand {
    Pairs(u16),
    AnnounceAck,
    GuestOffloads(u64),
}

/// A control command read from a chain: its bytes (class, command,
/// data) and where its one-byte answer goes.
fn read_ctrl<M: GuestMemory>(
    mem: &M,
    chain: virtio_queue::DescriptorChain<&M>,
) -> Result<(Vec<u8>, GuestAddress), String> {
    use vm_memory::Bytes;
    let descs = crate::whole_chain(chain).ok_or("a chain cut short")?;
    let (ack, cmd) = descs.split_last().ok_or("an empty chain")?;
    if !ack.is_write_only() || ack.len() < 1 {
        return Err("the chain does not end in a writable byte for the answer".into());
    }
    let mut bytes = Vec::new();
    for d in cmd {
        if d.is_write_only() {
            return Err("a writable descriptor before the answer".into());
        }
        let len = d.len() as usize;
        if bytes.len() + len > CTRL_MAX {
            return Err(format!("a command longer than {CTRL_MAX} bytes"));
        }
        let at = bytes.len();
        bytes.resize(at + len, 0);
        mem.read_slice(&mut bytes[at..], d.addr())
            .map_err(|e| format!("reading the command at {:#x}: {e}", d.addr().0))?;
    }
    if bytes.len() < 2 {
        return Err("a command shorter than its class and code".into());
    }
    Ok((bytes, ack.addr()))
}

/// What a pass over the control queue did.
#[derive(Debug)]
pub struct CtrlServed {
    /// Commands answered (used entries added).
    pub answered: u32,
    /// The last VQ_PAIRS_SET taken (1 to the most pairs).
    pub pairs: Option<u16>,
    /// The commands taken, in order.
    pub taken: Vec<CtrlCommand>,
    /// Why commands were answered ERR.
    pub refused: Vec<String>,
    /// Err: the ring itself could not be served.
    pub broken: Result<(), String>,
}

/// Answers every command posted on the control queue `queue`: what
/// `offer` allows (VQ_PAIRS_SET of 1 to `max_pairs`, ANNOUNCE_ACK,
/// GUEST_OFFLOADS_SET of offered bits) goes to `apply` before it is
/// answered (OK if it applied, so no receive queue past the count is used
/// once the driver sees the answer); everything else, and every malformed
/// chain, is answered ERR.
pub fn serve_ctrl_queue<M: GuestMemory>(
    mem: &M,
    queue: &mut virtio_queue::Queue,
    offer: &CtrlOffer,
    apply: &mut dyn FnMut(CtrlCommand) -> bool,
) -> CtrlServed {
    let max_pairs = offer.max_pairs;
    use vm_memory::Bytes;
    let mut served = CtrlServed {
        answered: 0,
        pairs: None,
        taken: Vec::new(),
        refused: Vec::new(),
        broken: Ok(()),
    };
    loop {
        let (head, parsed) = match crate::pop_chain(queue, mem) {
            crate::Popped::Chain(c) => (c.head_index(), read_ctrl(mem, c)),
            crate::Popped::Empty => return served,
            crate::Popped::Broken(why) => {
                served.broken = Err(why);
                return served;
            }
        };
        let (answer, ack_at) = match parsed {
            Ok((cmd, at)) => {
                let wanted = match cmd.as_slice() {
                    [CTRL_CLASS_MQ, CTRL_MQ_VQ_PAIRS_SET, lo, hi] if offer.mq => {
                        let n = u16::from_le_bytes([*lo, *hi]);
                        if (1..=max_pairs).contains(&n) {
                            Ok(CtrlCommand::Pairs(n))
                        } else {
                            Err(format!("VQ_PAIRS_SET {n} refused (1 to {max_pairs})"))
                        }
                    }
                    [CTRL_CLASS_ANNOUNCE, CTRL_ANNOUNCE_ACK] if offer.announce => {
                        Ok(CtrlCommand::AnnounceAck)
                    }
                    [CTRL_CLASS_GUEST_OFFLOADS, CTRL_GUEST_OFFLOADS_SET, v @ ..]
                        if offer.guest_offloads.is_some() && v.len() == 8 =>
                    {
                        let bits = u64::from_le_bytes(v.try_into().expect("8 bytes"));
                        let allowed = offer.guest_offloads.unwrap_or(0);
                        if bits & !allowed == 0 {
                            Ok(CtrlCommand::GuestOffloads(bits))
                        } else {
                            Err(format!(
                                "GUEST_OFFLOADS_SET {bits:#x} refused (offloads {allowed:#x} negotiated)"
                            ))
                        }
                    }
                    [class, command, ..] => Err(format!(
                        "command {class}.{command} ({} bytes of data) is not served",
                        cmd.len() - 2
                    )),
                    _ => Err("a command shorter than its class and code".to_string()),
                };
                let answer = match wanted {
                    Ok(c) if apply(c) => {
                        if let CtrlCommand::Pairs(n) = c {
                            served.pairs = Some(n);
                        }
                        served.taken.push(c);
                        CTRL_OK
                    }
                    Ok(c) => {
                        served.refused.push(format!("{c:?}: not applied"));
                        CTRL_ERR
                    }
                    Err(why) => {
                        served.refused.push(why);
                        CTRL_ERR
                    }
                };
                (answer, Some(at))
            }
            Err(why) => {
                served.refused.push(why);
                (CTRL_ERR, None)
            }
        };
        let written = ack_at.is_some_and(|at| mem.write_obj(answer, at).is_ok());
        if let Err(e) = queue.add_used(mem, head, written as u32) {
            served.broken = Err(format!("{e:?}"));
            return served;
        }
        served.answered += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_queue::desc::{split::Descriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Bytes, GuestMemoryMmap};

    fn mq(mq: bool) -> CtrlOffer {
        CtrlOffer {
            mq,
            max_pairs: 4,
            ..CtrlOffer::default()
        }
    }

    const NEXT: u16 = 1;
    const WRITE: u16 = 2;

    /// Posts one chain of (addr, len, flags) pieces at descriptor `first`.
    fn post(
        vq: &MockSplitQueue<GuestMemoryMmap>,
        first: u16,
        pieces: &[(u64, u32, u16)],
        slot: u16,
    ) {
        for (i, (addr, len, flags)) in pieces.iter().enumerate() {
            let d = first + i as u16;
            let last = i + 1 == pieces.len();
            let f = flags | if last { 0 } else { NEXT };
            let desc = Descriptor::new(*addr, *len, f, if last { 0 } else { d + 1 });
            vq.desc_table().store(d, RawDescriptor::from(desc)).unwrap();
        }
        vq.avail()
            .ring()
            .ref_at(slot as usize)
            .unwrap()
            .store(first);
        vq.avail().idx().store(slot + 1);
    }

    #[test]
    fn vq_pairs_set_is_answered_and_bad_commands_get_err() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let vq = MockSplitQueue::create(&mem, GuestAddress(0), 16);
        let mut q: virtio_queue::Queue = vq.create_queue().unwrap();
        // VQ_PAIRS_SET 2: class and command, the count, the answer byte
        mem.write_slice(&[CTRL_CLASS_MQ, CTRL_MQ_VQ_PAIRS_SET], GuestAddress(0x8000))
            .unwrap();
        mem.write_obj(2u16, GuestAddress(0x8010)).unwrap();
        mem.write_obj(0xffu8, GuestAddress(0x8020)).unwrap();
        post(
            &vq,
            0,
            &[(0x8000, 2, 0), (0x8010, 2, 0), (0x8020, 1, WRITE)],
            0,
        );
        let served = serve_ctrl_queue(&mem, &mut q, &mq(true), &mut |_| true);
        assert_eq!((served.answered, served.pairs), (1, Some(2)));
        assert_eq!(mem.read_obj::<u8>(GuestAddress(0x8020)).unwrap(), CTRL_OK);
        // 9 pairs of 4: ERR, nothing taken
        mem.write_obj(9u16, GuestAddress(0x8010)).unwrap();
        post(
            &vq,
            3,
            &[(0x8000, 2, 0), (0x8010, 2, 0), (0x8020, 1, WRITE)],
            1,
        );
        let served = serve_ctrl_queue(&mem, &mut q, &mq(true), &mut |_| true);
        assert_eq!((served.answered, served.pairs), (1, None));
        assert_eq!(mem.read_obj::<u8>(GuestAddress(0x8020)).unwrap(), CTRL_ERR);
        // without MQ negotiated, and a chain with no answer byte: ERR and
        // an empty answer, the queue goes on
        mem.write_obj(2u16, GuestAddress(0x8010)).unwrap();
        post(
            &vq,
            6,
            &[(0x8000, 2, 0), (0x8010, 2, 0), (0x8020, 1, WRITE)],
            2,
        );
        post(&vq, 9, &[(0x8000, 2, 0), (0x8010, 2, 0)], 3);
        let served = serve_ctrl_queue(&mem, &mut q, &mq(false), &mut |_| true);
        assert_eq!((served.answered, served.pairs), (2, None));
        assert_eq!(served.refused.len(), 2, "{:?}", served.refused);
        assert!(served.broken.is_ok());
        assert_eq!(vq.used().idx().load(), 4);
        let last = vq.used().ring().ref_at(3).unwrap().load();
        assert_eq!(last.len(), 0, "no answer byte: nothing written");
    }
}

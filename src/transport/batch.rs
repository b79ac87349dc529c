//! Datagrams held in one contiguous buffer: a batch handed from the
//! dispatcher to a worker, or the frames read from TCP connections in one
//! turn. Buffers grow to the largest batch seen and are then reused.

use std::net::SocketAddr;
use std::time::Instant;

use super::{Datagram, Proto};

struct Item {
    proto: Proto,
    source: SocketAddr,
    destination: SocketAddr,
    /// When it was read: the receive time str0m sees (TWCC feedback
    /// reports it), so a hand-off's wake-up delay is not mistaken by
    /// senders' bandwidth estimators for network queuing.
    at: Instant,
    off: u32,
    len: u32,
}

#[derive(Default)]
pub struct RxBatch {
    data: Vec<u8>,
    items: Vec<Item>,
}

impl RxBatch {
    pub fn push(&mut self, d: &Datagram<'_>, at: Instant) {
        self.items.push(Item {
            proto: d.proto,
            source: d.source,
            destination: d.destination,
            at,
            off: self.data.len() as u32,
            len: d.data.len() as u32,
        });
        self.data.extend_from_slice(d.data);
    }

    pub fn len(&self) -> usize {
        self.items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// The `i`th datagram and when it was read.
    pub fn get(&self, i: usize) -> (Datagram<'_>, Instant) {
        let it = &self.items[i];
        let d = Datagram {
            proto: it.proto,
            source: it.source,
            destination: it.destination,
            data: &self.data[it.off as usize..(it.off + it.len) as usize],
        };
        (d, it.at)
    }

    pub fn clear(&mut self) {
        self.items.clear();
        self.data.clear();
    }

    /// Append `other`'s datagrams, leaving it empty.
    pub fn append(&mut self, other: &mut RxBatch) {
        let base = self.data.len() as u32;
        self.data.extend_from_slice(&other.data);
        self.items.extend(other.items.drain(..).map(|mut it| {
            it.off += base;
            it
        }));
        other.clear();
    }
}

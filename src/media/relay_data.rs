//! Data packets and metadata updates, as the engine handles them: the pure
//! checks and stamping live in [`super::data`].

use std::time::{Duration, Instant};

use livekit_protocol as lk;
use lk::signal_response::Message as Resp;

use super::data;
use super::engine::{error_to, refuse_request, Core};
use super::participant::PcRole;
use crate::metrics::{Limit, MediaCounters};

impl Core {
    // ------------------------------------------------------------- data

    pub(super) fn data_in(&mut self, key: usize, role: PcRole, d: str0m::channel::ChannelData) {
        let Some(p) = self.parts.get_mut(key) else {
            return;
        };
        let Some(label) = p
            .peer_mut(role)
            .and_then(|peer| peer.channels.iter().find(|(c, _)| *c == d.id))
            .map(|(_, l)| l.clone())
        else {
            return;
        };
        let limits = &self.cfg.limits;
        let now = Instant::now();
        let refused = if limits.data_packet_bytes > 0 && d.data.len() > limits.data_packet_bytes {
            Some(Limit::DataSize)
        } else if !p.data_rate.take(now) {
            Some(Limit::DataRate)
        } else {
            None
        };
        if let Some(limit) = refused {
            self.counters.refused(limit);
            // A flood is not answered with a flood: one word a second.
            let told = p.data_refusal_told;
            if told.is_none_or(|t| now.saturating_duration_since(t) >= Duration::from_secs(1)) {
                p.data_refusal_told = Some(now);
                let why = match limit {
                    Limit::DataSize => format!(
                        "data packet of {} bytes refused: over {} bytes ([limits] data_packet_bytes)",
                        d.data.len(),
                        limits.data_packet_bytes
                    ),
                    _ => format!(
                        "data packets refused: over {} a second ([limits] data_packets_per_sec)",
                        limits.data_packets_per_sec
                    ),
                };
                tracing::debug!(participant = %p.sid, "{why}");
                error_to(p, lk::request_response::Reason::LimitExceeded, why);
            }
            return;
        }
        let out = match data::prepare(p, &label, &d.data) {
            Ok(Some(o)) => o,
            Ok(None) => return,
            Err(e) => {
                MediaCounters::add(&self.counters.signal_errors, 1);
                tracing::debug!(participant = %p.sid, error = %e, "data packet refused");
                return;
            }
        };
        let room = p.room;
        self.fan_out_data(room, Some(key), &out);
    }

    pub(super) fn update_metadata(&mut self, key: usize, m: lk::UpdateParticipantMetadata) {
        let Some(p) = self.parts.get_mut(key) else {
            return;
        };
        let request_id = m.request_id;
        if !p.permission.can_update_metadata {
            MediaCounters::add(&self.counters.signal_errors, 1);
            refuse_request(
                p,
                lk::request_response::Reason::NotAllowed,
                "metadata updates are not granted (canUpdateOwnMetadata)".into(),
                request_id,
                lk::request_response::Request::UpdateMetadata(m),
            );
            return;
        }
        if let Some((limit, why)) = p.update_exceeds(&m.metadata, &m.attributes, &self.cfg.limits) {
            self.counters.refused(limit);
            refuse_request(
                p,
                lk::request_response::Reason::LimitExceeded,
                why,
                request_id,
                lk::request_response::Request::UpdateMetadata(m),
            );
            return;
        }
        p.apply_update(m.name, m.metadata, m.attributes);
        self.broadcast_participant(key, true);
        if let Some(p) = self.parts.get_mut(key) {
            p.send(Resp::RequestResponse(lk::RequestResponse {
                request_id,
                reason: lk::request_response::Reason::Ok as i32,
                ..Default::default()
            }));
        }
    }
}

//! Data packets and metadata updates, as the engine handles them: the pure
//! checks and stamping live in [`super::data`].

use livekit_protocol as lk;
use lk::signal_response::Message as Resp;

use super::data;
use super::engine::{refuse_request, Core};
use super::participant::PcRole;
use crate::metrics::MediaCounters;

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

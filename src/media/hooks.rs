//! Webhooks from the engine: what happened to a room, a participant or a
//! track, handed to the webhook sink (which never blocks; see
//! `crate::webhook`). Only on joins, leaves and (un)publishing, never per
//! packet.

use livekit_protocol as lk;

use super::engine::Core;
use super::room::Room;

impl Core {
    /// `room_started` / `room_finished`.
    pub(super) fn hook_room(&self, event: &str, room: &Room) {
        if let Some(w) = &self.cfg.webhooks {
            w.emit(event, Some(room.info()), None, None);
        }
    }

    /// `participant_*` and `track_*` events: the room, the participant as
    /// it is now (`state` overrides its state, e.g. disconnected on leave),
    /// and the track for track events.
    pub(super) fn hook_participant(
        &self,
        event: &str,
        key: usize,
        state: Option<lk::participant_info::State>,
        track: Option<lk::TrackInfo>,
    ) {
        let Some(w) = &self.cfg.webhooks else {
            return;
        };
        let Some(p) = self.parts.get(key) else {
            return;
        };
        let Some(room) = self.rooms.get(p.room) else {
            return;
        };
        let mut info = p.info(&room.tracks);
        if let Some(s) = state {
            info.state = s as i32;
        }
        w.emit(event, Some(room.info()), Some(info), track);
    }
}

//! The server API's operations (LiveKit's RoomService, served by
//! `crate::api`) on the rooms of one worker. Runs on the engine thread: the
//! same code paths as a client's own requests, so members learn of every
//! change the way they learn of their peers'.

use std::time::Instant;

use livekit_protocol as lk;
use lk::signal_response::Message as Resp;
use prost::Message;

use super::data::{self, Outbound};
use super::engine::Core;

/// One RoomService call, already checked for grants and sizes.
#[derive(Debug)]
pub enum AdminOp {
    CreateRoom(Box<lk::CreateRoomRequest>),
    ListRooms(lk::ListRoomsRequest),
    DeleteRoom(String),
    ListParticipants(String),
    GetParticipant(lk::RoomParticipantIdentity),
    RemoveParticipant(lk::RoomParticipantIdentity),
    MuteTrack(lk::MuteRoomTrackRequest),
    UpdateParticipant(lk::UpdateParticipantRequest),
    UpdateSubscriptions(lk::UpdateSubscriptionsRequest),
    SendData(lk::SendDataRequest),
    UpdateRoomMetadata(lk::UpdateRoomMetadataRequest),
}

impl AdminOp {
    /// The room the call acts on (`None`: every room of the worker).
    pub fn room(&self) -> Option<&str> {
        Some(match self {
            AdminOp::CreateRoom(r) => &r.name,
            AdminOp::ListRooms(_) => return None,
            AdminOp::DeleteRoom(r) | AdminOp::ListParticipants(r) => r,
            AdminOp::GetParticipant(r) | AdminOp::RemoveParticipant(r) => &r.room,
            AdminOp::MuteTrack(r) => &r.room,
            AdminOp::UpdateParticipant(r) => &r.room,
            AdminOp::UpdateSubscriptions(r) => &r.room,
            AdminOp::SendData(r) => &r.room,
            AdminOp::UpdateRoomMetadata(r) => &r.room,
        })
    }
}

#[derive(Debug)]
pub enum AdminReply {
    Room(lk::Room),
    Rooms(Vec<lk::Room>),
    Participants(Vec<lk::ParticipantInfo>),
    Participant(lk::ParticipantInfo),
    Track(lk::TrackInfo),
    Done,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AdminError {
    #[error("requested room does not exist")]
    RoomNotFound,
    #[error("participant does not exist")]
    ParticipantNotFound,
    #[error("the participant has no published track {0:?}")]
    TrackNotFound(String),
    /// Turning someone's microphone or camera on is theirs to do: the API
    /// may mute, never unmute (LiveKit's default too).
    #[error("remote unmute is not allowed: only the participant can unmute its track")]
    RemoteUnmute,
}

impl Core {
    pub(super) fn admin(&mut self, op: AdminOp) -> Result<AdminReply, AdminError> {
        match op {
            AdminOp::CreateRoom(req) => Ok(AdminReply::Room(self.admin_create_room(*req))),
            AdminOp::ListRooms(req) => Ok(AdminReply::Rooms(
                self.rooms
                    .iter()
                    .filter(|(_, r)| req.names.is_empty() || req.names.contains(&r.name))
                    .map(|(_, r)| r.info())
                    .collect(),
            )),
            AdminOp::DeleteRoom(room) => {
                let rk = self.room_key(&room)?;
                for k in self.rooms[rk].participants.clone() {
                    self.remove_participant(k, Some(lk::DisconnectReason::RoomDeleted));
                }
                self.close_room(rk);
                self.publish_gauges();
                Ok(AdminReply::Done)
            }
            AdminOp::ListParticipants(room) => {
                let r = &self.rooms[self.room_key(&room)?];
                Ok(AdminReply::Participants(
                    r.participants
                        .iter()
                        .filter_map(|k| self.parts.get(*k))
                        .map(|p| p.info(&r.tracks))
                        .collect(),
                ))
            }
            AdminOp::GetParticipant(req) => {
                let key = self.member(&req.room, &req.identity)?;
                let p = &self.parts[key];
                Ok(AdminReply::Participant(p.info(&self.rooms[p.room].tracks)))
            }
            AdminOp::RemoveParticipant(req) => {
                let key = self.member(&req.room, &req.identity)?;
                self.remove_participant(key, Some(lk::DisconnectReason::ParticipantRemoved));
                Ok(AdminReply::Done)
            }
            AdminOp::MuteTrack(req) => self.admin_mute(req).map(AdminReply::Track),
            AdminOp::UpdateParticipant(req) => self
                .admin_update_participant(req)
                .map(AdminReply::Participant),
            AdminOp::UpdateSubscriptions(req) => {
                let key = self.member(&req.room, &req.identity)?;
                self.update_subscription(
                    key,
                    lk::UpdateSubscription {
                        track_sids: req.track_sids,
                        subscribe: req.subscribe,
                        participant_tracks: req.participant_tracks,
                    },
                );
                Ok(AdminReply::Done)
            }
            AdminOp::SendData(req) => {
                let rk = self.room_key(&req.room)?;
                let out = server_data(req);
                self.fan_out_data(rk, None, &out);
                Ok(AdminReply::Done)
            }
            AdminOp::UpdateRoomMetadata(req) => {
                let rk = self.room_key(&req.room)?;
                self.rooms[rk].metadata = req.metadata;
                let info = self.rooms[rk].info();
                for k in self.rooms[rk].participants.clone() {
                    if let Some(p) = self.parts.get_mut(k) {
                        p.send(Resp::RoomUpdate(lk::RoomUpdate {
                            room: Some(info.clone()),
                        }));
                    }
                }
                Ok(AdminReply::Room(info))
            }
        }
    }

    fn room_key(&self, room: &str) -> Result<usize, AdminError> {
        self.room_by_name
            .get(room)
            .copied()
            .ok_or(AdminError::RoomNotFound)
    }

    /// The participant key of `identity` in `room`.
    fn member(&self, room: &str, identity: &str) -> Result<usize, AdminError> {
        let rk = self.room_key(room)?;
        self.rooms[rk]
            .participants
            .iter()
            .copied()
            .find(|k| self.parts.get(*k).is_some_and(|p| p.identity == identity))
            .ok_or(AdminError::ParticipantNotFound)
    }

    /// Open the room (closed again after its empty timeout if nobody
    /// joins); the request's settings apply to a room it opens, an open
    /// room is returned as it is.
    fn admin_create_room(&mut self, req: lk::CreateRoomRequest) -> lk::Room {
        if let Some(rk) = self.room_by_name.get(&req.name) {
            return self.rooms[*rk].info();
        }
        let rk = self.create_room(&req.name);
        let r = &mut self.rooms[rk];
        r.unjoined_since = Some(Instant::now());
        if req.empty_timeout > 0 {
            r.empty_timeout_secs = req.empty_timeout.into();
        }
        if req.departure_timeout > 0 {
            r.departure_timeout_secs = req.departure_timeout.into();
        }
        r.max_participants = req.max_participants;
        r.metadata = req.metadata;
        r.info()
    }

    fn admin_mute(&mut self, req: lk::MuteRoomTrackRequest) -> Result<lk::TrackInfo, AdminError> {
        let key = self.member(&req.room, &req.identity)?;
        let p = &self.parts[key];
        let room = p.room;
        let tk = p
            .published
            .iter()
            .copied()
            .find(|t| {
                self.rooms[room]
                    .tracks
                    .get(*t)
                    .is_some_and(|t| t.info.sid == req.track_sid)
            })
            .ok_or_else(|| AdminError::TrackNotFound(req.track_sid.clone()))?;
        let track = &mut self.rooms[room].tracks[tk];
        if !req.muted && track.info.muted {
            return Err(AdminError::RemoteUnmute);
        }
        if req.muted && !track.info.muted {
            track.info.muted = true;
            let info = track.info.clone();
            // The publisher mutes its own track (and confirms with its
            // own MuteTrackRequest); the others see the update.
            if let Some(p) = self.parts.get_mut(key) {
                p.send(Resp::Mute(lk::MuteTrackRequest {
                    sid: info.sid.clone(),
                    muted: true,
                }));
            }
            self.broadcast_participant(key, true);
            return Ok(info);
        }
        Ok(track.info.clone())
    }

    fn admin_update_participant(
        &mut self,
        req: lk::UpdateParticipantRequest,
    ) -> Result<lk::ParticipantInfo, AdminError> {
        let key = self.member(&req.room, &req.identity)?;
        let p = &mut self.parts[key];
        p.apply_update(req.name, req.metadata, req.attributes);
        if let Some(perm) = req.permission {
            let revoke_publish = !perm.can_publish;
            let revoke_subscribe = !perm.can_subscribe;
            p.permission = perm;
            if revoke_publish {
                // What it may no longer publish is unpublished, and the
                // client told (livekit-client then stops the local track).
                p.pending_tracks.clear();
                let room = p.room;
                for tk in p.published.clone() {
                    let sid = self.rooms[room].tracks.get(tk).map(|t| t.sid.clone());
                    self.unpublish(key, tk);
                    if let (Some(sid), Some(p)) = (sid, self.parts.get_mut(key)) {
                        p.send(Resp::TrackUnpublished(lk::TrackUnpublishedResponse {
                            track_sid: sid,
                        }));
                    }
                }
            }
            if revoke_subscribe {
                let subs: Vec<usize> = self
                    .parts
                    .get(key)
                    .map(|p| p.subs.iter().map(|(k, _)| k).collect())
                    .unwrap_or_default();
                for sk in subs {
                    self.drop_sub(key, sk, false);
                }
                self.request_reoffer(key);
            }
        }
        self.broadcast_participant(key, true);
        let p = self.parts.get(key).ok_or(AdminError::ParticipantNotFound)?;
        Ok(p.info(&self.rooms[p.room].tracks))
    }

    /// Send a data packet on each member's channel of its kind, to everyone
    /// in the room but `except` (or the packet's named identities).
    pub(super) fn fan_out_data(&mut self, room: usize, except: Option<usize>, out: &Outbound) {
        for m in self.rooms[room].participants.clone() {
            if Some(m) == except {
                continue;
            }
            let Some(o) = self.parts.get_mut(m) else {
                continue;
            };
            if !data::wanted_by(o, &out.destinations) {
                continue;
            }
            // Downstream data goes on the connection that carries media to
            // the receiver: its own channels (single PC) or ours (dual PC).
            let peer = o.send_peer();
            let Some(id) = peer
                .channels
                .iter()
                .find(|(_, l)| l == out.label)
                .map(|(c, _)| *c)
            else {
                continue;
            };
            if let Some(mut ch) = peer.rtc.channel(id) {
                if let Err(e) = ch.write(true, &out.bytes) {
                    tracing::debug!(error = %e, "data packet not delivered");
                }
            }
            Self::mark_dirty(&mut self.dirty, &mut self.is_dirty, m);
        }
    }
}

/// A packet from the server itself: no sender identity, as LiveKit sends
/// what its API is given. (livekit-client 2.23 still reads the deprecated
/// fields.)
#[allow(deprecated)]
fn server_data(req: lk::SendDataRequest) -> Outbound {
    let lossy = req.kind == lk::data_packet::Kind::Lossy as i32;
    let destinations = req.destination_identities;
    let pkt = lk::DataPacket {
        kind: req.kind,
        destination_identities: destinations.clone(),
        value: Some(lk::data_packet::Value::User(lk::UserPacket {
            payload: req.data,
            topic: req.topic,
            destination_identities: destinations.clone(),
            nonce: req.nonce,
            ..Default::default()
        })),
        ..Default::default()
    };
    Outbound {
        label: if lossy { data::LOSSY } else { data::RELIABLE },
        bytes: pkt.encode_to_vec(),
        destinations,
    }
}

//! SDP negotiation: answering client offers (single PC, and the dual-PC
//! publisher), offering the dual-PC subscriber connection, and turning
//! negotiated m-lines into live subscriptions.

use std::collections::HashMap;
use std::time::Instant;

use livekit_protocol as lk;
use lk::signal_response::Message as Resp;
use str0m::change::SdpOffer;
use str0m::media::Mid;

use super::engine::{error_to, Core};
use super::forward::{Forwarder, StreamTail};
use super::participant::{Participant, PcRole, SendSlot, SlotState};
use super::sdp::{self, Dir, Kind, SendSlotView};
use crate::metrics::MediaCounters;

impl Core {
    // ------------------------------------------------------ negotiation

    pub(super) fn offer(&mut self, key: usize, sd: lk::SessionDescription) {
        let Some(p) = self.parts.get_mut(key) else {
            return;
        };
        let offer = match SdpOffer::from_sdp_string(&sd.sdp) {
            Ok(o) => o,
            Err(e) => {
                MediaCounters::add(&self.counters.sdp_errors, 1);
                error_to(
                    p,
                    lk::request_response::Reason::InvalidRequest,
                    format!("invalid SDP offer: {e}"),
                );
                return;
            }
        };
        let answer = match p.peer.rtc.sdp_api().accept_offer(offer) {
            Ok(a) => a,
            Err(e) => {
                MediaCounters::add(&self.counters.sdp_errors, 1);
                error_to(
                    p,
                    lk::request_response::Reason::InvalidRequest,
                    format!("SDP offer refused: {e}"),
                );
                if !p.peer.rtc.is_alive() {
                    self.remove_participant(key, Some(lk::DisconnectReason::StateMismatch));
                }
                return;
            }
        };
        let answer_text = answer.to_sdp_string();
        // A remote ICE restart gives us new local credentials: STUN from new
        // addresses is routed by the new ufrag.
        let ufrag = p.peer.rtc.direct_api().local_ice_credentials().ufrag;
        if ufrag != p.peer.ufrag {
            self.io.demux.remove_ufrag(&p.peer.ufrag);
            self.io.demux.set_ufrag(ufrag.clone(), (key, PcRole::Main));
            p.peer.ufrag = ufrag;
        }
        p.peer.remote = sdp::parse(&sd.sdp);
        p.peer.local = sdp::parse(&answer_text);
        p.reoffer_requested = None;
        // Answer before announcing what the offer published: the publisher
        // is then already sending when subscribers ask for keyframes.
        if p.sub_peer.is_some() {
            // Dual PC: this is the publisher connection; nothing to rewrite.
            p.send(Resp::Answer(lk::SessionDescription {
                r#type: "answer".into(),
                sdp: answer_text,
                id: sd.id,
                mid_to_track_id: HashMap::new(),
            }));
            Self::mark_dirty(&mut self.dirty, &mut self.is_dirty, key);
            self.reconcile_published(key);
            return;
        }
        self.reconcile_published(key);
        let Some(p) = self.parts.get_mut(key) else {
            return;
        };

        // Our send slots are the client's receive m-lines.
        let mut slots: Vec<SendSlot> = Vec::new();
        for s in &p.peer.local.sections {
            if s.kind == Kind::Application
                || s.disabled
                || !matches!(s.dir, Dir::SendOnly | Dir::SendRecv)
            {
                continue;
            }
            let prev = p.slots.iter().find(|x| x.mid == s.mid);
            slots.push(SendSlot {
                mid: s.mid.clone(),
                kind: s.kind,
                state: prev.map_or(SlotState::Free, |x| x.state),
                tail: prev.and_then(|x| x.tail),
            });
        }
        // Subscriptions whose slot vanished go back to waiting.
        for (_, sub) in p.subs.iter_mut() {
            if let Some(si) = sub.slot {
                let mid = p.slots.get(si).map(|s| s.mid.clone());
                sub.slot = mid.and_then(|m| slots.iter().position(|s| s.mid == m));
                if sub.slot.is_none() {
                    sub.live = false;
                }
            }
        }
        p.slots = slots;
        // Assign waiting subscriptions to free slots of their kind.
        let waiting: Vec<usize> = p
            .subs
            .iter()
            .filter(|(_, s)| s.slot.is_none())
            .map(|(k, _)| k)
            .collect();
        for sk in waiting {
            let kind = p.subs[sk].kind;
            if let Some(si) = p
                .slots
                .iter()
                .position(|s| s.kind == kind && s.state == SlotState::Free)
            {
                p.slots[si].state = SlotState::Assigned(sk);
                p.subs[sk].slot = Some(si);
            }
        }
        let mut mid_to_track_id = HashMap::new();
        let munged = {
            let subs = &p.subs;
            let slots = &p.slots;
            let mut names: HashMap<String, (String, String)> = HashMap::new();
            for s in slots {
                if let SlotState::Assigned(sk) = s.state {
                    if let Some(sub) = subs.get(sk) {
                        names.insert(
                            s.mid.clone(),
                            (
                                format!("{}|{}", sub.publisher_sid, sub.track_sid),
                                sub.track_sid.clone(),
                            ),
                        );
                        mid_to_track_id.insert(s.mid.clone(), sub.track_sid.clone());
                    }
                }
            }
            sdp::munge_answer(&answer_text, |mid| {
                let slot = slots.iter().find(|s| s.mid == mid)?;
                match slot.state {
                    SlotState::Assigned(_) => names
                        .get(mid)
                        .map(|(stream, track)| SendSlotView::Track { stream, track }),
                    _ => Some(SendSlotView::Inactive),
                }
            })
        };
        for s in p.slots.iter_mut() {
            if s.state == SlotState::Releasing {
                s.state = SlotState::Free;
            }
        }
        let still_waiting = p.subs.iter().any(|(_, s)| s.slot.is_none());
        tracing::trace!(participant = %p.sid, offer = %sd.sdp, answer = %munged, "negotiated");
        p.send(Resp::Answer(lk::SessionDescription {
            r#type: "answer".into(),
            sdp: munged,
            id: sd.id,
            mid_to_track_id,
        }));
        self.activate_subs(key);
        if still_waiting {
            self.request_reoffer(key);
        }
        Self::mark_dirty(&mut self.dirty, &mut self.is_dirty, key);
    }

    /// Subscriptions whose m-line was just negotiated start flowing.
    pub(super) fn activate_subs(&mut self, key: usize) {
        let Some(p) = self.parts.get(key) else {
            return;
        };
        let room = p.room;
        // Make assigned subscriptions live: first gather what they need
        // from their publishers, then update them.
        let pending: Vec<(usize, String, usize, Option<StreamTail>)> = p
            .slots
            .iter()
            .filter_map(|s| match s.state {
                SlotState::Assigned(sk) if p.subs.get(sk).is_some_and(|x| !x.live) => {
                    Some((sk, s.mid.clone(), p.subs[sk].track, s.tail))
                }
                _ => None,
            })
            .collect();
        let mut ready = Vec::new();
        for (sk, mid, tk, tail) in pending {
            let Some(t) = self.rooms[room].tracks.get(tk) else {
                continue;
            };
            let Some(pubp) = self.parts.get(t.publisher) else {
                continue;
            };
            let Some(me) = self.parts.get(key) else {
                return;
            };
            // Publisher payload types -> ours, by codec.
            let mut map = Vec::new();
            if let Some(sec) = pubp.peer.local.section(&t.mid) {
                for pt in &sec.pts {
                    if let Some(c) = pubp.peer.local.codecs.get(pt) {
                        if let Some(ours) = me.send_peer_ref().local.pt_for(c) {
                            map.push((*pt, ours));
                        }
                    }
                }
            }
            ready.push((sk, mid, tk, map, t.kind, t.clock_rate(), tail));
        }
        let Some(p) = self.parts.get_mut(key) else {
            return;
        };
        let mut kf = Vec::new();
        let mut video_mids = Vec::new();
        for (sk, mid, tk, map, kind, clock, tail) in ready {
            let Some(sub) = p.subs.get_mut(sk) else {
                continue;
            };
            if kind == Kind::Video {
                video_mids.push(Mid::from(mid.as_str()));
            }
            sub.pt_map = map;
            sub.mid = Some(Mid::from(mid.as_str()));
            sub.live = true;
            let available = sub.fwd.available();
            sub.fwd = Forwarder::new(kind == Kind::Video, clock, sub.fwd.target);
            sub.fwd.set_available(available);
            if let Some(t) = tail {
                sub.fwd.continue_from(t);
            }
            if kind == Kind::Video {
                kf.push((tk, sub.fwd.goal()));
            }
        }
        // Forwarded video is not held to the estimate by str0m's pacer: the
        // allocation keeps it within the estimate, and pacing a keyframe's
        // burst at the estimate's rate delayed it by up to a tenth of a
        // second on fast links (as LiveKit, which does not pace either).
        // Probes and padding are still paced.
        let mut api = p.send_peer().rtc.direct_api();
        for mid in video_mids {
            if let Some(stx) = api.stream_tx_by_mid(mid, None) {
                stx.set_unpaced(true);
            }
        }
        let now = Instant::now();
        for (tk, l) in kf {
            self.request_keyframe(room, tk, l, now);
        }
    }

    /// Dual PC, after a resume: offer the subscriber connection again with
    /// new ICE credentials. An offer still pending was lost with the old
    /// socket; what it added is offered again.
    pub(super) fn restart_subscriber_ice(&mut self, key: usize) {
        let Some(p) = self.parts.get_mut(key) else {
            return;
        };
        let Participant {
            sub_peer,
            subs,
            slots,
            ..
        } = p;
        let Some(sp) = sub_peer.as_mut() else {
            return;
        };
        if sp.pending.take().is_some() {
            for (_, sub) in subs.iter_mut().filter(|(_, s)| !s.live) {
                if let Some(slot) = sub.slot.take().and_then(|i| slots.get_mut(i)) {
                    slot.state = SlotState::Dead;
                }
            }
        }
        sp.restart_ice = true;
        sp.renegotiate = false;
        self.negotiate_subscriber(key);
    }

    /// Dual PC: offer the subscriber connection with every subscription
    /// that has no m-line yet and without those that ended. One offer at a
    /// time; changes meanwhile are offered after the answer.
    pub(super) fn negotiate_subscriber(&mut self, key: usize) {
        let Some(p) = self.parts.get_mut(key) else {
            return;
        };
        let Participant {
            sub_peer,
            subs,
            slots,
            ..
        } = p;
        let Some(sp) = sub_peer.as_mut() else {
            return;
        };
        if sp.pending.is_some() {
            sp.renegotiate = true;
            return;
        }
        let mut api = sp.peer.rtc.sdp_api();
        if std::mem::take(&mut sp.restart_ice) {
            api.ice_restart(true);
        }
        if !sp.channels_added {
            // Downstream data goes on our own channels, as LiveKit's do.
            api.add_channel_with_config(str0m::channel::ChannelConfig {
                label: "_reliable".into(),
                ..Default::default()
            });
            api.add_channel_with_config(str0m::channel::ChannelConfig {
                label: "_lossy".into(),
                ordered: false,
                reliability: str0m::channel::Reliability::MaxRetransmits { retransmits: 0 },
                ..Default::default()
            });
            sp.channels_added = true;
        }
        for slot in slots.iter_mut() {
            if slot.state == SlotState::Releasing {
                api.stop_media(Mid::from(slot.mid.as_str()));
                slot.state = SlotState::Dead;
            }
        }
        for (sk, sub) in subs.iter_mut() {
            if sub.slot.is_some() {
                continue;
            }
            let kind = match sub.kind {
                Kind::Audio => str0m::media::MediaKind::Audio,
                _ => str0m::media::MediaKind::Video,
            };
            let stream = format!("{}|{}", sub.publisher_sid, sub.track_sid);
            let mid = api.add_media(
                kind,
                str0m::media::Direction::SendOnly,
                Some(stream),
                Some(sub.track_sid.clone()),
                None,
            );
            slots.push(SendSlot {
                mid: mid.to_string(),
                kind: sub.kind,
                state: SlotState::Assigned(sk),
                tail: None,
            });
            sub.slot = Some(slots.len() - 1);
        }
        if !api.has_changes() {
            return;
        }
        let Some((offer, pending)) = api.apply() else {
            return;
        };
        let text = offer.to_sdp_string();
        sp.peer.local = sdp::parse(&text);
        sp.pending = Some(pending);
        let ufrag = sp.peer.rtc.direct_api().local_ice_credentials().ufrag;
        if ufrag != sp.peer.ufrag {
            self.io.demux.remove_ufrag(&sp.peer.ufrag);
            self.io
                .demux
                .set_ufrag(ufrag.clone(), (key, PcRole::Subscriber));
            sp.peer.ufrag = ufrag;
        }
        sp.offer_id += 1;
        let id = sp.offer_id;
        p.send(Resp::Offer(lk::SessionDescription {
            r#type: "offer".into(),
            sdp: text,
            id,
            mid_to_track_id: HashMap::new(),
        }));
        Self::mark_dirty(&mut self.dirty, &mut self.is_dirty, key);
    }

    /// Dual PC: the client's answer to our subscriber offer.
    pub(super) fn subscriber_answer(&mut self, key: usize, sd: lk::SessionDescription) {
        let Some(p) = self.parts.get_mut(key) else {
            return;
        };
        // Single-PC clients never answer; nothing may be pending.
        let Some(pending) = p.sub_peer.as_mut().and_then(|s| s.pending.take()) else {
            return;
        };
        let result = str0m::change::SdpAnswer::from_sdp_string(&sd.sdp)
            .map_err(|e| format!("invalid SDP answer: {e}"))
            .and_then(|answer| {
                let sp = p.sub_peer.as_mut().expect("checked above");
                sp.peer
                    .rtc
                    .sdp_api()
                    .accept_answer(pending, answer)
                    .map_err(|e| format!("SDP answer refused: {e}"))
            });
        if let Err(why) = result {
            MediaCounters::add(&self.counters.sdp_errors, 1);
            error_to(p, lk::request_response::Reason::InvalidRequest, why);
            // str0m dropped the offer: the connection cannot go on.
            self.remove_participant(key, Some(lk::DisconnectReason::StateMismatch));
            return;
        }
        let Some(sp) = p.sub_peer.as_mut() else {
            return;
        };
        sp.peer.remote = sdp::parse(&sd.sdp);
        let again = std::mem::take(&mut sp.renegotiate);
        self.activate_subs(key);
        if again {
            self.negotiate_subscriber(key);
        }
        Self::mark_dirty(&mut self.dirty, &mut self.is_dirty, key);
    }
}

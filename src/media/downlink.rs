//! Each subscriber's downlink: its bandwidth estimate (str0m's TWCC
//! estimator, or the client's REMB), each layer's measured rate, and the
//! layers `allocate` fits into it, applied to the forwarders; a track that
//! does not fit at all is paused and the client told (StreamStateUpdate).
//! Runs at housekeeping and on track settings, never per packet.

use std::time::{Duration, Instant};

use livekit_protocol as lk;
use lk::signal_response::Message as Resp;
use str0m::bwe::{Bitrate, BweKind};

use super::allocate::{self, Demand};
use super::engine::{Core, HOUSEKEEPING};
use super::forward::Layer;
use super::room::{Track, MAX_LAYERS};
use super::sdp::Kind;
use crate::metrics::MediaCounters;

/// Bytes a forwarded packet costs on the wire beyond its payload: RTP
/// header and extensions, SRTP tag, UDP and IP.
pub const WIRE_OVERHEAD: u64 = 60;

/// Per allocation pass (500 ms), what the remembered peak estimate keeps.
const PEAK_FADE: f64 = 0.97;
/// An estimate this far below its recent peak means congestion...
const CONGESTION_DROP: f64 = 0.85;
/// ...for this long: layers are cut to fit.
const CONGESTION_HOLD: Duration = Duration::from_secs(5);
/// After congestion, raises wait for the estimate (probed meanwhile) this
/// long: without it, a raise as soon as the loss stopped hit the same limit.
const GUARD_AFTER_CONGESTION: Duration = Duration::from_secs(30);
/// Share of the estimate media may use while congested.
const CONGESTED_SHARE: f64 = 0.85;
/// Loss in the receiver's reports, smoothed, at least this high... GCC's
/// own line: below it, loss is the network's (Wi-Fi, a lossy path), not
/// ours, and cutting layers would not lower it. Measured: at 5 % random
/// loss each way a 3 % line paused a 640x360 video for nothing.
const LOSS_EVIDENCE: f32 = 0.10;
/// Weight of a new report in the smoothed loss: one report of a second's
/// few dozen packets swings by chance (5 % random loss gives 15 % now and
/// then); a full link's loss (tens of %) still counts at its first report.
const LOSS_WEIGHT: f32 = 0.3;
/// ...shows the link full for this long (reports come every 1-2 s).
const LOSS_MEMORY: Duration = Duration::from_secs(5);
/// A receiver report covers about the last second: one this long after a
/// cut is about the layers left.
const CUT_SETTLE: Duration = Duration::from_millis(2000);
// Only a dip with loss is congestion. The estimate follows delay, and a
// busy host (ours or the receiver's, on a loaded machine) delays packets as
// a full link does, for as long as it stays busy: measured, dips alone cut
// a 960x540 subscriber's top layer for nothing. Loss only a full link makes;
// the estimate then says how much fits.

/// A new estimate or str0m target differing less than this is no news.
const CHANGE: f64 = 0.05;

impl Core {
    pub(super) fn on_estimate(&mut self, key: usize, b: BweKind) {
        let Some(p) = self.parts.get_mut(key) else {
            return;
        };
        match b {
            BweKind::Twcc { estimate, .. } => p.downlink.twcc = Some(estimate.as_u64()),
            // One REMB lists several streams; they carry the same figure.
            BweKind::Remb { estimate, .. } => p.downlink.remb = Some(estimate.as_u64()),
            _ => {}
        }
    }

    /// The receiver's reports on what we send it: smoothed loss above
    /// [`LOSS_EVIDENCE`] marks the downlink full for [`LOSS_MEMORY`].
    pub(super) fn note_downlink_loss(&mut self, key: usize, loss: Option<f32>, now: Instant) {
        let Some(p) = self.parts.get_mut(key) else {
            return;
        };
        let Some(l) = loss.filter(|l| l.is_finite()) else {
            return;
        };
        let dl = &mut p.downlink;
        dl.loss_avg += (l.clamp(0.0, 1.0) - dl.loss_avg) * LOSS_WEIGHT;
        if dl.loss_avg >= LOSS_EVIDENCE {
            dl.loss_at = Some(now);
        }
        if l >= LOSS_EVIDENCE {
            dl.report_loss_at = Some(now);
        }
    }

    /// ICE found a path again after losing it (another network, TCP after
    /// UDP): what the old path carried says nothing of the new one, and an
    /// estimate that collapsed while no feedback came would keep the video
    /// paused for long. Start afresh from the initial estimate.
    pub(super) fn downlink_path_changed(&mut self, key: usize, now: Instant) {
        let Some(initial) = self.cfg.bwe_initial else {
            return;
        };
        let Some(p) = self.parts.get_mut(key) else {
            return;
        };
        tracing::debug!(participant = %p.sid, "downlink estimate restarted");
        p.downlink.twcc = Some(initial.as_u64());
        p.downlink.remb = None;
        p.downlink.desired_set = None;
        p.downlink.peak = 0;
        p.downlink.congested_at = None;
        p.downlink.loss_at = None;
        p.downlink.report_loss_at = None;
        p.downlink.loss_avg = 0.0;
        p.downlink.cut_at = None;
        for (_, s) in p.subs.iter_mut() {
            s.hold = allocate::Hold::default();
        }
        let mut bwe = p.send_peer().rtc.bwe();
        bwe.reset(initial);
        self.allocate_for(key, now);
    }

    /// Turn each track's byte counts since the last look into rates.
    pub(super) fn measure_layers(&mut self) {
        let secs = HOUSEKEEPING.as_secs_f64();
        for (_, room) in self.rooms.iter_mut() {
            for (_, t) in room.tracks.iter_mut() {
                for l in 0..MAX_LAYERS {
                    let bytes = std::mem::take(&mut t.layer_bytes[l]);
                    if bytes == 0 {
                        // Stopped (dynacast, a muted camera): keep the last rate.
                        continue;
                    }
                    let bps = (bytes as f64 * 8.0 / secs) as u64;
                    t.layer_bps[l] = if t.layer_bps[l] == 0 {
                        bps
                    } else {
                        (t.layer_bps[l] + bps) / 2
                    };
                }
            }
        }
    }

    pub(super) fn allocate_downlinks(&mut self, now: Instant) {
        let keys: Vec<usize> = self
            .parts
            .iter()
            .filter(|(_, p)| p.downlink.estimate().is_some())
            .map(|(k, _)| k)
            .collect();
        for k in keys {
            self.allocate_for(k, now);
        }
        self.publish_gauges();
        self.publish_room_bandwidth();
    }

    /// Per-room paused tracks and downgrades for `/metrics` (one lock per
    /// housekeeping pass).
    fn publish_room_bandwidth(&mut self) {
        let Ok(mut m) = self.counters.room_bandwidth.lock() else {
            return;
        };
        for (_, room) in self.rooms.iter() {
            let paused = room
                .participants
                .iter()
                .filter_map(|k| self.parts.get(*k))
                .map(|p| p.subs.iter().filter(|(_, s)| s.paused).count() as u64)
                .sum();
            if paused > 0 || room.bwe_downgrades > 0 || m.contains_key(&room.name) {
                m.insert(room.name.clone(), (paused, room.bwe_downgrades));
            }
        }
    }

    /// Fit one subscriber's video into its estimate and apply the result.
    pub(super) fn allocate_for(&mut self, key: usize, now: Instant) {
        let Core {
            parts,
            rooms,
            counters,
            ..
        } = self;
        let Some(p) = parts.get_mut(key) else {
            return;
        };
        let Some(estimate) = p.downlink.estimate() else {
            return;
        };
        let Some(room) = rooms.get(p.room) else {
            return;
        };
        let mut audio = 0u64;
        let mut demands = Vec::new();
        let mut subs = Vec::new();
        for (sk, sub) in p.subs.iter() {
            if !sub.live || sub.disabled {
                continue;
            }
            let Some(t) = room.tracks.get(sub.track) else {
                continue;
            };
            match sub.kind {
                Kind::Audio => audio += t.layer_bps[0],
                Kind::Video => {
                    let speaking = room
                        .speakers
                        .iter()
                        .any(|(sid, _)| *sid == sub.publisher_sid);
                    let share = t.info.source == lk::TrackSource::ScreenShare as i32;
                    demands.push(Demand {
                        wanted: sub.want,
                        cost: layer_costs(t),
                        layers: t.layer_count(),
                        rank: if share {
                            0
                        } else if speaking {
                            1
                        } else {
                            2
                        },
                        current: (!sub.paused).then_some(sub.fwd.target),
                    });
                    subs.push(sk);
                }
                _ => {}
            }
        }
        let budget = estimate.saturating_sub(audio);
        // Congestion: the estimate fell below 85 % of its recent peak (the
        // peak fades by half in about 11 s) while the receiver reports
        // loss; it counts for 5 s.
        let dl = &mut p.downlink;
        dl.peak = estimate.max((dl.peak as f64 * PEAK_FADE) as u64);
        let lossy = dl
            .loss_at
            .is_some_and(|t| now.saturating_duration_since(t) < LOSS_MEMORY);
        // Once congested (the smoothed loss), one report of loss made after
        // the last cut had time to show may pause: a report still counting
        // the packets of the layer just cut (and the estimate it dragged
        // down) says nothing of the one left. Smoothed here too, a link
        // the lowest layer overfills by a little would never pause.
        let fresh_loss = dl.report_loss_at.is_some_and(|r| {
            now.saturating_duration_since(r) < LOSS_MEMORY
                && dl.cut_at.is_none_or(|c| r > c + CUT_SETTLE)
        });
        if lossy && (estimate as f64) < dl.peak as f64 * CONGESTION_DROP {
            dl.congested_at = Some(now);
        }
        let since = dl.congested_at.map(|t| now.saturating_duration_since(t));
        let link = allocate::Link {
            congested: since.is_some_and(|s| s < CONGESTION_HOLD),
            guarded: since.is_some_and(|s| s < GUARD_AFTER_CONGESTION),
            may_pause: fresh_loss,
        };
        let congested = link.congested;
        // Congested, what flows must also leave the link room to drain.
        let budget = if congested {
            ((estimate as f64 * CONGESTED_SHARE) as u64).saturating_sub(audio)
        } else {
            budget
        };
        let mut holds: Vec<_> = subs.iter().map(|&sk| p.subs[sk].hold.clone()).collect();
        let out = allocate::allocate(budget, link, &demands, &mut holds, now);

        tracing::trace!(
            participant = %p.sid, estimate, budget, congested, lossy,
            wanted = ?demands.iter().map(|d| d.wanted).collect::<Vec<_>>(),
            was = ?demands.iter().map(|d| d.current).collect::<Vec<_>>(),
            now = ?out, "downlink pass"
        );
        if out.iter().zip(&demands).any(|(o, d)| *o != d.current) {
            tracing::debug!(
                participant = %p.sid,
                estimate,
                audio,
                budget,
                congested,
                lossy,
                was = ?demands.iter().map(|d| d.current).collect::<Vec<_>>(),
                now = ?out,
                costs = ?demands.iter().map(|d| d.cost).collect::<Vec<_>>(),
                "downlink allocation"
            );
        }
        let mut states = Vec::new();
        let mut downgrades = 0;
        let mut keyframes: Vec<(usize, Layer)> = Vec::new();
        for (i, &sk) in subs.iter().enumerate() {
            let sub = &mut p.subs[sk];
            sub.hold = holds[i].clone();
            let (was, now_) = (demands[i].current, out[i]);
            if was == now_ {
                continue;
            }
            if now_ < was {
                MediaCounters::add(&counters.bwe_downgrades, 1);
                downgrades += 1;
            }
            match now_ {
                None => {
                    sub.paused = true;
                    sub.fwd.pause();
                    MediaCounters::add(&counters.bwe_pauses, 1);
                    states.push(stream_state(sub, lk::StreamState::Paused));
                }
                Some(l) => {
                    sub.fwd.target = l;
                    if sub.paused {
                        sub.paused = false;
                        states.push(stream_state(sub, lk::StreamState::Active));
                    }
                    // Either way the switch waits for a keyframe.
                    keyframes.push((sub.track, sub.fwd.goal()));
                }
            }
        }
        if !states.is_empty() {
            tracing::debug!(participant = %p.sid, estimate, changes = states.len(), "stream states");
            p.send(Resp::StreamStateUpdate(lk::StreamStateUpdate {
                stream_states: states,
            }));
        }

        // What str0m should aim for. Only while the estimate holds video
        // back (congested lately, or a track paused) is it worth probing, towards
        // everything as wanted with the room a raise needs. Otherwise what
        // flows: padding towards layers that flow anyway (they rise without
        // the estimate's leave, see `allocate`) only burns CPU on both ends
        // and, measured, kept a weak link full and its video stuttering.
        // The first pass always replaces the start-up target, so one who
        // receives no video is never padded up to it.
        let limited = link.guarded || out.iter().any(|o| o.is_none());
        let desired = if limited {
            let wanted = audio
                + demands
                    .iter()
                    .map(|d| d.cost[d.cap() as usize])
                    .sum::<u64>();
            (wanted as f64 * allocate::RAISE_MARGIN) as u64
        } else {
            audio
                + out
                    .iter()
                    .zip(&demands)
                    .map(|(o, d)| o.map_or(0, |l| d.cost[l as usize]))
                    .sum::<u64>()
        };
        let dl = &mut p.downlink;
        let news = dl
            .desired_set
            .is_none_or(|last| (desired as f64 - last as f64).abs() > last as f64 * CHANGE);
        if news {
            dl.desired_set = Some(desired);
            p.send_peer()
                .rtc
                .bwe()
                .set_bitrate(Bitrate::ZERO, Bitrate::bps(desired));
        }
        if downgrades > 0 {
            p.downlink.cut_at = Some(now);
        }
        let room_key = p.room;
        if let Some(r) = rooms.get_mut(room_key) {
            r.bwe_downgrades += downgrades;
        }
        for (tk, l) in keyframes {
            self.request_keyframe(room_key, tk, l, now);
        }
    }
}

fn stream_state(sub: &super::participant::Sub, state: lk::StreamState) -> lk::StreamStateInfo {
    lk::StreamStateInfo {
        participant_sid: sub.publisher_sid.clone(),
        track_sid: sub.track_sid.clone(),
        state: state as i32,
    }
}

/// What each layer of a track costs: measured, else what the publisher
/// declared, else a guess by its height; never less than the layer below.
// `TrackInfo.layers` is deprecated, yet it is what clients fill and read.
#[allow(deprecated)]
fn layer_costs(t: &Track) -> [u64; MAX_LAYERS] {
    let mut cost = [0u64; MAX_LAYERS];
    for l in 0..t.layer_count().min(MAX_LAYERS) {
        let declared = t
            .info
            .layers
            .iter()
            .find(|v| v.quality == l as i32)
            .map(|v| v.bitrate as u64)
            .unwrap_or(0);
        let height = t.dims.get(l).map(|d| d.1).unwrap_or(0);
        let guess = match height {
            0..=240 => 150_000,
            241..=540 => 500_000,
            _ => 1_500_000,
        };
        let c = if t.layer_bps[l] > 0 {
            t.layer_bps[l]
        } else if declared > 0 {
            declared
        } else {
            guess
        };
        cost[l] = if l > 0 { c.max(cost[l - 1] + 1) } else { c };
    }
    cost
}

//! Fitting a subscriber's video to its downlink: which simulcast layer of
//! each track it receives, or none (paused), within the bandwidth estimate.
//! Pure policy, no I/O; `downlink.rs` feeds it and applies the result.

use std::time::{Duration, Instant};

use super::forward::Layer;
use super::room::MAX_LAYERS;

/// One video track a subscriber receives, as the allocator sees it.
#[derive(Debug, Clone)]
pub struct Demand {
    /// The layer the subscriber asked for (by size or quality).
    pub wanted: Layer,
    /// Bits per second of each layer, lowest first (the track's layers only).
    pub cost: [u64; MAX_LAYERS],
    pub layers: usize,
    /// Lower goes first: screen shares and the active speaker's camera
    /// before other tiles.
    pub rank: u8,
    /// What it receives now: a layer, or `None` while paused.
    pub current: Option<Layer>,
}

impl Demand {
    /// The highest layer it may get.
    pub fn cap(&self) -> Layer {
        self.wanted.min(self.layers.saturating_sub(1) as Layer)
    }
}

/// Per subscription: when it may be raised again.
#[derive(Debug, Clone)]
pub struct Hold {
    until: Option<Instant>,
    /// The wait after the next cut; doubles when cuts follow raises closely.
    wait: Duration,
    last_up: Option<Instant>,
    last_down: Option<Instant>,
    /// Since when not even the lowest layer has fitted.
    starving: Option<Instant>,
}

impl Default for Hold {
    fn default() -> Self {
        Hold {
            until: None,
            wait: Hold::BASE,
            last_up: None,
            last_down: None,
            starving: None,
        }
    }
}

impl Hold {
    /// Wait after a cut before raising again.
    const BASE: Duration = Duration::from_secs(3);
    const MAX: Duration = Duration::from_secs(30);
    /// Between two raises: time for the keyframe and for the estimate to
    /// show whether the last raise fitted.
    const STEP: Duration = Duration::from_millis(1500);
    /// A cut this soon after a raise means the raise did not fit: flapping.
    const FLAP: Duration = Duration::from_secs(10);
    /// Stable this long: the wait starts afresh.
    const CALM: Duration = Duration::from_secs(30);
    /// A track is paused only when its lowest layer has not fitted for
    /// this long: a dip of the estimate (a burst of cross traffic, a busy
    /// receiver) costs a lower layer, not the picture.
    const PAUSE_AFTER: Duration = Duration::from_millis(1500);
    /// The least a paused track waits before it is tried again.
    const PAUSED: Duration = Duration::from_secs(8);

    fn may_raise(&self, now: Instant) -> bool {
        self.until.is_none_or(|u| now >= u)
    }

    fn raised(&mut self, now: Instant) {
        self.last_up = Some(now);
        self.until = Some(now + Self::STEP);
    }

    /// A cut; `pause` when it stops the track: resuming is the costliest
    /// guess to get wrong (an estimate probed up while almost nothing was
    /// sent is often not there), so it waits at least [`Self::PAUSED`].
    fn cut(&mut self, now: Instant, pause: bool) {
        if self
            .last_down
            .is_some_and(|d| now.saturating_duration_since(d) >= Self::CALM)
        {
            self.wait = Self::BASE;
        }
        if self
            .last_up
            .is_some_and(|u| now.saturating_duration_since(u) < Self::FLAP)
        {
            self.wait = (self.wait * 2).min(Self::MAX);
        }
        self.last_down = Some(now);
        let wait = if pause {
            self.wait.max(Self::PAUSED)
        } else {
            self.wait
        };
        self.until = Some(now + wait);
    }
}

/// A raise must fit this much below the budget (the whole estimate after
/// audio), a current layer only within it: the gap keeps layers from
/// flapping around one estimate, and a small dip of the estimate (which
/// tracks about what is sent) from cutting a layer that still fits.
pub const RAISE_MARGIN: f64 = 1.35;

fn cost(d: &Demand, l: Option<Layer>) -> u64 {
    l.map_or(0, |l| d.cost[l as usize])
}

/// Greedy fill in rank order: every track gets its lowest layer while that
/// fits, then tracks are raised a layer at a time (round robin within a
/// rank, so equal tiles share) up to their cap while that fits.
fn fill(
    budget: u64,
    demands: &[Demand],
    caps: &[Option<Layer>],
    order: &[usize],
) -> Vec<Option<Layer>> {
    let mut out: Vec<Option<Layer>> = vec![None; demands.len()];
    let mut left = budget;
    for &i in order {
        if caps[i].is_some() && demands[i].cost[0] <= left {
            left -= demands[i].cost[0];
            out[i] = Some(0);
        }
    }
    let mut start = 0;
    while start < order.len() {
        let rank = demands[order[start]].rank;
        let end = order[start..]
            .iter()
            .position(|&i| demands[i].rank != rank)
            .map_or(order.len(), |n| start + n);
        loop {
            let mut raised = false;
            for &i in &order[start..end] {
                let (Some(l), Some(cap)) = (out[i], caps[i]) else {
                    continue;
                };
                if l >= cap {
                    continue;
                }
                let step =
                    demands[i].cost[l as usize + 1].saturating_sub(demands[i].cost[l as usize]);
                if step <= left {
                    left -= step;
                    out[i] = Some(l + 1);
                    raised = true;
                }
            }
            if !raised {
                break;
            }
        }
        start = end;
    }
    out
}

/// What the downlink's signals allow in one pass.
#[derive(Debug, Clone, Copy, Default)]
pub struct Link {
    /// Congested now: current layers that do not fit the budget are cut.
    pub congested: bool,
    /// Congested lately: raises of flowing tracks must fit the budget too.
    /// Otherwise the estimate only tracks what is sent (a send-side estimate
    /// cannot see capacity nothing used): it stops no raise, and a raise
    /// that does not fit shows as congestion and is cut.
    pub guarded: bool,
    /// The receiver reports loss: a track whose lowest layer does not fit
    /// may be paused; without it the lowest layer is kept.
    pub may_pause: bool,
}

/// The layers to send within `budget` (bits per second for video): cuts at
/// once when the current layers do not fit, raises one step at a time,
/// only with [`RAISE_MARGIN`] to spare and when the track's [`Hold`] allows.
/// Paused tracks resume only within the estimate. See [`Link`] for when
/// the budget binds. `holds` is updated for what changed.
pub fn allocate(
    budget: u64,
    link: Link,
    demands: &[Demand],
    holds: &mut [Hold],
    now: Instant,
) -> Vec<Option<Layer>> {
    let mut order: Vec<usize> = (0..demands.len()).collect();
    order.sort_by_key(|&i| (demands[i].rank, std::cmp::Reverse(demands[i].cap())));
    // Never above what each has now: equal to it when it all fits.
    let keep_caps: Vec<Option<Layer>> = demands
        .iter()
        .map(|d| d.current.map(|c| c.min(d.cap())))
        .collect();
    let keep = if link.congested {
        fill(budget, demands, &keep_caps, &order)
    } else {
        keep_caps
    };
    // One step up for each, with margin.
    let up_caps: Vec<Option<Layer>> = demands
        .iter()
        .map(|d| Some(d.current.map_or(0, |c| (c + 1).min(d.cap()))))
        .collect();
    let mut up = fill(
        (budget as f64 / RAISE_MARGIN) as u64,
        demands,
        &up_caps,
        &order,
    );
    if !link.guarded {
        for (i, d) in demands.iter().enumerate() {
            if d.current.is_some() {
                up[i] = up_caps[i];
            }
        }
    }
    let mut out: Vec<Option<Layer>> = (0..demands.len())
        .map(|i| {
            if up[i] > keep[i] && up[i] > demands[i].current && holds[i].may_raise(now) {
                up[i]
            } else {
                keep[i]
            }
        })
        .collect();
    // Raises chosen from two fills may add up to more than the budget: undo
    // them from the last in rank order.
    let total = |out: &[Option<Layer>]| -> u64 {
        (0..demands.len()).map(|i| cost(&demands[i], out[i])).sum()
    };
    for &i in order.iter().rev() {
        if !link.guarded || total(&out) <= budget {
            break;
        }
        if out[i] > keep[i] {
            out[i] = keep[i];
        }
    }
    for (i, d) in demands.iter().enumerate() {
        if out[i].is_some() || d.current.is_none() {
            holds[i].starving = None;
        } else {
            let since = *holds[i].starving.get_or_insert(now);
            if !link.may_pause || now.saturating_duration_since(since) < Hold::PAUSE_AFTER {
                out[i] = Some(0);
            }
        }
        if out[i] > d.current {
            holds[i].raised(now);
        } else if out[i] < d.current {
            holds[i].cut(now, out[i].is_none());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const COST: [u64; 3] = [150_000, 450_000, 1_500_000];

    fn link(congested: bool, may_pause: bool) -> Link {
        Link {
            congested,
            guarded: congested,
            may_pause,
        }
    }

    fn cam(current: Option<Layer>) -> Demand {
        Demand {
            wanted: 2,
            cost: COST,
            layers: 3,
            rank: 1,
            current,
        }
    }

    fn run(budget: u64, demands: &[Demand], now: Instant) -> Vec<Option<Layer>> {
        let mut holds = vec![Hold::default(); demands.len()];
        allocate(budget, link(true, true), demands, &mut holds, now)
    }

    #[test]
    fn current_layers_stay_while_they_fit() {
        let now = Instant::now();
        let d = [cam(Some(2)), cam(Some(1))];
        assert_eq!(run(2_000_000, &d, now), vec![Some(2), Some(1)]);
    }

    #[test]
    fn a_drop_cuts_at_once_and_pauses_what_does_not_fit_at_all() {
        let now = Instant::now();
        assert_eq!(run(600_000, &[cam(Some(2))], now), vec![Some(1)]);
        // Not even the lowest layer fits: the lowest until that has lasted.
        let mut holds = vec![Hold::default()];
        let a = allocate(100_000, link(true, true), &[cam(Some(2))], &mut holds, now);
        assert_eq!(a, vec![Some(0)]);
        let b = allocate(
            100_000,
            link(true, true),
            &[cam(Some(0))],
            &mut holds,
            now + Duration::from_secs(1),
        );
        assert_eq!(b, vec![Some(0)]);
        let c = allocate(
            100_000,
            link(true, true),
            &[cam(Some(0))],
            &mut holds,
            now + Duration::from_secs(2),
        );
        assert_eq!(c, vec![None]);
        // Two tiles on 400 kbit/s: both at the lowest layer.
        assert_eq!(
            run(400_000, &[cam(Some(2)), cam(Some(2))], now),
            vec![Some(0), Some(0)]
        );
    }

    #[test]
    fn raises_go_one_step_at_a_time_with_margin_and_hold() {
        let t0 = Instant::now();
        let mut holds = vec![Hold::default()];
        // Paused, plenty of room: the lowest layer first.
        let a = allocate(5_000_000, link(true, true), &[cam(None)], &mut holds, t0);
        assert_eq!(a, vec![Some(0)]);
        // Too soon for the next step.
        let b = allocate(
            5_000_000,
            link(true, true),
            &[cam(Some(0))],
            &mut holds,
            t0 + Duration::from_millis(500),
        );
        assert_eq!(b, vec![Some(0)]);
        let c = allocate(
            5_000_000,
            link(true, true),
            &[cam(Some(0))],
            &mut holds,
            t0 + Duration::from_secs(2),
        );
        assert_eq!(c, vec![Some(1)]);
        // 1.5 Mbit/s fits the top layer exactly but not with the margin.
        let d = allocate(
            1_500_000,
            link(true, true),
            &[cam(Some(1))],
            &mut holds,
            t0 + Duration::from_secs(4),
        );
        assert_eq!(d, vec![Some(1)]);
    }

    #[test]
    fn a_cut_soon_after_a_raise_doubles_the_wait() {
        let t0 = Instant::now();
        let mut holds = vec![Hold::default()];
        assert_eq!(
            allocate(5_000_000, link(true, true), &[cam(Some(1))], &mut holds, t0),
            vec![Some(2)]
        );
        // It did not fit: cut 2 s later; the wait is now 6 s, not 3.
        let t1 = t0 + Duration::from_secs(2);
        assert_eq!(
            allocate(1_000_000, link(true, true), &[cam(Some(2))], &mut holds, t1),
            vec![Some(1)]
        );
        let t2 = t1 + Duration::from_secs(4);
        assert_eq!(
            allocate(5_000_000, link(true, true), &[cam(Some(1))], &mut holds, t2),
            vec![Some(1)]
        );
        let t3 = t1 + Duration::from_secs(6);
        assert_eq!(
            allocate(5_000_000, link(true, true), &[cam(Some(1))], &mut holds, t3),
            vec![Some(2)]
        );
    }

    #[test]
    fn screen_shares_and_speakers_go_first() {
        let now = Instant::now();
        let run = |budget, d: &[Demand]| {
            let mut holds = vec![Hold::default(); d.len()];
            allocate(budget, link(true, true), d, &mut holds, now);
            allocate(
                budget,
                link(true, true),
                d,
                &mut holds,
                now + Duration::from_secs(2),
            )
        };
        let mut share = cam(Some(2));
        share.rank = 0;
        // 1.7 Mbit/s: the share keeps its top layer, the camera is cut to the lowest.
        assert_eq!(
            run(1_700_000, &[cam(Some(2)), share.clone()]),
            vec![Some(0), Some(2)]
        );
        // 200 kbit/s: one lowest layer fits: the share's; the camera is paused.
        assert_eq!(run(200_000, &[cam(Some(2)), share]), vec![None, Some(0)]);
    }

    #[test]
    fn equal_tiles_share_a_layer_at_a_time() {
        let now = Instant::now();
        let d = [cam(Some(2)), cam(Some(2)), cam(Some(2))];
        // 1.4 Mbit/s: 3 x 450k fits, 1.5M for any one does not.
        assert_eq!(run(1_400_000, &d, now), vec![Some(1), Some(1), Some(1)]);
    }

    #[test]
    fn nothing_above_what_was_asked_for_or_exists() {
        let now = Instant::now();
        let mut small = cam(Some(0));
        small.wanted = 0;
        let mut single = cam(Some(0));
        single.layers = 1;
        assert_eq!(
            run(10_000_000, &[small, single], now),
            vec![Some(0), Some(0)]
        );
    }

    #[test]
    fn without_congestion_a_low_estimate_neither_cuts_nor_stops_a_raise() {
        let t0 = Instant::now();
        let mut holds = vec![Hold::default()];
        // The estimate only tracks the 150 kbit/s sent: keep, and raise a step.
        assert_eq!(
            allocate(200_000, link(false, true), &[cam(Some(2))], &mut holds, t0),
            vec![Some(2)]
        );
        assert_eq!(
            allocate(200_000, link(false, true), &[cam(Some(0))], &mut holds, t0),
            vec![Some(1)]
        );
        // A paused track resumes only within the estimate.
        let mut holds = vec![Hold::default()];
        assert_eq!(
            allocate(100_000, link(false, true), &[cam(None)], &mut holds, t0),
            vec![None]
        );
    }

    #[test]
    fn without_loss_the_lowest_layer_is_kept_not_paused() {
        // An estimate can dip because a host is busy, not the link: only a
        // receiver reporting loss gets a track paused.
        let t0 = Instant::now();
        let mut holds = vec![Hold::default()];
        for s in 0..5 {
            let now = t0 + Duration::from_secs(s);
            assert_eq!(
                allocate(50_000, link(true, false), &[cam(Some(0))], &mut holds, now),
                vec![Some(0)]
            );
        }
        assert_eq!(
            allocate(
                50_000,
                link(true, true),
                &[cam(Some(0))],
                &mut holds,
                t0 + Duration::from_secs(6)
            ),
            vec![None]
        );
    }
}

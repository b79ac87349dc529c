//! Active speakers from the RFC 6464 audio level each publisher sends in its
//! RTP header extension; the audio itself is never looked at.

/// Audio level (dBov, 0 loudest, 127 silence) at or below which a packet
/// counts as speech, as LiveKit's default.
const ACTIVE_LEVEL: u8 = 35;
/// Share of loud packets in a window for the track to count as speaking.
const MIN_PERCENT: u32 = 40;

#[derive(Debug, Default, Clone)]
pub struct LevelMeter {
    packets: u32,
    loud: u32,
    linear_sum: f32,
    /// Smoothed level (0..1) and activity at the end of the last window.
    pub level: f32,
    pub active: bool,
}

impl LevelMeter {
    /// `dbov` as str0m reports it: 0 loudest, negative quieter.
    #[inline]
    pub fn observe(&mut self, dbov: i8) {
        let level = dbov.unsigned_abs().min(127);
        self.packets += 1;
        if level <= ACTIVE_LEVEL {
            self.loud += 1;
            self.linear_sum += 10f32.powf(-(level as f32) / 20.0);
        }
    }

    /// Close a window; returns whether (active, level) changed noticeably.
    pub fn close_window(&mut self) -> bool {
        let was = (self.active, self.level);
        if self.packets == 0 {
            self.active = false;
            self.level = 0.0;
        } else {
            self.active = self.loud * 100 >= self.packets * MIN_PERCENT;
            let mean = if self.loud > 0 {
                self.linear_sum / self.loud as f32
            } else {
                0.0
            };
            self.level = if self.active { mean } else { 0.0 };
        }
        self.packets = 0;
        self.loud = 0;
        self.linear_sum = 0.0;
        was.0 != self.active || (self.active && (was.1 - self.level).abs() > 0.05)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loud_window_is_active_then_silence_is_not() {
        let mut m = LevelMeter::default();
        for _ in 0..50 {
            m.observe(-20);
        }
        assert!(m.close_window());
        assert!(m.active && m.level > 0.05);
        for _ in 0..50 {
            m.observe(-127);
        }
        assert!(m.close_window());
        assert!(!m.active);
        assert!(!m.close_window(), "no change, no event");
    }
}

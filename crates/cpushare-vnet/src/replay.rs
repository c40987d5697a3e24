//! The receive side's replay protection: a sliding window over packet
//! counters (RFC 6479's bitmap, as WireGuard keeps it). A counter is accepted
//! once; one older than the window is refused, since it cannot be told apart
//! from a replay. Reordering within the window is fine.

/// How far below the highest counter seen a counter may still arrive.
pub const WINDOW: u64 = 8192;
/// One word more than the window: the highest counter's word holds only
/// current bits (it was cleared when the window reached it).
const WORDS: usize = (WINDOW / 64) as usize + 1;

#[derive(Debug, Clone)]
pub struct ReplayWindow {
    /// Highest counter accepted so far.
    last: Option<u64>,
    bits: Box<[u64; WORDS]>,
}

impl Default for ReplayWindow {
    fn default() -> Self {
        ReplayWindow { last: None, bits: Box::new([0; WORDS]) }
    }
}

impl ReplayWindow {
    /// Whether `counter` could be accepted (checked before decrypting, to
    /// skip the work for an obvious replay).
    pub fn fresh(&self, counter: u64) -> bool {
        let Some(last) = self.last else { return true };
        if counter > last {
            return true;
        }
        if last - counter >= WINDOW {
            return false;
        }
        let (word, bit) = Self::slot(counter);
        self.bits[word] & (1 << bit) == 0
    }

    /// Records `counter` (after its packet authenticated); false if it was
    /// seen before or is too old.
    pub fn accept(&mut self, counter: u64) -> bool {
        if !self.fresh(counter) {
            return false;
        }
        if self.last.is_none_or(|last| counter > last) {
            // The words the window slides into start empty.
            let to = counter / 64;
            let from = self.last.map_or(to, |last| last / 64 + 1);
            for w in from..=to.min(from + WORDS as u64 - 1) {
                self.bits[(w % WORDS as u64) as usize] = 0;
            }
            self.last = Some(counter);
        }
        let (word, bit) = Self::slot(counter);
        self.bits[word] |= 1 << bit;
        true
    }

    fn slot(counter: u64) -> (usize, u32) {
        (((counter / 64) % WORDS as u64) as usize, (counter % 64) as u32)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn each_counter_once_in_any_order_within_the_window() {
        let mut w = ReplayWindow::default();
        assert!(w.accept(0));
        assert!(!w.accept(0));
        assert!(w.accept(5));
        assert!(w.accept(3));
        assert!(!w.accept(3));
        assert!(w.accept(100_000));
        assert!(!w.accept(100_000 - WINDOW), "older than the window");
        assert!(w.accept(100_000 - WINDOW + 1));
        assert!(!w.accept(5), "long gone");
    }

    proptest! {
        /// Against a model that remembers everything: never accepts a counter
        /// twice, and accepts every new counter within the window.
        #[test]
        fn matches_a_model(counters in proptest::collection::vec(0u64..40_000, 1..400)) {
            let mut w = ReplayWindow::default();
            let mut seen = std::collections::HashSet::new();
            let mut high: Option<u64> = None;
            for c in counters {
                let within = high.is_none_or(|h| c > h || h - c < WINDOW);
                let expect = !seen.contains(&c) && within;
                prop_assert_eq!(w.accept(c), expect, "counter {}", c);
                if expect {
                    seen.insert(c);
                    high = Some(high.map_or(c, |h| h.max(c)));
                }
            }
        }
    }
}

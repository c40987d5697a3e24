//! Integer money arithmetic: per-second metering at a per-hour price, settled in
//! whole cents with the remainder carried, so nothing is ever rounded away.

use crate::Cents;

pub const SECONDS_PER_HOUR: u64 = 3600;
/// Basis points in one whole.
pub const BPS: i64 = 10_000;

/// Highest ask or bid accepted: one million euros per CPU-hour.
pub const MAX_PRICE: u64 = 100_000_000;
/// Longest lease period accepted: a leap year.
pub const MAX_PERIOD: u64 = 366 * 24 * SECONDS_PER_HOUR;
/// Shortest lease period accepted.
pub const MIN_PERIOD: u64 = 60;
/// Most CPUs one buy order may ask for.
pub const MAX_CPUS: u32 = 100_000;
/// Largest single deposit or withdrawal: ten trillion euros.
pub const MAX_TRANSFER: Cents = 1_000_000_000_000_000;

/// The most one CPU can cost over one period, whatever remainder a lease carries
/// into it: `ceil(price * period / 3600)`. (With a carry `r < 3600`, the charge
/// `floor((r + p*T) / 3600)` never exceeds this.) This is what escrow holds.
pub fn period_ceiling(price: u64, period: u64) -> Cents {
    (price * period).div_ceil(SECONDS_PER_HOUR) as Cents
}

/// Meters `seconds` at `price` cents per hour onto a carried remainder (in
/// cent-seconds per hour, always below 3600). Returns the whole cents now due
/// and the new remainder.
pub fn accrue(carry: u64, seconds: u64, price: u64) -> (Cents, u64) {
    debug_assert!(carry < SECONDS_PER_HOUR);
    let total = carry + seconds * price;
    ((total / SECONDS_PER_HOUR) as Cents, total % SECONDS_PER_HOUR)
}

/// The exchange's cumulative fee on a lease's cumulative charge. Taking the
/// difference of cumulative fees at each settlement carries the fee's own
/// remainder, so the fee never loses or invents a cent either.
pub fn cumulative_fee(charged: Cents, fee_bps: u32) -> Cents {
    ((charged as i128 * fee_bps as i128) / BPS as i128) as Cents
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_hour_charges_the_price() {
        assert_eq!(accrue(0, 3600, 125), (125, 0));
    }

    #[test]
    fn seconds_carry_their_remainder() {
        // 1 cent/hour: 3599 seconds owe nothing yet, the 3600th owes one cent.
        let (due, carry) = accrue(0, 3599, 1);
        assert_eq!((due, carry), (0, 3599));
        assert_eq!(accrue(carry, 1, 1), (1, 0));
    }

    #[test]
    fn metering_in_pieces_equals_metering_at_once() {
        let price = 77;
        let mut carry = 0;
        let mut charged = 0;
        for _ in 0..10_000 {
            let (due, c) = accrue(carry, 7, price);
            charged += due;
            carry = c;
        }
        assert_eq!(charged, (70_000 * price / 3600) as Cents);
    }

    #[test]
    fn ceiling_bounds_any_period_charge() {
        for price in [1, 7, 100, 3599, 3601] {
            for period in [60, 61, 3600, 7201] {
                for carry in [0, 1, 1800, 3599] {
                    let (due, _) = accrue(carry, period, price);
                    assert!(due <= period_ceiling(price, period), "{price} {period} {carry}");
                }
            }
        }
    }

    #[test]
    fn fee_is_cumulative() {
        assert_eq!(cumulative_fee(99, 100), 0);
        assert_eq!(cumulative_fee(100, 100), 1);
        assert_eq!(cumulative_fee(MAX_TRANSFER, 10_000), MAX_TRANSFER);
    }
}

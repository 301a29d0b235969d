//! Month-end projection at the current rate (issue 19): what a tenant will have spent by the
//! end of the month, and the day its monthly limit runs out, if this month's spend goes on at
//! its average daily rate so far. Days are the database calendar's; today counts as a whole
//! day elapsed, so early in a day the rate is understated rather than wildly overstated.

use chrono::{Datelike, Days, NaiveDate};

use crate::money::Nanos;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Projection {
    /// Month-to-date spend / days elapsed (today included) × days in the month.
    pub month_end: Nanos,
    /// The first day whose end the spend reaches the limit at that rate; `today` when it is
    /// already reached; None without a monthly limit, with nothing spent, or when it lasts
    /// past the month's end (the monthly counter starts again then).
    pub runs_out: Option<NaiveDate>,
}

/// Days in `today`'s month (28 to 31).
pub fn days_in_month(today: NaiveDate) -> u32 {
    let first = today.with_day(1).unwrap_or(today);
    let next = first.checked_add_months(chrono::Months::new(1)).unwrap_or(first);
    next.signed_duration_since(first).num_days().clamp(28, 31) as u32
}

/// `spent` this month as of `today` against the effective monthly `limit`.
pub fn project(spent: Nanos, limit: Option<Nanos>, today: NaiveDate) -> Projection {
    let elapsed = i128::from(today.day()); // 1..=31
    let days = i128::from(days_in_month(today));
    let s = i128::from(spent.0.max(0));
    // Exact: at most 9.2e18 × 31, far inside i128; the result at most 31× an i64 value.
    let month_end = Nanos(i64::try_from(s * days / elapsed).unwrap_or(i64::MAX));
    let runs_out = limit.and_then(|l| {
        let l = i128::from(l.0.max(0));
        if s >= l {
            return Some(today);
        }
        if s == 0 {
            return None;
        }
        // The first day d of the month with s / elapsed × d >= l.
        let d = (l * elapsed + s - 1) / s;
        (d <= days).then(|| today.with_day(1).and_then(|f| f.checked_add_days(Days::new(d as u64 - 1)))).flatten()
    });
    Projection { month_end, runs_out }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn day(s: &str) -> NaiveDate {
        s.parse().unwrap()
    }

    #[test]
    fn days_in_months() {
        assert_eq!(days_in_month(day("2026-02-14")), 28);
        assert_eq!(days_in_month(day("2028-02-01")), 29);
        assert_eq!(days_in_month(day("2026-12-31")), 31);
        assert_eq!(days_in_month(day("2026-11-30")), 30);
    }

    #[test]
    fn projects_the_daily_average_to_the_month_end() {
        // $10 over 10 days of a 30-day month: $1 a day, $30 by the end; a $25 limit is
        // reached at the end of day 25.
        let p = project(Nanos(10_000_000_000), Some(Nanos(25_000_000_000)), day("2026-11-10"));
        assert_eq!(p.month_end, Nanos(30_000_000_000));
        assert_eq!(p.runs_out, Some(day("2026-11-25")));
        // A limit of $30 is reached on the last day, $31 not this month.
        assert_eq!(project(Nanos(10_000_000_000), Some(Nanos(30_000_000_000)), day("2026-11-10")).runs_out, Some(day("2026-11-30")));
        assert_eq!(project(Nanos(10_000_000_000), Some(Nanos(30_000_000_001)), day("2026-11-10")).runs_out, None);
        // Rounded down to the nano-dollar: 1 over 3 days of 31.
        assert_eq!(project(Nanos(1), None, day("2026-12-03")).month_end, Nanos(10));
    }

    #[test]
    fn spent_limits_none_and_zero() {
        let today = day("2026-12-02");
        assert_eq!(project(Nanos(5), Some(Nanos(5)), today).runs_out, Some(today));
        assert_eq!(project(Nanos(0), Some(Nanos(0)), today).runs_out, Some(today));
        assert_eq!(project(Nanos(0), Some(Nanos(5)), today), Projection { month_end: Nanos(0), runs_out: None });
        assert_eq!(project(Nanos(7), None, today).runs_out, None);
        assert_eq!(project(Nanos(i64::MAX), Some(Nanos(i64::MAX)), day("2026-12-01")).month_end, Nanos(i64::MAX));
        assert_eq!(project(Nanos(-3), Some(Nanos(1)), today).month_end, Nanos(0));
    }
}

//! Time: UTC microsecond timestamps in storage, calendar periods in the configured timezone.

use chrono::{DateTime, Datelike, Days, NaiveDate, TimeZone, Utc};
use chrono_tz::Tz;

use crate::error::{config_err, Result};

/// Microseconds since the Unix epoch, UTC.
pub type Micros = i64;

pub fn now_micros() -> Micros {
    Utc::now().timestamp_micros()
}

/// The timezone of a database created by a process that names none.
pub const DEFAULT_TIMEZONE: &str = "UTC";
/// The most days a day-range argument (`last_n_days`, the dashboard's chart) may span.
pub const MAX_DAYS: i64 = 100_000;

#[derive(Debug, Clone, Copy)]
pub struct Calendar {
    tz: Tz,
}

/// A budget period: its storage key and its bounds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Period {
    Daily,
    Monthly,
}

impl Period {
    pub fn name(self) -> &'static str {
        match self {
            Period::Daily => "daily",
            Period::Monthly => "monthly",
        }
    }
}

impl Calendar {
    pub fn new(tz_name: &str) -> Result<Calendar> {
        match tz_name.parse::<Tz>() {
            Ok(tz) => Ok(Calendar { tz }),
            Err(_) => config_err(format!("timezone: unknown IANA timezone {tz_name:?}")),
        }
    }

    pub fn name(&self) -> &'static str {
        self.tz.name()
    }

    /// The calendar date `at` falls on in this timezone.
    pub fn local_date(&self, at: Micros) -> NaiveDate {
        let utc = DateTime::<Utc>::from_timestamp_micros(at).unwrap_or_default();
        utc.with_timezone(&self.tz).date_naive()
    }

    /// The key of the period containing `at`: "2026-11-28" (daily) or "2026-11" (monthly).
    pub fn period_key(&self, period: Period, at: Micros) -> String {
        let d = self.local_date(at);
        // Plain integer formatting: chrono's strftime machinery showed up in call profiles.
        match period {
            Period::Daily => format!("{:04}-{:02}-{:02}", d.year(), d.month(), d.day()),
            Period::Monthly => format!("{:04}-{:02}", d.year(), d.month()),
        }
    }

    /// UTC micros of local midnight starting `date` (the earliest valid instant on DST days).
    pub fn start_of(&self, date: NaiveDate) -> Micros {
        let midnight = date.and_hms_opt(0, 0, 0).unwrap_or_default();
        let local = self
            .tz
            .from_local_datetime(&midnight)
            .earliest()
            // A DST gap at midnight: the day starts an hour later.
            .or_else(|| self.tz.from_local_datetime(&(midnight + chrono::Duration::hours(1))).earliest());
        local.map(|t| t.timestamp_micros()).unwrap_or(0)
    }

    /// [start, end) of the named range containing `now`.
    pub fn today(&self, now: Micros) -> (Micros, Micros) {
        let d = self.local_date(now);
        (self.start_of(d), self.start_of(d + Days::new(1)))
    }

    /// The ISO week (Monday first) containing `now`.
    pub fn this_week(&self, now: Micros) -> (Micros, Micros) {
        let d = self.local_date(now);
        let monday = d - Days::new(d.weekday().num_days_from_monday() as u64);
        (self.start_of(monday), self.start_of(monday + Days::new(7)))
    }

    pub fn this_month(&self, now: Micros) -> (Micros, Micros) {
        let d = self.local_date(now);
        let first = d.with_day(1).unwrap_or(d);
        let next = if first.month() == 12 {
            NaiveDate::from_ymd_opt(first.year() + 1, 1, 1)
        } else {
            NaiveDate::from_ymd_opt(first.year(), first.month() + 1, 1)
        }
        .unwrap_or(first);
        (self.start_of(first), self.start_of(next))
    }

    /// The calendar month before `now`'s.
    pub fn last_month(&self, now: Micros) -> (Micros, Micros) {
        self.this_month(self.this_month(now).0 - 1)
    }

    /// Today and the n-1 calendar days before it.
    /// The last `n` calendar days up to and including today's; `n` is at most `MAX_DAYS`.
    pub fn last_n_days(&self, now: Micros, n: u32) -> (Micros, Micros) {
        let d = self.local_date(now);
        let first = d - Days::new(n.saturating_sub(1) as u64);
        (self.start_of(first), self.start_of(d + Days::new(1)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> Micros {
        DateTime::parse_from_rfc3339(s).unwrap().timestamp_micros()
    }

    #[test]
    fn periods_follow_the_timezone() {
        let ny = Calendar::new("America/New_York").unwrap();
        // 03:00 UTC on Dec 1 is still Nov 30 in New York.
        let t = at("2026-12-01T03:00:00Z");
        assert_eq!(ny.period_key(Period::Daily, t), "2026-11-30");
        assert_eq!(ny.period_key(Period::Monthly, t), "2026-11");
        let utc = Calendar::new("UTC").unwrap();
        assert_eq!(utc.period_key(Period::Monthly, t), "2026-12");
    }

    #[test]
    fn ranges() {
        let utc = Calendar::new("UTC").unwrap();
        let t = at("2026-11-28T12:00:00Z"); // a Saturday
        assert_eq!(utc.today(t), (at("2026-11-28T00:00:00Z"), at("2026-11-29T00:00:00Z")));
        assert_eq!(utc.this_week(t), (at("2026-11-23T00:00:00Z"), at("2026-11-30T00:00:00Z")));
        assert_eq!(utc.this_month(t), (at("2026-11-01T00:00:00Z"), at("2026-12-01T00:00:00Z")));
        assert_eq!(utc.last_n_days(t, 7).0, at("2026-11-22T00:00:00Z"));
        let dec = at("2026-12-15T00:00:00Z");
        assert_eq!(utc.this_month(dec).1, at("2027-01-01T00:00:00Z"));
    }

    #[test]
    fn unknown_timezone_is_named() {
        let e = Calendar::new("Mars/Olympus").unwrap_err().to_string();
        assert!(e.contains("Mars/Olympus") && e.contains("timezone"));
    }
}

//! Exact money: integer nano-USD in storage and arithmetic, `rust_decimal` at the edges.

use rust_decimal::prelude::ToPrimitive;
use rust_decimal::{Decimal, RoundingStrategy};

use crate::error::{config_err, Result};

/// An amount of US dollars in units of 1e-9 USD.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Nanos(pub i64);

const NANOS_PER_USD: i64 = 1_000_000_000;

/// The largest USD amount a limit may be: one billion dollars. Sums of many calls still fit
/// an i64 of nano-dollars (about 9.2 billion USD) with room to spare.
pub const MAX_USD: i64 = 1_000_000_000;

impl Nanos {
    pub const ZERO: Nanos = Nanos(0);

    pub fn to_decimal(self) -> Decimal {
        Decimal::from_i128_with_scale(self.0 as i128, 9).normalize()
    }

    /// A user-given USD amount (a limit): from 0 to `MAX_USD`, representable to the
    /// nano-dollar; `field` names it in the error.
    pub fn from_usd(field: &str, usd: Decimal) -> Result<Nanos> {
        if usd.is_sign_negative() && !usd.is_zero() {
            return config_err(format!("{field} must not be negative (got {usd})"));
        }
        if usd > Decimal::from(MAX_USD) {
            return config_err(format!("{field} must be at most {MAX_USD} USD (got {usd})"));
        }
        // Cannot overflow below MAX_USD, but a checked product costs nothing.
        let scaled = usd.checked_mul(Decimal::from(NANOS_PER_USD));
        let Some(scaled) = scaled.filter(|s| s.fract() == Decimal::ZERO) else {
            return config_err(format!("{field} has more precision than one nano-dollar (got {usd})"));
        };
        match scaled.to_i64() {
            Some(n) => Ok(Nanos(n)),
            None => config_err(format!("{field} must be at most {MAX_USD} USD (got {usd})")),
        }
    }

    pub fn saturating_add(self, o: Nanos) -> Nanos {
        Nanos(self.0.saturating_add(o.0))
    }
}

/// Price of `tokens` at `usd_per_million`, rounded half away from zero to the nano-dollar.
/// Rounding happens once per component so input + output = total exactly. A product past
/// what an i64 of nano-dollars holds saturates (it can only come from absurd prices or
/// counts, which admission refuses anyway) instead of overflowing.
pub fn token_cost(tokens: i64, usd_per_million: Decimal) -> Nanos {
    // USD/1M tokens * 1e9 nanos/USD / 1e6 = price * 1000 nanos per token.
    let nanos = Decimal::from(tokens).checked_mul(usd_per_million).and_then(|n| n.checked_mul(Decimal::from(1000)));
    let saturated = if (tokens < 0) != usd_per_million.is_sign_negative() { i64::MIN } else { i64::MAX };
    match nanos {
        Some(n) => Nanos(n.round_dp_with_strategy(0, RoundingStrategy::MidpointAwayFromZero).to_i64().unwrap_or(saturated)),
        None => Nanos(saturated),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::str::FromStr;

    fn d(s: &str) -> Decimal {
        Decimal::from_str(s).unwrap()
    }

    #[test]
    fn cost_is_exact_nanos() {
        // 1,234 tokens at $2.50 / 1M = $0.003085 exactly.
        assert_eq!(token_cost(1234, d("2.50")), Nanos(3_085_000));
        assert_eq!(token_cost(1234, d("2.50")).to_decimal(), d("0.003085"));
        // $0.0375 / 1M: 37.5 nanos per token; 3 tokens = 112.5 -> 113.
        assert_eq!(token_cost(3, d("0.0375")), Nanos(113));
        assert_eq!(token_cost(0, d("15")), Nanos::ZERO);
    }

    #[test]
    fn limits_validate() {
        assert_eq!(Nanos::from_usd("daily_limit", d("50")).unwrap(), Nanos(50_000_000_000));
        assert!(Nanos::from_usd("daily_limit", d("-1")).is_err());
        let e = Nanos::from_usd("daily_limit", d("0.0000000001")).unwrap_err();
        assert!(e.to_string().contains("daily_limit"));
        assert_eq!(Nanos(1_500_000_000).to_decimal(), d("1.5"));
    }

    #[test]
    fn huge_amounts_are_errors_or_saturate_never_panic() {
        assert_eq!(Nanos::from_usd("daily_limit", d("1000000000")).unwrap(), Nanos(MAX_USD * NANOS_PER_USD));
        for big in ["1000000000.000000001", "100000000000000000000", "79228162514264337593543950335"] {
            let e = Nanos::from_usd("daily_limit", d(big)).unwrap_err().to_string();
            assert!(e.contains("daily_limit") && e.contains("at most"), "{e}");
        }
        assert_eq!(token_cost(i64::MAX, Decimal::MAX), Nanos(i64::MAX));
        assert_eq!(token_cost(i64::MIN, Decimal::MAX), Nanos(i64::MIN));
        assert_eq!(token_cost(1 << 62, d("15")), Nanos(i64::MAX));
    }
}

//! Exact money: integer nano-USD in storage and arithmetic, `rust_decimal` at the edges.

use rust_decimal::prelude::ToPrimitive;
use rust_decimal::{Decimal, RoundingStrategy};

use crate::error::{config_err, Result};

/// An amount of US dollars in units of 1e-9 USD.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Nanos(pub i64);

const NANOS_PER_USD: i64 = 1_000_000_000;

impl Nanos {
    pub const ZERO: Nanos = Nanos(0);

    pub fn to_decimal(self) -> Decimal {
        Decimal::from_i128_with_scale(self.0 as i128, 9).normalize()
    }

    /// A user-given USD amount (a limit): must be finite, non-negative and representable
    /// to the nano-dollar; `field` names it in the error.
    pub fn from_usd(field: &str, usd: Decimal) -> Result<Nanos> {
        if usd.is_sign_negative() && !usd.is_zero() {
            return config_err(format!("{field} must not be negative (got {usd})"));
        }
        let scaled = usd * Decimal::from(NANOS_PER_USD);
        if scaled.fract() != Decimal::ZERO {
            return config_err(format!("{field} has more precision than one nano-dollar (got {usd})"));
        }
        match scaled.to_i64() {
            Some(n) => Ok(Nanos(n)),
            None => config_err(format!("{field} is too large (got {usd})")),
        }
    }

    pub fn saturating_add(self, o: Nanos) -> Nanos {
        Nanos(self.0.saturating_add(o.0))
    }
}

/// Price of `tokens` at `usd_per_million`, rounded half away from zero to the nano-dollar.
/// Rounding happens once per component so input + output = total exactly.
pub fn token_cost(tokens: i64, usd_per_million: Decimal) -> Nanos {
    // USD/1M tokens * 1e9 nanos/USD / 1e6 = price * 1000 nanos per token.
    let nanos = Decimal::from(tokens) * usd_per_million * Decimal::from(1000);
    let rounded = nanos.round_dp_with_strategy(0, RoundingStrategy::MidpointAwayFromZero);
    Nanos(rounded.to_i64().unwrap_or(i64::MAX))
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
}

//! Tenants' sealed provider API keys.

use super::connect::PgResult;
use super::db::OnCommitLoss;
use super::PostgresStore;
use crate::clock::now_micros;
use crate::error::Result;
use crate::secrets::Sealed;

pub(super) fn api_key_put(store: &PostgresStore, scope: &str, provider: &str, sealed: Option<&Sealed>) -> Result<()> {
    let now = now_micros();
    store.write(OnCommitLoss::Rerun, |db| {
        match sealed {
            Some((nonce, ct)) => db.execute(
                "INSERT INTO api_configurations (scope, provider, nonce, ciphertext, updated_at) VALUES ($1, $2, $3, $4, $5)
                 ON CONFLICT (scope, provider) DO UPDATE SET nonce = EXCLUDED.nonce, ciphertext = EXCLUDED.ciphertext,
                     updated_at = EXCLUDED.updated_at",
                &[&scope, &provider, nonce, ct, &now],
            )?,
            None => db.execute("DELETE FROM api_configurations WHERE scope = $1 AND provider = $2", &[&scope, &provider])?,
        };
        Ok(())
    })
}

pub(super) fn api_key_get(store: &PostgresStore, scope: &str, provider: &str) -> Result<Option<Sealed>> {
    store.read(|db| {
        let r = db.query_opt("SELECT nonce, ciphertext FROM api_configurations WHERE scope = $1 AND provider = $2", &[&scope, &provider])?;
        r.map(|r| -> PgResult<Sealed> { Ok((r.try_get(0)?, r.try_get(1)?)) }).transpose()
    })
}

pub(super) fn api_key_providers(store: &PostgresStore, scope: &str) -> Result<Vec<String>> {
    store.read(|db| {
        let rows = db.query("SELECT provider FROM api_configurations WHERE scope = $1 ORDER BY provider", &[&scope])?;
        rows.iter().map(|r| Ok(r.try_get(0)?)).collect()
    })
}

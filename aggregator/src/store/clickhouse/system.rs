//! Reads of ClickHouse's `system.tables`, which the migrations and the copy
//! of old tables make while other aggregators may be changing the tables.

use clickhouse::Client;

use super::service::server_code;

/// The engine of `table` in `database`, `None` if there is no such table.
pub(crate) async fn engine_of(
    db: &Client,
    database: &str,
    table: &str,
) -> Result<Option<String>, clickhouse::error::Error> {
    let sql = "SELECT engine FROM system.tables WHERE database = ? AND name = ?";
    Ok(read_system_tables(db, sql, database, table).await?.into_iter().next())
}

/// The strings a query of `system.tables` with two parameters returns.
/// ClickHouse 18.16 fails such a read with `UNKNOWN_TABLE` (code 60) when a
/// table it lists is renamed or dropped meanwhile, as another aggregator's
/// copy does to old tables; the read is then made again.
pub(crate) async fn read_system_tables(
    db: &Client,
    sql: &str,
    database: &str,
    arg: &str,
) -> Result<Vec<String>, clickhouse::error::Error> {
    again_if_moved(|| db.query(sql).bind(database).bind(arg).fetch_all::<String>()).await
}

/// Runs `request` up to 5 times while it fails with `UNKNOWN_TABLE` (code
/// 60): for a moment another aggregator may have a table renamed, as
/// migration 5 does when it finds it took the wrong one and puts it back.
pub(crate) async fn again_if_moved<T, F, R>(mut request: R) -> Result<T, clickhouse::error::Error>
where
    R: FnMut() -> F,
    F: Future<Output = Result<T, clickhouse::error::Error>>,
{
    let mut attempt = 1;
    loop {
        match request().await {
            Err(clickhouse::error::Error::BadResponse(text)) if attempt < 5 && server_code(&text) == Some(60) => {
                tracing::debug!(attempt, error = text, "a table was missing for a moment; asking again");
                tokio::time::sleep(std::time::Duration::from_millis(20 << attempt)).await;
                attempt += 1;
            }
            answer => return answer,
        }
    }
}

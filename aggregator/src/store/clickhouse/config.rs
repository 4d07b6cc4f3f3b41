//! Building the ClickHouse client from [`ClickHouseSettings`].

use clickhouse::Client;

use crate::settings::ClickHouseSettings;
use crate::store::OpenError;

/// Checks the endpoint and builds two clients: one without a database (to
/// create it) and one bound to it. Row validation is off: it needs the
/// `RowBinaryWithNamesAndTypes` format, which ClickHouse 18.16 lacks, and
/// the row types here mirror the migrations in [`super::schema`] exactly.
///
/// On a cluster the bound client also carries the settings that make a
/// `Distributed` table safe to acknowledge from (see [`super::cluster`]):
/// - `insert_distributed_sync=1`: an insert returns once every shard it
///   touches has committed its rows, not once they are queued on the server
///   the aggregator talks to;
/// - `load_balancing=in_order` and `prefer_localhost_replica=0`: reads and
///   writes of every aggregator go to the same replica of each shard (the
///   first healthy one in `remote_servers`), so a ledger look-up sees what
///   another aggregator committed without waiting for replication.
pub(crate) fn clients(settings: &ClickHouseSettings) -> Result<(Client, Client), OpenError> {
    let endpoint = settings.endpoint.trim_end_matches('/');
    let invalid = |reason: &str| OpenError::Endpoint { endpoint: settings.endpoint.clone(), reason: reason.to_owned() };
    let rest = endpoint
        .strip_prefix("http://")
        .or_else(|| endpoint.strip_prefix("https://"))
        .ok_or_else(|| invalid("the scheme must be http:// or https://"))?;
    if rest.is_empty() {
        return Err(invalid("the host is missing"));
    }
    if settings.database.is_empty() || !settings.database.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
        return Err(invalid("the database name must be non-empty and use only letters, digits and `_`"));
    }
    let base = Client::default()
        .with_url(endpoint)
        .with_user(settings.user.clone())
        .with_password(settings.password.clone())
        .with_validation(false);
    let mut bound = base.clone().with_database(settings.database.clone());
    if let Some(cluster) = &settings.cluster {
        if !super::cluster::is_identifier(cluster) {
            return Err(OpenError::Cluster { name: cluster.clone() });
        }
        bound = bound
            .with_setting("insert_distributed_sync", "1")
            .with_setting("load_balancing", "in_order")
            .with_setting("prefer_localhost_replica", "0");
    }
    Ok((base, bound))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_are_checked_before_connecting() {
        let ok = ClickHouseSettings::new("http://127.0.0.1:8123/");
        assert!(clients(&ok).is_ok());
        for bad in ["127.0.0.1:8123", "ftp://x", "http://"] {
            let e = clients(&ClickHouseSettings::new(bad)).err().map(|e| e.to_string()).unwrap_or_default();
            assert!(e.contains(bad), "{bad}: {e}");
        }
        let mut s = ClickHouseSettings::new("http://x:8123");
        s.database = "a-b; DROP".into();
        assert!(clients(&s).is_err());
    }

    #[test]
    fn a_cluster_name_must_be_an_identifier() {
        let mut s = ClickHouseSettings::new("http://x:8123");
        s.cluster = Some("fleet_1".into());
        assert!(clients(&s).is_ok());
        for bad in ["", "1fleet", "a b", "x') DROP"] {
            s.cluster = Some(bad.into());
            let e = clients(&s).err().map(|e| e.to_string()).unwrap_or_default();
            assert!(e.contains("cluster name") && e.contains(&format!("{bad:?}")), "{bad}: {e}");
        }
    }
}

//! Building the ClickHouse client from [`ClickHouseSettings`].

use clickhouse::Client;

use crate::settings::ClickHouseSettings;
use crate::store::OpenError;

/// Checks the endpoint and builds two clients: one without a database (to
/// create it) and one bound to it. Row validation is off: it needs the
/// `RowBinaryWithNamesAndTypes` format, which ClickHouse 18.16 lacks, and
/// the row types here mirror the migrations in [`super::schema`] exactly.
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
    let bound = base.clone().with_database(settings.database.clone());
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
}

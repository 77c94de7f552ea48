//! Connecting to RabbitMQ.

use lapin::{types::LongString, Connection, ConnectionProperties};

use crate::config::redact;

/// Error connecting to the broker, with the (redacted) URL in its text.
#[derive(Debug, thiserror::Error)]
#[error("cannot connect to RabbitMQ at {url}: {source}")]
pub struct ConnectError {
    /// The URL without its password.
    pub url: String,
    /// What lapin reported.
    #[source]
    pub source: lapin::Error,
}

/// Opens a connection named `name` (shown in the RabbitMQ console's Connections page).
pub async fn connect(url: &str, name: &str) -> Result<Connection, ConnectError> {
    let host = std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|h| h.trim().to_string())
        .unwrap_or_default();
    let props = ConnectionProperties::default().with_connection_name(LongString::from(format!(
        "{name}@{host}:{}",
        std::process::id()
    )));
    Connection::connect(url, props)
        .await
        .map_err(|source| ConnectError {
            url: redact(url),
            source,
        })
}

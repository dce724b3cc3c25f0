//! The PostgreSQL session walnut works in (a backup's, and every other command's: the binary
//! connects through [`connect`] too): connecting with a bound, and error text with detail.

use super::*;

/// Connects (at most 30 s) and drives the connection on its own task.
pub async fn connect(pg: &tokio_postgres::Config) -> Result<tokio_postgres::Client, BackupError> {
    let (client, conn) = tokio::time::timeout(Duration::from_secs(30), pg.connect(tokio_postgres::NoTls))
        .await
        .map_err(|_| BackupError::Postgres("connect: timed out after 30s".into()))?
        .map_err(|e| BackupError::Postgres(format!("connect: {}", pg_error(&e))))?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!("PostgreSQL connection closed: {e}");
        }
    });
    Ok(client)
}

/// A PostgreSQL error's message, with its detail (tokio-postgres' Display hides them).
pub fn pg_error(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => match db.hint() {
            Some(h) => format!("{} (hint: {h})", db.message()),
            None => db.message().to_string(),
        },
        None => {
            let mut s = e.to_string();
            let mut src = std::error::Error::source(e);
            while let Some(inner) = src {
                s = format!("{s}: {inner}");
                src = inner.source();
            }
            s
        }
    }
}

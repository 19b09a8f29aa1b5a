//! Owns the one-server-per-ledger rule: a server holds its ledger exclusively for as long as it
//! runs. Two servers on one ledger would each believe their in-memory floors, fleet and
//! reconciler state, and both would act on the same nodes.
//!
//! - SQLite: an exclusive `flock` on `<ledger file>.lock` (the holder's pid written in it). Other
//!   readers of the ledger (`guardianctl audit verify`, tests) do not take it.
//! - PostgreSQL: a session advisory lock held on one pooled connection.
//!
//! # Guarantees
//! [`Ledger::lock_for_server`] returns only for the first server; a second one gets
//! [`StoreError::Locked`] naming the holder and the fix, before it listens.

use std::io::{Read, Seek, Write};

use sqlx::Row;

use super::{Backend, Ledger, StoreError};

/// The PostgreSQL advisory lock key: "guardian" in ASCII, as a bigint.
const ADVISORY_KEY: i64 = 0x6775_6172_6469_616e;

/// Held while a server runs on the ledger; released when dropped (or when the process dies).
#[derive(Debug)]
pub struct ServerLock {
    _file: Option<std::fs::File>,
    _connection: Option<sqlx::pool::PoolConnection<sqlx::Any>>,
}

impl ServerLock {
    /// Whether the lock is still this process's. A file lock lasts as long as the process;
    /// the PostgreSQL advisory lock lasts as long as its session, so the session is asked
    /// (within `timeout`): a session that does not answer counts as lost, since PostgreSQL
    /// releases the lock to a standby once it notices the session is gone.
    pub async fn still_held(&mut self, timeout: std::time::Duration) -> bool {
        let Some(connection) = self._connection.as_mut() else {
            return true;
        };
        let check = sqlx::query(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted \
             AND pid = pg_backend_pid() AND ((classid::bigint << 32) | objid::bigint) = $1",
        )
        .bind(ADVISORY_KEY)
        .fetch_one(&mut **connection);
        match tokio::time::timeout(timeout, check).await {
            Ok(Ok(row)) => row.try_get::<i64, _>(0).is_ok_and(|n| n > 0),
            _ => false,
        }
    }
}

impl Ledger {
    /// Takes the ledger for this server.
    ///
    /// # Errors
    /// [`StoreError::Locked`] when another server holds it; [`StoreError::Query`] or
    /// [`StoreError::CreateDir`] when the lock cannot be taken at all.
    pub async fn lock_for_server(&self) -> Result<ServerLock, StoreError> {
        match self.backend {
            Backend::Sqlite => {
                let Some(file) = &self.file else {
                    // An in-memory ledger belongs to this process alone.
                    return Ok(ServerLock {
                        _file: None,
                        _connection: None,
                    });
                };
                let mut path = file.as_os_str().to_owned();
                path.push(".lock");
                let path = std::path::PathBuf::from(path);
                let io = |source| StoreError::CreateDir {
                    path: path.display().to_string(),
                    source,
                };
                let mut lock = std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create(true)
                    .truncate(false)
                    .open(&path)
                    .map_err(io)?;
                if rustix::fs::flock(&lock, rustix::fs::FlockOperation::NonBlockingLockExclusive)
                    .is_err()
                {
                    let mut holder = String::new();
                    let _ = lock.read_to_string(&mut holder);
                    return Err(StoreError::Locked {
                        ledger: file.display().to_string(),
                        holder: format!(
                            "the process with pid {} (lock file {})",
                            holder.trim(),
                            path.display()
                        ),
                    });
                }
                lock.set_len(0).map_err(io)?;
                lock.rewind().map_err(io)?;
                writeln!(lock, "{}", std::process::id()).map_err(io)?;
                Ok(ServerLock {
                    _file: Some(lock),
                    _connection: None,
                })
            }
            Backend::Postgres => {
                let mut connection = self.pool.acquire().await?;
                let taken: bool = sqlx::query("SELECT pg_try_advisory_lock($1)")
                    .bind(ADVISORY_KEY)
                    .fetch_one(&mut *connection)
                    .await?
                    .try_get(0)?;
                if !taken {
                    return Err(StoreError::Locked {
                        ledger: "the PostgreSQL ledger".into(),
                        holder: format!(
                            "another session (advisory lock {ADVISORY_KEY}; see pg_locks)"
                        ),
                    });
                }
                Ok(ServerLock {
                    _file: None,
                    _connection: Some(connection),
                })
            }
        }
    }
}

//! Durable state in SQLite: device records (identity + twin), jobs and per-device job rows.
//!
//! Every write a client is told about is committed here first, in one transaction per
//! operation (or per batch, for jobs). WAL mode with `synchronous=NORMAL` survives a killed
//! process; a power cut may lose the last transactions.
//!
//! Commits from the running hub go through [`Store::commit`] / [`Store::commit_then`] to one
//! writer thread that owns the connection's write path: callers never block an async worker on
//! SQLite, and the writer group-commits whatever is queued into one transaction (each caller
//! still learns its own outcome: if the group's transaction fails, its commits are retried one
//! by one). Commits are applied in the order they were queued, and `commit_then`'s steps run
//! on the writer, in that order, after their commit, whether or not the caller still waits. A store written by a newer emulator, or
//! one that is not a database or fails SQLite's integrity check, is refused before anything is
//! written to it. One hub at a time: the file stays exclusively locked while a hub has it open
//! (two hubs on one store would each overwrite the other's changes). The file holds every key,
//! so it is created readable by its owner only.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, mpsc};
use std::thread::JoinHandle;

use rusqlite::{Connection, OpenFlags, params};
use tokio::sync::oneshot;

/// The schema this build reads and writes (`PRAGMA user_version`).
pub const SCHEMA_VERSION: i64 = 1;

/// Why the store could not be opened or written.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The file is not a SQLite database, or is damaged.
    #[error("the hub store {} is not a readable database ({source}); move it away or pass another --data-dir (nothing was changed)", path.display())]
    Corrupt {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
    /// SQLite's integrity check found damage.
    #[error("the hub store {} is damaged (integrity check: {problem}); restore it from a backup, or move it away to start with an empty hub (nothing was changed)", path.display())]
    Damaged { path: PathBuf, problem: String },
    /// The store was written by a newer hub-emulator.
    #[error("the hub store {} has format {found}, newer than this hub-emulator understands ({SCHEMA_VERSION}); upgrade hub-emulator or pass another --data-dir (nothing was changed)", path.display())]
    TooNew { path: PathBuf, found: i64 },
    /// Another process (another hub-emulator on this data directory) has the store open.
    #[error("the hub store {} is in use by another process, probably another hub-emulator with the same --data-dir; stop that one, or pass another --data-dir", path.display())]
    InUse { path: PathBuf },
    /// The store file could not be created.
    #[error("cannot create the hub store {}: {source}", path.display())]
    Create {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A read or write failed.
    #[error("hub store {operation} failed: {source}")]
    Sql {
        operation: &'static str,
        #[source]
        source: rusqlite::Error,
    },
    /// A commit failed on the writer thread (the message is the SQL error's, shared by every
    /// commit of a failed group).
    #[error("hub store commit failed: {0}")]
    Commit(String),
    /// The writer thread is gone (the store is closing).
    #[error("the hub store is closed")]
    Closed,
}

fn sql(operation: &'static str) -> impl FnOnce(rusqlite::Error) -> StoreError {
    move |source| StoreError::Sql { operation, source }
}

/// One change to durable state; a list of them commits atomically.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Write {
    /// Insert or replace a device record (JSON).
    PutDevice { id: String, doc: String },
    /// Remove a device record.
    DeleteDevice { id: String },
    /// Insert or replace a job (JSON).
    PutJob { id: String, doc: String },
    /// Remove a job and its device rows.
    DeleteJob { id: String },
    /// Insert or replace one device's row of a job (JSON).
    PutDeviceJob {
        job_id: String,
        device_id: String,
        doc: String,
    },
    /// Insert or replace an automatic configuration (JSON).
    PutConfiguration { id: String, doc: String },
    /// Remove an automatic configuration.
    DeleteConfiguration { id: String },
    /// Insert or replace a value in the hub's settings (keys, policies).
    PutMeta { key: String, value: String },
}

/// What runs with a commit's outcome, on the writer thread, in commit order.
type AfterCommit = Box<dyn FnOnce(Result<(), StoreError>) + Send>;

/// One queued commit and what runs with its outcome.
struct Queued {
    writes: Vec<Write>,
    then: AfterCommit,
}

/// Most commits the writer joins into one transaction: bounds the work one failed group repeats.
const GROUP_MAX: usize = 256;

/// The hub's durable store; `None` inside means `--in-memory` (nothing persists).
#[derive(Debug)]
pub struct Store {
    durable: Option<Durable>,
}

/// The open database and its writer thread.
#[derive(Debug)]
struct Durable {
    // A std Mutex: SQLite calls are synchronous and the guard is never held across an `.await`.
    // The writer thread takes it per group; startup reads and `write` take it directly.
    conn: Arc<Mutex<Connection>>,
    queue: Option<mpsc::Sender<Queued>>,
    writer: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Queued {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Queued")
            .field("writes", &self.writes.len())
            .finish_non_exhaustive()
    }
}

impl Drop for Durable {
    fn drop(&mut self) {
        // Closing the queue ends the writer after it has committed everything queued; joining
        // it closes the database (and releases its exclusive lock) before the hub is gone, so
        // the same data directory can be opened again at once.
        drop(self.queue.take());
        let Some(writer) = self.writer.take() else {
            return;
        };
        // The last handle to the store can be dropped by a step the writer itself runs (a
        // change whose caller went away): then the writer ends by itself once that step
        // returns, since its queue is closed, and must not wait for itself.
        if writer.thread().id() == std::thread::current().id() {
            return;
        }
        if writer.join().is_err() {
            tracing::error!("the hub store's writer thread panicked");
        }
    }
}

impl Store {
    /// A store that keeps nothing (for `--in-memory`).
    pub fn in_memory() -> Self {
        Store { durable: None }
    }

    /// Whether writes reach disk.
    pub fn is_durable(&self) -> bool {
        self.durable.is_some()
    }

    /// Opens (or creates) the store at `path`, refusing damaged, newer-format or in-use files.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let refused = |source: rusqlite::Error| match source.sqlite_error_code() {
            Some(rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked) => {
                StoreError::InUse {
                    path: path.to_path_buf(),
                }
            }
            _ => StoreError::Corrupt {
                path: path.to_path_buf(),
                source,
            },
        };
        create_private(path).map_err(|source| StoreError::Create {
            path: path.to_path_buf(),
            source,
        })?;
        let conn = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_WRITE
                | OpenFlags::SQLITE_OPEN_CREATE
                | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(refused)?;
        // Fail fast when another hub holds the file, rather than after rusqlite's default 5 s.
        conn.busy_timeout(std::time::Duration::from_millis(500))
            .map_err(refused)?;
        // Once this connection has written, no other connection can read or write the file
        // until it closes: a second hub on the same store is refused below (as `InUse`).
        conn.pragma_update(None, "locking_mode", "EXCLUSIVE")
            .map_err(refused)?;
        // Reading the schema version is the first access to the file: a non-database fails here.
        let version: i64 = conn
            .query_row("PRAGMA user_version", [], |row| row.get(0))
            .map_err(refused)?;
        if version > SCHEMA_VERSION {
            return Err(StoreError::TooNew {
                path: path.to_path_buf(),
                found: version,
            });
        }
        // Damage past the header only shows when the page is read: check every page before the
        // first write, so a damaged file is refused as it was found.
        let check: String = conn
            .query_row("PRAGMA quick_check(1)", [], |row| row.get(0))
            .map_err(refused)?;
        if check != "ok" {
            return Err(StoreError::Damaged {
                path: path.to_path_buf(),
                problem: check,
            });
        }
        // Take the write lock now (and keep it: exclusive locking mode).
        conn.execute_batch("BEGIN EXCLUSIVE; COMMIT;")
            .map_err(refused)?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(refused)?;
        conn.pragma_update(None, "synchronous", "NORMAL")
            .map_err(refused)?;
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
             CREATE TABLE IF NOT EXISTS devices (id TEXT PRIMARY KEY, doc TEXT NOT NULL);
             CREATE TABLE IF NOT EXISTS jobs (id TEXT PRIMARY KEY, doc TEXT NOT NULL);
             CREATE TABLE IF NOT EXISTS configurations (id TEXT PRIMARY KEY, doc TEXT NOT NULL);
             CREATE TABLE IF NOT EXISTS device_jobs (
                 job_id TEXT NOT NULL, device_id TEXT NOT NULL, doc TEXT NOT NULL,
                 PRIMARY KEY (job_id, device_id));",
        )
        .map_err(refused)?;
        if version != SCHEMA_VERSION {
            conn.pragma_update(None, "user_version", SCHEMA_VERSION)
                .map_err(refused)?;
        }
        let conn = Arc::new(Mutex::new(conn));
        let (queue, queued) = mpsc::channel();
        let writer = {
            let conn = Arc::clone(&conn);
            std::thread::Builder::new()
                .name("hub-store-writer".into())
                .spawn(move || write_loop(&conn, &queued))
                .map_err(|source| StoreError::Create {
                    path: path.to_path_buf(),
                    source,
                })?
        };
        Ok(Store {
            durable: Some(Durable {
                conn,
                queue: Some(queue),
                writer: Some(writer),
            }),
        })
    }

    fn with_conn<T>(
        &self,
        f: impl FnOnce(&mut Connection) -> Result<T, StoreError>,
    ) -> Result<Option<T>, StoreError> {
        match &self.durable {
            None => Ok(None),
            Some(durable) => f(&mut lock_conn(&durable.conn)).map(Some),
        }
    }

    /// Commits `writes` in one transaction on the calling thread (startup, tests and blocking
    /// code; the running hub uses [`Store::commit`]).
    pub fn write(&self, writes: &[Write]) -> Result<(), StoreError> {
        self.with_conn(|conn| apply(conn, writes)).map(|_| ())
    }

    /// Queues `writes` for the writer thread; the future resolves once they are committed in one
    /// transaction (at once for an in-memory store). Commits are applied in the order this is
    /// called, whether or not the futures are awaited in that order; a dropped future does not
    /// cancel its commit.
    pub fn commit(&self, writes: Vec<Write>) -> impl Future<Output = Result<(), StoreError>> {
        let (done, outcome) = oneshot::channel();
        self.commit_then(writes, move |result| {
            let _ = done.send(result);
        });
        async move { outcome.await.unwrap_or(Err(StoreError::Closed)) }
    }

    /// Queues `writes` for the writer thread and runs `then` with the outcome once they are
    /// committed in one transaction: on the writer thread, in the order commits were queued, and
    /// whatever happens to the caller meanwhile (for an in-memory store, at once, here). `then`
    /// must be short and must not wait for the store.
    pub fn commit_then(
        &self,
        writes: Vec<Write>,
        then: impl FnOnce(Result<(), StoreError>) + Send + 'static,
    ) {
        let Some(durable) = &self.durable else {
            return then(Ok(()));
        };
        let queued = Queued {
            writes,
            then: Box::new(then),
        };
        let refused = match &durable.queue {
            Some(queue) => queue.send(queued).err().map(|e| e.0),
            None => Some(queued),
        };
        if let Some(queued) = refused {
            (queued.then)(Err(StoreError::Closed));
        }
    }

    /// Reads one setting.
    pub fn meta(&self, key: &str) -> Result<Option<String>, StoreError> {
        self.with_conn(|conn| {
            let mut stmt = conn
                .prepare_cached("SELECT value FROM meta WHERE key = ?1")
                .map_err(sql("settings read"))?;
            let mut rows = stmt.query(params![key]).map_err(sql("settings read"))?;
            match rows.next().map_err(sql("settings read"))? {
                Some(row) => row.get(0).map(Some).map_err(sql("settings read")),
                None => Ok(None),
            }
        })
        .map(Option::flatten)
    }

    fn load_pairs(&self, query: &'static str) -> Result<Vec<(String, String)>, StoreError> {
        self.with_conn(|conn| {
            let mut stmt = conn.prepare(query).map_err(sql("load"))?;
            let rows = stmt
                .query_map([], |row| Ok((row.get(0)?, row.get(1)?)))
                .map_err(sql("load"))?;
            rows.collect::<Result<Vec<_>, _>>().map_err(sql("load"))
        })
        .map(Option::unwrap_or_default)
    }

    /// Every stored device record as `(id, json)`.
    pub fn load_devices(&self) -> Result<Vec<(String, String)>, StoreError> {
        self.load_pairs("SELECT id, doc FROM devices")
    }

    /// Every stored automatic configuration as `(id, json)`.
    pub fn load_configurations(&self) -> Result<Vec<(String, String)>, StoreError> {
        self.load_pairs("SELECT id, doc FROM configurations")
    }

    /// Every stored job as `(id, json)`.
    pub fn load_jobs(&self) -> Result<Vec<(String, String)>, StoreError> {
        self.load_pairs("SELECT id, doc FROM jobs")
    }

    /// Every stored device-job row as `(job_id, device_id, json)`.
    pub fn load_device_jobs(&self) -> Result<Vec<(String, String, String)>, StoreError> {
        self.with_conn(|conn| {
            let mut stmt = conn
                .prepare("SELECT job_id, device_id, doc FROM device_jobs")
                .map_err(sql("load"))?;
            let rows = stmt
                .query_map([], |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)))
                .map_err(sql("load"))?;
            rows.collect::<Result<Vec<_>, _>>().map_err(sql("load"))
        })
        .map(Option::unwrap_or_default)
    }
}

fn lock_conn(conn: &Mutex<Connection>) -> std::sync::MutexGuard<'_, Connection> {
    // A panic while holding the connection is a bug already reported; SQLite rolls back the
    // transaction it interrupted, so the connection is still consistent.
    conn.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The writer thread: takes the first queued commit, joins whatever else is queued behind it
/// (up to [`GROUP_MAX`]) into one transaction, and answers each. Ends when the queue closes.
fn write_loop(conn: &Mutex<Connection>, queued: &mpsc::Receiver<Queued>) {
    // No spinning for the next commit: on two cores the spin steals the CPU the next commit's
    // producer needs (measured: a pipelining device's patches halved under load).
    while let Ok(first) = queued.recv() {
        let mut group = vec![first];
        while group.len() < GROUP_MAX {
            match queued.try_recv() {
                Ok(next) => group.push(next),
                Err(_) => break,
            }
        }
        let outcomes: Vec<Result<(), StoreError>> = {
            let mut conn = lock_conn(conn);
            let all: Vec<&Write> = group.iter().flat_map(|q| &q.writes).collect();
            if group.len() > 1 && apply_refs(&mut conn, &all).is_ok() {
                group.iter().map(|_| Ok(())).collect()
            } else {
                // Alone, or one bad commit must not fail the others: each in its own transaction.
                group
                    .iter()
                    .map(|queued| {
                        apply(&mut conn, &queued.writes)
                            .map_err(|e| StoreError::Commit(e.to_string()))
                    })
                    .collect()
            }
        };
        // With the connection released: what runs next may take the hub's locks.
        for (queued, outcome) in group.into_iter().zip(outcomes) {
            let then = queued.then;
            if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| then(outcome))).is_err() {
                // A bug in the caller's step, already reported by the panic hook; the writer
                // must live on for every other commit.
                tracing::error!("a step after a store commit panicked");
            }
        }
    }
}

fn apply(conn: &mut Connection, writes: &[Write]) -> Result<(), StoreError> {
    apply_refs(conn, &writes.iter().collect::<Vec<_>>())
}

/// Commits `writes` in one transaction.
fn apply_refs(conn: &mut Connection, writes: &[&Write]) -> Result<(), StoreError> {
    let tx = conn.transaction().map_err(sql("begin"))?;
    for write in writes {
        match write {
                    Write::PutDevice { id, doc } => tx
                        .prepare_cached("INSERT OR REPLACE INTO devices (id, doc) VALUES (?1, ?2)")
                        .and_then(|mut s| s.execute(params![id, doc]))
                        .map_err(sql("device write"))?,
                    Write::DeleteDevice { id } => tx
                        .prepare_cached("DELETE FROM devices WHERE id = ?1")
                        .and_then(|mut s| s.execute(params![id]))
                        .map_err(sql("device delete"))?,
                    Write::PutJob { id, doc } => tx
                        .prepare_cached("INSERT OR REPLACE INTO jobs (id, doc) VALUES (?1, ?2)")
                        .and_then(|mut s| s.execute(params![id, doc]))
                        .map_err(sql("job write"))?,
                    Write::DeleteJob { id } => {
                        tx.prepare_cached("DELETE FROM device_jobs WHERE job_id = ?1")
                            .and_then(|mut s| s.execute(params![id]))
                            .map_err(sql("job delete"))?;
                        tx.prepare_cached("DELETE FROM jobs WHERE id = ?1")
                            .and_then(|mut s| s.execute(params![id]))
                            .map_err(sql("job delete"))?
                    }
                    Write::PutDeviceJob { job_id, device_id, doc } => tx
                        .prepare_cached(
                            "INSERT OR REPLACE INTO device_jobs (job_id, device_id, doc) VALUES (?1, ?2, ?3)",
                        )
                        .and_then(|mut s| s.execute(params![job_id, device_id, doc]))
                        .map_err(sql("device job write"))?,
                    Write::PutConfiguration { id, doc } => tx
                        .prepare_cached(
                            "INSERT OR REPLACE INTO configurations (id, doc) VALUES (?1, ?2)",
                        )
                        .and_then(|mut s| s.execute(params![id, doc]))
                        .map_err(sql("configuration write"))?,
                    Write::DeleteConfiguration { id } => tx
                        .prepare_cached("DELETE FROM configurations WHERE id = ?1")
                        .and_then(|mut s| s.execute(params![id]))
                        .map_err(sql("configuration delete"))?,
                    Write::PutMeta { key, value } => tx
                        .prepare_cached("INSERT OR REPLACE INTO meta (key, value) VALUES (?1, ?2)")
                        .and_then(|mut s| s.execute(params![key, value]))
                        .map_err(sql("settings write"))?,
                };
    }
    tx.commit().map_err(sql("commit"))
}

/// Creates an empty store file readable by its owner only (SQLite gives its WAL the same mode).
/// An existing file keeps its contents but is tightened to 0600, with its `-wal` and `-shm`
/// files if present: `mode` applies only to a file `open` creates (std `OpenOptionsExt::mode`:
/// "If a new file is created as part of an `OpenOptions::open` call then this specified mode
/// will be used as the permission bits for the new file"), and the store holds the device and
/// policy keys (project issue 13).
fn create_private(path: &Path) -> std::io::Result<()> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    match options.open(path) {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            #[cfg(unix)]
            {
                use std::os::unix::fs::PermissionsExt;
                let private = || std::fs::Permissions::from_mode(0o600);
                std::fs::set_permissions(path, private())?;
                for suffix in ["-wal", "-shm"] {
                    let mut side = path.as_os_str().to_owned();
                    side.push(suffix);
                    match std::fs::set_permissions(&side, private()) {
                        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
                        _ => {}
                    }
                }
            }
            Ok(())
        }
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_survive_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("hub.db");
        {
            let store = Store::open(&path).expect("open");
            store
                .write(&[
                    Write::PutDevice {
                        id: "d1".into(),
                        doc: "{\"a\":1}".into(),
                    },
                    Write::PutJob {
                        id: "j1".into(),
                        doc: "{}".into(),
                    },
                    Write::PutDeviceJob {
                        job_id: "j1".into(),
                        device_id: "d1".into(),
                        doc: "{}".into(),
                    },
                    Write::PutMeta {
                        key: "k".into(),
                        value: "v".into(),
                    },
                ])
                .expect("write");
        }
        let store = Store::open(&path).expect("reopen");
        assert_eq!(
            store.load_devices().expect("load"),
            vec![("d1".into(), "{\"a\":1}".into())]
        );
        assert_eq!(store.load_device_jobs().expect("load").len(), 1);
        assert_eq!(store.meta("k").expect("meta").as_deref(), Some("v"));
        store
            .write(&[Write::DeleteJob { id: "j1".into() }])
            .expect("delete");
        assert!(store.load_jobs().expect("load").is_empty());
        assert!(store.load_device_jobs().expect("load").is_empty());
    }

    #[test]
    fn refuses_non_database_and_newer_format_without_touching_them() {
        let dir = tempfile::tempdir().expect("tempdir");
        let garbage = dir.path().join("garbage.db");
        std::fs::write(&garbage, vec![0x42u8; 4096]).expect("write");
        let err = Store::open(&garbage).expect_err("garbage must be refused");
        assert!(matches!(err, StoreError::Corrupt { .. }), "{err}");
        assert_eq!(std::fs::read(&garbage).expect("read"), vec![0x42u8; 4096]);

        let newer = dir.path().join("newer.db");
        {
            let conn = Connection::open(&newer).expect("open");
            conn.pragma_update(None, "user_version", SCHEMA_VERSION + 1)
                .expect("pragma");
        }
        let err = Store::open(&newer).expect_err("newer must be refused");
        assert!(
            matches!(err, StoreError::TooNew { found, .. } if found == SCHEMA_VERSION + 1),
            "{err}"
        );
    }

    #[test]
    fn a_damaged_page_is_refused_without_touching_the_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("hub.db");
        {
            let store = Store::open(&path).expect("open");
            let doc = format!("{{\"pad\":\"{}\"}}", "x".repeat(3000));
            for i in 0..50 {
                let id = format!("dev{i}");
                store
                    .write(&[Write::PutDevice {
                        id: id.clone(),
                        doc: doc.clone(),
                    }])
                    .expect("write");
            }
        }
        assert!(
            !dir.path().join("hub.db-wal").exists(),
            "closing checkpoints the WAL into the file"
        );
        let mut bytes = std::fs::read(&path).expect("read");
        assert!(bytes.len() > 5 * 4096);
        // Leave the header (page 1) intact, so only reading the pages shows the damage.
        for b in &mut bytes[4096..5 * 4096] {
            *b = 0xA5;
        }
        std::fs::write(&path, &bytes).expect("damage");
        let err = Store::open(&path).expect_err("damage must be refused");
        assert!(
            matches!(err, StoreError::Damaged { .. } | StoreError::Corrupt { .. }),
            "{err}"
        );
        assert_eq!(
            std::fs::read(&path).expect("read"),
            bytes,
            "a refused store is not changed"
        );
    }

    #[test]
    fn a_store_in_use_is_refused_and_created_private() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("hub.db");
        let first = Store::open(&path).expect("open");
        let err = Store::open(&path).expect_err("a second hub on the same store");
        assert!(matches!(err, StoreError::InUse { .. }), "{err}");
        assert!(err.to_string().contains("--data-dir"), "{err}");
        first
            .write(&[Write::PutMeta {
                key: "k".into(),
                value: "v".into(),
            }])
            .expect("the first one still writes");
        drop(first);
        let again = Store::open(&path).expect("free again once closed");
        assert_eq!(again.meta("k").expect("meta").as_deref(), Some("v"));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).expect("meta").permissions().mode();
            assert_eq!(mode & 0o777, 0o600, "the store holds every key");
        }
    }

    #[test]
    fn in_memory_store_keeps_nothing() {
        let store = Store::in_memory();
        store
            .write(&[Write::PutDevice {
                id: "d".into(),
                doc: "{}".into(),
            }])
            .expect("write");
        assert!(store.load_devices().expect("load").is_empty());
        assert!(!store.is_durable());
    }

    #[tokio::test]
    async fn commits_apply_in_queue_order_even_when_not_awaited() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("hub.db");
        {
            let store = Store::open(&path).expect("open");
            let pending: Vec<_> = (0..200)
                .map(|i| {
                    store.commit(vec![Write::PutMeta {
                        key: "k".into(),
                        value: i.to_string(),
                    }])
                })
                .collect();
            // One future is dropped unawaited: its commit still happens.
            let mut pending = pending.into_iter().rev();
            drop(pending.next());
            for commit in pending {
                commit.await.expect("commit");
            }
            store
                .commit(vec![Write::PutMeta {
                    key: "other".into(),
                    value: "x".into(),
                }])
                .await
                .expect("commit");
        }
        let store = Store::open(&path).expect("reopen");
        assert_eq!(
            store.meta("k").expect("meta").as_deref(),
            Some("199"),
            "the last queued commit is the last applied, awaited or not"
        );
        assert_eq!(store.meta("other").expect("meta").as_deref(), Some("x"));
    }

    #[tokio::test]
    async fn an_in_memory_commit_succeeds_and_keeps_nothing() {
        let store = Store::in_memory();
        store
            .commit(vec![Write::PutMeta {
                key: "k".into(),
                value: "v".into(),
            }])
            .await
            .expect("commit");
        assert_eq!(store.meta("k").expect("meta"), None);
    }
}

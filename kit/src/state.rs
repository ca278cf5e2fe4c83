//! Durable per-service state behind a small interface: typed, versioned records in named
//! tables, and a group-commit `flush()` (one sled flush answers every waiter that arrived
//! meanwhile — sled's own `flush_async` hangs under many concurrent callers, sled #1308).
//!
//! Invariant: a record a handler depends on is flushed before its message is acked.
//! Only this module names sled; a switch to redb or fjall stays local.
//! Caveat: sled flushes with `sync_file_range`, which survives a process kill but is weaker
//! than `fsync` against power loss.

use std::marker::PhantomData;
use std::path::Path;
use std::sync::Arc;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("state store: {0}")]
    Store(String),
    #[error("record {key} in {table}: {msg}")]
    Decode { table: String, key: String, msg: String },
    #[error("state store flusher is gone")]
    FlusherGone,
}

impl From<sled::Error> for StateError {
    fn from(e: sled::Error) -> Self {
        StateError::Store(e.to_string())
    }
}

/// A record type stored in a table. Bump `VERSION` when its shape changes incompatibly;
/// records of a newer version than the code are refused rather than misread.
pub trait Record: Serialize + DeserializeOwned + Send + Sync + 'static {
    const VERSION: u32;
}

#[derive(Serialize)]
struct EnvelopeRef<'a, T> {
    v: u32,
    r: &'a T,
}

#[derive(Deserialize)]
struct Envelope<T> {
    v: u32,
    r: T,
}

type FlushWaiter = oneshot::Sender<Result<(), String>>;

/// The service's state store. Cheap to clone.
#[derive(Clone)]
pub struct Store {
    db: sled::Db,
    flusher: mpsc::UnboundedSender<FlushWaiter>,
}

/// sled's page cache per service unless `PN_STATE_CACHE_MB` says otherwise.
pub const DEFAULT_CACHE_MB: u64 = 32;

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Store")
    }
}

impl Store {
    /// Opens (or creates) the store in `dir` with the default page cache (`DEFAULT_CACHE_MB`).
    /// Must be called inside a tokio runtime.
    pub fn open(dir: &Path) -> Result<Store, StateError> {
        Store::open_with_cache(dir, DEFAULT_CACHE_MB)
    }

    /// Opens the store with sled's page cache capped at `cache_mb` MiB: the records of
    /// operations nobody is working on (parked, done) leave memory for the disk beyond it, so
    /// a service's memory does not grow with the operations it remembers.
    pub fn open_with_cache(dir: &Path, cache_mb: u64) -> Result<Store, StateError> {
        std::fs::create_dir_all(dir).map_err(|e| StateError::Store(format!("{}: {e}", dir.display())))?;
        let cache = cache_mb.clamp(1, 1 << 16) * 1024 * 1024;
        let db = sled::Config::new().path(dir.join("state.sled")).mode(sled::Mode::LowSpace).cache_capacity(cache).open()?;
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(flusher(db.clone(), rx));
        Ok(Store { db, flusher: tx })
    }

    pub fn table<T: Record>(&self, name: &str) -> Result<Table<T>, StateError> {
        Ok(Table { tree: self.db.open_tree(name)?, name: Arc::from(name), store: self.clone(), _t: PhantomData })
    }

    /// Makes every write so far durable. Concurrent callers share one flush.
    pub async fn flush(&self) -> Result<(), StateError> {
        let (tx, rx) = oneshot::channel();
        self.flusher.send(tx).map_err(|_| StateError::FlusherGone)?;
        rx.await.map_err(|_| StateError::FlusherGone)?.map_err(StateError::Store)
    }

    /// Disk space the store uses, in bytes.
    pub fn size_on_disk(&self) -> u64 {
        self.db.size_on_disk().unwrap_or(0)
    }
}

async fn flusher(db: sled::Db, mut rx: mpsc::UnboundedReceiver<FlushWaiter>) {
    while let Some(first) = rx.recv().await {
        let mut waiters = vec![first];
        while let Ok(w) = rx.try_recv() {
            waiters.push(w);
        }
        let db2 = db.clone();
        let res = tokio::task::spawn_blocking(move || db2.flush())
            .await
            .map_err(|e| e.to_string())
            .and_then(|r| r.map(|_| ()).map_err(|e| e.to_string()));
        for w in waiters {
            let _ = w.send(res.clone());
        }
    }
}

/// A named table of `T` keyed by strings.
pub struct Table<T> {
    tree: sled::Tree,
    name: Arc<str>,
    store: Store,
    _t: PhantomData<fn() -> T>,
}

impl<T> Clone for Table<T> {
    fn clone(&self) -> Self {
        Table { tree: self.tree.clone(), name: self.name.clone(), store: self.store.clone(), _t: PhantomData }
    }
}

impl<T: Record> Table<T> {
    fn decode(&self, key: &str, bytes: &[u8]) -> Result<T, StateError> {
        let env: Envelope<T> = serde_json::from_slice(bytes).map_err(|e| StateError::Decode {
            table: self.name.to_string(),
            key: key.to_string(),
            msg: e.to_string(),
        })?;
        if env.v > T::VERSION {
            return Err(StateError::Decode {
                table: self.name.to_string(),
                key: key.to_string(),
                msg: format!("record version {} is newer than this build ({})", env.v, T::VERSION),
            });
        }
        Ok(env.r)
    }

    fn encode(v: &T) -> Result<Vec<u8>, StateError> {
        serde_json::to_vec(&EnvelopeRef { v: T::VERSION, r: v }).map_err(|e| StateError::Store(e.to_string()))
    }

    /// `key` is any string-like key: a `&str`, or an id newtype (`proto::OpId`).
    pub fn get(&self, key: &(impl AsRef<str> + ?Sized)) -> Result<Option<T>, StateError> {
        let key = key.as_ref();
        match self.tree.get(key.as_bytes())? {
            Some(b) => self.decode(key, &b).map(Some),
            None => Ok(None),
        }
    }

    /// Writes without waiting for durability; pair with `Store::flush` (group commit).
    pub fn put_nowait(&self, key: &(impl AsRef<str> + ?Sized), v: &T) -> Result<(), StateError> {
        self.tree.insert(key.as_ref().as_bytes(), Self::encode(v)?)?;
        Ok(())
    }

    /// Writes and waits until the write is durable.
    pub async fn put(&self, key: &(impl AsRef<str> + ?Sized), v: &T) -> Result<(), StateError> {
        self.put_nowait(key, v)?;
        self.store.flush().await
    }

    pub async fn remove(&self, key: &(impl AsRef<str> + ?Sized)) -> Result<(), StateError> {
        self.tree.remove(key.as_ref().as_bytes())?;
        self.store.flush().await
    }

    /// Every record, in key order. Undecodable records are returned as errors, not skipped.
    pub fn iter(&self) -> impl Iterator<Item = Result<(String, T), StateError>> + '_ {
        self.tree.iter().map(move |kv| {
            let (k, v) = kv?;
            let key = String::from_utf8_lossy(&k).into_owned();
            let rec = self.decode(&key, &v)?;
            Ok((key, rec))
        })
    }

    pub fn len(&self) -> usize {
        self.tree.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tree.is_empty()
    }
}

/// `#[serde(with = "kit::state::b64")]` for a `Vec<u8>` field of a record: stored as one
/// base64 string (4 bytes per 3) instead of a JSON array of numbers (up to 4 per byte) — a
/// record's size is what an operation costs in memory while sled caches it. Reads either form,
/// so records written before the switch still load.
pub mod b64 {
    use base64::Engine;
    use base64::engine::general_purpose::STANDARD;
    use serde::{Deserializer, Serializer, de};

    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&STANDARD.encode(v))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        struct V;
        impl<'de> de::Visitor<'de> for V {
            type Value = Vec<u8>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("base64 text or an array of bytes")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Vec<u8>, E> {
                STANDARD.decode(v).map_err(|_| E::custom("invalid base64"))
            }
            fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<u8>, A::Error> {
                let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(1 << 16));
                while let Some(b) = seq.next_element::<u8>()? {
                    out.push(b);
                }
                Ok(out)
            }
        }
        d.deserialize_any(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Serialize, Deserialize, PartialEq, Default)]
    struct Blob {
        #[serde(with = "super::b64", default)]
        pb: Vec<u8>,
    }

    #[test]
    fn bytes_are_stored_as_base64_and_old_arrays_still_read() {
        let b = Blob { pb: vec![0, 1, 254, 255] };
        let text = serde_json::to_string(&b).unwrap_or_default();
        assert_eq!(text, r#"{"pb":"AAH+/w=="}"#);
        assert_eq!(serde_json::from_str::<Blob>(&text).ok(), Some(Blob { pb: vec![0, 1, 254, 255] }));
        assert_eq!(serde_json::from_str::<Blob>(r#"{"pb":[0,1,254,255]}"#).ok(), Some(Blob { pb: vec![0, 1, 254, 255] }));
        assert_eq!(serde_json::from_str::<Blob>("{}").ok(), Some(Blob::default()));
        assert!(serde_json::from_str::<Blob>(r#"{"pb":"not base64!"}"#).is_err());
        assert!(serde_json::from_str::<Blob>(r#"{"pb":[256]}"#).is_err());
    }

    #[derive(Debug, Serialize, Deserialize, PartialEq)]
    struct Rec {
        n: u32,
    }
    impl Record for Rec {
        const VERSION: u32 = 1;
    }

    #[tokio::test]
    async fn put_get_iter_and_reopen() -> Result<(), StateError> {
        let dir = tempfile::tempdir().map_err(|e| StateError::Store(e.to_string()))?;
        {
            let store = Store::open(dir.path())?;
            let t: Table<Rec> = store.table("t")?;
            let mut joins = Vec::new();
            for i in 0..200u32 {
                let t = t.clone();
                joins.push(tokio::spawn(async move { t.put(&format!("k{i:03}"), &Rec { n: i }).await }));
            }
            for j in joins {
                j.await.map_err(|e| StateError::Store(e.to_string()))??;
            }
            assert_eq!(t.get("k007")?, Some(Rec { n: 7 }));
            assert_eq!(t.iter().count(), 200);
        }
        // Let the flusher task see its channel close and release the store's lock.
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        let store = Store::open(dir.path())?;
        let t: Table<Rec> = store.table("t")?;
        assert_eq!(t.get("k199")?, Some(Rec { n: 199 }));
        Ok(())
    }
}

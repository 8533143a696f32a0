use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use crate::error::SinkError;
use crate::event::AuditEvent;
use crate::siem::Encoding;
use crate::sink::AuditSink;

/// Appends each event as one JSON object per line to a file.
///
/// A batch is serialised on the worker, then written with one `write` call on Tokio's blocking pool (so the
/// worker's thread never blocks on the disk); with [`fsync`](Self::fsync) the data is synced before the batch
/// counts as written. Control characters inside fields are escaped by JSON, so a hostile path cannot start a
/// new line. A batch that is retried after a partial write can leave some lines twice: readers deduplicate on
/// `id`.
///
/// ```
/// # fn main() -> Result<(), tower_audit::SinkError> {
/// use tower_audit::JsonLinesSink;
/// let dir = std::env::temp_dir();
/// let sink = JsonLinesSink::open(dir.join("audit-doc-example.jsonl"))?.fsync(true);
/// assert!(sink.path().ends_with("audit-doc-example.jsonl"));
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct JsonLinesSink {
    file: Arc<Mutex<File>>,
    path: PathBuf,
    fsync: bool,
    encoding: Encoding,
    /// The last batch's buffer, given back once written: the next batch is serialised into memory already
    /// mapped (a fresh buffer of a few hundred KiB is a fresh mapping, faulted in page by page).
    spare: Arc<Mutex<Vec<u8>>>,
}

/// The largest buffer kept for the next batch.
const MAX_SPARE: usize = 4 << 20;

impl JsonLinesSink {
    /// Opens (creating it if needed) `path` for appending.
    ///
    /// # Errors
    ///
    /// [`SinkError::Open`] with the path and the reason when the file cannot be opened (missing directory,
    /// no permission, a directory in the way).
    pub fn open(path: impl AsRef<Path>) -> Result<Self, SinkError> {
        let path = path.as_ref().to_path_buf();
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|source| SinkError::Open { path: path.clone(), source })?;
        Ok(Self {
            file: Arc::new(Mutex::new(file)),
            path,
            fsync: false,
            encoding: Encoding::Native,
            spare: Arc::default(),
        })
    }

    /// Syncs the file's data to disk after every batch (off by default).
    pub fn fsync(mut self, fsync: bool) -> Self {
        self.fsync = fsync;
        self
    }

    /// Writes each event in this encoding: the library's own shape ([`Encoding::Native`], the default), OCSF
    /// ([`Encoding::Ocsf`]) or Elastic Common Schema ([`Encoding::Ecs`]), one JSON object per line either way.
    ///
    /// ```
    /// # fn main() -> Result<(), tower_audit::SinkError> {
    /// use tower_audit::{Encoding, JsonLinesSink};
    /// let sink = JsonLinesSink::open(std::env::temp_dir().join("audit-ocsf.jsonl"))?.encoding(Encoding::Ocsf);
    /// assert_eq!(sink.encoding_used(), Encoding::Ocsf);
    /// # Ok(())
    /// # }
    /// ```
    pub fn encoding(mut self, encoding: Encoding) -> Self {
        self.encoding = encoding;
        self
    }

    /// The encoding lines are written in (see [`encoding`](Self::encoding)).
    pub fn encoding_used(&self) -> Encoding {
        self.encoding
    }

    /// The file written to.
    pub fn path(&self) -> &Path {
        &self.path
    }

    async fn blocking(&self, buf: Vec<u8>, sync: bool) -> Result<(), SinkError> {
        let file = Arc::clone(&self.file);
        let buf = tokio::task::spawn_blocking(move || {
            let mut file = file.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            file.write_all(&buf)?;
            if sync {
                file.sync_data()?;
            }
            Ok::<_, std::io::Error>(buf)
        })
        .await
        .map_err(SinkError::backend)??;
        if (1..=MAX_SPARE).contains(&buf.capacity()) {
            *self.spare.lock().unwrap_or_else(|poisoned| poisoned.into_inner()) = buf;
        }
        Ok(())
    }
}

impl AuditSink for JsonLinesSink {
    async fn write_batch(&self, batch: &[AuditEvent]) -> Result<(), SinkError> {
        let mut buf = std::mem::take(&mut *self.spare.lock().unwrap_or_else(|poisoned| poisoned.into_inner()));
        buf.clear();
        buf.reserve(batch.len() * 384);
        for event in batch {
            match self.encoding {
                Encoding::Native => crate::event::write_json(event, &mut buf)?,
                encoding => serde_json::to_writer(&mut buf, &encoding.encode(event))?,
            }
            buf.push(b'\n');
        }
        self.blocking(buf, self.fsync).await
    }

    async fn flush(&self) -> Result<(), SinkError> {
        self.blocking(Vec::new(), true).await
    }
}

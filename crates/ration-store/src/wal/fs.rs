//! The seam between the write-ahead log and its files.
//!
//! [`StdFs`] is the real directory: `write` appends, `sync` is `fdatasync`,
//! `sync_dir` is an `fsync` of the directory. [`MemFs`] is the test double: it keeps
//! what was written apart from what was made durable, and [`MemFs::power_cut`]
//! throws away everything not yet synced (optionally keeping a torn prefix of the
//! unsynced tail, as a disk that lost power mid-write can), so a test can cut
//! power at a moment it chooses and restart from what a real disk would hold.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{File, OpenOptions};
use std::future::Future;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// A boxed future of an fsync.
pub type SyncFuture<'a> = Pin<Box<dyn Future<Output = io::Result<()>> + Send + 'a>>;

/// The files of one write-ahead log directory, by name.
pub trait WalFs: Send + Sync + std::fmt::Debug + 'static {
    /// The names of the files present.
    fn list(&self) -> io::Result<Vec<String>>;
    /// A whole file.
    fn read(&self, name: &str) -> io::Result<Vec<u8>>;
    /// `len` bytes of a file from `offset`.
    fn read_at(&self, name: &str, offset: u64, len: usize) -> io::Result<Vec<u8>>;
    /// Creates a new, empty file (its name is durable after [`WalFs::sync_dir`]).
    fn create(&self, name: &str) -> io::Result<()>;
    /// Appends bytes to a file (durable after [`WalFs::sync`]).
    fn append(&self, name: &str, bytes: &[u8]) -> io::Result<()>;
    /// Cuts a file to `len` bytes.
    fn truncate(&self, name: &str, len: u64) -> io::Result<()>;
    /// Removes a file.
    fn remove(&self, name: &str) -> io::Result<()>;
    /// Makes every byte appended to `name` so far durable (`fdatasync`).
    fn sync<'a>(&'a self, name: &'a str) -> SyncFuture<'a>;
    /// Makes the directory's entries (files created and removed) durable.
    fn sync_dir(&self) -> SyncFuture<'_>;
}

/// A real directory.
#[derive(Debug)]
pub struct StdFs {
    dir: PathBuf,
    open: Mutex<BTreeMap<String, Arc<File>>>,
}

impl StdFs {
    pub fn new(dir: &Path) -> io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        Ok(Self { dir: dir.to_path_buf(), open: Mutex::new(BTreeMap::new()) })
    }

    fn file(&self, name: &str) -> io::Result<Arc<File>> {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(f) = open.get(name) {
            return Ok(f.clone());
        }
        let f = Arc::new(OpenOptions::new().read(true).append(true).open(self.dir.join(name))?);
        open.insert(name.to_owned(), f.clone());
        Ok(f)
    }

    fn forget(&self, name: &str) {
        self.open.lock().unwrap_or_else(|p| p.into_inner()).remove(name);
    }
}

/// Runs blocking file work off the async threads.
async fn blocking(f: impl FnOnce() -> io::Result<()> + Send + 'static) -> io::Result<()> {
    tokio::task::spawn_blocking(f).await.map_err(io::Error::other)?
}

impl WalFs for StdFs {
    fn list(&self) -> io::Result<Vec<String>> {
        let mut names = Vec::new();
        for e in std::fs::read_dir(&self.dir)? {
            if let Some(name) = e?.file_name().to_str() {
                names.push(name.to_owned());
            }
        }
        Ok(names)
    }

    fn read(&self, name: &str) -> io::Result<Vec<u8>> {
        std::fs::read(self.dir.join(name))
    }

    fn read_at(&self, name: &str, offset: u64, len: usize) -> io::Result<Vec<u8>> {
        use std::os::unix::fs::FileExt;
        let mut buf = vec![0; len];
        self.file(name)?.read_exact_at(&mut buf, offset)?;
        Ok(buf)
    }

    fn create(&self, name: &str) -> io::Result<()> {
        let f = OpenOptions::new()
            .read(true)
            .append(true)
            .create_new(true)
            .open(self.dir.join(name))?;
        self.open.lock().unwrap_or_else(|p| p.into_inner()).insert(name.to_owned(), Arc::new(f));
        Ok(())
    }

    fn append(&self, name: &str, bytes: &[u8]) -> io::Result<()> {
        (&*self.file(name)?).write_all(bytes)
    }

    fn truncate(&self, name: &str, len: u64) -> io::Result<()> {
        self.file(name)?.set_len(len)
    }

    fn remove(&self, name: &str) -> io::Result<()> {
        self.forget(name);
        std::fs::remove_file(self.dir.join(name))
    }

    fn sync<'a>(&'a self, name: &'a str) -> SyncFuture<'a> {
        Box::pin(async move {
            let f = self.file(name)?;
            blocking(move || f.sync_data()).await
        })
    }

    fn sync_dir(&self) -> SyncFuture<'_> {
        let dir = self.dir.clone();
        Box::pin(blocking(move || File::open(dir)?.sync_all()))
    }
}

/// Files in memory, with what was written kept apart from what was synced.
#[derive(Debug, Default)]
pub struct MemFs {
    state: Mutex<MemState>,
}

#[derive(Debug, Default)]
struct MemState {
    /// Every file as the process sees it: (written bytes, durable bytes).
    files: BTreeMap<String, MemFile>,
    /// Names a power cut keeps: those present at the last `sync_dir`.
    durable_names: BTreeSet<String>,
    /// Durable contents of files removed since the last `sync_dir` (they come back
    /// after a power cut).
    removed: BTreeMap<String, Vec<u8>>,
    /// The file written last, whose unsynced tail a torn power cut keeps in part.
    last_written: Option<String>,
    /// After a power cut, until [`MemFs::restore`]: every operation fails.
    dead: bool,
    /// While set, syncs wait (a test holds them to cut power mid-sync).
    held: bool,
    /// While set, every write and sync fails, and nothing is lost: a disk that
    /// died (the process sees I/O errors; its data is what it was).
    failing: bool,
    /// How long a sync takes (simulated time in the simulation).
    sync_delay: Duration,
    syncs: u64,
}

#[derive(Debug, Default, Clone)]
struct MemFile {
    data: Vec<u8>,
    durable: Vec<u8>,
}

fn dead() -> io::Error {
    io::Error::other("the disk has no power")
}

fn missing(name: &str) -> io::Error {
    io::Error::new(io::ErrorKind::NotFound, format!("{name}: no such file"))
}

impl MemFs {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// A file system whose syncs each take `delay`.
    pub fn with_sync_delay(delay: Duration) -> Arc<Self> {
        let fs = Self::default();
        fs.set_sync_delay(delay);
        Arc::new(fs)
    }

    /// Makes every later sync take `delay`.
    pub fn set_sync_delay(&self, delay: Duration) {
        self.state().sync_delay = delay;
    }

    /// While `failing`, writes and syncs return I/O errors (a dead disk).
    pub fn set_failing(&self, failing: bool) {
        self.state().failing = failing;
    }

    /// Every file as a power cut now would leave it: (name, durable bytes).
    pub fn durable_files(&self) -> Vec<(String, Vec<u8>)> {
        let s = self.state();
        s.durable_names
            .iter()
            .filter_map(|n| {
                let bytes = s
                    .files
                    .get(n)
                    .map(|f| f.durable.clone())
                    .or_else(|| s.removed.get(n).cloned())?;
                Some((n.clone(), bytes))
            })
            .collect()
    }

    fn state(&self) -> std::sync::MutexGuard<'_, MemState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn live(&self) -> io::Result<std::sync::MutexGuard<'_, MemState>> {
        let s = self.state();
        if s.dead {
            return Err(dead());
        }
        Ok(s)
    }

    /// [`MemFs::live`], for an operation that writes: fails on a failing disk too.
    fn writable(&self) -> io::Result<std::sync::MutexGuard<'_, MemState>> {
        let s = self.live()?;
        if s.failing {
            return Err(io::Error::other("the disk failed (simulated I/O error)"));
        }
        Ok(s)
    }

    /// Cuts the power: every byte not synced is lost (and every name not made
    /// durable), except, with `torn_keep = Some(n)`, the first `n` unsynced bytes of
    /// the file written last (a torn write). Every operation fails until
    /// [`MemFs::restore`]. Returns how many unsynced bytes were lost.
    pub fn power_cut(&self, torn_keep: Option<usize>) -> u64 {
        let mut s = self.state();
        let mut lost = 0u64;
        let mut files = BTreeMap::new();
        let names: Vec<String> = s.durable_names.iter().cloned().collect();
        for name in names {
            let durable = match (s.files.get(&name), s.removed.get(&name)) {
                (Some(f), _) => f.clone(),
                (None, Some(bytes)) => MemFile { data: bytes.clone(), durable: bytes.clone() },
                (None, None) => continue,
            };
            let mut kept = durable.durable.clone();
            let unsynced = durable.data.get(kept.len()..).unwrap_or_default();
            lost += unsynced.len() as u64;
            if let (Some(n), Some(last)) = (torn_keep, &s.last_written) {
                if *last == name && durable.data.starts_with(&kept) {
                    let n = n.min(unsynced.len());
                    kept.extend_from_slice(&unsynced[..n]);
                    lost -= n as u64;
                }
            }
            files.insert(name, MemFile { data: kept.clone(), durable: kept });
        }
        for (name, f) in &s.files {
            if !files.contains_key(name) {
                lost += f.data.len() as u64;
            }
        }
        s.files = files;
        s.removed.clear();
        s.last_written = None;
        s.dead = true;
        lost
    }

    /// Power is back: the files are what the cut left.
    pub fn restore(&self) {
        self.state().dead = false;
    }

    /// Holds every sync (it waits, writing nothing durable) until released.
    pub fn hold_syncs(&self, held: bool) {
        self.state().held = held;
    }

    /// Syncs completed so far.
    pub fn syncs(&self) -> u64 {
        self.state().syncs
    }
}

impl WalFs for MemFs {
    fn list(&self) -> io::Result<Vec<String>> {
        Ok(self.live()?.files.keys().cloned().collect())
    }

    fn read(&self, name: &str) -> io::Result<Vec<u8>> {
        self.live()?.files.get(name).map(|f| f.data.clone()).ok_or_else(|| missing(name))
    }

    fn read_at(&self, name: &str, offset: u64, len: usize) -> io::Result<Vec<u8>> {
        let s = self.live()?;
        let f = s.files.get(name).ok_or_else(|| missing(name))?;
        let start = usize::try_from(offset).map_err(io::Error::other)?;
        f.data
            .get(start..start.saturating_add(len))
            .map(<[u8]>::to_vec)
            .ok_or_else(|| io::Error::new(io::ErrorKind::UnexpectedEof, "read past the end"))
    }

    fn create(&self, name: &str) -> io::Result<()> {
        let mut s = self.writable()?;
        if s.files.contains_key(name) {
            return Err(io::Error::new(io::ErrorKind::AlreadyExists, name.to_owned()));
        }
        s.files.insert(name.to_owned(), MemFile::default());
        Ok(())
    }

    fn append(&self, name: &str, bytes: &[u8]) -> io::Result<()> {
        let mut s = self.writable()?;
        s.files.get_mut(name).ok_or_else(|| missing(name))?.data.extend_from_slice(bytes);
        s.last_written = Some(name.to_owned());
        Ok(())
    }

    fn truncate(&self, name: &str, len: u64) -> io::Result<()> {
        let mut s = self.writable()?;
        let f = s.files.get_mut(name).ok_or_else(|| missing(name))?;
        f.data.truncate(usize::try_from(len).map_err(io::Error::other)?);
        Ok(())
    }

    fn remove(&self, name: &str) -> io::Result<()> {
        let mut s = self.writable()?;
        let f = s.files.remove(name).ok_or_else(|| missing(name))?;
        if s.durable_names.contains(name) {
            s.removed.insert(name.to_owned(), f.durable);
        }
        Ok(())
    }

    fn sync<'a>(&'a self, name: &'a str) -> SyncFuture<'a> {
        Box::pin(async move {
            // What a sync makes durable is what was written when it started.
            let (data, delay) = {
                let s = self.writable()?;
                (s.files.get(name).ok_or_else(|| missing(name))?.data.clone(), s.sync_delay)
            };
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            while self.live()?.held {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            let mut s = self.writable()?;
            let f = s.files.get_mut(name).ok_or_else(|| missing(name))?;
            if f.data.starts_with(&data) {
                f.durable = data;
            }
            s.syncs += 1;
            Ok(())
        })
    }

    fn sync_dir(&self) -> SyncFuture<'_> {
        Box::pin(async move {
            let (names, delay) = {
                let s = self.writable()?;
                (s.files.keys().cloned().collect::<BTreeSet<String>>(), s.sync_delay)
            };
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            let mut s = self.writable()?;
            // Names created or removed since the sync started stay as they were.
            s.durable_names = names.into_iter().filter(|n| s.files.contains_key(n)).collect();
            s.removed.clear();
            Ok(())
        })
    }
}

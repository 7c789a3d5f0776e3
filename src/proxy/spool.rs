//! Response spooling: a client that reads slower than the origin sends must not hold the
//! origin connection while it does.
//!
//! A response that did not fit `response_buffer` is handed to a pump task that reads the
//! origin's body as fast as the origin sends it into a per-response spool (the first
//! `spool_memory` bytes in memory, the rest in an unlinked file in `spool_dir`), gives the origin
//! connection back to the pool the moment the body has ended, and feeds the client from the
//! spool through a small channel. It is nginx's proxy buffering, with the memory and the disk
//! both bounded: each response by `response_spool`, all of them together by `spool_budget`.
//! A spool that reaches either bound stops reading the origin until the client catches up,
//! which is the unspooled behaviour (the connection stays with the response), and a response
//! that arrives when the budget is spent is not spooled at all (counted).
//!
//! The pump is also the response's progress clock. While bytes wait for the client, the client
//! must take some within `send_timeout` and, over each `send_timeout` window, at least
//! `min_send_rate` bytes/s. "Taking" is the HTTP server pulling the next frame, which hyper does
//! only when the socket took the last one (HTTP/1) or the client credited stream window (HTTP/2),
//! so a zero-window HTTP/2 client stalls here even though no socket write ever blocks. A stalled
//! client's connection is closed (hyper offers no way to reset one server stream from outside)
//! and its spool is freed at once.
//!
//! The spool does not live past its response: the file is unlinked at creation (its space
//! returns when the pump drops it) and every byte is given back to the budget when the pump
//! ends, whichever way it ends.

use std::collections::VecDeque;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body, Frame};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::activity::{Closing, ConnActivity};
use crate::upstream::body::BoxError;
use crate::upstream::Lease;

/// Frames in flight between the pump and the client's body: enough to keep a fast client busy
/// while the pump reads, small enough that the spool (which is accounted) holds nearly all.
const CHANNEL_FRAMES: usize = 4;
/// Bytes read back from a spool file per read.
const FILE_CHUNK: usize = 64 * 1024;

/// The spool settings of the generation in force (`[http]`).
#[derive(Debug, Clone)]
pub struct Settings {
    pub per_response: u64,
    pub memory: u64,
    pub dir: PathBuf,
    pub send_timeout: Duration,
    pub min_send_rate: u64,
}

/// The process-wide spool budget and counters (kept across reloads).
#[derive(Debug, Default)]
pub struct Spooler {
    limit: AtomicU64,
    in_use: AtomicU64,
    pub responses: AtomicU64,
    pub bytes: AtomicU64,
    /// Responses whose spool went past `spool_memory` into a file.
    pub to_file: AtomicU64,
    /// Responses streamed unspooled because the budget was spent.
    pub exhausted: AtomicU64,
    /// Connections closed because a response made no progress for `send_timeout`.
    pub stalled: AtomicU64,
    /// Connections closed because a response was taken slower than `min_send_rate`.
    pub too_slow: AtomicU64,
}

impl Spooler {
    pub fn new(limit: u64) -> Arc<Spooler> {
        let s = Spooler::default();
        s.limit.store(limit, Ordering::Relaxed);
        Arc::new(s)
    }

    pub fn set_limit(&self, limit: u64) {
        self.limit.store(limit, Ordering::Relaxed);
    }

    pub fn limit(&self) -> u64 {
        self.limit.load(Ordering::Relaxed)
    }

    /// Bytes held by all spools now.
    pub fn in_use(&self) -> u64 {
        self.in_use.load(Ordering::Relaxed)
    }

    /// Whether a new response may start spooling (some budget is left).
    pub fn has_room(&self) -> bool {
        self.in_use() < self.limit()
    }

    fn charge(&self, n: u64) {
        self.in_use.fetch_add(n, Ordering::AcqRel);
    }

    fn release(&self, n: u64) {
        if n > 0 {
            self.in_use.fetch_sub(n, Ordering::AcqRel);
        }
    }
}

/// What the client has taken, written by its body and read by the pump's clock.
#[derive(Debug)]
struct Progress {
    origin: std::time::Instant,
    taken_at_ms: AtomicU64,
    taken_bytes: AtomicU64,
}

impl Progress {
    fn taken_at(&self) -> Instant {
        Instant::from_std(self.origin)
            + Duration::from_millis(self.taken_at_ms.load(Ordering::Relaxed))
    }
}

type Item = Result<Frame<Bytes>, BoxError>;

/// The client's side of a spooled response.
#[derive(Debug)]
pub struct Spooled {
    rx: mpsc::Receiver<Item>,
    progress: Arc<Progress>,
    /// Bytes still to come when the origin said how many (Content-Length), else None.
    remaining: Option<u64>,
}

impl Spooled {
    pub fn poll_frame(&mut self, cx: &mut Context<'_>) -> Poll<Option<Item>> {
        let item = std::task::ready!(self.rx.poll_recv(cx));
        if let Some(Ok(f)) = &item {
            let n = f.data_ref().map_or(0, |d| d.len() as u64);
            let ms = self.progress.origin.elapsed().as_millis() as u64;
            self.progress.taken_at_ms.store(ms, Ordering::Relaxed);
            self.progress.taken_bytes.fetch_add(n, Ordering::Relaxed);
            if let Some(r) = self.remaining.as_mut() {
                *r = r.saturating_sub(n);
            }
        }
        Poll::Ready(item)
    }

    pub fn remaining(&self) -> Option<u64> {
        self.remaining
    }
}

/// Starts spooling `body` (whose origin connection is `lease`); the client reads the returned
/// end. `exact` is the body's size when the origin declared it.
pub fn start(
    settings: &Settings,
    spooler: Arc<Spooler>,
    activity: Arc<ConnActivity>,
    body: Incoming,
    lease: Lease,
) -> Spooled {
    let exact = body.size_hint().exact();
    let (tx, rx) = mpsc::channel(CHANNEL_FRAMES);
    let progress = Arc::new(Progress {
        origin: std::time::Instant::now(),
        taken_at_ms: AtomicU64::new(0),
        taken_bytes: AtomicU64::new(0),
    });
    spooler.responses.fetch_add(1, Ordering::Relaxed);
    let pump = Pump {
        settings: settings.clone(),
        store: Store::new(spooler),
        progress: progress.clone(),
        activity,
        tx,
        origin: Some((body, lease)),
    };
    tokio::spawn(pump.run());
    Spooled {
        rx,
        progress,
        remaining: exact,
    }
}

struct Pump {
    settings: Settings,
    store: Store,
    progress: Arc<Progress>,
    activity: Arc<ConnActivity>,
    tx: mpsc::Sender<Item>,
    /// The origin body and its connection, until the body ended (then the connection is back
    /// in the pool).
    origin: Option<(Incoming, Lease)>,
}

/// Why the pump stopped feeding the client.
enum End {
    /// Everything was delivered.
    Done,
    /// The client went away, or was cut for making no progress.
    Abandoned,
}

impl Pump {
    async fn run(mut self) {
        let end = self.feed().await;
        self.store.clear();
        if let (End::Abandoned, Some((body, lease))) = (end, self.origin.take()) {
            // The client is gone but the origin is still sending: finish reading it (bounded)
            // so the connection can serve again, instead of costing the origin a handshake.
            lease.drain_abandoned(body).await;
        }
    }

    async fn feed(&mut self) -> End {
        // When bytes started waiting for the client, and the start of the current rate window
        // with the bytes taken by then.
        let mut waiting_since: Option<Instant> = None;
        let mut window: Option<(Instant, u64)> = None;
        loop {
            let in_channel = self.tx.capacity() < CHANNEL_FRAMES;
            let waiting = !self.store.is_empty() || in_channel;
            if !waiting {
                if self.origin.is_none() {
                    return End::Done;
                }
                waiting_since = None;
                window = None;
            } else if waiting_since.is_none() {
                let now = Instant::now();
                waiting_since = Some(now);
                window = Some((now, self.progress.taken_bytes.load(Ordering::Relaxed)));
            }
            let read_origin = self.origin.is_some() && self.store.has_room(&self.settings);
            let deadline = match (waiting_since, window) {
                (Some(since), Some((w, _))) => {
                    let base = since.max(self.progress.taken_at());
                    (base + self.settings.send_timeout).min(w + self.settings.send_timeout)
                }
                _ => Instant::now() + Duration::from_secs(3600),
            };
            tokio::select! {
                biased;
                _ = self.tx.closed() => return End::Abandoned,
                // The client took the last frames: the end (or the next read) is due now, not
                // at the next clock check.
                _ = self.tx.reserve_many(CHANNEL_FRAMES), if self.store.is_empty() && in_channel => {}
                permit = self.tx.reserve(), if !self.store.is_empty() => {
                    let Ok(permit) = permit else { return End::Abandoned };
                    match self.store.pop().await {
                        Some(item) => permit.send(item),
                        None => return End::Abandoned,
                    }
                }
                frame = next_frame(&mut self.origin), if read_origin => {
                    match frame {
                        Some(Ok(f)) => {
                            if let Err(e) = self.store.push(f, &self.settings).await {
                                tracing::warn!(error = %e, "response spool file failed; the response is cut");
                                self.store.push_error(Box::new(e));
                                // The origin connection is mid-body: it cannot serve again.
                                self.origin = None;
                            } else if self.origin.as_ref().is_some_and(|(b, _)| b.is_end_stream()) {
                                // A Content-Length body is whole after its last byte.
                                if let Some((_, lease)) = self.origin.take() {
                                    lease.finish();
                                }
                            }
                        }
                        Some(Err(e)) => {
                            tracing::warn!(error = %e, "origin response body failed mid-stream");
                            self.store.push_error(Box::new(e));
                            self.origin = None;
                        }
                        None => {
                            if let Some((_, lease)) = self.origin.take() {
                                lease.finish();
                            }
                        }
                    }
                }
                _ = tokio::time::sleep_until(deadline), if waiting_since.is_some() => {
                    let now = Instant::now();
                    let base = waiting_since.unwrap_or(now).max(self.progress.taken_at());
                    if now >= base + self.settings.send_timeout {
                        self.store.spooler.stalled.fetch_add(1, Ordering::Relaxed);
                        self.activity.close(Closing::Stalled);
                        return End::Abandoned;
                    }
                    if let Some((start, taken0)) = window {
                        let secs = now.duration_since(start).as_secs_f64();
                        if secs >= self.settings.send_timeout.as_secs_f64() {
                            let taken = self.progress.taken_bytes.load(Ordering::Relaxed);
                            let need = self.settings.min_send_rate as f64 * secs;
                            if self.settings.min_send_rate > 0 && ((taken - taken0) as f64) < need {
                                self.store.spooler.too_slow.fetch_add(1, Ordering::Relaxed);
                                self.activity.close(Closing::TooSlow);
                                return End::Abandoned;
                            }
                            window = Some((now, taken));
                        }
                    }
                }
            }
        }
    }
}

/// The next frame of the origin body, or never when there is none.
async fn next_frame(
    origin: &mut Option<(Incoming, Lease)>,
) -> Option<Result<Frame<Bytes>, hyper::Error>> {
    match origin {
        Some((body, _)) => body.frame().await,
        None => std::future::pending().await,
    }
}

/// One response's spooled bytes, in order: memory first, then (past `spool_memory`) a file.
struct Store {
    spooler: Arc<Spooler>,
    mem: VecDeque<Frame<Bytes>>,
    mem_bytes: u64,
    file: Option<Arc<File>>,
    /// The file holds [file_read, file_written); its space is charged to the budget up to
    /// `file_written` until the file is read to the end and reused from its start.
    file_read: u64,
    file_written: u64,
    /// Frames that come after the file's bytes (trailers, an error).
    after_file: VecDeque<Item>,
    failed: Option<BoxError>,
}

impl Store {
    fn new(spooler: Arc<Spooler>) -> Store {
        Store {
            spooler,
            mem: VecDeque::new(),
            mem_bytes: 0,
            file: None,
            file_read: 0,
            file_written: 0,
            after_file: VecDeque::new(),
            failed: None,
        }
    }

    fn is_empty(&self) -> bool {
        self.mem.is_empty()
            && self.file_read == self.file_written
            && self.after_file.is_empty()
            && self.failed.is_none()
    }

    /// Whether the origin may be read further: under the per-response bound and some budget
    /// left. An empty spool may always take the next frame: it then relays as an unspooled
    /// response would, so a spent budget slows a response down to its client's pace but never
    /// stalls it (which would read as the client's fault and get it cut).
    fn has_room(&self, s: &Settings) -> bool {
        self.failed.is_none()
            && self.mem_bytes + self.file_written < s.per_response
            && (self.is_empty() || self.spooler.has_room())
    }

    fn in_file(&self) -> bool {
        self.file_read < self.file_written
    }

    async fn push(&mut self, frame: Frame<Bytes>, s: &Settings) -> std::io::Result<()> {
        let Some(data) = frame.data_ref() else {
            // Trailers come after every data byte.
            if self.in_file() {
                self.after_file.push_back(Ok(frame));
            } else {
                self.mem.push_back(frame);
            }
            return Ok(());
        };
        let n = data.len() as u64;
        // The budget was checked before reading; a frame that overshoots it is still kept
        // (dropping it would corrupt the response), and reading stops until it drains.
        self.spooler.charge(n);
        self.spooler.bytes.fetch_add(n, Ordering::Relaxed);
        if !self.in_file() && self.mem_bytes + n <= s.memory {
            self.mem_bytes += n;
            self.mem.push_back(frame);
            return Ok(());
        }
        // Into the file: from here on everything goes there until it is read to its end.
        let file = match &self.file {
            Some(f) => f.clone(),
            None => {
                let dir = s.dir.clone();
                let f = Arc::new(
                    tokio::task::spawn_blocking(move || tempfile::tempfile_in(dir))
                        .await
                        .map_err(std::io::Error::other)??,
                );
                self.spooler.to_file.fetch_add(1, Ordering::Relaxed);
                self.file = Some(f.clone());
                f
            }
        };
        let at = self.file_written;
        let data = data.clone();
        tokio::task::spawn_blocking(move || file.write_all_at(&data, at))
            .await
            .map_err(std::io::Error::other)??;
        self.file_written += n;
        Ok(())
    }

    fn push_error(&mut self, e: BoxError) {
        self.failed = Some(e);
    }

    /// The next item for the client, in order.
    async fn pop(&mut self) -> Option<Item> {
        if let Some(f) = self.mem.pop_front() {
            if let Some(d) = f.data_ref() {
                let n = d.len() as u64;
                self.mem_bytes -= n;
                self.spooler.release(n);
            }
            return Some(Ok(f));
        }
        if self.in_file() {
            let file = self.file.clone()?;
            let at = self.file_read;
            let len = (self.file_written - at).min(FILE_CHUNK as u64) as usize;
            let read = tokio::task::spawn_blocking(move || {
                let mut buf = vec![0; len];
                file.read_exact_at(&mut buf, at).map(|()| buf)
            })
            .await
            .map_err(std::io::Error::other)
            .and_then(|r| r);
            return match read {
                Ok(buf) => {
                    self.file_read += len as u64;
                    if self.file_read == self.file_written {
                        // Read to its end: its space goes back and it is reused from the start.
                        self.spooler.release(self.file_written);
                        self.file_read = 0;
                        self.file_written = 0;
                    }
                    Some(Ok(Frame::data(Bytes::from(buf))))
                }
                Err(e) => {
                    tracing::warn!(error = %e, "reading a response spool file failed; the response is cut");
                    Some(Err(Box::new(e)))
                }
            };
        }
        if let Some(item) = self.after_file.pop_front() {
            return Some(item);
        }
        self.failed.take().map(Err)
    }

    /// Gives every byte back to the budget (the file goes with the store).
    fn clear(&mut self) {
        self.spooler.release(self.mem_bytes + self.file_written);
        self.mem.clear();
        self.mem_bytes = 0;
        self.file_read = 0;
        self.file_written = 0;
        self.file = None;
        self.after_file.clear();
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        self.clear();
    }
}

/// Whether a response is streamed on purpose and must reach the client as it is produced
/// (server-sent events): never spooled.
pub fn is_streaming(headers: &HeaderMap) -> bool {
    headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.trim_start()
                .to_ascii_lowercase()
                .starts_with("text/event-stream")
        })
}

//! A user-space fault proxy for process tests: one TCP forwarder in front of each
//! node. Nodes advertise their proxy's address, so every connection to a node —
//! from a peer or from a client — passes through the proxy in front of it.
//!
//! Faults are per link (source, destination). A node has one address for all its
//! peers (Raft membership carries the advertised address), so the proxy tells
//! sources apart by who owns the connecting socket: on Linux it finds the socket's
//! inode in `/proc/net/tcp` and the process holding it under `/proc/<pid>/fd`.
//! Connections from the test process itself (gateways, writers), or from a process
//! it cannot identify, come from [`Faults::client`].
//!
//! A link is one of:
//! - [`Fault::Pass`]: bytes flow.
//! - [`Fault::Delay`]: every chunk read is held this long before it is written on.
//! - [`Fault::Blackhole`]: connections stay open but nothing is forwarded, both
//!   ways, until the link heals (then what was held is delivered late); new
//!   connections are accepted and held the same way. Callers see timeouts.
//! - [`Fault::Reset`]: open connections are closed, new ones are closed at once.
//!   Callers see connection errors.
//! - [`Fault::Wan`]: a distant link ([`Link`]): every chunk is delivered a one-way
//!   delay (plus jitter) after it was read, pipelined like a real long link (bytes
//!   keep flowing while earlier ones are in flight) and in order; a "lost" chunk
//!   is delivered a retransmission timeout late, holding those behind it, which is
//!   what TCP makes of packet loss. Only the proxy's direction of the connection
//!   (src → dst requests and dst → src answers) pays: both halves of a connection
//!   through the proxy in front of dst are delayed, so a round trip on link
//!   (src, dst) costs twice its delay.
//!
//! Cutting (src → dst) leaves (dst → src) alone: a one-way partition at the level
//! of connections (a request on a cut connection gets no reply either).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    Pass,
    Delay(Duration),
    Blackhole,
    Reset,
    Wan(Link),
}

/// A distant link: one-way delay, jitter and loss (see the module docs).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Link {
    /// One-way delay of every chunk.
    pub delay: Duration,
    /// Up to this much more, uniformly at random per chunk (order is kept).
    pub jitter: Duration,
    /// Chunks in a million delivered a retransmission timeout late.
    pub loss_ppm: u32,
}

impl Link {
    pub fn delay_ms(ms: u64) -> Self {
        Self { delay: Duration::from_millis(ms), ..Self::default() }
    }

    /// How late a lost chunk arrives: Linux's minimum retransmission timeout
    /// (200 ms), or a round trip when that is longer.
    pub fn retransmit_after(&self) -> Duration {
        (self.delay * 2).max(Duration::from_millis(200))
    }

    /// `DELAY[~JITTER][/LOSS%]` in ms, e.g. `130`, `130~10`, `130~10/0.5`.
    pub fn parse(text: &str) -> Result<Self, String> {
        let bad = || format!("{text:?} is not DELAY[~JITTER][/LOSS%] (ms, ms, percent)");
        let (rest, loss) = match text.split_once('/') {
            Some((r, l)) => (r, Some(l.trim_end_matches('%'))),
            None => (text, None),
        };
        let (delay, jitter) = match rest.split_once('~') {
            Some((d, j)) => (d, Some(j)),
            None => (rest, None),
        };
        let ms = |t: &str| t.trim().parse::<u64>().map(Duration::from_millis).map_err(|_| bad());
        let loss_ppm = match loss {
            Some(l) => {
                let pct: f64 = l.trim().parse().map_err(|_| bad())?;
                if !(0.0..=100.0).contains(&pct) {
                    return Err(bad());
                }
                (pct * 10_000.0).round() as u32
            }
            None => 0,
        };
        Ok(Self {
            delay: ms(delay)?,
            jitter: jitter.map(ms).transpose()?.unwrap_or_default(),
            loss_ppm,
        })
    }
}

/// The proxies in front of `n` nodes and the state of every link.
#[derive(Debug)]
pub struct Faults {
    n: usize,
    /// Proxy addresses, by destination node index.
    pub addrs: Vec<SocketAddr>,
    /// `links[src * n + dst]`; `src == n` is the client.
    links: watch::Sender<Vec<Fault>>,
    /// Current pid of each node's process.
    pids: Mutex<Vec<Option<u32>>>,
    /// Connections accepted, by source (nodes, then the client).
    pub accepted: Vec<AtomicU64>,
    /// Connections whose owner could not be found (counted as the client's too).
    pub unidentified: AtomicU64,
}

impl Faults {
    /// Starts a proxy in front of each of `targets` (on the current runtime).
    pub async fn start(targets: Vec<SocketAddr>) -> Arc<Self> {
        let n = targets.len();
        let mut listeners = Vec::new();
        while listeners.len() < n {
            // Never a port a node is about to listen on (the caller picked those
            // free a moment ago; the kernel may hand one out again).
            let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let port = l.local_addr().unwrap().port();
            if !targets.iter().any(|t| t.port() == port) {
                listeners.push(l);
            }
        }
        let faults = Arc::new(Self {
            n,
            addrs: listeners.iter().map(|l| l.local_addr().unwrap()).collect(),
            links: watch::Sender::new(vec![Fault::Pass; (n + 1) * n]),
            pids: Mutex::new(vec![None; n]),
            accepted: (0..=n).map(|_| AtomicU64::new(0)).collect(),
            unidentified: AtomicU64::new(0),
        });
        for (dst, (listener, target)) in listeners.into_iter().zip(targets).enumerate() {
            let weak = Arc::downgrade(&faults);
            tokio::spawn(async move {
                while let Ok((conn, peer)) = listener.accept().await {
                    let Some(faults) = weak.upgrade() else { return };
                    tokio::spawn(async move { faults.serve(conn, peer, dst, target).await });
                }
            });
        }
        faults
    }

    /// The source index of the test process and of anything unidentified.
    pub fn client(&self) -> usize {
        self.n
    }

    pub fn set_pid(&self, node: usize, pid: Option<u32>) {
        self.pids.lock().unwrap()[node] = pid;
    }

    pub fn set(&self, src: usize, dst: usize, fault: Fault) {
        let n = self.n;
        self.links.send_modify(|l| l[src * n + dst] = fault);
    }

    pub fn get(&self, src: usize, dst: usize) -> Fault {
        self.links.borrow()[src * self.n + dst]
    }

    /// Cuts every link between `node` and the other nodes, both ways, and the
    /// client's links to it if `clients`.
    pub fn isolate(&self, node: usize, fault: Fault, clients: bool) {
        let n = self.n;
        self.links.send_modify(|l| {
            for other in (0..n).filter(|o| *o != node) {
                l[node * n + other] = fault;
                l[other * n + node] = fault;
            }
            if clients {
                l[n * n + node] = fault;
            }
        });
    }

    /// Every link into `node` (from peers and the client) gets `fault`.
    pub fn inbound(&self, node: usize, fault: Fault) {
        let n = self.n;
        self.links.send_modify(|l| {
            for src in (0..=n).filter(|s| *s != node) {
                l[src * n + node] = fault;
            }
        });
    }

    pub fn heal_all(&self) {
        self.links.send_modify(|l| l.iter_mut().for_each(|f| *f = Fault::Pass));
    }

    async fn serve(self: Arc<Self>, conn: TcpStream, peer: SocketAddr, dst: usize, to: SocketAddr) {
        let local = conn.local_addr().ok();
        let me = self.clone();
        let owner = tokio::task::spawn_blocking(move || local.and_then(|l| me.owner(peer, l)));
        let src = match owner.await.ok().flatten() {
            Some(src) => src,
            None => {
                self.unidentified.fetch_add(1, Ordering::Relaxed);
                self.n
            }
        };
        self.accepted[src].fetch_add(1, Ordering::Relaxed);
        let idx = src * self.n + dst;
        let mut links = self.links.subscribe();
        drop(self);
        if links.borrow_and_update()[idx] == Fault::Reset {
            return;
        }
        // A node that is down refuses: so does its proxy.
        let Ok(Ok(upstream)) =
            tokio::time::timeout(Duration::from_secs(2), TcpStream::connect(to)).await
        else {
            return;
        };
        let _ = conn.set_nodelay(true);
        let _ = upstream.set_nodelay(true);
        let (cr, cw) = conn.into_split();
        let (ur, uw) = upstream.into_split();
        // Either direction ending closes both.
        tokio::select! {
            _ = pump(cr, uw, links.clone(), idx) => {}
            _ = pump(ur, cw, links, idx) => {}
        }
    }

    /// Which node's process holds the connecting socket `peer` → `local`, or the
    /// client (this process); `None` when no process can be found.
    fn owner(&self, peer: SocketAddr, local: SocketAddr) -> Option<usize> {
        let inode = socket_inode(peer, local)?;
        let link = format!("socket:[{inode}]");
        let pids = self.pids.lock().unwrap().clone();
        let me = std::process::id();
        let candidates = pids.iter().enumerate().filter_map(|(i, p)| p.map(|p| (i, p)));
        for (i, pid) in candidates.chain([(self.n, me)]) {
            let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else { continue };
            for fd in fds.flatten() {
                if std::fs::read_link(fd.path()).is_ok_and(|t| t.as_os_str() == link.as_str()) {
                    return Some(i);
                }
            }
        }
        None
    }
}

/// The inode of the TCP socket bound to `local` and connected to `remote`.
fn socket_inode(local: SocketAddr, remote: SocketAddr) -> Option<u64> {
    let (SocketAddr::V4(l), SocketAddr::V4(r)) = (local, remote) else { return None };
    let hex = |a: std::net::SocketAddrV4| {
        format!("{:08X}:{:04X}", u32::from_ne_bytes(a.ip().octets()), a.port())
    };
    let (want_l, want_r) = (hex(l), hex(r));
    // The entry exists once connect() completes; retry briefly all the same.
    for _ in 0..3 {
        let text = std::fs::read_to_string("/proc/net/tcp").ok()?;
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() > 9 && f[1] == want_l && f[2] == want_r {
                return f[9].parse().ok();
            }
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    None
}

/// Forwards `from` to `to` chunk by chunk, as the link's fault allows. A reader
/// stamps each chunk with when it may be written; a writer writes them in order
/// at those times, so a [`Fault::Wan`] link carries many chunks at once.
async fn pump(
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    mut links: watch::Receiver<Vec<Fault>>,
    idx: usize,
) {
    // Bounded: a reader far ahead of a slow writer waits (like a full TCP window).
    let (tx, mut rx) = tokio::sync::mpsc::channel::<(tokio::time::Instant, Vec<u8>)>(256);
    let mut reset = links.clone();
    let mut reset_w = links.clone();
    let reader = async move {
        let mut buf = vec![0u8; 64 * 1024];
        let mut rng = Rng::seeded();
        let mut last = tokio::time::Instant::now();
        loop {
            let n = tokio::select! {
                r = from.read(&mut buf) => match r {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                },
                _ = reset.wait_for(|l| l[idx] == Fault::Reset) => return,
            };
            let at = loop {
                let fault = links.borrow_and_update()[idx];
                match fault {
                    Fault::Pass => break tokio::time::Instant::now(),
                    Fault::Delay(d) => {
                        tokio::time::sleep(d).await;
                        break tokio::time::Instant::now();
                    }
                    Fault::Wan(link) => {
                        let mut at = tokio::time::Instant::now() + link.delay;
                        if !link.jitter.is_zero() {
                            let j = u64::try_from(link.jitter.as_micros()).unwrap_or(u64::MAX);
                            at += Duration::from_micros(rng.below(j.saturating_add(1)));
                        }
                        if link.loss_ppm > 0 && rng.below(1_000_000) < u64::from(link.loss_ppm) {
                            at += link.retransmit_after();
                        }
                        break at;
                    }
                    Fault::Blackhole => {
                        if links.changed().await.is_err() {
                            return;
                        }
                    }
                    Fault::Reset => return,
                }
            };
            // In order: never before the chunk ahead of it.
            last = last.max(at);
            if tx.send((last, buf[..n].to_vec())).await.is_err() {
                return;
            }
        }
    };
    let writer = async move {
        while let Some((at, bytes)) = rx.recv().await {
            tokio::time::sleep_until(at).await;
            tokio::select! {
                r = to.write_all(&bytes) => if r.is_err() { return },
                _ = reset_w.wait_for(|l| l[idx] == Fault::Reset) => return,
            }
        }
    };
    // The writer drains what the reader queued before the reader ended.
    let (_, ()) = tokio::join!(reader, writer);
}

/// A small xorshift generator for jitter and loss (no dependency, good enough).
struct Rng(u64);

impl Rng {
    fn seeded() -> Self {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(7);
        static NEXT: AtomicU64 = AtomicU64::new(0x9E37_79B9_7F4A_7C15);
        Self((NEXT.fetch_add(0x9E37_79B9_7F4A_7C15, Ordering::Relaxed) ^ u64::from(nanos)) | 1)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        if n == 0 {
            0
        } else {
            self.0 % n
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn links_parse_from_delay_jitter_and_loss() {
        assert_eq!(Link::parse("130").unwrap(), Link::delay_ms(130));
        let l = Link::parse("130~10/0.5%").unwrap();
        assert_eq!(
            l,
            Link {
                delay: Duration::from_millis(130),
                jitter: Duration::from_millis(10),
                loss_ppm: 5_000
            }
        );
        assert_eq!(Link::parse("30/1").unwrap().loss_ppm, 10_000);
        for bad in ["", "x", "30~", "30/101", "-5", "30/-1"] {
            let err = Link::parse(bad).unwrap_err();
            assert!(err.contains("DELAY"), "{bad}: {err}");
        }
        assert_eq!(Link::delay_ms(30).retransmit_after(), Duration::from_millis(200));
        assert_eq!(Link::delay_ms(150).retransmit_after(), Duration::from_millis(300));
    }

    /// A 50 ms link carries a stream of writes pipelined: 20 chunks written 10 ms
    /// apart each come back about 100 ms after they were sent, not 100 ms apart.
    #[tokio::test]
    async fn a_wan_link_is_pipelined_and_in_order() {
        let echo = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let target = echo.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut c, _) = echo.accept().await.unwrap();
            let mut buf = [0u8; 4096];
            loop {
                match c.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => c.write_all(&buf[..n]).await.unwrap(),
                }
            }
        });
        let faults = Faults::start(vec![target]).await;
        let client = faults.client();
        faults.set(client, 0, Fault::Wan(Link::delay_ms(50)));
        let conn = TcpStream::connect(faults.addrs[0]).await.unwrap();
        conn.set_nodelay(true).unwrap();
        let started = tokio::time::Instant::now();
        let (mut r, mut w) = conn.into_split();
        let sender = tokio::spawn(async move {
            for i in 0..20u8 {
                w.write_all(&[i]).await.unwrap();
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            w
        });
        let mut got = Vec::new();
        let mut buf = [0u8; 64];
        while got.len() < 20 {
            let n = r.read(&mut buf).await.unwrap();
            assert!(n > 0, "closed early");
            got.extend_from_slice(&buf[..n]);
        }
        let took = started.elapsed();
        let _w = sender.await.unwrap();
        assert_eq!(got, (0..20u8).collect::<Vec<_>>(), "in order");
        // Holding chunks one after another would take at least 20 x 50 ms each
        // way (2 s); pipelined, the last byte is sent at ~190 ms and is back
        // ~100 ms later.
        assert!(took >= Duration::from_millis(290), "{took:?}: the delay was applied");
        assert!(took < Duration::from_millis(1950), "{took:?}: chunks were not pipelined");
    }
}

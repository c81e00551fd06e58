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
        for _ in 0..n {
            listeners.push(TcpListener::bind("127.0.0.1:0").await.unwrap());
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

/// Forwards `from` to `to` chunk by chunk, as the link's fault allows.
async fn pump(
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    mut links: watch::Receiver<Vec<Fault>>,
    idx: usize,
) {
    let mut buf = vec![0u8; 64 * 1024];
    let mut reset = links.clone();
    loop {
        let n = tokio::select! {
            r = from.read(&mut buf) => match r {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            },
            _ = reset.wait_for(|l| l[idx] == Fault::Reset) => return,
        };
        loop {
            let fault = links.borrow_and_update()[idx];
            match fault {
                Fault::Pass => break,
                Fault::Delay(d) => {
                    tokio::time::sleep(d).await;
                    break;
                }
                Fault::Blackhole => {
                    if links.changed().await.is_err() {
                        return;
                    }
                }
                Fault::Reset => return,
            }
        }
        tokio::select! {
            r = to.write_all(&buf[..n]) => if r.is_err() { return },
            _ = reset.wait_for(|l| l[idx] == Fault::Reset) => return,
        }
    }
}

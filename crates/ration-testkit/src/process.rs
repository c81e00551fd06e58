//! Real `rationd` processes: spawning, signalling and killing them, and picking
//! ports for them. The test passes in the binary (`env!("CARGO_BIN_EXE_rationd")`,
//! which only rationd's own integration tests have).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

/// One `rationd` process, restartable from its data directory.
#[derive(Debug)]
pub struct Proc {
    /// The `rationd` binary.
    pub bin: PathBuf,
    pub id: u64,
    /// Where it listens.
    pub addr: SocketAddr,
    /// What it tells peers and clients to use (`--advertise`), if not `addr`.
    pub advertise: Option<SocketAddr>,
    pub dir: PathBuf,
    /// `--initial-cluster`.
    pub cluster: String,
    /// Further flags.
    pub args: Vec<String>,
    pub child: Option<Child>,
    /// The stderr log of every incarnation, oldest first.
    pub logs: Vec<PathBuf>,
    /// `RATION_LOG` for the node: None for `RATION_TEST_LOG` (default `warn`),
    /// `Some("")` for rationd's own default filter.
    pub log_filter: Option<String>,
}

impl Proc {
    /// A node with the flags the process tests share: a tick every 200 ms and a
    /// snapshot every 300 entries, so restarts go through snapshots too.
    pub fn new(
        bin: impl Into<PathBuf>,
        id: u64,
        addr: SocketAddr,
        dir: PathBuf,
        cluster: String,
    ) -> Self {
        let args = ["--tick-ms", "200", "--snapshot-after-entries", "300"];
        Self {
            bin: bin.into(),
            id,
            addr,
            advertise: None,
            dir,
            cluster,
            args: args.iter().map(|s| s.to_string()).collect(),
            child: None,
            logs: Vec::new(),
            log_filter: None,
        }
    }

    pub fn spawn(&mut self) {
        // A test's first start of this node: see the function.
        if let Some(wait) = self.logs.is_empty().then(crate::wait_for_a_new_day).flatten() {
            std::thread::sleep(wait);
        }
        let path = self.dir.with_extension(format!("log{}", self.logs.len()));
        let log = std::fs::File::create(&path).unwrap();
        self.logs.push(path);
        let mut cmd = Command::new(&self.bin);
        cmd.args(["--node-id", &self.id.to_string(), "--listen", &self.addr.to_string()])
            .args(["--data-dir", self.dir.to_str().unwrap(), "--initial-cluster", &self.cluster])
            .args(["--metrics-listen", "127.0.0.1:0"])
            .args(&self.args);
        if let Some(a) = self.advertise {
            cmd.args(["--advertise", &a.to_string()]);
        }
        // RATION_TEST_LOG (e.g. `info,openraft=info`) makes the nodes' logs verbose.
        match &self.log_filter {
            Some(f) if f.is_empty() => cmd.env_remove("RATION_LOG"),
            Some(f) => cmd.env("RATION_LOG", f),
            None => cmd.env(
                "RATION_LOG",
                std::env::var("RATION_TEST_LOG").unwrap_or_else(|_| "warn".into()),
            ),
        };
        let child = cmd.stdout(Stdio::null()).stderr(log).spawn().unwrap();
        self.child = Some(child);
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn running(&self) -> bool {
        self.child.is_some()
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().unwrap(); // SIGKILL (also ends a stopped process)
            c.wait().unwrap();
        }
    }

    /// Sends a signal by name (`STOP`, `CONT`, `TERM`) with kill(1).
    pub fn signal(&self, name: &str) {
        if let Some(pid) = self.pid() {
            let ok = Command::new("kill").args([&format!("-{name}"), &pid.to_string()]).status();
            assert!(ok.unwrap().success(), "kill -{name} {pid} failed");
        }
    }

    /// The last `n` lines of each incarnation's log.
    pub fn log_tail(&self, n: usize) -> String {
        let mut out = String::new();
        for (i, path) in self.logs.iter().enumerate() {
            let text = std::fs::read_to_string(path).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            out.push_str(&format!(
                "--- node {} incarnation {i} ({} lines, {}) ---\n",
                self.id,
                lines.len(),
                path.display()
            ));
            for l in &lines[lines.len().saturating_sub(n)..] {
                out.push_str(l);
                out.push('\n');
            }
        }
        out
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// `n` distinct free loopback addresses: all listeners stay bound until every port
/// is chosen, so the kernel cannot hand the same one out twice.
pub fn free_addrs(n: usize) -> Vec<SocketAddr> {
    let listeners: Vec<_> =
        (0..n).map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap()).collect();
    listeners.iter().map(|l| l.local_addr().unwrap()).collect()
}

/// `1=addr1,2=addr2,...` for `--initial-cluster`.
pub fn initial_cluster(addrs: &[SocketAddr]) -> String {
    addrs.iter().enumerate().map(|(i, a)| format!("{}={a}", i + 1)).collect::<Vec<_>>().join(",")
}

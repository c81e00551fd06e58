//! The same debit workload against etcd or Redis, for `benches/compare/run.sh`: a
//! debit subtracts `amount` from a key only if enough remains, as a quota backend
//! built on them would.
//!
//! - `etcd`: one key per client; a debit is one transaction comparing the key's
//!   `mod_revision` with the one this client last wrote (etcd's JSON gateway,
//!   `POST /v3/kv/txn`, HTTP/1.1 kept alive); a lost compare re-reads and retries.
//! - `redis`: one key per client; a debit is `EVALSHA` of a Lua script (GET, compare,
//!   DECRBY), on a server the script starts with `appendfsync always`.
//!
//! Every key starts at `--cap`. At the end each key is read back: it must equal the
//! cap minus the debits that succeeded, and never be below zero, or the run fails
//! ("overshot"). The summary line has the shape `ration-load` prints, so the script
//! reads both alike.
//!
//!   ration-compare --system redis --endpoint 127.0.0.1:6380 --clients 64 --duration-s 10

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use base64::Engine as _;
use hdrhistogram::Histogram;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum System {
    Etcd,
    Redis,
}

/// Flags.
#[derive(Debug, clap::Parser)]
struct Args {
    /// Which system to drive.
    #[arg(long, value_enum)]
    system: System,
    /// host:port of its client endpoint (etcd: any member's client URL's address).
    #[arg(long)]
    endpoint: String,
    /// Concurrent clients, each with its own key and connection.
    #[arg(long, default_value_t = 64)]
    clients: usize,
    /// Measured seconds.
    #[arg(long, default_value_t = 10)]
    duration_s: u64,
    /// Unmeasured seconds first.
    #[arg(long, default_value_t = 2)]
    warmup_s: u64,
    /// What each key starts at.
    #[arg(long, default_value_t = 1_000_000_000)]
    cap: u64,
    /// A prefix for the keys (a fresh one per run).
    #[arg(long, default_value = "debit")]
    prefix: String,
}

/// One HTTP/1.1 connection kept alive.
struct Http {
    reader: BufReader<tokio::net::tcp::OwnedReadHalf>,
    writer: tokio::net::tcp::OwnedWriteHalf,
    host: String,
}

impl Http {
    async fn connect(addr: &str) -> anyhow::Result<Self> {
        let stream = TcpStream::connect(addr).await.with_context(|| format!("connect {addr}"))?;
        stream.set_nodelay(true)?;
        let (r, w) = stream.into_split();
        Ok(Self { reader: BufReader::new(r), writer: w, host: addr.to_owned() })
    }

    async fn post(
        &mut self,
        path: &str,
        body: &serde_json::Value,
    ) -> anyhow::Result<serde_json::Value> {
        let body = body.to_string();
        let head = format!(
            "POST {path} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            self.host,
            body.len()
        );
        self.writer.write_all(head.as_bytes()).await?;
        self.writer.write_all(body.as_bytes()).await?;
        let mut status = String::new();
        self.reader.read_line(&mut status).await?;
        let mut length = None;
        let mut chunked = false;
        loop {
            let mut line = String::new();
            self.reader.read_line(&mut line).await?;
            let line = line.trim_end();
            if line.is_empty() {
                break;
            }
            let lower = line.to_ascii_lowercase();
            if let Some(v) = lower.strip_prefix("content-length:") {
                length = Some(v.trim().parse::<usize>()?);
            }
            if lower.starts_with("transfer-encoding:") && lower.contains("chunked") {
                chunked = true;
            }
        }
        let mut data = Vec::new();
        if chunked {
            loop {
                let mut size = String::new();
                self.reader.read_line(&mut size).await?;
                let n = usize::from_str_radix(size.trim(), 16)?;
                let mut chunk = vec![0; n + 2];
                self.reader.read_exact(&mut chunk).await?;
                if n == 0 {
                    break;
                }
                data.extend_from_slice(&chunk[..n]);
            }
        } else {
            let n = length.ok_or_else(|| anyhow!("no content-length: {status}"))?;
            data.resize(n, 0);
            self.reader.read_exact(&mut data).await?;
        }
        if !status.contains(" 200 ") {
            bail!("{}: {}", status.trim(), String::from_utf8_lossy(&data));
        }
        Ok(serde_json::from_slice(&data)?)
    }
}

fn b64(s: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(s)
}

fn unb64(v: &serde_json::Value) -> anyhow::Result<String> {
    let s = v.as_str().ok_or_else(|| anyhow!("not a string: {v}"))?;
    Ok(String::from_utf8(base64::engine::general_purpose::STANDARD.decode(s)?)?)
}

/// A number etcd's JSON gives as a string ("123") or leaves out (0).
fn num(v: &serde_json::Value) -> u64 {
    v.as_str().and_then(|s| s.parse().ok()).or_else(|| v.as_u64()).unwrap_or(0)
}

/// One etcd client: its key's value and the mod_revision it last saw.
struct EtcdKey {
    http: Http,
    key: String,
    value: u64,
    rev: u64,
}

impl EtcdKey {
    async fn start(addr: &str, key: String, cap: u64) -> anyhow::Result<Self> {
        let mut http = Http::connect(addr).await?;
        let put = serde_json::json!({ "key": b64(&key), "value": b64(&cap.to_string()) });
        let r = http.post("/v3/kv/put", &put).await?;
        let rev = num(&r["header"]["revision"]);
        Ok(Self { http, key, value: cap, rev })
    }

    async fn read(&mut self) -> anyhow::Result<()> {
        let r =
            self.http.post("/v3/kv/range", &serde_json::json!({ "key": b64(&self.key) })).await?;
        let kv = &r["kvs"][0];
        self.value = unb64(&kv["value"])?.parse()?;
        self.rev = num(&kv["mod_revision"]);
        Ok(())
    }

    /// Subtracts `amount` if it remains; false if it does not.
    async fn debit(&mut self, amount: u64) -> anyhow::Result<bool> {
        loop {
            if self.value < amount {
                return Ok(false);
            }
            let next = self.value - amount;
            let txn = serde_json::json!({
                "compare": [{ "key": b64(&self.key), "target": "MOD", "result": "EQUAL", "mod_revision": self.rev.to_string() }],
                "success": [{ "request_put": { "key": b64(&self.key), "value": b64(&next.to_string()) } }],
            });
            let r = self.http.post("/v3/kv/txn", &txn).await?;
            if r["succeeded"].as_bool().unwrap_or(false) {
                self.value = next;
                self.rev = num(&r["header"]["revision"]);
                return Ok(true);
            }
            self.read().await?;
        }
    }
}

/// One Redis connection speaking RESP.
struct Redis {
    reader: BufReader<tokio::net::tcp::OwnedReadHalf>,
    writer: tokio::net::tcp::OwnedWriteHalf,
}

/// A RESP reply, as far as this tool needs.
#[derive(Debug)]
enum Reply {
    Int(i64),
    Text(String),
    Nil,
}

impl Redis {
    async fn connect(addr: &str) -> anyhow::Result<Self> {
        let stream = TcpStream::connect(addr).await.with_context(|| format!("connect {addr}"))?;
        stream.set_nodelay(true)?;
        let (r, w) = stream.into_split();
        Ok(Self { reader: BufReader::new(r), writer: w })
    }

    async fn call(&mut self, args: &[&str]) -> anyhow::Result<Reply> {
        let mut out = format!("*{}\r\n", args.len());
        for a in args {
            out.push_str(&format!("${}\r\n{a}\r\n", a.len()));
        }
        self.writer.write_all(out.as_bytes()).await?;
        let mut line = String::new();
        self.reader.read_line(&mut line).await?;
        let line = line.trim_end();
        let (kind, rest) = line.split_at(1.min(line.len()));
        match kind {
            ":" => Ok(Reply::Int(rest.parse()?)),
            "+" => Ok(Reply::Text(rest.to_owned())),
            "-" => bail!("redis: {rest}"),
            "$" if rest == "-1" => Ok(Reply::Nil),
            "$" => {
                let n: usize = rest.parse()?;
                let mut data = vec![0; n + 2];
                self.reader.read_exact(&mut data).await?;
                Ok(Reply::Text(String::from_utf8_lossy(&data[..n]).into_owned()))
            }
            _ => bail!("redis: unexpected reply {line:?}"),
        }
    }
}

/// Subtracts ARGV[1] from KEYS[1] only if that much remains.
const DEBIT_LUA: &str = "local v = tonumber(redis.call('GET', KEYS[1]) or '0') \
    if v >= tonumber(ARGV[1]) then redis.call('DECRBY', KEYS[1], ARGV[1]) return 1 end return 0";

enum Client {
    Etcd(EtcdKey),
    Redis { conn: Redis, key: String, sha: String },
}

impl Client {
    async fn debit(&mut self, amount: u64) -> anyhow::Result<bool> {
        match self {
            Client::Etcd(k) => k.debit(amount).await,
            Client::Redis { conn, key, sha } => {
                match conn.call(&["EVALSHA", sha, "1", key, &amount.to_string()]).await? {
                    Reply::Int(n) => Ok(n == 1),
                    other => bail!("EVALSHA answered {other:?}"),
                }
            }
        }
    }

    /// What the key holds now, read from the server.
    async fn value(&mut self) -> anyhow::Result<i128> {
        match self {
            Client::Etcd(k) => {
                k.read().await?;
                Ok(i128::from(k.value))
            }
            Client::Redis { conn, key, .. } => match conn.call(&["GET", key]).await? {
                Reply::Text(t) => Ok(t.parse()?),
                other => bail!("GET answered {other:?}"),
            },
        }
    }
}

async fn start_client(args: &Args, i: usize) -> anyhow::Result<Client> {
    let key = format!("{}-{i}", args.prefix);
    match args.system {
        System::Etcd => Ok(Client::Etcd(EtcdKey::start(&args.endpoint, key, args.cap).await?)),
        System::Redis => {
            let mut conn = Redis::connect(&args.endpoint).await?;
            conn.call(&["SET", &key, &args.cap.to_string()]).await?;
            let sha = match conn.call(&["SCRIPT", "LOAD", DEBIT_LUA]).await? {
                Reply::Text(sha) => sha,
                other => bail!("SCRIPT LOAD answered {other:?}"),
            };
            Ok(Client::Redis { conn, key, sha })
        }
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = <Args as clap::Parser>::parse();
    let recording = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let errors = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for i in 0..args.clients {
        let mut client = start_client(&args, i).await?;
        let (recording, stop, errors) = (recording.clone(), stop.clone(), errors.clone());
        tasks.push(tokio::spawn(async move {
            let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("bounds");
            let mut debited = 0u64;
            let mut measured = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let t = Instant::now();
                match client.debit(1).await {
                    Ok(true) => {
                        debited += 1;
                        if recording.load(Ordering::Relaxed) {
                            measured += 1;
                            let _ = hist.record(t.elapsed().as_micros().max(1) as u64);
                        }
                    }
                    Ok(false) => break,
                    Err(e) => {
                        if errors.fetch_add(1, Ordering::Relaxed) < 3 {
                            eprintln!("debit failed: {e:#}");
                        }
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                }
            }
            let value = client.value().await;
            (hist, debited, measured, value)
        }));
    }
    tokio::time::sleep(Duration::from_secs(args.warmup_s)).await;
    recording.store(true, Ordering::Relaxed);
    let started = Instant::now();
    tokio::time::sleep(Duration::from_secs(args.duration_s)).await;
    recording.store(false, Ordering::Relaxed);
    let elapsed = started.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    let mut all = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    let mut ops = 0u64;
    let mut overshot = Vec::new();
    for (i, task) in tasks.into_iter().enumerate() {
        let (hist, debited, measured, value) = task.await?;
        all.add(&hist)?;
        ops += measured;
        let value = value?;
        let expected = i128::from(args.cap) - i128::from(debited);
        if value != expected || value < 0 {
            overshot.push(format!("key {i}: holds {value}, expected {expected}"));
        }
    }
    println!(
        "{ops} ops in {elapsed:.1} s: {:.0} ops/s; latency per debit: p50 {} us, p99 {} us, max {} us; {} errors",
        ops as f64 / elapsed,
        all.value_at_quantile(0.5),
        all.value_at_quantile(0.99),
        all.max(),
        errors.load(Ordering::Relaxed)
    );
    if overshot.is_empty() {
        println!("cap held: every key holds its cap minus the debits that succeeded");
        Ok(())
    } else {
        bail!("OVERSHOT: {}", overshot.join("; "))
    }
}

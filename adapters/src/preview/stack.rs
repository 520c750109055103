//! What to run for an entrypoint: detected from the checkout (Wing, Node, Procfile), or set by an
//! optional `understudy.toml` at the repository root.
//!
//! ```toml
//! # understudy.toml: every key is optional; what is missing comes from detection.
//! install = "npm ci"          # runs with network access, package scripts off (see below)
//! build = "npm run build"     # no network
//! start = "node server.js"    # gets $PORT; must answer HTTP there
//! test = "npm test"           # one test named after the command
//! health = "/healthz"         # Ready once this answers 2xx/3xx (default "/")
//! [env]
//! NODE_ENV = "production"
//!
//! # Tiers, read from the production branch's file (see docs/tiers.md):
//! [tiers.staging]
//! branches = "main"
//! smoke = "node smoke.js"
//! jobs = [{ name = "report", schedule = "0 * * * *", command = "node report.js" }]
//! [tiers.production]
//! from = "staging"            # promoted automatically unless `automatic = false`
//! ```

use std::collections::BTreeMap;
use std::path::Path;

use serde::Deserialize;
use understudy_domain::project::EntrypointRule;
use understudy_domain::tier::{ScheduledJob, TierSource, TierSpec};
use understudy_domain::values::{BranchName, BranchPattern, Entrypoint, TierName};

/// The name of the optional repository file.
pub const CONFIG_FILE: &str = "understudy.toml";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stack {
    Wing,
    Node,
    Procfile,
    Rust,
    Python,
    Custom,
}

impl Stack {
    pub fn as_str(self) -> &'static str {
        match self {
            Stack::Wing => "wing",
            Stack::Node => "node",
            Stack::Procfile => "procfile",
            Stack::Rust => "rust",
            Stack::Python => "python",
            Stack::Custom => "understudy.toml",
        }
    }
}

/// How an entrypoint's tests run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Tests {
    /// `wing test <entrypoint>`: each test in a fresh simulator, results per test.
    Wing {
        entrypoint: String,
    },
    /// One shell command; its exit code is one test result, named after the command.
    Command(String),
    None,
}

/// Everything the worker runs for one entrypoint. Commands are shell lines run inside the
/// sandbox with the checkout as working directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub stack: Stack,
    /// Fetches dependencies. The only step with network access, so it runs the package manager
    /// with package scripts turned off; `build` runs them afterwards without network.
    pub install: Option<String>,
    pub build: Option<String>,
    pub start: String,
    pub tests: Tests,
    pub health_path: String,
    /// When the started app counts as up.
    pub ready: Readiness,
    pub env: BTreeMap<String, String>,
}

/// How the worker knows that a started app is up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Readiness {
    /// `GET health_path` answers 2xx or 3xx.
    Answers,
    /// The Wing Console (`wing it`) answers at once, then compiles the app and loads it into its
    /// simulator. The app is up when the Console's `GET /trpc/app.state` says `success`; `error`
    /// means it does not compile, a build failure whose reason is `GET /trpc/app.error`.
    WingConsole,
}

/// Why no plan could be made: a user fault, shown in the build log.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    #[error("{CONFIG_FILE}, line {line}: {reason}")]
    Config { line: usize, reason: String },
    #[error("{0}")]
    Nothing(String),
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    /// The repository's entrypoints (each its own environment): Wing files, or directories
    /// holding an app; replaces detection.
    entrypoints: Option<Vec<String>>,
    install: Option<String>,
    build: Option<String>,
    start: Option<String>,
    test: Option<String>,
    health: Option<String>,
    #[serde(default)]
    env: BTreeMap<String, String>,
    tiers: Option<BTreeMap<String, TierConfig>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TierConfig {
    branches: Option<String>,
    tags: Option<String>,
    from: Option<String>,
    automatic: Option<bool>,
    #[serde(default)]
    env: BTreeMap<String, String>,
    smoke: Option<String>,
    #[serde(default)]
    jobs: Vec<JobConfig>,
    push_to: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct JobConfig {
    name: String,
    schedule: String,
    command: String,
}

/// The tiers a repository file declares, checked as a whole and ordered so that every
/// promotion source comes first: `Ok(None)` when it declares none.
pub fn configured_tiers(text: &str) -> Result<Option<Vec<TierSpec>>, PlanError> {
    let Some(tiers) = parse_config(text)?.tiers else { return Ok(None) };
    let line_of = |name: &str| text.lines().position(|l| l.trim_start().starts_with(&format!("[tiers.{name}]"))).map_or(1, |i| i + 1);
    let mut specs = Vec::new();
    for (name, tier) in tiers {
        let invalid = |reason: String| PlanError::Config { line: line_of(&name), reason: format!("tier {name}: {reason}") };
        let tier_name = TierName::parse(name.as_str()).map_err(|e| invalid(e.to_string()))?;
        let source = match (tier.branches, tier.from, tier.tags) {
            (Some(pattern), None, None) if tier.automatic.is_none() => {
                TierSource::Branches { pattern: BranchPattern::parse(pattern).map_err(|e| invalid(e.to_string()))? }
            }
            (None, None, Some(pattern)) if tier.automatic.is_none() => {
                TierSource::Tags { pattern: BranchPattern::parse(pattern).map_err(|e| invalid(e.to_string()))? }
            }
            (None, Some(from), None) => TierSource::Promotion {
                from: TierName::parse(from).map_err(|e| invalid(e.to_string()))?,
                automatic: tier.automatic.unwrap_or(true),
            },
            _ => return Err(invalid("one of `branches`, `tags`, or `from` (and `automatic`)".into())),
        };
        let jobs = tier.jobs.into_iter().map(|j| ScheduledJob { name: j.name, schedule: j.schedule, command: j.command }).collect();
        let push_to = tier.push_to.map(BranchName::parse).transpose().map_err(|e| invalid(e.to_string()))?;
        specs.push(TierSpec { name: tier_name, source, env: tier.env, smoke: tier.smoke, jobs, push_to, from_file: true });
    }
    understudy_domain::tier::validate_all(specs).map(Some).map_err(|e| PlanError::Config {
        line: text.lines().position(|l| l.trim_start().starts_with("[tiers")).map_or(1, |i| i + 1),
        reason: e.to_string(),
    })
}

fn parse_config(text: &str) -> Result<Config, PlanError> {
    toml::from_str::<Config>(text).map_err(|error| {
        let line = error.span().map(|span| text[..span.start.min(text.len())].matches('\n').count() + 1).unwrap_or(1);
        PlanError::Config { line, reason: error.message().to_string() }
    })
}

#[derive(Deserialize, Default)]
struct PackageJson {
    #[serde(default)]
    scripts: BTreeMap<String, String>,
    #[serde(default)]
    dependencies: BTreeMap<String, serde_json::Value>,
    #[serde(default, rename = "devDependencies")]
    dev_dependencies: BTreeMap<String, serde_json::Value>,
}

/// Whether `text` is a valid `understudy.toml`, with the line and reason when it is not.
pub fn check_config(text: &str) -> Result<(), PlanError> {
    configured_tiers(text).map(|_| ())
}

/// The entrypoints an `understudy.toml` lists, when it lists valid ones. A file that does not
/// parse lists none here: detection applies, and the build reports the file's error.
pub fn configured_entrypoints(text: &str) -> Option<Vec<Entrypoint>> {
    let listed = parse_config(text).ok()?.entrypoints?;
    let parsed: Vec<Entrypoint> = listed.iter().filter_map(|e| Entrypoint::parse(e.as_str()).ok()).collect();
    (!parsed.is_empty() && parsed.len() == listed.len()).then_some(parsed)
}

/// The entrypoints of a commit: a project's listed ones, else the repository file's, else what
/// detection finds among the root files.
pub fn select_entrypoints(rule: &EntrypointRule, root_files: &[String], config: Option<&str>) -> Vec<Entrypoint> {
    match (rule, config.and_then(configured_entrypoints)) {
        (EntrypointRule::Detect, Some(listed)) => listed,
        _ => rule.select(root_files),
    }
}

/// The directory an entrypoint's app lives in, relative to the checkout: the root for Wing
/// files and `.`, the entrypoint itself when it names a directory.
pub fn app_dir(entrypoint: &str) -> &str {
    if entrypoint.ends_with(".w") || entrypoint == "." {
        "."
    } else {
        entrypoint.trim_end_matches('/')
    }
}

/// The plan for `entrypoint` (`main.w`, `api.main.w`, or `.` for the repository's one app) in
/// the checkout at `root`.
pub fn plan(root: &Path, entrypoint: &str) -> Result<Plan, PlanError> {
    let dir = app_dir(entrypoint);
    if dir != "." {
        // An app in a directory of its own: planned from there (its own understudy.toml,
        // package.json, …), as if it were a repository root.
        if !root.join(dir).is_dir() {
            return Err(PlanError::Nothing(format!("entrypoint {entrypoint} is not a directory of this commit")));
        }
        return plan(&root.join(dir), ".");
    }
    let read = |name: &str| std::fs::read_to_string(root.join(name)).ok();
    let config = match read(CONFIG_FILE) {
        Some(text) => {
            // Tiers that do not hold together fail every build of the commit, with the reason.
            configured_tiers(&text)?;
            Some(parse_config(&text)?)
        }
        None => None,
    };
    let package = match read("package.json") {
        Some(text) => Some(
            serde_json::from_str::<PackageJson>(&text)
                .map_err(|e| PlanError::Nothing(format!("package.json does not parse: {e} (line {})", e.line())))?,
        ),
        None => None,
    };
    let has_lock = root.join("package-lock.json").exists();
    let npm_install = package.as_ref().filter(|p| !p.dependencies.is_empty() || !p.dev_dependencies.is_empty()).map(|_| {
        if has_lock { "npm ci --ignore-scripts --no-audit --no-fund" } else { "npm install --ignore-scripts --no-audit --no-fund" }
            .to_string()
    });
    // Package scripts were skipped while fetching; run them now, offline.
    let npm_rebuild = npm_install.as_ref().map(|_| "npm rebuild --no-audit --no-fund".to_string());
    // Python: a virtualenv kept in the environment's cache, wheels only while online (an sdist
    // would run its build code with network).
    let has_requirements = root.join("requirements.txt").is_file();
    let pip_install = has_requirements.then(|| {
        "python3 -m venv /cache/venv && /cache/venv/bin/pip install --quiet --disable-pip-version-check --only-binary :all: -r requirements.txt"
            .to_string()
    });
    let is_rust = root.join("Cargo.toml").is_file();
    // Rust: crates fetched online into the cache's CARGO_HOME, built offline into its target dir
    // (kept between deployments: warm builds are incremental).
    let cargo_fetch = is_rust.then(|| "cargo fetch".to_string());
    let any_install = |parts: [Option<String>; 3]| Some(join(parts)).filter(|s| !s.is_empty());

    let mut plan = if entrypoint.ends_with(".w") {
        if !root.join(entrypoint).is_file() {
            return Err(PlanError::Nothing(format!("entrypoint {entrypoint} is not in this commit")));
        }
        let quoted = shell_quote(entrypoint);
        Plan {
            stack: Stack::Wing,
            install: npm_install,
            // `wing it` compiles the app itself, and the Wing Console reports how that went.
            build: npm_rebuild,
            start: format!("wing it {quoted} --no-open -p \"$PORT\""),
            tests: Tests::Wing { entrypoint: entrypoint.to_string() },
            health_path: "/".into(),
            ready: Readiness::WingConsole,
            env: BTreeMap::new(),
        }
    } else if let Some(package) = package.as_ref().filter(|p| p.scripts.contains_key("start")) {
        let build = package.scripts.contains_key("build").then(|| "npm run build".to_string());
        Plan {
            stack: Stack::Node,
            install: npm_install,
            build: Some(join([npm_rebuild, build])).filter(|b| !b.is_empty()),
            start: "npm start".into(),
            tests: if package.scripts.contains_key("test") { Tests::Command("npm test".into()) } else { Tests::None },
            health_path: "/".into(),
            ready: Readiness::Answers,
            env: BTreeMap::new(),
        }
    } else if let Some(web) = read("Procfile").as_deref().and_then(procfile_web) {
        Plan {
            stack: Stack::Procfile,
            install: any_install([npm_install, pip_install, cargo_fetch]),
            build: if is_rust { Some(join([npm_rebuild, Some("cargo build --release --offline".into())])) } else { npm_rebuild },
            start: web,
            tests: Tests::None,
            health_path: "/".into(),
            ready: Readiness::Answers,
            env: BTreeMap::new(),
        }
    } else if is_rust {
        Plan {
            stack: Stack::Rust,
            install: cargo_fetch,
            build: Some("cargo build --release --offline".into()),
            start: "cargo run --release --offline --quiet".into(),
            tests: Tests::Command("cargo test --release --offline".into()),
            health_path: "/".into(),
            ready: Readiness::Answers,
            env: BTreeMap::new(),
        }
    } else if let Some(main) = ["app.py", "main.py"].into_iter().find(|f| root.join(f).is_file()) {
        let has_tests = root.join("tests").is_dir()
            || std::fs::read_dir(root).is_ok_and(|dir| {
                dir.flatten().any(|e| e.file_name().to_str().is_some_and(|n| n.starts_with("test_") && n.ends_with(".py")))
            });
        let pytest = read("requirements.txt").is_some_and(|r| r.lines().any(|l| l.trim().to_ascii_lowercase().starts_with("pytest")));
        Plan {
            stack: Stack::Python,
            install: pip_install,
            build: None,
            start: format!("python3 {main}"),
            tests: match (has_tests, pytest) {
                (false, _) => Tests::None,
                (true, true) => Tests::Command("python3 -m pytest".into()),
                (true, false) => Tests::Command("python3 -m unittest discover".into()),
            },
            health_path: "/".into(),
            ready: Readiness::Answers,
            env: BTreeMap::new(),
        }
    } else if config.as_ref().is_some_and(|c| c.start.is_some()) {
        Plan {
            stack: Stack::Custom,
            install: None,
            build: None,
            start: String::new(),
            tests: Tests::None,
            health_path: "/".into(),
            ready: Readiness::Answers,
            env: BTreeMap::new(),
        }
    } else {
        return Err(PlanError::Nothing(format!(
            "nothing to run for entrypoint {entrypoint}: no main.w, no package.json with a start script, no Procfile web \
             process, no Cargo.toml, no app.py or main.py, and no start command in {CONFIG_FILE}"
        )));
    };
    if let Some(config) = config {
        if config.install.is_some() {
            plan.install = config.install;
        }
        if config.build.is_some() {
            plan.build = config.build;
        }
        if let Some(start) = config.start {
            plan.start = start;
            plan.ready = Readiness::Answers;
        }
        if let Some(test) = config.test {
            plan.tests = Tests::Command(test);
        }
        if let Some(health) = config.health {
            if !health.starts_with('/') {
                return Err(PlanError::Config { line: 1, reason: format!("health must be a path starting with '/', not {health:?}") });
            }
            plan.health_path = health;
            plan.ready = Readiness::Answers;
        }
        plan.env = config.env;
    }
    Ok(plan)
}

fn join(parts: impl IntoIterator<Item = Option<String>>) -> String {
    parts.into_iter().flatten().collect::<Vec<_>>().join(" && ")
}

/// The `web:` process of a Procfile.
fn procfile_web(text: &str) -> Option<String> {
    text.lines().find_map(|line| line.trim().strip_prefix("web:").map(|cmd| cmd.trim().to_string())).filter(|c| !c.is_empty())
}

/// Quotes `s` for a POSIX shell.
pub fn shell_quote(s: &str) -> String {
    if !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || "-_./=:".contains(c)) {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn repo(files: &[(&str, &str)]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().expect("temp dir");
        for (name, text) in files {
            std::fs::write(dir.path().join(name), text).expect("write");
        }
        dir
    }

    #[test]
    fn wing_entrypoints_compile_serve_the_console_and_test_with_wing() {
        let dir = repo(&[("main.w", "bring cloud;"), ("api.main.w", "bring cloud;")]);
        let plan = plan(dir.path(), "api.main.w").expect("plan");
        assert_eq!(plan.stack, Stack::Wing);
        assert_eq!(plan.build, None, "`wing it` compiles the app");
        assert_eq!(plan.start, "wing it api.main.w --no-open -p \"$PORT\"");
        assert_eq!(plan.ready, Readiness::WingConsole);
        assert_eq!(plan.tests, Tests::Wing { entrypoint: "api.main.w".into() });
        assert!(plan.install.is_none(), "no package.json, nothing to fetch");
        assert!(matches!(super::plan(dir.path(), "gone.main.w"), Err(PlanError::Nothing(_))));

        // A start or health check of one's own is waited for as any app's: by its answer.
        for file in ["start = \"node server.js\"\n", "health = \"/up\"\n"] {
            let dir = repo(&[("main.w", "bring cloud;"), (CONFIG_FILE, file)]);
            assert_eq!(super::plan(dir.path(), "main.w").expect("plan").ready, Readiness::Answers, "{file}");
        }
    }

    #[test]
    fn node_apps_install_without_scripts_then_rebuild_offline() {
        let dir = repo(&[
            ("package.json", r#"{"scripts":{"start":"node index.js","test":"node test.js"},"dependencies":{"left-pad":"1"}}"#),
            ("package-lock.json", "{}"),
        ]);
        let plan = plan(dir.path(), ".").expect("plan");
        assert_eq!(plan.stack, Stack::Node);
        assert_eq!(plan.install.as_deref(), Some("npm ci --ignore-scripts --no-audit --no-fund"));
        assert_eq!(plan.build.as_deref(), Some("npm rebuild --no-audit --no-fund"));
        assert_eq!(plan.start, "npm start");
        assert_eq!(plan.tests, Tests::Command("npm test".into()));
    }

    #[test]
    fn procfile_web_and_the_repository_file_override_detection() {
        let dir = repo(&[
            ("Procfile", "worker: ./work\nweb: python3 -m http.server $PORT\n"),
            (CONFIG_FILE, "test = \"./check\"\nhealth = \"/up\"\n[env]\nMODE = \"preview\"\n"),
        ]);
        let plan = plan(dir.path(), ".").expect("plan");
        assert_eq!(plan.stack, Stack::Procfile);
        assert_eq!(plan.start, "python3 -m http.server $PORT");
        assert_eq!(plan.tests, Tests::Command("./check".into()));
        assert_eq!(plan.health_path, "/up");
        assert_eq!(plan.env.get("MODE").map(String::as_str), Some("preview"));
    }

    #[test]
    fn a_bad_repository_file_names_its_line_and_reason() {
        let dir = repo(&[(CONFIG_FILE, "start = \"node a.js\"\n\nbuild = [1, 2]\n")]);
        match plan(dir.path(), ".") {
            Err(PlanError::Config { line, reason }) => {
                assert_eq!(line, 3);
                assert!(reason.contains("string"), "{reason}");
            }
            other => panic!("expected a config error, got {other:?}"),
        }
        let dir = repo(&[(CONFIG_FILE, "strat = \"typo\"\n")]);
        assert!(matches!(plan(dir.path(), "."), Err(PlanError::Config { line: 1, .. })));
        let dir = repo(&[(CONFIG_FILE, "start = \"x\"\nhealth = \"up\"\n")]);
        assert!(matches!(plan(dir.path(), "."), Err(PlanError::Config { .. })));
    }

    #[test]
    fn a_repository_with_nothing_to_run_says_so() {
        let dir = repo(&[("README.md", "hi")]);
        let error = plan(dir.path(), ".").expect_err("nothing to run");
        assert!(error.to_string().contains("nothing to run"), "{error}");
    }

    #[test]
    fn rust_builds_offline_after_fetching_and_python_runs_from_a_cached_virtualenv() {
        let dir = repo(&[("Cargo.toml", "[package]\nname = \"app\"\n")]);
        let plan = super::plan(dir.path(), ".").expect("plan");
        assert_eq!(plan.stack, Stack::Rust);
        assert_eq!(plan.install.as_deref(), Some("cargo fetch"));
        assert_eq!(plan.build.as_deref(), Some("cargo build --release --offline"));
        assert_eq!(plan.tests, Tests::Command("cargo test --release --offline".into()));

        let dir = repo(&[("requirements.txt", "pytest==8\n"), ("app.py", ""), ("test_app.py", "")]);
        let plan = super::plan(dir.path(), ".").expect("plan");
        assert_eq!(plan.stack, Stack::Python);
        assert!(plan.install.as_deref().is_some_and(|i| i.contains("--only-binary :all:")), "{plan:?}");
        assert_eq!(plan.start, "python3 app.py");
        assert_eq!(plan.tests, Tests::Command("python3 -m pytest".into()));

        let dir = repo(&[("main.py", ""), ("Procfile", "web: python3 main.py --port $PORT\n"), ("requirements.txt", "")]);
        let plan = super::plan(dir.path(), ".").expect("plan");
        assert_eq!(plan.stack, Stack::Procfile, "a Procfile says how to start");
        assert!(plan.install.as_deref().is_some_and(|i| i.contains("pip install")), "and its requirements are installed");
    }

    #[test]
    fn the_repository_file_can_list_entrypoints_including_app_directories() {
        let files: Vec<String> = ["main.w", "understudy.toml"].iter().map(|s| s.to_string()).collect();
        let listed = |text: &str| -> Vec<String> {
            select_entrypoints(&EntrypointRule::Detect, &files, Some(text)).into_iter().map(String::from).collect()
        };
        assert_eq!(listed("entrypoints = [\"web\", \"api.main.w\"]\n"), ["web", "api.main.w"]);
        assert_eq!(listed("build = \"x\"\n"), ["main.w"], "no list: detection");
        assert_eq!(listed("entrypoints = [\"../escape\"]\n"), ["main.w"], "an invalid list: detection, the build says why");
        assert_eq!(listed("not toml ["), ["main.w"]);
        let dir = repo(&[]);
        std::fs::create_dir_all(dir.path().join("web")).expect("mkdir");
        std::fs::write(dir.path().join("web/package.json"), r#"{"scripts":{"start":"node s.js"}}"#).expect("write");
        let plan = plan(dir.path(), "web").expect("a directory's app");
        assert_eq!(plan.stack, Stack::Node);
        assert_eq!(app_dir("web/"), "web");
        assert_eq!(app_dir("api.main.w"), ".");
        assert!(matches!(super::plan(dir.path(), "missing"), Err(PlanError::Nothing(_))));
    }

    #[test]
    fn the_repository_file_declares_tiers_in_promotion_order_or_says_what_is_wrong() {
        let file = "start = \"node server.js\"\n[tiers.production]\nfrom = \"staging\"\n[tiers.staging]\nbranches = \"main\"\nsmoke = \"node smoke.js\"\njobs = [{ name = \"report\", schedule = \"0 * * * *\", command = \"node report.js\" }]\n";
        let tiers = configured_tiers(file).expect("valid").expect("declared");
        let names: Vec<&str> = tiers.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, ["staging", "production"], "a source before the tiers promoted from it");
        assert!(tiers.iter().all(|t| t.from_file));
        assert_eq!(tiers[0].jobs[0].name, "report");
        assert_eq!(configured_tiers("start = \"x\"\n").expect("valid"), None);
        for (bad, line, says) in [
            ("[tiers.production]\nfrom = \"nowhere\"\n", 1, "not declared"),
            ("start = \"x\"\n\n[tiers.qa]\nbranches = \"qa\"\nfrom = \"qa\"\n", 3, "one of"),
            ("[tiers.qa]\nbranches = \"has space\"\n", 1, "branch name"),
            ("[tiers.qa]\nbranches = \"qa\"\nbogus = 1\n", 3, "unknown field"),
            ("[tiers.qa]\nbranches = \"qa\"\njobs = [{ name = \"x\", schedule = \"never\", command = \"true\" }]\n", 1, "never"),
        ] {
            match configured_tiers(bad) {
                Err(PlanError::Config { line: l, reason }) => {
                    assert_eq!(l, line, "{bad}: {reason}");
                    assert!(reason.contains(says), "{bad}: {reason}");
                }
                other => panic!("{bad}: {other:?}"),
            }
        }
    }

    #[test]
    fn shell_quoting() {
        assert_eq!(shell_quote("main.w"), "main.w");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
        assert_eq!(shell_quote("a b"), "'a b'");
    }
}

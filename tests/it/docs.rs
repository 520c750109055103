//! The docs cannot rot: every `understudy …` command shown in README.md and docs/ names commands
//! and flags the binary really has.

use std::process::Command;

use understudy_tests::understudy_bin;

/// Lines of shell code blocks that run `understudy`, with the leading variables stripped.
fn documented_commands() -> Vec<(String, String)> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut files = vec![root.join("README.md")];
    for entry in std::fs::read_dir(root.join("docs")).expect("docs/") {
        let path = entry.expect("entry").path();
        if path.extension().is_some_and(|e| e == "md") {
            files.push(path);
        }
    }
    let mut commands = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(&file).expect("read");
        let mut in_shell = false;
        for line in text.lines() {
            if line.starts_with("```") {
                in_shell = line.trim() == "```sh";
                continue;
            }
            if !in_shell {
                continue;
            }
            let words: Vec<&str> = line.split_whitespace().skip_while(|w| w.contains('=')).collect();
            if words.first() == Some(&"understudy") {
                let command = words.iter().take_while(|w| **w != "#").copied().collect::<Vec<_>>().join(" ");
                commands.push((file.file_name().unwrap_or_default().to_string_lossy().into_owned(), command));
            }
        }
    }
    commands
}

#[test]
fn every_documented_command_exists_with_its_flags() {
    let commands = documented_commands();
    assert!(commands.len() >= 15, "found only {} documented commands", commands.len());
    for (file, command) in commands {
        let words: Vec<&str> = command.split_whitespace().skip(1).collect();
        // The subcommand path: leading words that are names, not values or flags.
        let path: Vec<&str> =
            words.iter().take_while(|w| w.chars().all(|c| c.is_ascii_lowercase() || c == '-') && !w.starts_with('-')).copied().collect();
        let help = Command::new(understudy_bin()).args(&path).arg("--help").output().expect("run");
        assert!(help.status.success(), "{file}: `{command}`: `understudy {} --help` failed", path.join(" "));
        let text = String::from_utf8_lossy(&help.stdout);
        for flag in words.iter().filter(|w| w.starts_with("--")) {
            let flag = flag.split('=').next().unwrap_or(flag);
            assert!(text.contains(flag), "{file}: `{command}`: `understudy {}` has no {flag}", path.join(" "));
        }
    }
}

/// The documented commands that read or rebuild data, and every `tier` command (declaring,
/// listing, removing, promoting), run for real against a database with a pull request's
/// environment and a project whose staging branch passed in it; placeholders become their ids.
/// Commands that run servers (up, api, relay, projector), call GitHub (project create) or take
/// minutes (bench) are checked above for their names and flags only.
#[tokio::test]
async fn documented_operator_commands_run_against_real_data() {
    use understudy_domain::ids::{DeploymentId, ProjectId};
    use understudy_tests::fixtures::{self, meta};

    let env = understudy_tests::TestEnv::new().await;
    let project = ProjectId(uuid::Uuid::new_v4());
    let spec = fixtures::spec(project, 1, "main.w");
    let id = fixtures::env_id(&spec).0;
    let deployment = DeploymentId(uuid::Uuid::new_v4());
    let store = &env.runtime.store.environments;
    let correlation =
        store.execute(id, fixtures::request(&spec, deployment, 1), meta()).await.expect("request").events[0].payload.meta.correlation_id;
    for command in fixtures::to_ready(deployment) {
        store.execute(id, command, meta()).await.expect("to ready");
    }
    // The project, with a staging tier whose main branch passed, for the `tier` commands.
    {
        use understudy_domain::environment::{EnvironmentCommand, EnvironmentSpec};
        use understudy_domain::project::{EntrypointRule, ProjectCommand};
        use understudy_domain::tier::{TierSource, TierSpec};
        use understudy_domain::values::{BranchName, BranchPattern, Entrypoint, ProjectName, RepoFullName, Target, TierName};
        let create = ProjectCommand::Create {
            project_id: project,
            account_id: understudy_domain::ids::AccountId(uuid::Uuid::new_v4()),
            name: ProjectName::parse("docs").expect("name"),
            repository: RepoFullName::parse("octo/docs").expect("repo"),
            production_branch: BranchName::parse("main").expect("branch"),
            entrypoints: EntrypointRule::Detect,
            at: chrono::Utc::now(),
        };
        env.runtime.store.projects.execute(project.0, create, meta()).await.expect("project");
        let staging = TierSpec {
            name: TierName::parse("staging").expect("tier"),
            source: TierSource::Branches { pattern: BranchPattern::parse("main").expect("pattern") },
            env: Default::default(),
            smoke: None,
            jobs: vec![],
            push_to: None,
            from_file: false,
        };
        env.runtime
            .store
            .projects
            .execute(project.0, ProjectCommand::SetTier { tier: staging, at: chrono::Utc::now() }, meta())
            .await
            .expect("tier");
        let main = EnvironmentSpec {
            project_id: project,
            target: Target::Branch { branch: BranchName::parse("main").expect("branch") },
            entrypoint: Entrypoint::parse("main.w").expect("entrypoint"),
        };
        let main_id = fixtures::env_id(&main).0;
        let passed = DeploymentId(uuid::Uuid::new_v4());
        store.execute(main_id, fixtures::request(&main, passed, 7), meta()).await.expect("request");
        for command in fixtures::to_ready(passed) {
            store.execute(main_id, command, meta()).await.expect("to ready");
        }
        store
            .execute(main_id, EnvironmentCommand::CompleteTests { deployment_id: passed, at: chrono::Utc::now() }, meta())
            .await
            .expect("tests");
    }
    understudy_tests::sequence_all(env.pool()).await;
    env.project(understudy_projections::all()).await;
    let runnable = ["events", "trace", "state", "verify", "usage", "status", "replay", "github", "tier"];
    let now = chrono::Utc::now().to_rfc3339();
    let mut ran = 0;
    for (file, command) in documented_commands() {
        let mut words: Vec<String> = command.split_whitespace().skip(1).map(str::to_string).collect();
        if !words.first().is_some_and(|w| runnable.contains(&w.as_str())) {
            continue;
        }
        if let Some(redirect) = words.iter().position(|w| w == ">") {
            words.truncate(redirect);
        }
        let mut run = if words[0] == "tier" {
            // Through a shell, as a reader would type it (patterns and jobs are quoted).
            let line =
                command.replacen("understudy", &understudy_bin().display().to_string(), 1).replace("<project-id>", &project.to_string());
            let mut shell = Command::new("/bin/sh");
            shell.arg("-c").arg(line);
            shell
        } else {
            Command::new(understudy_bin())
        };
        for i in 0..words.len() {
            let replacement = match words[i].as_str() {
                "<id>" | "<environment-id>" => Some(id.to_string()),
                "<correlation-id>" => Some(correlation.to_string()),
                _ if i > 0 && words[i - 1] == "--at" => Some(now.clone()),
                _ => None,
            };
            if let Some(replacement) = replacement {
                words[i] = replacement;
            }
        }
        if words[0] != "tier" {
            run.args(&words);
        }
        let output = run.env("DATABASE_URL", &env.database_url).output().expect("run");
        assert!(
            output.status.success(),
            "{file}: `{command}` failed:\n{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        ran += 1;
    }
    assert!(ran >= 18, "ran only {ran} documented commands");
}

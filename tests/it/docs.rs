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

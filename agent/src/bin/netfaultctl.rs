//! netfaultctl: the command-line client of netfaultd's API, on its unix
//! socket or (`--url`, `--token-file`) on its loopback TCP listener.

use std::io::Read;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{SystemTime, UNIX_EPOCH};

use clap::{Parser, Subcommand, ValueEnum};
use netfault_api::wire::DEFAULT_SOCKET;
use netfault_api::{Client, ClientError, Fault};
use serde_json::Value;

#[path = "../ctl/input.rs"]
mod input;
#[path = "../ctl/render.rs"]
mod render;

#[derive(Debug, Parser)]
#[command(
    name = "netfaultctl",
    version,
    about = "Inject network faults into pods and network namespaces through netfaultd"
)]
struct Cli {
    /// netfaultd's unix socket.
    #[arg(long, global = true, env = "NETFAULT_SOCKET", default_value = DEFAULT_SOCKET)]
    socket: PathBuf,
    /// Talk to netfaultd's TCP listener at this URL (http://HOST:PORT, e.g.
    /// the local end of `kubectl port-forward`) instead of the socket.
    #[arg(
        long,
        global = true,
        env = "NETFAULT_URL",
        value_name = "URL",
        requires = "token_file"
    )]
    url: Option<String>,
    /// File holding the bearer token for --url (whitespace trimmed).
    #[arg(long, global = true, env = "NETFAULT_TOKEN_FILE", value_name = "PATH")]
    token_file: Option<PathBuf>,
    /// Output format.
    #[arg(short = 'o', long, global = true, value_enum, default_value_t = Output::Table)]
    output: Output,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Output {
    Table,
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// List the enrolled sandboxes (pods and namespaces).
    Sandboxes,
    /// Create faults from a JSON file: one fault object or an array of them.
    Apply {
        /// The file to read, or `-` for standard input.
        #[arg(short = 'f', long = "filename", value_name = "FILE")]
        file: String,
    },
    /// List faults with their state and counters.
    List,
    /// Show one fault.
    Get {
        /// The fault's id.
        id: String,
    },
    /// Remove a fault (succeeds when it is already gone).
    Delete {
        /// The fault's id.
        id: String,
    },
    /// Ask whether netfaultd is ready.
    Health,
}

/// Everything that makes netfaultctl exit 1, printed as one `error: ...` line
/// (plus a note on what was done when a batch stopped half-way).
#[derive(Debug)]
enum CtlError {
    Client(Box<ClientError>),
    Input(String),
    Other(String),
    /// `apply` stopped at `label`; `created` were created before it.
    Partial {
        label: String,
        error: Box<ClientError>,
        created: Vec<String>,
    },
}

impl From<ClientError> for CtlError {
    fn from(e: ClientError) -> Self {
        CtlError::Client(Box::new(e))
    }
}

fn describe(e: &ClientError) -> String {
    match e {
        ClientError::Api {
            status: 401,
            message,
            ..
        } => format!("{message} (check --token-file or NETFAULT_TOKEN_FILE)"),
        ClientError::Api { field, message, .. } => match field {
            Some(f) if !f.is_empty() => format!("{message} (field {f})"),
            _ => message.clone(),
        },
        ClientError::Connect { path, source } => format!(
            "cannot reach netfaultd at {}: {source} (is netfaultd running? use --socket or NETFAULT_SOCKET for another path)",
            path.display()
        ),
        ClientError::ConnectTcp { url, source } => format!(
            "cannot reach netfaultd at {url}: {source} (is the port forwarded and netfaultd started with --listen-tcp? check --url or NETFAULT_URL)"
        ),
        ClientError::Url { url, reason } => format!("--url {url}: {reason}"),
        other => other.to_string(),
    }
}

impl CtlError {
    fn message(&self) -> String {
        match self {
            CtlError::Client(e) => format!("error: {}", describe(e)),
            CtlError::Input(m) | CtlError::Other(m) => format!("error: {m}"),
            CtlError::Partial {
                label,
                error,
                created,
            } => {
                let done = if created.is_empty() {
                    "no fault was created".to_string()
                } else {
                    format!("created before it (still active): {}", created.join(", "))
                };
                format!("error: {label}: {}\n{done}", describe(error))
            }
        }
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

fn pretty(v: &Value) -> Result<String, CtlError> {
    serde_json::to_string_pretty(v).map_err(|e| CtlError::Other(format!("cannot print JSON: {e}")))
}

fn bad_answer(what: &str, e: serde_json::Error) -> CtlError {
    CtlError::Other(format!("unexpected {what} from netfaultd: {e}"))
}

fn array(v: Value, what: &str) -> Result<Vec<Value>, CtlError> {
    match v {
        Value::Array(a) => Ok(a),
        other => Err(CtlError::Other(format!(
            "unexpected {what} from netfaultd: expected a JSON array, got {other}"
        ))),
    }
}

fn read_input(file: &str) -> Result<String, CtlError> {
    let mut text = String::new();
    if file == "-" {
        std::io::stdin()
            .read_to_string(&mut text)
            .map_err(|e| CtlError::Input(format!("cannot read standard input: {e}")))?;
    } else {
        text = std::fs::read_to_string(file)
            .map_err(|e| CtlError::Input(format!("cannot read {file}: {e}")))?;
    }
    Ok(text)
}

fn apply(client: &Client, file: &str, output: Output) -> Result<String, CtlError> {
    let text = read_input(file)?;
    let items = input::parse_faults(&text).map_err(|e| {
        let name = if file == "-" { "<stdin>" } else { file };
        CtlError::Input(format!("{e} (in {name}; nothing was applied)"))
    })?;
    let mut created: Vec<Value> = Vec::with_capacity(items.len());
    let mut ids: Vec<String> = Vec::with_capacity(items.len());
    for item in &items {
        match client.call("POST", "/v1/faults", Some(&item.value)) {
            Ok(v) => {
                ids.push(v["id"].as_str().unwrap_or("?").to_string());
                created.push(v);
            }
            Err(error) => {
                // Print what did get created, so the caller can clean up.
                let done = apply_output(&ids, &created, output)?;
                if !done.is_empty() {
                    print!("{done}");
                }
                return Err(CtlError::Partial {
                    label: item.label.clone(),
                    error: Box::new(error),
                    created: ids,
                });
            }
        }
    }
    apply_output(&ids, &created, output)
}

fn apply_output(ids: &[String], created: &[Value], output: Output) -> Result<String, CtlError> {
    match output {
        Output::Table => Ok(ids.iter().map(|id| format!("created {id}\n")).collect()),
        Output::Json if created.is_empty() => Ok(String::new()),
        Output::Json => Ok(format!("{}\n", pretty(&Value::Array(created.to_vec()))?)),
    }
}

fn health(client: &Client, output: Output) -> Result<String, CtlError> {
    let resp = client.raw("GET", "/healthz", None)?;
    let body = String::from_utf8_lossy(&resp.body).trim().to_string();
    if resp.status != 200 {
        let detail = resp
            .json()
            .ok()
            .and_then(|v| v["error"]["message"].as_str().map(str::to_string))
            .unwrap_or(body);
        return Err(CtlError::Other(format!(
            "netfaultd at {} is not ready (HTTP {}){}",
            client.endpoint(),
            resp.status,
            if detail.is_empty() {
                String::new()
            } else {
                format!(": {detail}")
            }
        )));
    }
    Ok(match output {
        Output::Json => match resp.json() {
            Ok(v) if !v.is_null() => format!("{}\n", pretty(&v)?),
            _ => "{\"status\": \"ok\"}\n".to_string(),
        },
        Output::Table => format!("ok ({})\n", client.endpoint()),
    })
}

/// `--token-file`: its content, whitespace trimmed, printable ASCII.
fn read_token(path: &std::path::Path) -> Result<String, CtlError> {
    let name = path.display();
    let text = std::fs::read(path)
        .map_err(|e| CtlError::Input(format!("--token-file {name}: cannot read it: {e}")))?;
    let token = text.trim_ascii();
    if token.is_empty() {
        return Err(CtlError::Input(format!(
            "--token-file {name}: the file holds no token"
        )));
    }
    if !token.iter().all(|b| (0x21..=0x7e).contains(b)) {
        return Err(CtlError::Input(format!(
            "--token-file {name}: the token must be printable ASCII without spaces"
        )));
    }
    Ok(String::from_utf8_lossy(token).into_owned())
}

/// The client the flags ask for: the TCP listener with a token (`--url`),
/// or the unix socket.
fn client_of(cli: &Cli) -> Result<Client, CtlError> {
    match (&cli.url, &cli.token_file) {
        (Some(url), Some(file)) => {
            let token = read_token(file)?;
            Ok(Client::tcp(url)?.with_token(token))
        }
        (Some(url), None) => Err(CtlError::Input(format!(
            "--url {url} needs --token-file (or NETFAULT_TOKEN_FILE)"
        ))),
        (None, _) => Ok(Client::new(&cli.socket)),
    }
}

fn run(cli: Cli) -> Result<String, CtlError> {
    let client = client_of(&cli)?;
    let out = cli.output;
    match cli.command {
        Command::Sandboxes => {
            let v = client.call("GET", "/v1/sandboxes", None)?;
            if out == Output::Json {
                return Ok(format!("{}\n", pretty(&v)?));
            }
            let items = array(v, "sandbox list")?;
            render::sandboxes_table(&items).map_err(|e| bad_answer("sandbox list", e))
        }
        Command::Apply { file } => apply(&client, &file, out),
        Command::List => {
            let v = client.call("GET", "/v1/faults", None)?;
            if out == Output::Json {
                return Ok(format!("{}\n", pretty(&v)?));
            }
            let faults: Vec<Fault> =
                serde_json::from_value(v).map_err(|e| bad_answer("fault list", e))?;
            Ok(render::faults_table(&faults, now_ms()))
        }
        Command::Get { id } => {
            let path = format!("/v1/faults/{}", input::path_segment(&id));
            let v = client.call("GET", &path, None)?;
            if out == Output::Json {
                return Ok(format!("{}\n", pretty(&v)?));
            }
            let f: Fault = serde_json::from_value(v).map_err(|e| bad_answer("fault", e))?;
            Ok(render::fault_detail(&f, now_ms()))
        }
        Command::Delete { id } => {
            let path = format!("/v1/faults/{}", input::path_segment(&id));
            match client.call("DELETE", &path, None) {
                Ok(_) => {}
                // Deleting is idempotent: a fault that is already gone is deleted.
                Err(ClientError::Api { status: 404, .. }) => {}
                Err(e) => return Err(e.into()),
            }
            Ok(match out {
                Output::Table => format!("deleted {id}\n"),
                Output::Json => format!("{}\n", serde_json::json!({"deleted": id})),
            })
        }
        Command::Health => health(&client, out),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(text) => {
            print!("{text}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{}", e.message());
            ExitCode::from(1)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;
    use netfault_api::ErrorCode;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn global_flags_parse_after_the_subcommand() {
        let cli = Cli::try_parse_from(["netfaultctl", "list", "-o", "json", "--socket", "/tmp/s"])
            .expect("valid flags");
        assert_eq!(cli.output, Output::Json);
        assert_eq!(cli.socket, PathBuf::from("/tmp/s"));
        let cli = Cli::try_parse_from(["netfaultctl", "apply", "-f", "-"]).expect("stdin");
        assert!(matches!(cli.command, Command::Apply { file } if file == "-"));
        assert!(Cli::try_parse_from(["netfaultctl", "apply"]).is_err());
        assert!(Cli::try_parse_from(["netfaultctl", "list", "-o", "yaml"]).is_err());
    }

    #[test]
    fn url_and_token_file_flags() {
        let dir = std::env::temp_dir().join(format!("netfaultctl-token-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let empty = dir.join("empty");
        std::fs::write(&empty, " \n").expect("write");
        let good = dir.join("good");
        std::fs::write(&good, "tok-0123456789abcdef\n").expect("write");
        let parse = |args: &[&str]| {
            let mut v = vec!["netfaultctl"];
            v.extend_from_slice(args);
            Cli::try_parse_from(v)
        };
        // --url without --token-file is refused by the parser.
        assert!(parse(&["list", "--url", "http://127.0.0.1:1"]).is_err());
        let s = |p: &std::path::Path| p.to_str().expect("utf-8").to_string();
        let cli = parse(&[
            "list",
            "--url",
            "http://127.0.0.1:1",
            "--token-file",
            &s(&empty),
        ])
        .expect("flags");
        let e = client_of(&cli).expect_err("empty token");
        assert!(e.message().contains("--token-file"), "{}", e.message());
        let missing = dir.join("missing");
        let cli = parse(&[
            "list",
            "--url",
            "http://127.0.0.1:1",
            "--token-file",
            &s(&missing),
        ])
        .expect("flags");
        let e = client_of(&cli).expect_err("missing token");
        assert!(e.message().contains("--token-file"), "{}", e.message());
        let cli =
            parse(&["list", "--url", "https://x:1", "--token-file", &s(&good)]).expect("flags");
        let e = client_of(&cli).expect_err("https");
        assert!(e.message().contains("--url https://x:1"), "{}", e.message());
        let cli = parse(&[
            "list",
            "--url",
            "http://127.0.0.1:1",
            "--token-file",
            &s(&good),
        ])
        .expect("flags");
        let c = client_of(&cli).expect("client");
        assert_eq!(c.endpoint(), "http://127.0.0.1:1");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn api_errors_name_the_field() {
        let e = CtlError::from(ClientError::Api {
            status: 400,
            code: ErrorCode::Invalid.to_string(),
            field: Some("action.percent".into()),
            message: "must be from 0 to 100".into(),
        });
        assert_eq!(
            e.message(),
            "error: must be from 0 to 100 (field action.percent)"
        );
        let e = CtlError::from(ClientError::Connect {
            path: PathBuf::from("/run/x.sock"),
            source: std::io::Error::from(std::io::ErrorKind::NotFound),
        });
        assert!(e.message().contains("/run/x.sock"), "{}", e.message());
    }

    #[test]
    fn partial_apply_reports_what_was_created() {
        let e = CtlError::Partial {
            label: "faults[2]".into(),
            error: Box::new(ClientError::Api {
                status: 404,
                code: ErrorCode::NotFound.to_string(),
                field: Some("target.sandbox".into()),
                message: "no such sandbox".into(),
            }),
            created: vec!["f-1".into(), "f-2".into()],
        };
        assert_eq!(
            e.message(),
            "error: faults[2]: no such sandbox (field target.sandbox)\ncreated before it (still active): f-1, f-2"
        );
    }

    #[test]
    fn unreachable_socket_is_an_error_naming_it() {
        let dir = std::env::temp_dir().join(format!("netfaultctl-test-{}", std::process::id()));
        let sock = dir.join("missing.sock");
        let cli = Cli::try_parse_from([
            "netfaultctl",
            "--socket",
            sock.to_str().unwrap_or("/nonexistent/missing.sock"),
            "list",
        ])
        .expect("valid flags");
        let e = run(cli).expect_err("no agent there");
        assert!(e.message().contains("missing.sock"), "{}", e.message());
    }

    #[test]
    fn bad_file_is_rejected_before_connecting() {
        let dir = std::env::temp_dir().join(format!("netfaultctl-apply-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let file = dir.join("faults.json");
        std::fs::write(
            &file,
            r#"[{"target":{"sandbox":"a"},"action":{"type":"blackhole"},"duration":"1m"},
                {"target":{"sandbox":"a"},"action":{"type":"loss","percent":101},"duration":"1m"}]"#,
        )
        .expect("write");
        // The socket does not exist: the error must be the file's, not the socket's.
        let client = Client::new(dir.join("no.sock"));
        let e = apply(&client, &file.to_string_lossy(), Output::Table).expect_err("invalid");
        let msg = e.message();
        assert!(
            msg.starts_with("error: faults[1].action.percent: must be from 0 to 100"),
            "{msg}"
        );
        assert!(msg.contains("nothing was applied"), "{msg}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}

//! netfaultctl: the command-line client of netfaultd's API, on its unix
//! socket, on its loopback TCP listener (`--url`, `--token-file`), or from
//! outside the cluster through the Kubernetes API server (`--kube`: the
//! target pod's node, the agent pod on it, `pods/portforward` to its TCP
//! listener; see `ctl/kube.rs`).

use std::io::Read;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use clap::{ArgMatches, CommandFactory, FromArgMatches, Parser, Subcommand, ValueEnum};
use netfault_api::wire::DEFAULT_SOCKET;
use netfault_api::{Client, ClientError, Fault};
use serde_json::Value;

#[path = "../ctl/input.rs"]
mod input;
#[path = "../ctl/kube.rs"]
mod kube_access;
#[path = "../ctl/render.rs"]
mod render;
#[path = "../ctl/verbs.rs"]
mod verbs;

use kube_access::{Bridge, Kube, KubeError, KubeOptions};

#[derive(Debug, Parser)]
#[command(
    name = "netfaultctl",
    version,
    subcommand_required = true,
    about = "Inject network faults into pods and network namespaces through netfaultd",
    after_help = "With --kube, netfaultctl needs no access to the node: it finds the node of each \
fault's target pod ({\"pod\": {\"namespace\", \"name\"}}), the netfault agent pod on that node \
(namespace --agent-namespace, labels app.kubernetes.io/name=netfault,app.kubernetes.io/component=agent), \
reads the API token from the Secret netfault-api-token (key token) unless --token-file is given, and \
talks to the agent's TCP listener (--agent-port) through the API server's pods/portforward. \
`list` without --node/--pod lists every node's faults with a NODE column; `get`, `delete`, \
`sandboxes` and `health` need --node NAME or --pod NAMESPACE/NAME. The RBAC this needs is in \
daemonset/test-suite-rbac.yaml.\n\nExamples:\n  netfaultctl --kube apply -f fault.json\n  \
netfaultctl --kube list\n  netfaultctl --kube --node worker-1 delete f-0123abcd\n\n\
One verb per action makes a fault from flags, validated as the API validates it:\n  \
netfaultctl delay 100ms --jitter 10ms --pod shop/cart --for 5m\n  \
netfaultctl loss 10% --to 10.0.0.0/8 --port 80 --sandbox ID\n  \
netfaultctl http-abort 503 --path '/api/*' --percent 30 --port 8080 --pod shop/cart\n  \
netfaultctl dns-error nxdomain --name '*.example.com' --pod shop/cart"
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
    /// File holding the bearer token for --url or --kube (whitespace
    /// trimmed). With --kube it defaults to the Secret netfault-api-token.
    #[arg(long, global = true, env = "NETFAULT_TOKEN_FILE", value_name = "PATH")]
    token_file: Option<PathBuf>,
    /// Reach the agents through the Kubernetes API server (pods/portforward
    /// to their TCP listener) instead of the socket.
    #[arg(long, global = true)]
    kube: bool,
    /// With --kube: the kubeconfig file (default: KUBECONFIG,
    /// ~/.kube/config, or the in-cluster service account).
    #[arg(long, global = true, value_name = "PATH")]
    kubeconfig: Option<PathBuf>,
    /// With --kube: the kubeconfig context (default: its current context).
    #[arg(long, global = true, value_name = "NAME")]
    context: Option<String>,
    /// With --kube: the namespace of the netfault DaemonSet.
    #[arg(long, global = true, value_name = "NS", default_value = kube_access::AGENT_NAMESPACE)]
    agent_namespace: String,
    /// With --kube: the agents' TCP listener port (netfaultd --listen-tcp).
    #[arg(long, global = true, value_name = "PORT", default_value_t = kube_access::AGENT_PORT,
          value_parser = clap::value_parser!(u16).range(1..))]
    agent_port: u16,
    /// With --kube: the node whose agent to talk to (for every fault of
    /// `apply`, whatever its target).
    #[arg(long, global = true, value_name = "NAME")]
    node: Option<String>,
    /// A verb's target pod (NAMESPACE/NAME, or NAME in namespace default);
    /// with --kube, also for any command: talk to the agent on its node.
    #[arg(long, global = true, value_name = "NS/NAME", value_parser = kube_access::parse_pod_ref)]
    pod: Option<(String, String)>,
    /// Output format.
    #[arg(short = 'o', long, global = true, value_enum, default_value_t = Output::Table)]
    output: Output,
    /// `None` for a verb (`delay`, `loss`, ...): those are built from the
    /// API's verb table at run time (`ctl/verbs.rs`).
    #[command(subcommand)]
    command: Option<Command>,
}

/// What a run does: a command, or a verb's fault.
enum Work {
    Command(Command),
    /// The verb's name and its fault JSON.
    Verb(String, Value),
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
    /// Show every fault's counters live, with their rates, refreshing in
    /// place (on a terminal; frames one after another otherwise).
    /// Print a shell completion script (bash, zsh, fish, elvish,
    /// powershell), verbs and flags included.
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the man page (roff) to standard output.
    Man,
    Watch {
        /// Time between refreshes.
        #[arg(long, value_name = "DURATION", default_value = "1s", value_parser = parse_interval)]
        interval: Duration,
        /// Stop after this many frames (default: until interrupted).
        #[arg(long, value_name = "N")]
        count: Option<u64>,
    },
}

/// `--interval`: a humantime duration from 10ms to 1h.
fn parse_interval(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| format!("{s:?}: {e}"))?;
    if d < Duration::from_millis(10) || d > Duration::from_secs(3600) {
        return Err(format!("{s:?}: must be from 10ms to 1h"));
    }
    Ok(d)
}

/// Everything that makes netfaultctl exit 1, printed as one `error: ...` line
/// (plus a note on what was done when a batch stopped half-way).
#[derive(Debug)]
enum CtlError {
    Client(Box<ClientError>),
    Input(String),
    Other(String),
    /// `apply` stopped at `label` (`error` says why); `created` were
    /// created before it.
    Partial {
        label: String,
        error: String,
        created: Vec<String>,
    },
}

impl From<KubeError> for CtlError {
    fn from(e: KubeError) -> Self {
        CtlError::Other(e.to_string())
    }
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
                format!("error: {label}: {error}\n{done}")
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

/// The validated faults of `file`, or why none will be applied.
fn read_faults(file: &str) -> Result<Vec<input::Item>, CtlError> {
    let text = read_input(file)?;
    input::parse_faults(&text).map_err(|e| {
        let name = if file == "-" { "<stdin>" } else { file };
        CtlError::Input(format!("{e} (in {name}; nothing was applied)"))
    })
}

fn apply(client: &Client, file: &str, output: Output) -> Result<String, CtlError> {
    let items = read_faults(file)?;
    apply_items(&items, output, |_, body| {
        client
            .call("POST", "/v1/faults", Some(body))
            .map_err(|e| describe(&e))
    })
}

/// POSTs `items` in order with `post(index, body)`, stopping at the first
/// failure; a `node` in an item's result is shown in the table output.
fn apply_items(
    items: &[input::Item],
    output: Output,
    mut post: impl FnMut(usize, &Value) -> Result<Value, String>,
) -> Result<String, CtlError> {
    let mut created: Vec<Value> = Vec::with_capacity(items.len());
    let mut ids: Vec<String> = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        match post(i, &item.value) {
            Ok(v) => {
                ids.push(v["id"].as_str().unwrap_or("?").to_string());
                created.push(v);
            }
            Err(error) => {
                // Print what did get created, so the caller can clean up.
                let done = apply_output(&created, output)?;
                if !done.is_empty() {
                    print!("{done}");
                }
                return Err(CtlError::Partial {
                    label: item.label.clone(),
                    error,
                    created: ids,
                });
            }
        }
    }
    apply_output(&created, output)
}

fn apply_output(created: &[Value], output: Output) -> Result<String, CtlError> {
    match output {
        Output::Table => Ok(created
            .iter()
            .map(|v| {
                let id = v["id"].as_str().unwrap_or("?");
                match v["node"].as_str() {
                    Some(node) => format!("created {id} on node {node}\n"),
                    None => format!("created {id}\n"),
                }
            })
            .collect()),
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
    // An agent that a hand-over froze or retired answers, but does not
    // serve: the new agent is not ready until it serves the socket.
    if let Ok(v) = resp.json() {
        if v["serving"] == Value::Bool(false) {
            return Err(CtlError::Other(format!(
                "netfaultd at {} is not ready: {} (a hand-over to a new agent)",
                client.endpoint(),
                v["status"].as_str().unwrap_or("not serving")
            )));
        }
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

/// Flag combinations clap cannot check across global flags and subcommands.
/// A verb takes `--pod` as its target, with or without `--kube`.
fn check_flags(cli: &Cli, verb: bool) -> Result<(), CtlError> {
    if cli.kube {
        if let Some(url) = &cli.url {
            return Err(CtlError::Input(format!(
                "--url {url} and --kube exclude each other: --kube finds the agent itself"
            )));
        }
        if cli.node.is_some() && cli.pod.is_some() {
            return Err(CtlError::Input(
                "--node and --pod exclude each other: both choose the agent".into(),
            ));
        }
        return Ok(());
    }
    let kube_only = [
        ("--kubeconfig", cli.kubeconfig.is_some()),
        ("--context", cli.context.is_some()),
        ("--node", cli.node.is_some()),
        ("--pod", cli.pod.is_some() && !verb),
    ];
    match kube_only.iter().find(|(_, set)| *set) {
        Some((flag, _)) => Err(CtlError::Input(format!("{flag} needs --kube"))),
        None => Ok(()),
    }
}

/// netfaultctl's whole command line: the derived commands and the verbs.
fn full_command() -> clap::Command {
    Cli::command().subcommands(verbs::commands())
}

/// `completions SHELL`: the script, made from the command line's definition.
fn completions(shell: clap_complete::Shell) -> String {
    let mut buf: Vec<u8> = Vec::new();
    clap_complete::generate(shell, &mut full_command(), "netfaultctl", &mut buf);
    String::from_utf8_lossy(&buf).into_owned()
}

/// `man`: the man page (roff), made from the command line's definition.
fn man_page() -> Result<String, CtlError> {
    let mut buf: Vec<u8> = Vec::new();
    clap_mangen::Man::new(full_command())
        .render(&mut buf)
        .map_err(|e| CtlError::Other(format!("rendering the man page: {e}")))?;
    Ok(String::from_utf8_lossy(&buf).into_owned())
}

fn run(cli: Cli, work: Work) -> Result<String, CtlError> {
    // Neither needs an agent.
    match &work {
        Work::Command(Command::Completions { shell }) => return Ok(completions(*shell)),
        Work::Command(Command::Man) => return man_page(),
        _ => {}
    }
    check_flags(&cli, matches!(work, Work::Verb(..)))?;
    if cli.kube {
        return run_kube(cli, work);
    }
    let client = client_of(&cli)?;
    match work {
        Work::Command(command) => run_on(&client, &command, cli.output),
        Work::Verb(_, fault) => {
            let created = client.call("POST", "/v1/faults", Some(&fault))?;
            verb_output(&created, cli.output)
        }
    }
}

/// The fault a verb created: its detail, or its JSON with `-o json`.
fn verb_output(created: &Value, out: Output) -> Result<String, CtlError> {
    match out {
        Output::Json => Ok(format!("{}\n", pretty(created)?)),
        Output::Table => {
            let f: Fault =
                serde_json::from_value(created.clone()).map_err(|e| bad_answer("fault", e))?;
            Ok(format!(
                "created {}\n{}",
                f.id,
                render::fault_detail(&f, now_ms())
            ))
        }
    }
}

/// A verb's fault from the command line, or the error naming its flag.
fn verb_work(cli: &Cli, name: &str, m: &ArgMatches) -> Result<Work, CtlError> {
    let pod = cli.pod.as_ref().map(|(ns, n)| (ns.as_str(), n.as_str()));
    let fault = verbs::fault(name, m, pod).map_err(CtlError::Input)?;
    Ok(Work::Verb(name.to_string(), fault))
}

/// One command against one agent.
fn run_on(client: &Client, command: &Command, out: Output) -> Result<String, CtlError> {
    match command {
        Command::Sandboxes => {
            let v = client.call("GET", "/v1/sandboxes", None)?;
            if out == Output::Json {
                return Ok(format!("{}\n", pretty(&v)?));
            }
            let items = array(v, "sandbox list")?;
            render::sandboxes_table(&items).map_err(|e| bad_answer("sandbox list", e))
        }
        Command::Apply { file } => apply(client, file, out),
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
            let path = format!("/v1/faults/{}", input::path_segment(id));
            let v = client.call("GET", &path, None)?;
            if out == Output::Json {
                return Ok(format!("{}\n", pretty(&v)?));
            }
            let f: Fault = serde_json::from_value(v).map_err(|e| bad_answer("fault", e))?;
            Ok(render::fault_detail(&f, now_ms()))
        }
        Command::Delete { id } => {
            let path = format!("/v1/faults/{}", input::path_segment(id));
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
        Command::Health => health(client, out),
        Command::Watch { interval, count } => watch(client, *interval, *count, out),
        Command::Completions { shell } => Ok(completions(*shell)),
        Command::Man => man_page(),
    }
}

/// `watch`: a frame per interval, the counters' rates from the previous
/// frame. With `-o json`, one line of JSON per frame (the fault list).
fn watch(
    client: &Client,
    interval: Duration,
    count: Option<u64>,
    out: Output,
) -> Result<String, CtlError> {
    use std::io::{IsTerminal, Write};
    let tty = std::io::stdout().is_terminal();
    let mut prev: std::collections::HashMap<String, netfault_api::Counters> =
        std::collections::HashMap::new();
    let mut last = std::time::Instant::now();
    let mut frame = 0u64;
    loop {
        let v = client.call("GET", "/v1/faults", None)?;
        let now = std::time::Instant::now();
        let text = match out {
            Output::Json => format!(
                "{}\n",
                serde_json::to_string(&v).map_err(|e| bad_answer("fault list", e))?
            ),
            Output::Table => {
                let faults: Vec<Fault> =
                    serde_json::from_value(v).map_err(|e| bad_answer("fault list", e))?;
                let secs = now.duration_since(last).as_secs_f64();
                let table = render::watch_table(&faults, &prev, secs, now_ms());
                prev = faults.into_iter().map(|f| (f.id, f.counters)).collect();
                if tty {
                    // Home and clear: the frame replaces the last one.
                    format!("\x1b[H\x1b[2J{table}")
                } else {
                    format!("{table}\n")
                }
            }
        };
        last = now;
        let mut stdout = std::io::stdout().lock();
        if stdout
            .write_all(text.as_bytes())
            .and_then(|()| stdout.flush())
            .is_err()
        {
            // The reader went away (a closed pipe): done.
            return Ok(String::new());
        }
        drop(stdout);
        frame += 1;
        if count.is_some_and(|c| frame >= c) {
            return Ok(String::new());
        }
        std::thread::sleep(interval);
    }
}

/// One agent reached through the API server: the port-forward bridge, a
/// client on it, and where the token came from (for error messages).
struct Remote {
    bridge: Bridge,
    client: Client,
    token_source: String,
}

impl Remote {
    /// What went wrong with a request through the bridge: the port-forward's
    /// own failure when there was one, else the agent's answer.
    fn explain(&self, e: &ClientError) -> String {
        if let Some(f) = self.bridge.failure() {
            return f.to_string();
        }
        let agent = format!(
            "the agent {} on node {}",
            self.bridge.agent.label(),
            self.bridge.agent.node
        );
        match e {
            ClientError::Api {
                status: 401,
                message,
                ..
            } => format!(
                "{agent} refused the token from {} ({message}); it must match the agent's Secret {}/{}",
                self.token_source,
                self.bridge.agent.namespace,
                kube_access::TOKEN_SECRET
            ),
            ClientError::Api {
                status: 503,
                message,
                ..
            } => format!("{agent} is not serving its TCP API yet: {message}"),
            ClientError::ConnectTcp { source, .. } => format!(
                "{agent}: cannot connect to the local end of the port-forward: {source}"
            ),
            ClientError::Io(_) | ClientError::Protocol(_) => format!(
                "{agent}: no valid answer through the port-forward to port {}: {e} (is netfaultd started with --listen-tcp 127.0.0.1:{}?)",
                self.bridge.port, self.bridge.port
            ),
            other => format!("{agent}: {}", describe(other)),
        }
    }

    fn call(&self, method: &str, path: &str, body: Option<&Value>) -> Result<Value, String> {
        self.client
            .call(method, path, body)
            .map_err(|e| self.explain(&e))
    }
}

/// `--kube`: one session with the cluster, the token, and a bridge per agent.
struct KubeSession {
    kube: Kube,
    token_file: Option<String>,
    token: Option<(String, String)>,
    remotes: std::collections::BTreeMap<String, Remote>,
}

impl KubeSession {
    fn token(&mut self) -> Result<(String, String), CtlError> {
        if let Some(t) = &self.token {
            return Ok(t.clone());
        }
        let t = match &self.token_file {
            Some(path) => (
                read_token(std::path::Path::new(path))?,
                format!("--token-file {path}"),
            ),
            None => (
                self.kube.token()?,
                format!("the Secret {}", kube_access::TOKEN_SECRET),
            ),
        };
        self.token = Some(t.clone());
        Ok(t)
    }

    /// The agent of `node`, bridged (once per node).
    fn remote(&mut self, node: &str) -> Result<&Remote, CtlError> {
        if !self.remotes.contains_key(node) {
            let agent = self.kube.agent_on(node)?;
            let r = self.remote_for(agent)?;
            self.remotes.insert(node.to_string(), r);
        }
        self.remotes
            .get(node)
            .ok_or_else(|| CtlError::Other(format!("no agent for node {node}")))
    }

    fn remote_for(&mut self, agent: kube_access::AgentPod) -> Result<Remote, CtlError> {
        let (token, token_source) = self.token()?;
        let bridge = self.kube.bridge(&agent)?;
        let client = Client::tcp(&bridge.url)?
            .with_token(token)
            .with_timeout(Duration::from_secs(30));
        Ok(Remote {
            bridge,
            client,
            token_source,
        })
    }
}

/// The node `--node` or `--pod` names, if any.
fn chosen_node(cli: &Cli, kube: &Kube) -> Result<Option<String>, CtlError> {
    if let Some(n) = &cli.node {
        if n.is_empty() {
            return Err(CtlError::Input("--node: the node name is empty".into()));
        }
        return Ok(Some(n.clone()));
    }
    match &cli.pod {
        Some((ns, name)) => Ok(Some(kube.node_of_pod(ns, name)?)),
        None => Ok(None),
    }
}

fn command_name(c: &Command) -> &'static str {
    match c {
        Command::Sandboxes => "sandboxes",
        Command::Apply { .. } => "apply",
        Command::List => "list",
        Command::Get { .. } => "get",
        Command::Delete { .. } => "delete",
        Command::Health => "health",
        Command::Watch { .. } => "watch",
        Command::Completions { .. } => "completions",
        Command::Man => "man",
    }
}

fn run_kube(cli: Cli, work: Work) -> Result<String, CtlError> {
    let out = cli.output;
    // A bad file is rejected before the cluster is asked anything.
    let (command, items) = match work {
        Work::Command(Command::Apply { file }) => (None, Some(read_faults(&file)?)),
        Work::Command(c) => (Some(c), None),
        Work::Verb(label, value) => (None, Some(vec![input::Item { label, value }])),
    };
    let kube = Kube::connect(KubeOptions {
        kubeconfig: cli.kubeconfig.clone(),
        context: cli.context.clone(),
        agent_namespace: cli.agent_namespace.clone(),
        agent_port: cli.agent_port,
    })?;
    let node = chosen_node(&cli, &kube)?;
    let mut session = KubeSession {
        kube,
        token_file: cli
            .token_file
            .as_ref()
            .map(|p| p.to_string_lossy().into_owned()),
        token: None,
        remotes: std::collections::BTreeMap::new(),
    };
    if let Some(items) = items {
        return kube_apply(&mut session, &items, node.as_deref(), out);
    }
    let Some(command) = command else {
        return Err(CtlError::Other("nothing to do".into()));
    };
    match (&command, node) {
        (Command::List, None) => kube_list_all(&mut session, out),
        (command, Some(node)) => {
            let remote = session.remote(&node)?;
            let text = run_on(&remote.client, command, out).map_err(|e| match e {
                CtlError::Client(c) => CtlError::Other(remote.explain(&c)),
                other => other,
            })?;
            // `health` names its endpoint: the agent pod, not the bridge.
            let agent = format!("{} on node {node}", remote.bridge.agent.label());
            Ok(text.replace(&remote.bridge.url, &agent))
        }
        (command, None) => Err(CtlError::Input(format!(
            "netfaultctl --kube {} needs --node NAME or --pod NAMESPACE/NAME: the node whose agent to ask (`netfaultctl --kube list` shows each fault's node)",
            command_name(command)
        ))),
    }
}

/// `apply` with `--kube`: every fault goes to the agent on its target pod's
/// node (or on `node`). Every node and agent is found, and the token read,
/// before the first fault is created.
fn kube_apply(
    session: &mut KubeSession,
    items: &[input::Item],
    node: Option<&str>,
    out: Output,
) -> Result<String, CtlError> {
    let mut nodes: Vec<String> = Vec::with_capacity(items.len());
    let mut pods: std::collections::BTreeMap<(String, String), String> =
        std::collections::BTreeMap::new();
    for item in items {
        if let Some(n) = node {
            nodes.push(n.to_string());
            continue;
        }
        let pod = &item.value["target"]["pod"];
        let Some(name) = pod["name"].as_str() else {
            return Err(CtlError::Input(format!(
                "{}.target: with --kube a fault's target must be a pod ({{\"pod\": {{\"namespace\", \"name\"}}}}) so that its node can be found; for a sandbox or netns target pass --node NAME (nothing was applied)",
                item.label
            )));
        };
        let ns = pod["namespace"].as_str().unwrap_or("default");
        let key = (ns.to_string(), name.to_string());
        let n = match pods.get(&key) {
            Some(n) => n.clone(),
            None => {
                let n = session.kube.node_of_pod(ns, name).map_err(|e| {
                    CtlError::Other(format!("{}: {e} (nothing was applied)", item.label))
                })?;
                pods.insert(key, n.clone());
                n
            }
        };
        nodes.push(n);
    }
    for n in &nodes {
        session
            .remote(n)
            .map_err(|e| CtlError::Other(format!("{} (nothing was applied)", strip_error(e))))?;
    }
    let remotes = &session.remotes;
    apply_items(items, out, |i, body| {
        let node = &nodes[i];
        let remote = remotes
            .get(node)
            .ok_or_else(|| format!("no agent for node {node}"))?;
        let mut v = remote.call("POST", "/v1/faults", Some(body))?;
        if let Some(o) = v.as_object_mut() {
            o.insert("node".into(), Value::String(node.clone()));
        }
        Ok(v)
    })
}

/// The message of an error, without the `error: ` prefix.
fn strip_error(e: CtlError) -> String {
    let m = e.message();
    m.strip_prefix("error: ").unwrap_or(&m).to_string()
}

/// `list` with `--kube` and no node: every ready agent's faults, with their
/// node. Agents that cannot be asked are reported after the table (exit 1).
fn kube_list_all(session: &mut KubeSession, out: Output) -> Result<String, CtlError> {
    let (agents, mut problems) = session.kube.all_agents()?;
    let problems: Vec<String> = problems.drain(..).map(|e| e.to_string()).collect();
    let mut errors = problems;
    let mut rows: Vec<(String, Value)> = Vec::new();
    for agent in agents {
        let node = agent.node.clone();
        let remote = match session.remote_for(agent) {
            Ok(r) => r,
            Err(e) => {
                errors.push(format!("node {node}: {}", strip_error(e)));
                continue;
            }
        };
        match remote.call("GET", "/v1/faults", None) {
            Ok(Value::Array(faults)) => rows.extend(faults.into_iter().map(|f| (node.clone(), f))),
            Ok(other) => errors.push(format!(
                "node {node}: unexpected fault list from netfaultd: {other}"
            )),
            Err(e) => errors.push(e),
        }
    }
    let text = match out {
        Output::Json => {
            let all: Vec<Value> = rows
                .into_iter()
                .map(|(node, mut f)| {
                    if let Some(o) = f.as_object_mut() {
                        o.insert("node".into(), Value::String(node));
                    }
                    f
                })
                .collect();
            format!("{}\n", pretty(&Value::Array(all))?)
        }
        Output::Table => {
            let mut faults = Vec::with_capacity(rows.len());
            for (node, v) in rows {
                let f: Fault =
                    serde_json::from_value(v).map_err(|e| bad_answer("fault list", e))?;
                faults.push((node, f));
            }
            render::node_faults_table(&faults, now_ms())
        }
    };
    if errors.is_empty() {
        return Ok(text);
    }
    print!("{text}");
    Err(CtlError::Other(errors.join("\nerror: ")))
}

/// The command line's meaning: the flags, and the command or verb.
fn parse_command_line() -> Result<(Cli, Work), CtlError> {
    let matches = full_command().get_matches();
    let mut cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    let work = match (cli.command.take(), matches.subcommand()) {
        (Some(c), _) => Work::Command(c),
        (None, Some((name, m))) if verbs::is_verb(name) => verb_work(&cli, name, m)?,
        (None, _) => return Err(CtlError::Input("no command; see --help".into())),
    };
    Ok((cli, work))
}

fn main() -> ExitCode {
    let parsed = parse_command_line();
    match parsed.and_then(|(cli, work)| run(cli, work)) {
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
        full_command().debug_assert();
    }

    #[test]
    fn completions_and_man_page_cover_the_verbs_and_their_flags() {
        let bash = completions(clap_complete::Shell::Bash);
        for word in [
            "http-abort",
            "dns-error",
            "--match-header",
            "--jitter",
            "watch",
        ] {
            assert!(bash.contains(word), "bash completion lacks {word}");
        }
        let man = man_page().expect("man page");
        assert!(
            man.starts_with(".ie") || man.contains(".TH"),
            "roff: {}",
            &man[..man.len().min(80)]
        );
        for word in ["netfaultctl", "delay", "dns\\-spoof"] {
            assert!(man.contains(word), "man page lacks {word}");
        }
    }

    #[test]
    fn global_flags_parse_after_the_subcommand() {
        let cli = Cli::try_parse_from(["netfaultctl", "list", "-o", "json", "--socket", "/tmp/s"])
            .expect("valid flags");
        assert_eq!(cli.output, Output::Json);
        assert_eq!(cli.socket, PathBuf::from("/tmp/s"));
        let cli = Cli::try_parse_from(["netfaultctl", "apply", "-f", "-"]).expect("stdin");
        assert!(matches!(cli.command, Some(Command::Apply { file }) if file == "-"));
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
    fn kube_flags_are_checked() {
        let parse = |args: &[&str]| {
            let mut v = vec!["netfaultctl"];
            v.extend_from_slice(args);
            Cli::try_parse_from(v).expect("flags parse")
        };
        // Global flags on either side of the subcommand.
        let cli = parse(&["--kube", "get", "f-1", "--pod", "shop/web"]);
        assert!(cli.kube);
        assert_eq!(cli.pod, Some(("shop".into(), "web".into())));
        assert_eq!(cli.agent_namespace, "netfault");
        assert_eq!(cli.agent_port, 7979);
        assert!(check_flags(&cli, false).is_ok());
        let cli = parse(&["list", "--kube", "--node", "n1", "--agent-port", "8000"]);
        assert_eq!((cli.node.as_deref(), cli.agent_port), (Some("n1"), 8000));
        assert!(check_flags(&cli, false).is_ok());
        // --kube-only flags without --kube, and exclusive pairs.
        for (args, flag) in [
            (&["list", "--node", "n1"][..], "--node needs --kube"),
            (&["list", "--pod", "a/b"][..], "--pod needs --kube"),
            (
                &["list", "--kubeconfig", "/k"][..],
                "--kubeconfig needs --kube",
            ),
            (&["list", "--context", "c"][..], "--context needs --kube"),
            (
                &["--kube", "list", "--node", "n", "--pod", "a/b"][..],
                "--node and --pod exclude each other",
            ),
            (
                &[
                    "--kube",
                    "--url",
                    "http://127.0.0.1:1",
                    "--token-file",
                    "/t",
                    "list",
                ][..],
                "--url http://127.0.0.1:1 and --kube exclude each other",
            ),
        ] {
            let e = check_flags(&parse(args), false).expect_err("refused");
            assert!(e.message().contains(flag), "{args:?}: {}", e.message());
        }
        // A malformed --pod and port 0 are usage errors.
        assert!(Cli::try_parse_from(["netfaultctl", "--kube", "--pod", "a/b/c", "list"]).is_err());
        assert!(
            Cli::try_parse_from(["netfaultctl", "--kube", "--agent-port", "0", "list"]).is_err()
        );
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
            error: describe(&ClientError::Api {
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
        let mut cli = cli;
        let command = cli.command.take().expect("a command");
        let e = run(cli, Work::Command(command)).expect_err("no agent there");
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

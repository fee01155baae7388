//! The `tollgate` command line. `serve`, `check-config` and `bootstrap` work on a config file; every
//! other command is a client of the admin API (`--server`, `--token`, `--json`).

/// A line of a command's answer, kept until [`flush_out`] writes the whole answer at once (see
/// there): every answer of the CLI is printed with it, none with `println!`.
macro_rules! outln {
    ($($arg:tt)*) => {
        $crate::cli::out_line(format_args!($($arg)*))
    };
}

mod client;
mod quickstart;

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::{anyhow, Context};
use clap::{Args, Parser, Subcommand};
use reqwest::Method;
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::admin::{
    AddUser, AddedUser, CreatedService, EditService, Reason, RevokeRequest, ServiceView, UserView, WhoAmI,
};
use crate::config::Config;
use crate::lifecycle::{
    AuditEntry, CreateService, CredentialsRequest, IssueRequest, IssuedCredential, IssuedToken, RoleChange,
    RotateRequest, TokenView,
};
use crate::policy::Role;
use crate::store::Attributes;
use crate::{lifecycle, server, store};
use client::{segment, table, Client};

thread_local! {
    /// The answer being made: [`outln!`] appends to it, [`flush_out`] writes it.
    static OUT: std::cell::RefCell<String> = const { std::cell::RefCell::new(String::new()) };
}

/// Appends a line to the answer being made (see [`outln!`]).
pub(crate) fn out_line(args: std::fmt::Arguments) {
    OUT.with(|out| {
        use std::fmt::Write as _;
        let mut out = out.borrow_mut();
        let _ = out.write_fmt(args);
        out.push('\n');
    });
}

/// Writes the answer made so far to stdout, and says so when it cannot be (a full disk, a reader
/// gone from a pipe where `SIGPIPE` does not end the command): `println!` would panic there, and
/// a new token's only copy be lost with a backtrace. (A stdout closed before the command started
/// is `/dev/null` to a Rust program, which opens that in its place: the answer goes nowhere, as
/// with `> /dev/null`.)
pub(crate) fn flush_out() -> anyhow::Result<()> {
    use std::io::Write as _;
    let text = OUT.with(|out| std::mem::take(&mut *out.borrow_mut()));
    if text.is_empty() {
        return Ok(());
    }
    let mut stdout = std::io::stdout().lock();
    stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush())
        .context("cannot write the answer to stdout")
}

/// What is said when a new token's answer could not be written: it was made, and works.
fn secret_lost(id: &str) -> String {
    format!(
        "token {id} was made but its secret could not be shown: revoke it (tollgate token revoke {id}) and make another"
    )
}

/// Tollgate: an authentication gateway.
#[derive(Debug, Parser)]
#[command(name = "tollgate", version, about)]
pub struct Cli {
    /// Admin API address.
    #[arg(long, global = true, env = "TOLLGATE_SERVER", default_value = "http://127.0.0.1:8081")]
    server: String,
    /// Token to authenticate with.
    #[arg(long, global = true, env = "TOLLGATE_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

impl Cli {
    /// Whether printing into a closed pipe may simply end the command (default SIGPIPE): not for
    /// the servers, nor for `bootstrap`, which talks to the store itself (a Unix-socket Redis
    /// that drops the connection would otherwise kill it without a word), nor for a command that
    /// makes a secret: killed, it would not say which token was made and lost.
    pub fn may_die_of_sigpipe(&self) -> bool {
        !matches!(
            self.command,
            Command::Serve { .. }
                | Command::Quickstart { .. }
                | Command::Echo { .. }
                | Command::Bootstrap { .. }
                | Command::Token(TokenCmd::Issue { .. } | TokenCmd::Rotate { .. })
                | Command::User(UserCmd::Add { issue_token: true, .. })
                | Command::Service(ServiceCmd::Create { .. })
                | Command::Credentials(_)
        )
    }
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the gateway.
    Serve {
        /// The YAML config file.
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Start a demo gateway on the embedded store, in front of a built-in echo upstream, and print
    /// a working token and the lines to try.
    Quickstart {
        /// Where to keep the config and the data.
        #[arg(long, default_value = "tollgate-quickstart")]
        dir: PathBuf,
        /// Gateway port, for a new config [default: 8080] (a later run uses the config it finds in
        /// --dir, and refuses a port that differs from it).
        #[arg(long, value_parser = clap::value_parser!(u16).range(1..))]
        port: Option<u16>,
        /// Admin API port, for a new config [default: 8081].
        #[arg(long, value_parser = clap::value_parser!(u16).range(1..))]
        admin_port: Option<u16>,
    },
    /// Serve the echo upstream (answers every request with JSON of what it received).
    Echo {
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:9000")]
        listen: std::net::SocketAddr,
    },
    /// Validate a config file and print every error with its YAML path.
    CheckConfig {
        /// The YAML config file.
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Create an org's first admin user and print their token (once).
    Bootstrap {
        /// The YAML config file (for the store and argon2 settings).
        #[arg(long, short)]
        config: PathBuf,
        /// The org to create or use.
        #[arg(long)]
        org: String,
        /// The admin's email.
        #[arg(long)]
        email: String,
    },
    /// Personal access tokens (and any token, for admins).
    #[command(subcommand, visible_alias = "tokens")]
    Token(TokenCmd),
    /// Users of an org.
    #[command(subcommand)]
    User(UserCmd),
    /// Service accounts of an org.
    #[command(subcommand)]
    Service(ServiceCmd),
    /// Ephemeral credentials: short-lived JWTs a service mints for its end users.
    #[command(subcommand)]
    Credentials(CredentialsCmd),
    /// Write a new JWT signing key (PKCS#8 PEM) for the `jwt.keys` section of the config.
    Keygen {
        /// EdDSA (Ed25519) or ES256 (P-256).
        #[arg(long, default_value = "EdDSA")]
        algorithm: String,
        /// The file to write; refused if it exists.
        #[arg(long)]
        out: PathBuf,
    },
    /// Who the token is: its owner, their roles now, and the token's own scope and environments.
    Whoami,
    /// The audit log of an org.
    Audit {
        /// Org (default: yours).
        #[arg(long)]
        org: Option<String>,
        /// Only entries about this token.
        #[arg(long)]
        token_id: Option<String>,
        /// Most entries to show, newest first.
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
}

/// A new token's lifetime (`token issue`, and the first token of `service create` and
/// `user add --issue-token`); with neither, `tokens.max_ttl` or no expiry.
#[derive(Debug, clap::Args)]
struct LifetimeArgs {
    /// The token's lifetime in minutes.
    #[arg(long, conflicts_with = "expires", allow_negative_numbers = true)]
    ttl_minutes: Option<i64>,
    /// The token's expiry time (RFC 3339).
    #[arg(long)]
    expires: Option<String>,
}

impl LifetimeArgs {
    fn is_unset(&self) -> bool {
        self.ttl_minutes.is_none() && self.expires.is_none()
    }
}

/// Whether a person is at the command: its input and its prompts' output are a terminal.
fn at_a_terminal() -> bool {
    use std::io::IsTerminal;
    std::io::stdin().is_terminal() && std::io::stderr().is_terminal()
}

/// Asks on stderr for a new token's display name and lifetime, as `rill token issue` does when
/// given neither: an empty answer (or the end of input) leaves either unset; a lifetime is a
/// number of minutes or an RFC 3339 time (checked by the server, as `--expires` is).
fn ask_name_and_lifetime(
    input: &mut impl std::io::BufRead,
) -> anyhow::Result<(Option<String>, LifetimeArgs)> {
    let mut ask = |question: &str| -> anyhow::Result<Option<String>> {
        eprint!("{question}");
        let mut line = String::new();
        input.read_line(&mut line).context("reading the answer")?;
        let answer = line.trim();
        Ok((!answer.is_empty()).then(|| answer.to_string()))
    };
    let name = ask("Display name (empty for none): ")?;
    let question =
        "Expires in minutes, or at an RFC 3339 time (empty: never, or the most the config allows): ";
    let lifetime =
        ask_lifetime(input, question)?.unwrap_or(LifetimeArgs { ttl_minutes: None, expires: None });
    Ok((name, lifetime))
}

/// Asks `question` on stderr for a lifetime (a number of minutes or an RFC 3339 time); `None` for
/// an empty answer or the end of input.
fn ask_lifetime(input: &mut impl std::io::BufRead, question: &str) -> anyhow::Result<Option<LifetimeArgs>> {
    eprint!("{question}");
    let mut line = String::new();
    input.read_line(&mut line).context("reading the answer")?;
    let answer = line.trim();
    Ok((!answer.is_empty()).then(|| match answer.parse::<i64>() {
        Ok(minutes) => LifetimeArgs { ttl_minutes: Some(minutes), expires: None },
        Err(_) => LifetimeArgs { ttl_minutes: None, expires: Some(answer.to_string()) },
    }))
}

#[derive(Debug, Subcommand)]
enum TokenCmd {
    /// Issue a personal access token; it is shown once. Run at a terminal with neither a name nor
    /// a lifetime, it asks for both.
    #[command(visible_alias = "create")]
    Issue {
        /// A name to recognise it by, as `--display-name` (`token create my-token`).
        #[arg(conflicts_with = "display_name", value_name = "DISPLAY_NAME")]
        name: Option<String>,
        /// A name to recognise it by.
        #[arg(long)]
        display_name: Option<String>,
        /// Issue it to this service of your org instead (its admins and its creator): a service
        /// whose tokens all expired or were revoked gets a working one again.
        #[arg(long, value_name = "NAME", conflicts_with = "user")]
        service: Option<String>,
        /// Issue it to this user of your org instead (org admins), as `user add --issue-token`
        /// does: a user whose tokens all expired or were revoked gets a working one again.
        #[arg(long, value_name = "EMAIL")]
        user: Option<String>,
        #[command(flatten)]
        lifetime: LifetimeArgs,
        #[command(flatten)]
        narrowing: Narrowing,
    },
    /// List your active tokens.
    List {
        /// Include revoked, expired and rotated tokens, with their status.
        #[arg(long)]
        all: bool,
        /// Another user's (email) or a service's (name) tokens: admins; a service's creator too.
        #[arg(long)]
        owner: Option<String>,
    },
    /// Show one token.
    Get {
        /// Token id (or the whole token: only its id is sent).
        id: String,
    },
    /// Revoke a token by id, or yours by display name.
    Revoke {
        /// Token id (or the whole token, say a leaked one: only its id is sent).
        #[arg(required_unless_present = "display_name")]
        id: Option<String>,
        /// Revoke your token with this name (refused when several have it).
        #[arg(long, conflicts_with = "id")]
        display_name: Option<String>,
        /// Why (kept in the audit log).
        #[arg(long)]
        reason: Option<String>,
    },
    /// Replace a token with a new one; the old one stops now or after the grace period.
    Rotate {
        /// Token id (or the whole token: only its id is sent).
        id: String,
        /// A new scope, permissions or environments (each kept from the old token when not given).
        #[command(flatten)]
        narrowing: Narrowing,
        /// New expiry (RFC 3339).
        #[arg(long, conflicts_with = "ttl_minutes")]
        expires: Option<String>,
        /// New lifetime in minutes.
        #[arg(long, allow_negative_numbers = true)]
        ttl_minutes: Option<i64>,
        /// Seconds the old token keeps working, answering with a Deprecation header.
        #[arg(long, allow_negative_numbers = true)]
        grace_seconds: Option<i64>,
    },
}

/// What a new token or credential is narrowed to, below what its maker holds.
#[derive(Debug, Args)]
struct Narrowing {
    /// Scope preset (read, execute, read-write, admin, or one from config).
    #[arg(long, conflicts_with = "permission")]
    scope: Option<String>,
    /// Explicit permissions instead of a preset (`--permission read execute`, or repeated; a
    /// token's name or id goes before it).
    #[arg(long, num_args = 1.., value_name = "P")]
    permission: Vec<String>,
    /// Environments it works in (`--env production staging`, or repeated; a token's name or id
    /// goes before it).
    #[arg(long = "env", num_args = 1.., value_name = "E")]
    env: Vec<String>,
}

impl Narrowing {
    /// `(scope, permissions, environments)` as the admin API takes them.
    #[allow(clippy::type_complexity)]
    fn into_parts(self) -> (Option<String>, Option<Vec<String>>, Option<Vec<String>>) {
        let Narrowing { scope, permission, env } = self;
        (scope, (!permission.is_empty()).then_some(permission), (!env.is_empty()).then_some(env))
    }
}

#[derive(Debug, Subcommand)]
enum CredentialsCmd {
    /// Mint a JWT for an end user of the calling service (authenticate with the service's token);
    /// it is shown once.
    Issue {
        /// Org.
        #[arg(long)]
        org: String,
        /// The project it works on.
        #[arg(long)]
        project: String,
        /// The end user's attributes (a JSON object).
        #[arg(long, required_unless_present = "user_email", conflicts_with = "user_email")]
        attributes: Option<String>,
        /// The end user's email (their attributes come from the org's user with that email).
        #[arg(long)]
        user_email: Option<String>,
        /// The end user's id for the upstream (default: the email).
        #[arg(long)]
        subject: Option<String>,
        /// Lifetime in seconds (default and cap from the config's `jwt` section).
        #[arg(long, allow_negative_numbers = true)]
        ttl_seconds: Option<i64>,
        #[command(flatten)]
        narrowing: Narrowing,
    },
}

#[derive(Debug, Args)]
struct RoleArgs {
    /// Org role.
    #[arg(long, value_parser = parse_role)]
    org_role: Option<Role>,
    /// Project to give a role on.
    #[arg(long)]
    project: Option<String>,
    /// Role on that project.
    #[arg(long, value_parser = parse_role, requires = "project")]
    project_role: Option<Role>,
}

/// A role change: [`RoleArgs`], or a project's role removed.
#[derive(Debug, Args)]
struct SetRoleArgs {
    #[command(flatten)]
    roles: RoleArgs,
    /// Remove the role on `--project`.
    #[arg(long, requires = "project", conflicts_with = "project_role")]
    remove: bool,
}

impl SetRoleArgs {
    fn change(&self) -> RoleChange {
        RoleChange {
            org_role: self.roles.org_role,
            project: self.roles.project.clone(),
            project_role: self.roles.project_role,
            remove: self.remove,
        }
    }
}

impl RoleArgs {
    fn project_roles(&self) -> anyhow::Result<BTreeMap<String, Role>> {
        match (&self.project, self.project_role) {
            (Some(p), Some(r)) => Ok(BTreeMap::from([(p.clone(), r)])),
            (None, None) => Ok(BTreeMap::new()),
            _ => Err(anyhow!("give --project and --project-role together")),
        }
    }
}

#[derive(Debug, Subcommand)]
enum UserCmd {
    /// Add a user.
    Add {
        /// Email.
        email: String,
        /// Org (default: yours).
        #[arg(long)]
        org: Option<String>,
        #[command(flatten)]
        roles: RoleArgs,
        /// Attributes as a JSON object.
        #[arg(long)]
        attributes: Option<String>,
        /// Also issue the user's first token (shown once) to hand over to them.
        #[arg(long)]
        issue_token: bool,
        #[command(flatten)]
        lifetime: LifetimeArgs,
    },
    /// List users.
    List {
        /// Org (default: yours).
        #[arg(long)]
        org: Option<String>,
    },
    /// Show a user.
    Show {
        /// Email.
        email: String,
        /// Org (default: yours).
        #[arg(long)]
        org: Option<String>,
    },
    /// Change a user's org role or one project role.
    SetRole {
        /// Email.
        email: String,
        /// Org (default: yours).
        #[arg(long)]
        org: Option<String>,
        #[command(flatten)]
        roles: SetRoleArgs,
    },
    /// Suspend a user: all their tokens stop until reactivated.
    Suspend {
        /// Email.
        email: String,
        /// Org (default: yours).
        #[arg(long)]
        org: Option<String>,
        /// Why.
        #[arg(long)]
        reason: Option<String>,
    },
    /// Reactivate a suspended user.
    Reactivate {
        /// Email.
        email: String,
        /// Org (default: yours).
        #[arg(long)]
        org: Option<String>,
        /// Why (kept in the audit log).
        #[arg(long)]
        reason: Option<String>,
    },
    /// Remove a user and revoke their tokens; services they created stay.
    Remove {
        /// Email.
        email: String,
        /// Org (default: yours).
        #[arg(long)]
        org: Option<String>,
        /// Why, for the audit log.
        #[arg(long)]
        reason: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
enum ServiceCmd {
    /// Create a service; its token is shown once.
    Create {
        /// Name.
        name: String,
        /// Org (default: yours).
        #[arg(long)]
        org: Option<String>,
        #[command(flatten)]
        roles: RoleArgs,
        /// Attributes as a JSON object.
        #[arg(long)]
        attributes: Option<String>,
        #[command(flatten)]
        lifetime: LifetimeArgs,
    },
    /// List services.
    List {
        /// Org (default: yours).
        #[arg(long)]
        org: Option<String>,
    },
    /// Show a service.
    Show {
        /// Name.
        name: String,
        /// Org (default: yours).
        #[arg(long)]
        org: Option<String>,
    },
    /// Rename a service or replace its attributes (`{}` clears them).
    Edit {
        /// Name.
        name: String,
        /// Org (default: yours).
        #[arg(long)]
        org: Option<String>,
        /// New name.
        #[arg(long)]
        new_name: Option<String>,
        /// New attributes as a JSON object.
        #[arg(long)]
        attributes: Option<String>,
    },
    /// Change a service's org role, or set or remove a project role.
    SetRole {
        /// Name.
        name: String,
        /// Org (default: yours).
        #[arg(long)]
        org: Option<String>,
        #[command(flatten)]
        roles: SetRoleArgs,
    },
    /// Delete a service; its tokens stop at once.
    Delete {
        /// Name.
        name: String,
        /// Org (default: yours).
        #[arg(long)]
        org: Option<String>,
        /// Why, for the audit log.
        #[arg(long)]
        reason: Option<String>,
    },
}

fn parse_role(s: &str) -> Result<Role, String> {
    Role::parse(s).ok_or_else(|| format!("unknown role {s:?}; roles are guest, viewer, editor, admin"))
}

fn parse_attributes(text: Option<&str>) -> anyhow::Result<Option<Attributes>> {
    let Some(text) = text else { return Ok(None) };
    let value: serde_json::Value =
        serde_json::from_str(text).map_err(|e| anyhow!("--attributes is not valid JSON: {e}"))?;
    // As the admin API checks a body: parsed and sent again, a key given twice would go as its
    // last value, and an integer beyond 64 bits rounded, unnoticed.
    crate::admin::check_json(text.as_bytes()).map_err(|e| anyhow!("--attributes: {e}"))?;
    match value {
        serde_json::Value::Object(map) => Ok(Some(map)),
        _ => Err(anyhow!("--attributes must be a JSON object, like '{{\"team\":\"data\"}}'")),
    }
}

/// The token id of `arg`: the id itself (`tgp_a1B2c3`), or a whole token (pasted, say, from a leak
/// report, even with a character of its secret mistyped: its length and alphabet still make it
/// one). Anything else is refused, sending nothing: a revocation or rotation is not undone, and
/// `tgp_a1B2c3,tgp_d4E5f6` or `tgp_a1B2c3/x` must not act on the first id alone.
fn token_id(arg: &str) -> anyhow::Result<String> {
    use crate::token::{TokenId, ID_LEN, TOKEN_LEN};
    match TokenId::parse(unless_whole_token(arg)?) {
        Some(id) => Ok(id.to_string()),
        // Not echoed: it may be a secret, whole or in part.
        None => Err(anyhow!(
            "that is not a token id: give one id of {ID_LEN} characters, as `token list` shows it (like tgp_a1B2c3), or a whole token ({TOKEN_LEN} characters)"
        )),
    }
}

/// What `audit --token-id` sends: a stored token's id (what starts like one is cut to its first
/// 10 characters, so that no part of a secret, however mangled in the pasting, travels in the
/// URL: this only reads), or an ephemeral credential's id (its `jti`), which the API checks.
fn audited_id(arg: &str) -> anyhow::Result<&str> {
    let arg = unless_whole_token(arg)?;
    let prefixed = crate::token::PREFIXES.iter().any(|p| arg.starts_with(p));
    Ok(match arg.get(..crate::token::ID_LEN) {
        Some(id) if prefixed => id,
        _ => arg,
    })
}

/// `arg`, trimmed, or the id of the whole token it is, so that a secret never travels in a URL or
/// comes back in a message. An ephemeral credential (a JWT) is refused, sending nothing: it has no
/// token id, and is stopped by revoking the service token that minted it, which the message names.
fn unless_whole_token(arg: &str) -> anyhow::Result<&str> {
    use crate::token::{ID_LEN, TOKEN_LEN};
    let arg = arg.trim();
    if crate::jwt::looks_like_jwt(arg) {
        let minted_by = minting_token(arg).map_or(String::new(), |tid| format!(" ({tid})"));
        return Err(anyhow!(
            "that is an ephemeral credential (a JWT), which has no token id: it ends at its expiry, or when the service token that minted it{minted_by} is revoked, which ends every credential that token minted"
        ));
    }
    let whole = arg.len() == TOKEN_LEN
        && crate::token::PREFIXES
            .iter()
            .any(|p| arg.strip_prefix(p).is_some_and(|rest| rest.bytes().all(|b| b.is_ascii_alphanumeric())));
    Ok(if whole { &arg[..ID_LEN] } else { arg })
}

/// The `tid` claim (the minting service token's id) of a JWT, read without verifying it: it only
/// names what to look at.
fn minting_token(jwt: &str) -> Option<crate::token::TokenId> {
    crate::token::TokenId::parse(crate::jwt::unverified_claims(jwt)?["tid"].as_str()?)
}

fn load(path: &std::path::Path) -> anyhow::Result<Config> {
    Config::load(path).map_err(|e| invalid(path, &e))
}

/// A config refused: every problem, one per line, with its YAML path.
fn invalid(path: &std::path::Path, e: &crate::config::ConfigError) -> anyhow::Error {
    anyhow!("invalid config {}:\n{e}", path.display())
}

pub(crate) fn init_logging(default_level: &str) {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr)
        // A log line that cannot be written (stderr closed: `quickstart 2>&1 | head`, a closed
        // terminal) is dropped; reporting it would write to the same stderr with `eprintln!`,
        // which panics there, in the middle of serving a request.
        .log_internal_errors(false)
        .finish()
        .with(tracing_subscriber::filter::filter_fn(pingora_at_most_info))
        .with(ClientsPingoraLines)
        .try_init();
}

/// Drops Pingora's lines (at error) about what a client did to its own connection: closed or
/// timed out before or while sending a request head ("Fail to proxy: ..."; the same text after a
/// request was read is the line Tollgate replaces with its own), left before an error answer, or
/// closed before the end of a response. Anyone who can reach the port could fill the log with
/// them; like Pingora's other refusals of a head, they are neither logged nor counted.
struct ClientsPingoraLines;

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for ClientsPingoraLines {
    fn event_enabled(
        &self,
        event: &tracing::Event<'_>,
        _: tracing_subscriber::layer::Context<'_, S>,
    ) -> bool {
        const CLIENTS: [(&str, &str); 3] = [
            ("pingora_proxy", "Fail to proxy: "),
            ("pingora_proxy", "failed to send error response to downstream"),
            ("pingora_proxy", "Error finish sending body to downstream"),
        ];
        // Pingora logs through the `log` crate: such an event's own target is `log`, the
        // module's is a field.
        if event.metadata().target() != "log" {
            return true;
        }
        let mut line = LogLine::default();
        event.record(&mut line);
        !line.target.starts_with("pingora")
            || !CLIENTS
                .iter()
                .any(|(module, start)| line.target.starts_with(module) && line.message.starts_with(start))
    }
}

/// A `log` crate event's target and message, as text.
#[derive(Default)]
struct LogLine {
    target: String,
    message: String,
}

impl tracing::field::Visit for LogLine {
    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        if field.name() == "log.target" {
            self.target = value.to_string();
        }
    }

    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            self.message = format!("{value:?}");
        }
    }
}

/// Pingora never logs below info, whatever the level or `RUST_LOG` says (a directive for one of
/// its modules included): at debug its proxy logs request heads whole, `Authorization` included,
/// and its core a chunked body's bytes. A filter of its own, since a more specific `RUST_LOG`
/// directive overrides any directive added to the env filter.
fn pingora_at_most_info(meta: &tracing::Metadata<'_>) -> bool {
    !meta.target().starts_with("pingora") || *meta.level() <= tracing::Level::INFO
}

fn block_on<T>(fut: impl std::future::Future<Output = anyhow::Result<T>>) -> anyhow::Result<T> {
    tokio::runtime::Builder::new_current_thread().enable_all().build()?.block_on(fut)
}

/// Runs the command line.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    // What a command printed before it failed (`check-config --json`'s errors) is written too.
    let done = run_command(cli);
    let written = flush_out();
    match (done, written) {
        // Both said: what was left to write may be a token kept from an unanswered change.
        (Err(e), Err(w)) => Err(anyhow!(
            "{e:#}; and the answer could not be written either: {w:#} (if it named a token that was made, revoke it: tollgate token revoke <its id>)"
        )),
        (done, written) => done.and(written),
    }
}

fn run_command(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve { config: path } => {
            server::catch_early_signals();
            // Before the reading: an edit from here on is applied once the watcher starts.
            let loaded = server::file_stamp(&path);
            let config = load(&path)?;
            init_logging(&config.log_level);
            server::run(config, &path, loaded, server::Started::default())
        }
        Command::Quickstart { dir, port, admin_port } => quickstart::run(&dir, port, admin_port),
        Command::Echo { listen } => {
            init_logging("info");
            block_on(async move {
                use tokio::signal::unix::{signal, SignalKind};
                let listener = tokio::net::TcpListener::bind(listen)
                    .await
                    .with_context(|| format!("cannot listen on {listen}"))?;
                // Handled, not left to their default: as a container's first process (compose's
                // `echo` service) it would otherwise ignore them, and each stop wait out its grace.
                let (mut term, mut int) =
                    (signal(SignalKind::terminate())?, signal(SignalKind::interrupt())?);
                tracing::info!(%listen, "echo upstream listening");
                tokio::select! {
                    served = crate::echo::serve(listener) => Ok(served?),
                    _ = term.recv() => Ok(()),
                    _ = int.recv() => Ok(()),
                }
            })
        }
        Command::Keygen { algorithm, out } => {
            // Named in the config as the list spells it, whatever case it was asked for in.
            let (name, alg) = crate::jwt::ALGORITHMS
                .iter()
                .find(|(name, _)| name.eq_ignore_ascii_case(&algorithm))
                .copied()
                .ok_or_else(|| anyhow!("unknown algorithm {algorithm:?}; use EdDSA or ES256"))?;
            let pem = crate::jwt::generate_key(alg).map_err(|e| anyhow!(e))?;
            write_private(&out, pem.as_bytes())?;
            if cli.json {
                let wrote = serde_json::json!({ "algorithm": name, "key_file": out.to_string_lossy() });
                outln!("{}", serde_json::to_string_pretty(&wrote)?);
                return Ok(());
            }
            outln!("Wrote a new {name} private key to {}.", out.display());
            outln!("Add it under `jwt.keys` with a kid of your own (make that kid `jwt.signing_key` to sign with it):");
            // A JSON string is a YAML double-quoted one.
            let file = serde_json::Value::from(out.to_string_lossy());
            outln!("  - {{ kid: NEW-KID, algorithm: {name}, key_file: {file} }}");
            Ok(())
        }
        Command::CheckConfig { config: path } => match (Config::load(&path), cli.json) {
            (Ok(config), false) => {
                outln!("{}: ok ({} routes)", path.display(), config.routes.iter().count());
                Ok(())
            }
            (Ok(config), true) => {
                let ok = serde_json::json!({ "ok": true, "routes": config.routes.iter().count() });
                outln!("{}", serde_json::to_string_pretty(&ok)?);
                Ok(())
            }
            (Err(e), false) => Err(invalid(&path, &e)),
            // Every problem with its YAML path (empty for the whole file) on stdout, for a script;
            // the exit code says it failed.
            (Err(e), true) => {
                let errors: Vec<_> = e
                    .issues
                    .iter()
                    .map(|i| serde_json::json!({ "path": i.path, "message": i.message }))
                    .collect();
                outln!(
                    "{}",
                    serde_json::to_string_pretty(&serde_json::json!({ "ok": false, "errors": errors }))?
                );
                let n = e.issues.len();
                Err(anyhow!(
                    "invalid config {} ({n} problem{})",
                    path.display(),
                    if n == 1 { "" } else { "s" }
                ))
            }
        },
        Command::Bootstrap { config, org, email } => {
            let config = load(&config)?;
            if !config.orgs.contains_key(&org) {
                let known: Vec<&str> = config.orgs.keys().map(String::as_str).collect();
                return Err(anyhow!(
                    "org {org:?} is not in the config's `orgs` (it has: {}); add it there first, with its projects and environments",
                    if known.is_empty() { "none".to_string() } else { known.join(", ") }
                ));
            }
            init_logging("warn");
            block_on(async {
                let store = store::open(&config.store, config.audit_max)?;
                let made =
                    lifecycle::bootstrap(&store, config.argon2.params, &config.tokens, &org, &email).await;
                if let Err(lifecycle::LifecycleError::UnansweredToken(u)) = &made {
                    print_kept_token(&u.token, cli.json);
                }
                let (user, token, expires_at) = made.with_context(|| format!("bootstrapping org {org:?}"))?;
                let expires_at = expires_at.map(crate::store::format_millis);
                let id = token.token[..crate::token::ID_LEN].to_string();
                if cli.json {
                    // As `user add --issue-token` answers.
                    let added = AddedUser::new(UserView::from(user), Some((token.token, expires_at)));
                    outln!("{}", serde_json::to_string_pretty(&added)?);
                } else {
                    outln!("Created admin user {email:?} ({}) in org {org:?}.", user.id);
                    print_first_token(&token.token, expires_at.as_deref(), "Store it now");
                }
                flush_out().with_context(|| {
                    format!(
                        "the first admin's token {id} was made but its secret could not be shown: bootstrap another \
                         admin (another --email), and revoke {id} with that one's token"
                    )
                })
            })
        }
        command => {
            let api = Api { client: Client::new(&cli.server, cli.token, cli.json)?, json: cli.json };
            block_on(api.run(command))
        }
    }
}

/// Creates `path` (never overwriting) readable by its owner only, and writes `bytes`.
fn write_private(path: &std::path::Path, bytes: &[u8]) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    file.write_all(bytes).with_context(|| format!("cannot write {}", path.display()))
}

struct Api {
    client: Client,
    json: bool,
}

const NONE: Option<&()> = None;

impl Api {
    async fn get<T: DeserializeOwned>(&self, path: &str) -> anyhow::Result<T> {
        self.client.call(Method::GET, path, NONE).await
    }

    async fn send<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: &impl Serialize,
    ) -> anyhow::Result<T> {
        self.client.call(method, path, Some(body)).await
    }

    async fn org(&self, org: Option<String>) -> anyhow::Result<String> {
        match org {
            Some(o) => Ok(o),
            None => Ok(self.get::<WhoAmI>("/v1/whoami").await?.org),
        }
    }

    /// Prints JSON with `--json`, else what `human` makes of it (with [`outln!`]).
    fn show<T: Serialize>(&self, value: &T, human: impl FnOnce(&T)) -> anyhow::Result<()> {
        if self.json {
            outln!("{}", serde_json::to_string_pretty(value)?);
        } else {
            human(value);
        }
        flush_out()
    }

    async fn run(&self, command: Command) -> anyhow::Result<()> {
        match command {
            Command::Token(cmd) => self.token(cmd).await,
            Command::User(cmd) => self.user(cmd).await,
            Command::Service(cmd) => self.service(cmd).await,
            Command::Credentials(CredentialsCmd::Issue {
                org,
                project,
                attributes,
                user_email,
                subject,
                ttl_seconds,
                narrowing,
            }) => {
                let (scope, permissions, environments) = narrowing.into_parts();
                let req = CredentialsRequest {
                    attributes: parse_attributes(attributes.as_deref())?,
                    user_email,
                    subject,
                    ttl_seconds,
                    scope,
                    permissions,
                    environments,
                };
                let path = format!("/v1/orgs/{}/projects/{}/credentials", segment(&org), segment(&project));
                let issued: IssuedCredential = self.send(Method::POST, &path, &req).await?;
                self.show(&issued, |c| {
                    outln!(
                        "Issued an ephemeral credential for {:?} on {}/{}, expiring {} (in {} s).",
                        c.subject,
                        c.org,
                        c.project,
                        c.expires_at,
                        c.expires_in
                    );
                    outln!("Credential id: {}", c.id);
                    if let Some(permissions) = &c.permissions {
                        outln!("Permissions:   {}", permissions.join(", "));
                    }
                    if let Some(environments) = &c.environments {
                        outln!("Environments:  {}", environments.join(", "));
                    }
                    outln!("Access token: {}", c.token);
                })
            }
            Command::Whoami => {
                let me: WhoAmI = self.get("/v1/whoami").await?;
                self.show(&me, |me| {
                    outln!("Subject:       {}", me.subject);
                    if let Some(email) = &me.email {
                        outln!("Email:         {email}");
                    }
                    outln!("Org:           {} (role {})", me.org, me.org_role);
                    match &me.project_roles {
                        Some(roles) => outln!("Project roles: {}", roles_text(roles)),
                        None => outln!("Project roles: (not told by this gateway, an older version)"),
                    }
                    if let Some(id) = &me.token_id {
                        outln!("Token:         {id}");
                    }
                    if let Some(scope) = &me.scope {
                        outln!("Scope:         {}", scope.join(", "));
                    }
                    if let Some(envs) = &me.environments {
                        outln!("Environments:  {}", envs.join(", "));
                    }
                })
            }
            Command::Audit { org, token_id: id, limit } => {
                let id = id.as_deref().map(audited_id).transpose()?;
                let org = self.org(org).await?;
                let mut path = format!("/v1/orgs/{}/audit?limit={limit}", segment(&org));
                if let Some(id) = id {
                    path.push_str(&format!("&token_id={}", segment(id)));
                }
                let events: Vec<AuditEntry> = self.get(&path).await?;
                self.show(&events, |events| {
                    let rows = events
                        .iter()
                        .map(|e| {
                            // What the change was (a rotation's new token, the role given):
                            // the entry's details, on one line.
                            let details = details_text(&e.details);
                            // A user by their email (`user:<id>` names nobody a command can
                            // look up), with the token they acted with: what a leaked token did
                            // shows.
                            let who = e.actor_email.as_deref().unwrap_or(&e.actor);
                            let actor = match &e.by_token {
                                Some(t) => format!("{who} ({t})"),
                                None => who.to_string(),
                            };
                            vec![
                                e.at.0.clone(),
                                actor,
                                e.action.clone(),
                                e.target.clone(),
                                e.token_id.clone().unwrap_or_default(),
                                e.reason.clone().unwrap_or_default(),
                                details,
                            ]
                        })
                        .collect::<Vec<_>>();
                    table(&["TIME", "ACTOR", "ACTION", "TARGET", "TOKEN", "REASON", "DETAILS"], &rows);
                    if limit > 0 && events.len() >= limit {
                        // Said on stderr, beside the table a script may read: older entries exist.
                        use std::io::Write;
                        let _ = writeln!(
                            std::io::stderr(),
                            "(the newest {limit} entries: older ones may exist; `--limit` shows more)"
                        );
                    }
                })
            }
            Command::Serve { .. }
            | Command::CheckConfig { .. }
            | Command::Bootstrap { .. }
            | Command::Quickstart { .. }
            | Command::Keygen { .. }
            | Command::Echo { .. } => Ok(()),
        }
    }

    async fn token(&self, cmd: TokenCmd) -> anyhow::Result<()> {
        match cmd {
            TokenCmd::Issue { name, display_name, service, user, mut lifetime, narrowing } => {
                let mut display_name = display_name.or(name);
                let asking = display_name.is_none() && lifetime.is_unset() && !self.json && at_a_terminal();
                if asking {
                    // Not asked only to be told there is nothing to call with.
                    self.client.token()?;
                    (display_name, lifetime) = ask_name_and_lifetime(&mut std::io::stdin().lock())?;
                }
                let (scope, permissions, environments) = narrowing.into_parts();
                let LifetimeArgs { ttl_minutes, expires } = lifetime;
                let mut req = IssueRequest {
                    display_name,
                    ttl_minutes,
                    expires,
                    scope,
                    permissions,
                    environments,
                    service,
                    user,
                };
                let mut sent = self.send(Method::POST, "/v1/tokens", &req).await;
                // Left empty where the gateway requires an expiry (which the prompt cannot know):
                // asked again, as the prompt offered the empty answer.
                while asking
                    && req.ttl_minutes.is_none()
                    && req.expires.is_none()
                    && sent.as_ref().is_err_and(|e| e.to_string().contains("requires an expiry"))
                {
                    let question = "This gateway requires an expiry: in minutes, or at an RFC 3339 time (empty to give up): ";
                    let asked = ask_lifetime(&mut std::io::stdin().lock(), question)?;
                    let Some(LifetimeArgs { ttl_minutes, expires }) = asked else { break };
                    (req.ttl_minutes, req.expires) = (ttl_minutes, expires);
                    sent = self.send(Method::POST, "/v1/tokens", &req).await;
                }
                let issued: IssuedToken = sent?;
                self.show(&issued, print_issued).with_context(|| secret_lost(&issued.details.id))
            }
            TokenCmd::List { all, owner } => {
                let mut path = format!("/v1/tokens?all={all}");
                if let Some(o) = owner {
                    path.push_str(&format!("&owner={}", segment(&o)));
                }
                let tokens: Vec<TokenView> = self.get(&path).await?;
                self.show(&tokens, |tokens| {
                    let mut headers = vec!["ID", "DISPLAY NAME", "CREATED", "EXPIRES"];
                    // Also when a listed token is in a rotation's grace ("deprecated"), which an
                    // active-only list shows too.
                    let status = all || tokens.iter().any(|t| t.status != "active");
                    if status {
                        headers.push("STATUS");
                    }
                    let rows = tokens
                        .iter()
                        .map(|t| {
                            let mut row = vec![
                                t.id.clone(),
                                t.display_name.clone().unwrap_or_default(),
                                short_time(&t.created_at),
                                // In a rotation's grace: when it stops, which is sooner.
                                works_until(t)
                                    .filter(|_| t.status == "deprecated")
                                    .or(t.expires_at.as_deref())
                                    .map_or("Never".into(), short_time),
                            ];
                            if status {
                                row.push(t.status.clone());
                            }
                            row
                        })
                        .collect::<Vec<_>>();
                    table(&headers, &rows);
                })
            }
            TokenCmd::Get { id } => {
                let id = token_id(&id)?;
                let t: TokenView = self.get(&format!("/v1/tokens/{}", segment(&id))).await?;
                self.show(&t, print_token)
            }
            TokenCmd::Revoke { id, display_name, reason } => {
                let (path, req) = match id {
                    Some(id) => (
                        format!("/v1/tokens/{}/revoke", segment(&token_id(&id)?)),
                        RevokeRequest { display_name: None, reason },
                    ),
                    None => ("/v1/tokens/revoke".to_string(), RevokeRequest { display_name, reason }),
                };
                let t: TokenView = self.send(Method::POST, &path, &req).await?;
                self.show(&t, |t| outln!("Revoked token {}.", t.id))
            }
            TokenCmd::Rotate { id, narrowing, expires, ttl_minutes, grace_seconds } => {
                let id = token_id(&id)?;
                let (scope, permissions, environments) = narrowing.into_parts();
                let req =
                    RotateRequest { scope, permissions, expires, ttl_minutes, environments, grace_seconds };
                let issued: IssuedToken =
                    self.send(Method::POST, &format!("/v1/tokens/{}/rotate", segment(&id)), &req).await?;
                // The old token's grace ends at its own expiry if that comes first: its record
                // says when it stops.
                let old: Option<TokenView> = match grace_seconds.filter(|g| *g > 0) {
                    Some(_) if !self.json => self.get(&format!("/v1/tokens/{}", segment(&id))).await.ok(),
                    _ => None,
                };
                self.show(&issued, |t| {
                    match (grace_seconds.filter(|g| *g > 0), old.as_ref().and_then(works_until)) {
                        (Some(_), Some(until)) => {
                            outln!("Rotated {id}; the old token keeps working until {until}.")
                        }
                        (Some(g), None) => {
                            outln!("Rotated {id}; the old token keeps working for {g} seconds.")
                        }
                        (None, _) => outln!("Rotated {id}; the old token is revoked."),
                    }
                    print_issued(t);
                })
                .with_context(|| secret_lost(&issued.details.id))
            }
        }
    }

    async fn user(&self, cmd: UserCmd) -> anyhow::Result<()> {
        match cmd {
            UserCmd::Add { email, org, roles, attributes, issue_token, lifetime } => {
                let attributes = parse_attributes(attributes.as_deref())?.unwrap_or_default();
                let org_role = roles.org_role.ok_or_else(|| anyhow!("give --org-role"))?;
                let body = AddUser {
                    email,
                    org_role,
                    project_roles: roles.project_roles()?,
                    attributes,
                    issue_token,
                    ttl_minutes: lifetime.ttl_minutes,
                    expires: lifetime.expires,
                };
                let org = self.org(org).await?;
                let added: AddedUser =
                    self.send(Method::POST, &format!("/v1/orgs/{}/users", segment(&org)), &body).await?;
                let made = added.token_id.clone();
                self.show(&added, |a| {
                    let u = &a.user;
                    outln!("Added user {:?} ({}) to org {:?} as {}.", u.email, u.id, u.org, u.org_role);
                    if let Some(token) = &a.token {
                        let expires_at = a.token_expires_at.as_ref().and_then(Option::as_deref);
                        print_first_token(token, expires_at, "Hand it over now");
                    }
                })
                .map_err(|e| match &made {
                    Some(id) => e.context(secret_lost(id)),
                    None => e,
                })
            }
            UserCmd::List { org } => {
                let org = self.org(org).await?;
                let users: Vec<UserView> = self.get(&format!("/v1/orgs/{}/users", segment(&org))).await?;
                self.show(&users, |users| {
                    let rows = users
                        .iter()
                        .map(|u| {
                            vec![
                                u.email.clone(),
                                u.id.clone(),
                                u.org_role.to_string(),
                                status_text(u.status),
                                roles_text(&u.project_roles),
                            ]
                        })
                        .collect::<Vec<_>>();
                    table(&["EMAIL", "ID", "ORG ROLE", "STATUS", "PROJECT ROLES"], &rows);
                })
            }
            UserCmd::Show { email, org } => {
                let org = self.org(org).await?;
                let u: UserView =
                    self.get(&format!("/v1/orgs/{}/users/{}", segment(&org), segment(&email))).await?;
                self.show(&u, print_user)
            }
            UserCmd::SetRole { email, org, roles } => {
                let org = self.org(org).await?;
                let path = format!("/v1/orgs/{}/users/{}/role", segment(&org), segment(&email));
                let u: UserView = self.send(Method::POST, &path, &roles.change()).await?;
                self.show(&u, print_user)
            }
            UserCmd::Suspend { email, org, reason } => {
                let org = self.org(org).await?;
                let path = format!("/v1/orgs/{}/users/{}/suspend", segment(&org), segment(&email));
                let u: UserView = self.send(Method::POST, &path, &Reason { reason }).await?;
                self.show(&u, |u| outln!("Suspended {}: all their tokens are refused.", u.email))
            }
            UserCmd::Reactivate { email, org, reason } => {
                let org = self.org(org).await?;
                let path = format!("/v1/orgs/{}/users/{}/reactivate", segment(&org), segment(&email));
                let u: UserView = self.send(Method::POST, &path, &Reason { reason }).await?;
                self.show(&u, |u| outln!("Reactivated {}.", u.email))
            }
            UserCmd::Remove { email, org, reason } => {
                let org = self.org(org).await?;
                let path = format!("/v1/orgs/{}/users/{}", segment(&org), segment(&email));
                let v: serde_json::Value = self.send(Method::DELETE, &path, &Reason { reason }).await?;
                self.show(&v, |v| outln!("Removed {email}; revoked {} token(s).", v["revoked_tokens"]))
            }
        }
    }

    async fn service(&self, cmd: ServiceCmd) -> anyhow::Result<()> {
        match cmd {
            ServiceCmd::Create { name, org, roles, attributes, lifetime } => {
                let org = self.org(org).await?;
                let body = CreateService {
                    org: String::new(),
                    name,
                    org_role: roles.org_role,
                    project_roles: roles.project_roles()?,
                    attributes: parse_attributes(attributes.as_deref())?.unwrap_or_default(),
                    ttl_minutes: lifetime.ttl_minutes,
                    expires: lifetime.expires,
                };
                let created: CreatedService =
                    self.send(Method::POST, &format!("/v1/orgs/{}/services", segment(&org)), &body).await?;
                self.show(&created, |c| {
                    outln!("Created service {:?} in org {:?}.", c.service.name, c.service.org);
                    print_first_token(&c.token, c.token_expires_at.as_deref(), "Store it now");
                })
                .with_context(|| secret_lost(&created.token_id))
            }
            ServiceCmd::List { org } => {
                let org = self.org(org).await?;
                let services: Vec<ServiceView> =
                    self.get(&format!("/v1/orgs/{}/services", segment(&org))).await?;
                self.show(&services, |services| {
                    let rows = services
                        .iter()
                        .map(|s| {
                            vec![
                                s.name.clone(),
                                s.org_role.map(|r| r.to_string()).unwrap_or_else(|| "-".into()),
                                roles_text(&s.project_roles),
                                serde_json::Value::Object(s.attributes.clone()).to_string(),
                            ]
                        })
                        .collect::<Vec<_>>();
                    table(&["NAME", "ORG ROLE", "PROJECT ROLES", "ATTRIBUTES"], &rows);
                })
            }
            ServiceCmd::Show { name, org } => {
                let org = self.org(org).await?;
                let s: ServiceView =
                    self.get(&format!("/v1/orgs/{}/services/{}", segment(&org), segment(&name))).await?;
                self.show(&s, print_service)
            }
            ServiceCmd::Edit { name, org, new_name, attributes } => {
                let org = self.org(org).await?;
                let body = EditService { new_name, attributes: parse_attributes(attributes.as_deref())? };
                let path = format!("/v1/orgs/{}/services/{}", segment(&org), segment(&name));
                let s: ServiceView = self.send(Method::PATCH, &path, &body).await?;
                self.show(&s, print_service)
            }
            ServiceCmd::SetRole { name, org, roles } => {
                let org = self.org(org).await?;
                let path = format!("/v1/orgs/{}/services/{}/role", segment(&org), segment(&name));
                let s: ServiceView = self.send(Method::POST, &path, &roles.change()).await?;
                self.show(&s, print_service)
            }
            ServiceCmd::Delete { name, org, reason } => {
                let org = self.org(org).await?;
                let path = format!("/v1/orgs/{}/services/{}", segment(&org), segment(&name));
                let v: serde_json::Value = self.send(Method::DELETE, &path, &Reason { reason }).await?;
                self.show(&v, |v| match v["revoked_tokens"].as_u64() {
                    Some(n) => outln!(
                        "Deleted service {name:?} from org {org:?}; revoked {n} token(s), and every credential they minted is refused."
                    ),
                    // A gateway older than this CLI does not count them.
                    None => outln!("Deleted service {name:?} from org {org:?}; its tokens are refused."),
                })
            }
        }
    }
}

/// `2026-11-22T21:09:03Z` -> `2026-11-22 21:09`.
fn short_time(rfc3339: &str) -> String {
    rfc3339.get(..16).map(|s| s.replace('T', " ")).unwrap_or_else(|| rfc3339.to_string())
}

fn status_text(s: store::UserStatus) -> String {
    serde_json::to_value(s).ok().and_then(|v| v.as_str().map(str::to_string)).unwrap_or_default()
}

/// An audit entry's details on one line: a long list as its length (a removal's every revoked
/// token id), and the whole cut at 160 characters (`--json` has it all).
fn details_text(details: &serde_json::Value) -> String {
    use serde_json::Value;
    let shown = match details {
        Value::Null => return String::new(),
        Value::Object(m) if m.is_empty() => return String::new(),
        Value::Object(m) => Value::Object(
            m.iter()
                .map(|(k, v)| match v {
                    Value::Array(items) if items.len() > 3 => {
                        (k.clone(), format!("{} items", items.len()).into())
                    }
                    v => (k.clone(), v.clone()),
                })
                .collect(),
        ),
        d => d.clone(),
    };
    let text = shown.to_string();
    match text.char_indices().nth(160) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text,
    }
}

/// Project roles as `project:role,...`, or `-` for none (as an org role's cell says it).
fn roles_text(roles: &BTreeMap<String, Role>) -> String {
    if roles.is_empty() {
        return "-".into();
    }
    roles.iter().map(|(p, r)| format!("{p}:{r}")).collect::<Vec<_>>().join(",")
}

/// When a token in a rotation's grace stops working: the grace's end, or its expiry if sooner
/// (both RFC 3339 in UTC, so they compare as text).
fn works_until(t: &TokenView) -> Option<&str> {
    let end = t.revoked_at.as_deref()?;
    Some(t.expires_at.as_deref().map_or(end, |expiry| expiry.min(end)))
}

/// A token made by a change the store did not answer: printed, since the change may have been made
/// (as JSON with `--json`; as sent it is only ever escaped, never cut).
pub(crate) fn print_kept_token(token: &str, json: bool) {
    if json {
        let kept = serde_json::json!({
            "token": token,
            "kept": "the change may have been made: if it was, this is the new token, shown once"
        });
        outln!("{kept}");
        return;
    }
    outln!("Access token: {}", client::printable(token));
    outln!("Keep it: the change may have been made (see below), and then this is the new token; it will not be shown again.");
}

/// A first token made with a user or a service: it, and when it expires (`tokens.max_ttl` may
/// have given it an expiry no one asked for).
fn print_first_token(token: &str, expires_at: Option<&str>, keep: &str) {
    outln!("Access token: {token}");
    outln!("Expires:      {}", expires_at.unwrap_or("never"));
    outln!("{keep}: it will not be shown again.");
}

fn print_issued(t: &IssuedToken) {
    outln!("Token issued: {}", t.details.id);
    if let Some(name) = &t.details.display_name {
        outln!("Display name: {}", client::printable(name));
    }
    outln!("Expires:      {}", t.details.expires_at.as_deref().unwrap_or("never"));
    outln!("Access token: {}", t.token);
    outln!("Store it now: it will not be shown again.");
}

fn print_token(t: &TokenView) {
    let or_dash = |v: &Option<String>| v.clone().unwrap_or_else(|| "-".into());
    let scope = match (&t.scope, &t.permissions) {
        (Some(name), Some(p)) => format!("{name} ({})", p.join(",")),
        (None, Some(p)) => p.join(","),
        _ => "all of the owner's permissions".into(),
    };
    let rows = [
        ("ID", t.id.clone()),
        ("Kind", t.kind.clone()),
        ("Owner", t.owner.clone()),
        ("Display name", or_dash(&t.display_name)),
        ("Status", t.status.clone()),
        ("Scope", scope),
        ("Environments", t.environments.as_ref().map_or("all".into(), |e| e.join(","))),
        ("Created", t.created_at.clone()),
        ("Expires", t.expires_at.clone().unwrap_or_else(|| "never".into())),
        (
            "Last used",
            match (&t.last_used_at, &t.last_used_ip) {
                (Some(at), Some(ip)) => format!("{at} from {ip}"),
                _ => "never".into(),
            },
        ),
        // A token in a rotation's grace is "revoked" from a time still to come: when it stops.
        match works_until(t).filter(|_| t.status == "deprecated") {
            Some(until) => ("Works until", format!("{until} (a rotation's grace)")),
            None => ("Revoked", or_dash(&t.revoked_at)),
        },
        ("Reason", or_dash(&t.revoke_reason)),
        ("Rotated to", or_dash(&t.rotated_to)),
    ];
    for (k, v) in rows {
        outln!("{:<14}{}", format!("{k}:"), client::printable(&v));
    }
}

/// One `Label:   value` line of a record, the value shown with control characters escaped.
fn field(label: &str, value: impl std::fmt::Display) {
    outln!("{label:<15}{}", client::printable(&value.to_string()));
}

fn print_user(u: &UserView) {
    field("Email:", &u.email);
    field("ID:", &u.id);
    field("Org:", &u.org);
    field("Org role:", u.org_role);
    field("Project roles:", roles_text(&u.project_roles));
    field("Status:", status_text(u.status));
    field("Attributes:", serde_json::Value::Object(u.attributes.clone()));
}

fn print_service(s: &ServiceView) {
    field("Name:", &s.name);
    field("Org:", &s.org);
    field("Org role:", s.org_role.map(|r| r.to_string()).unwrap_or_else(|| "-".into()));
    field("Project roles:", roles_text(&s.project_roles));
    field("Attributes:", serde_json::Value::Object(s.attributes.clone()));
    field("Created:", &s.created_at);
}

#[cfg(test)]
mod tests {
    use super::details_text;

    /// An audit row stays one readable line: a removal's thousand revoked ids are a count, and a
    /// long entry is cut (`--json` has it whole).
    #[test]
    fn audit_details_fit_a_table_row() {
        assert_eq!(details_text(&serde_json::Value::Null), "");
        assert_eq!(details_text(&serde_json::json!({})), "");
        let rotated = serde_json::json!({ "rotated_from": "tgp_a1B2c3" });
        assert_eq!(details_text(&rotated), r#"{"rotated_from":"tgp_a1B2c3"}"#);
        let ids: Vec<String> = (0..1000).map(|i| format!("tgp_{i:06}")).collect();
        let removal = serde_json::json!({ "id": "u_1", "revoked_tokens": ids });
        assert_eq!(details_text(&removal), r#"{"id":"u_1","revoked_tokens":"1000 items"}"#);
        let few = serde_json::json!({ "revoked_tokens": ["tgp_a", "tgp_b"] });
        assert_eq!(details_text(&few), r#"{"revoked_tokens":["tgp_a","tgp_b"]}"#);
        let wide = serde_json::json!({ "attributes": { "note": "é".repeat(400) } });
        let text = details_text(&wide);
        assert_eq!(text.chars().count(), 161, "{text}");
        assert!(text.ends_with('…'));
    }
}

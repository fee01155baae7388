//! `tollgate quickstart`: from a clean clone to an authenticated request in one command. Writes a
//! config for the embedded store, starts the built-in echo upstream, bootstraps an admin (or, on a
//! later run, gives the existing admin a fresh token), prints the token and the lines to try, and
//! serves.

use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::Path;

use anyhow::Context;

use crate::config::Config;
use crate::lifecycle;
use crate::store;
use crate::{echo, server};

const ORG: &str = "demo";
const EMAIL: &str = "admin@demo.local";

/// The line of a quickstart config that names the echo upstream's address, so that a later run
/// starts the echo where the (possibly edited) config expects it.
const ECHO_MARK: &str = "# quickstart echo upstream: ";

/// The store's file in `dir`, as an absolute path where the working directory is known.
fn store_path(dir: &Path) -> std::path::PathBuf {
    let file = dir.join("store.redb");
    std::path::absolute(&file).unwrap_or(file)
}

fn config_text(port: u16, admin_port: u16, upstream: SocketAddr, dir: &Path) -> String {
    format!(
        r#"# Written by `tollgate quickstart`; edit it and the running gateway reloads it. Later runs of
# quickstart use it as it is (delete it for a fresh one).
{ECHO_MARK}{upstream}
listen: 127.0.0.1:{port}
admin: {{ listen: "127.0.0.1:{admin_port}" }}
store:
  embedded: {{ path: {store} }}
orgs:
  {ORG}:
    projects:
      app: {{ environments: [production] }}
routes:
  - name: demo
    path: /demo
    upstream: "{upstream}"
    org: {ORG}
    project: app
    environment: production
    query_token: true
  - name: public
    path: /public
    upstream: "{upstream}"
    auth: none
"#,
        // A JSON string is a YAML double-quoted one: a `"` or `\` in the directory's name stays itself.
        // Absolute: a relative path is read from the working directory, and a later run from
        // another one (`--dir` naming this directory) would open a new, empty store there.
        store = serde_json::Value::from(store_path(dir).to_string_lossy()),
    )
}

/// Runs the quickstart; serves until stopped.
/// `port` and `admin_port` as given on the command line: they shape a new config; an earlier
/// run's config is used as it is, and a port given that differs from it is refused.
pub fn run(dir: &Path, port: Option<u16>, admin_port: Option<u16>) -> anyhow::Result<()> {
    server::catch_early_signals();
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let path = dir.join("tollgate.yaml");
    // Before the reading: an edit from here on (the instructions invite them) is applied once the
    // watcher starts.
    let mut loaded = server::file_stamp(&path);
    let (config, upstream_listener) = match std::fs::read_to_string(&path) {
        // A config from an earlier run is kept as it is, the user's edits included.
        Ok(text) => {
            say(&format!("Using {} from an earlier run (delete it for a fresh one).\n", path.display()));
            let config = load(&path)?;
            // Written relative by an earlier version: read from the working directory, which
            // may not be the one it was written from.
            let store = &config.store.embedded_path;
            if config.store.redis.is_none() && store.is_relative() {
                let here = std::env::current_dir().map(|d| d.join(store)).unwrap_or_else(|_| store.clone());
                say(&format!(
                    "Note: its store path {} is relative, so this run opens {}; if the earlier run's data is elsewhere, stop, and write its absolute path in the config.\n",
                    store.display(),
                    here.display()
                ));
            }
            for (flag, given, own) in
                [("--port", port, config.listen), ("--admin-port", admin_port, config.admin.listen)]
            {
                if let Some(given) = given.filter(|p| *p != own.port()) {
                    anyhow::bail!(
                        "{flag} {given} differs from {} ({own}), which this run uses as it is: change \
                         the port there, or delete the file for a fresh config",
                        path.display()
                    );
                }
            }
            // A gateway already running on this directory holds its store: said before the echo
            // upstream's port, which it holds too, is blamed on the config.
            drop(store::open(&config.store, config.audit_max)?);
            let listener = echo_listener(&text, &config, &path)?;
            (config, listener)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let (port, admin_port) = (port.unwrap_or(8080), admin_port.unwrap_or(8081));
            // Before the file is written: a config whose ports cannot be used would be kept and
            // used as it is by the next run.
            if port == admin_port {
                anyhow::bail!(
                    "--port and --admin-port are both {port}; give each its own (nothing was written)"
                );
            }
            for (flag, port) in [("--port", port), ("--admin-port", admin_port)] {
                TcpListener::bind((Ipv4Addr::LOCALHOST, port)).with_context(|| {
                    format!("cannot listen on 127.0.0.1:{port} (nothing was written or issued; free it, or choose another with {flag})")
                })?;
            }
            // Next to the admin port if free (the ports the OS hands out may be taken by any
            // client later, and a later run binds the same one again), else any.
            let listener = admin_port
                .checked_add(1)
                .filter(|p| *p != port)
                .and_then(|p| TcpListener::bind((Ipv4Addr::LOCALHOST, p)).ok())
                .map_or_else(|| TcpListener::bind((Ipv4Addr::LOCALHOST, 0)), Ok)
                .context("cannot start the echo upstream")?;
            write_whole(&path, &config_text(port, admin_port, listener.local_addr()?, dir))
                .with_context(|| format!("cannot write {} (nothing was written)", path.display()))?;
            loaded = server::file_stamp(&path);
            (load(&path)?, Some(listener))
        }
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    };
    // The config's `log.level` where it asks for more or less than the default (`info`, which
    // here is Tollgate's lines at info and only warnings from the rest).
    let level = match config.log_level.as_str() {
        "info" => "warn,tollgate=info",
        level => level,
    };
    super::init_logging(level);

    // The ports first: a token issued for a gateway that then cannot start would be left behind.
    for (what, addr) in [("listen", config.listen), ("admin.listen", config.admin.listen)] {
        TcpListener::bind(addr).with_context(|| {
            format!(
                "cannot listen on {what} {addr} (nothing was issued; free it, or change it in {})",
                path.display()
            )
        })?;
    }
    let token = first_token(&config)?;
    let echo = upstream_listener.is_some();
    if let Some(listener) = upstream_listener {
        echo::spawn(listener)?;
    }
    print_instructions(&config, &path, &token, echo);
    // Its secret is known good: the printed lines work at once, however busy the machine (a
    // first check's argon2 runs at the lowest priority).
    // And a closed terminal's hangup stops it, rather than leave it serving unseen.
    server::run(config, &path, loaded, server::Started { minted: vec![token], hangup_stops: true })
}

fn load(path: &Path) -> anyhow::Result<Config> {
    Config::load(path)
        .map_err(|e| anyhow::anyhow!("quickstart config {} invalid (fix or delete it):\n{e}", path.display()))
}

/// The echo upstream where an existing quickstart config names it (its marker line, or, in a
/// config written before the marker, the `demo` route's upstream); none if neither is there.
fn echo_listener(text: &str, config: &Config, path: &Path) -> anyhow::Result<Option<TcpListener>> {
    let marked = text.lines().find_map(|l| l.strip_prefix(ECHO_MARK)).map(str::trim);
    let none = || {
        say(&format!("No `{}` line in it: no echo upstream started.\n", ECHO_MARK.trim_end()));
        Ok(None)
    };
    let addr = match marked {
        Some(addr) => addr.parse::<SocketAddr>().with_context(|| {
            format!("{}: the `{}` line names no address: {addr:?}", path.display(), ECHO_MARK.trim_end())
        })?,
        // Written by a quickstart from before the line: its `demo` route leads to the echo (if
        // that port is taken now, the user may have put their own app there).
        None if text.starts_with("# Written by `tollgate quickstart`") => {
            // Only as quickstart wrote it: `demo` and `public` both on one loopback upstream.
            let upstream = |name: &str| {
                config.routes.iter().find(|r| r.name == name).map(|r| r.upstreams.clone()).unwrap_or_default()
            };
            let (demo, public) = (upstream("demo"), upstream("public"));
            let echo = match demo.as_slice() {
                [a] if a.ip().is_loopback() && public == demo => Some(*a),
                _ => None,
            };
            match echo.filter(|a| !clashes(*a, config)).and_then(|a| TcpListener::bind(a).ok()) {
                Some(listener) => return Ok(Some(listener)),
                None => return none(),
            }
        }
        None => return none(),
    };
    if clashes(addr, config) {
        anyhow::bail!(
            "{}: the echo upstream's address {addr} is the gateway's own; change the `{}` line (and the \
             routes that use it), or delete the file for a fresh config",
            path.display(),
            ECHO_MARK.trim_end()
        );
    }
    let listener = TcpListener::bind(addr).with_context(|| {
        format!(
            "cannot start the echo upstream on {addr}, as {} says: change that port there (the `{}` \
             line and the routes' upstreams), or delete the file for a fresh config",
            path.display(),
            ECHO_MARK.trim_end()
        )
    })?;
    Ok(Some(listener))
}

/// Whether `addr` is (or overlaps, through an any-address listener) the gateway's or admin API's.
fn clashes(addr: SocketAddr, config: &Config) -> bool {
    [config.listen, config.admin.listen].into_iter().any(|own| crate::config::same_socket(own, addr))
}

/// Bootstraps the demo admin, or gives the existing one a new token (audited, as `quickstart`).
/// The store is closed again before the gateway opens it (the embedded store serves one process).
fn first_token(config: &Config) -> anyhow::Result<String> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(async {
        let store = store::open(&config.store, config.audit_max)?;
        let params = config.argon2.params;
        let token = match store.find_user_by_email(ORG, EMAIL).await? {
            None => lifecycle::bootstrap(&store, params, &config.tokens, ORG, EMAIL).await?.1,
            Some(user) => {
                lifecycle::operator_token(&store, params, &config.tokens, &user.into_inner(), "quickstart")
                    .await?
            }
        };
        Ok(token.token)
    })
}

/// Writes `text` to `path` whole or not at all (a file cut short by a full disk would be read
/// back, by every later run, as a config with nothing in it).
fn write_whole(path: &Path, text: &str) -> std::io::Result<()> {
    let partial = path.with_extension("yaml.partial");
    let written = std::fs::write(&partial, text).and_then(|()| std::fs::rename(&partial, path));
    if written.is_err() {
        let _ = std::fs::remove_file(&partial);
    }
    written
}

fn print_instructions(config: &Config, path: &Path, token: &str, echo: bool) {
    say(&instructions(config, path, token, echo));
}

/// What [`print_instructions`] prints.
fn instructions(config: &Config, path: &Path, token: &str, echo: bool) -> String {
    let gw = format!("http://{}", config.listen);
    let admin = format!("http://{}", config.admin.listen);
    // The binary running now, however it was started (`cargo run` builds it in `target/`).
    let cli =
        std::env::current_exe().map_or_else(|_| "tollgate".into(), |p| shell_word(&p.display().to_string()));
    // Only where one was started (an older config's echo port may be someone else's now).
    let demo = match echo {
        true => "route /demo -> a built-in echo upstream",
        false => "route /demo -> the upstream your config names; no echo upstream was started",
    };
    format!(
        "Tollgate is starting.
  gateway    {gw}   ({demo}, org \"{ORG}\")
  admin API  {admin}
  config     {}   (edits are picked up while it runs)

Access token for {EMAIL} (shown once):
Access token: {token}

Try:
  curl -i {gw}/demo/hello
  curl -i -H \"Authorization: Bearer {token}\" {gw}/demo/hello
  TOLLGATE_SERVER={admin} TOLLGATE_TOKEN={token} {cli} token list

Stop with Ctrl-C; run it again to continue with the same data.
",
        path.display()
    )
}

/// `word` as a POSIX shell reads it back: as it is when it holds nothing the shell treats
/// specially, else in single quotes (a checkout under `~/My Projects` is one word, not two).
fn shell_word(word: &str) -> String {
    let plain = |c: char| c.is_ascii_alphanumeric() || "/._-+:,@%=".contains(c);
    if !word.is_empty() && word.chars().all(plain) {
        return word.to_string();
    }
    format!("'{}'", word.replace('\'', r"'\''"))
}

/// Writes `text` to stdout, whether or not anyone still reads it: the gateway keeps running when
/// whoever read its instructions (`| head`, a pager, a script) has gone, where `println!` would
/// panic on the closed pipe and take the gateway down.
fn say(text: &str) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(text.as_bytes()).and_then(|()| out.flush());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_written_config_names_any_directory_as_it_is() {
        // A `"` in the directory's name broke the YAML, and every later run reused the file.
        let dir = Path::new("/tmp/q\"x\\y: z #w");
        let upstream = SocketAddr::from((Ipv4Addr::LOCALHOST, 9));
        let config = Config::parse(&config_text(18080, 18081, upstream, dir)).unwrap();
        assert_eq!(config.store.embedded_path, dir.join("store.redb"));
    }

    /// The first line says where /demo leads: to the echo upstream only where one was started.
    #[test]
    fn the_instructions_promise_an_echo_upstream_only_when_one_runs() {
        let upstream = SocketAddr::from((Ipv4Addr::LOCALHOST, 9));
        let config = Config::parse(&config_text(18080, 18081, upstream, Path::new("/tmp/qs"))).unwrap();
        let path = Path::new("/tmp/qs/tollgate.yaml");
        let started = instructions(&config, path, "tgp_x", true);
        assert!(started.contains("route /demo -> a built-in echo upstream"), "{started}");
        let none = instructions(&config, path, "tgp_x", false);
        assert!(none.contains("no echo upstream was started") && !none.contains("built-in echo"), "{none}");
    }

    /// A config is written whole or not at all: a write that fails leaves the earlier file as it
    /// was (a file cut short by a full disk was read back by every later run as an empty config).
    #[test]
    fn a_config_write_that_fails_leaves_the_file_as_it_was() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tollgate.yaml");
        write_whole(&path, "listen: 127.0.0.1:18080\n").unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "listen: 127.0.0.1:18080\n");
        // The write cannot happen (its temporary name is taken by a directory).
        std::fs::create_dir(path.with_extension("yaml.partial")).unwrap();
        assert!(write_whole(&path, "listen: 127.0.0.1:19090\n").is_err());
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "listen: 127.0.0.1:18080\n");
    }

    /// The printed `token list` line names the binary so that a shell runs that binary, wherever
    /// the checkout is.
    #[test]
    fn the_printed_binary_path_is_one_shell_word() {
        assert_eq!(
            shell_word("/src/tollgate/target/release/tollgate"),
            "/src/tollgate/target/release/tollgate"
        );
        for path in ["/home/me/My Projects/tollgate", "/tmp/it's $HOME; `x` \\ \"q\"", "/tmp/a*b?"] {
            let out = std::process::Command::new("sh")
                .arg("-c")
                .arg(format!("printf %s {}", shell_word(path)))
                .output()
                .unwrap();
            assert_eq!(String::from_utf8(out.stdout).unwrap(), path);
        }
    }
}

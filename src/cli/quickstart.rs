//! `tollgate quickstart`: from a clean clone to an authenticated request in one command. Writes a
//! config for the embedded store, starts the built-in echo upstream, bootstraps an admin (or, on a
//! later run, gives the existing admin a fresh token), prints the token and the lines to try, and
//! serves.

use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::Path;

use anyhow::Context;

use crate::config::Config;
use crate::lifecycle::{self, TokenSpec};
use crate::store::{self, Owner};
use crate::{echo, server};

const ORG: &str = "demo";
const EMAIL: &str = "admin@demo.local";

fn config_text(port: u16, admin_port: u16, upstream: SocketAddr, dir: &Path) -> String {
    format!(
        r#"# Written by `tollgate quickstart`; edit it and the running gateway reloads it.
listen: 127.0.0.1:{port}
admin: {{ listen: "127.0.0.1:{admin_port}" }}
store:
  embedded: {{ path: "{store}" }}
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
        store = dir.join("store.redb").display(),
    )
}

/// Runs the quickstart; serves until stopped.
pub fn run(dir: &Path, port: u16, admin_port: u16) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let upstream_listener =
        TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).context("cannot start the echo upstream")?;
    let upstream = upstream_listener.local_addr()?;
    let path = dir.join("tollgate.yaml");
    std::fs::write(&path, config_text(port, admin_port, upstream, dir))
        .with_context(|| format!("cannot write {}", path.display()))?;
    let config = Config::load(&path).map_err(|e| anyhow::anyhow!("quickstart config invalid:\n{e}"))?;
    super::init_logging("warn,tollgate=info");

    let token = first_token(&config)?;
    echo::spawn(upstream_listener)?;
    print_instructions(&config, &path, &token);
    server::run(config, &path)
}

/// Bootstraps the demo admin, or gives the existing one a new token. The store is closed again
/// before the gateway opens it (the embedded store serves one process).
fn first_token(config: &Config) -> anyhow::Result<String> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(async {
        let store = store::open(&config.store)?;
        let params = config.argon2.params;
        let token = match store.find_user_by_email(ORG, EMAIL).await? {
            None => lifecycle::bootstrap(&store, params, &config.tokens, ORG, EMAIL).await?.1,
            Some(user) => {
                let spec = TokenSpec { display_name: Some("quickstart".into()), ..TokenSpec::default() };
                lifecycle::issue_token(&store, params, ORG, Owner::User(user.into_inner().id), spec).await?.0
            }
        };
        Ok(token.token)
    })
}

fn print_instructions(config: &Config, path: &Path, token: &str) {
    let gw = format!("http://{}", config.listen);
    let admin = format!("http://{}", config.admin.listen);
    println!("Tollgate is starting.");
    println!("  gateway    {gw}   (route /demo -> a built-in echo upstream, org \"{ORG}\")");
    println!("  admin API  {admin}");
    println!("  config     {}   (edits are picked up while it runs)", path.display());
    println!();
    println!("Access token for {EMAIL} (shown once):");
    println!("Access token: {token}");
    println!();
    println!("Try:");
    println!("  curl -i {gw}/demo/hello");
    println!("  curl -i -H \"Authorization: Bearer {token}\" {gw}/demo/hello");
    println!("  TOLLGATE_SERVER={admin} TOLLGATE_TOKEN={token} cargo run --release -- token list");
    println!();
    println!("Stop with Ctrl-C; run it again to continue with the same data.");
}

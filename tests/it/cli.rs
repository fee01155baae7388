//! The command line: `check-config` reports every error with its YAML path; `bootstrap` prints a
//! working admin token once.

use std::process::Command;

use crate::support::*;

fn check_config(yaml: &str) -> (bool, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.yaml");
    std::fs::write(&path, yaml).unwrap();
    let out = Command::new(tollgate_bin()).arg("check-config").arg("--config").arg(&path).output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

#[test]
fn check_config_accepts_the_shipped_example() {
    let example = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config/tollgate.yaml");
    let out = Command::new(tollgate_bin()).arg("check-config").arg("--config").arg(example).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn the_docker_compose_config_is_valid_but_for_its_compose_host_names() {
    // `echo` resolves only inside the compose network; everything else must be valid as shipped.
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config/docker.yaml");
    let text = std::fs::read_to_string(path).unwrap().replace("echo:9000", "127.0.0.1:9000");
    if let Err(e) = tollgate::config::Config::parse(&text) {
        panic!("config/docker.yaml: {e}");
    }
}

/// A list of strings in the shipped docker-compose.yml: `service`'s `field`.
fn compose_list(service: &str, field: &str) -> Vec<String> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docker-compose.yml");
    let compose: serde_yaml::Value = serde_yaml::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let list = compose["services"][service][field].as_sequence();
    let list = list.unwrap_or_else(|| panic!("services.{service}.{field} in docker-compose.yml, as a list"));
    list.iter().filter_map(|v| v.as_str()).map(str::to_string).collect()
}

/// PRODUCT: the shipped Redis keeps every acknowledged write (AOF, fsync on each), since a lost
/// revocation would bring a token back.
#[test]
fn the_shipped_redis_writes_every_change_to_disk_before_it_answers() {
    let command = compose_list("redis", "command");
    let setting = |name: &str| {
        command.iter().position(|a| a == name).and_then(|i| command.get(i + 1)).map(String::as_str)
    };
    assert_eq!(setting("--appendonly"), Some("yes"), "{command:?}");
    assert_eq!(setting("--appendfsync"), Some("always"), "{command:?}");
}

/// The gateway serves the config in this checkout, so an edit to it is picked up while it runs
/// (reload), and every service comes back after a reboot or a crash.
#[test]
fn the_shipped_compose_file_serves_the_checkouts_config_and_restarts() {
    let command = compose_list("tollgate", "command");
    let config = command.iter().position(|a| a == "--config").and_then(|i| command.get(i + 1)).unwrap();
    let volumes = compose_list("tollgate", "volumes");
    let (host, inside) = volumes
        .iter()
        .find_map(|v| v.strip_suffix(":ro")?.split_once(':').filter(|(_, inside)| config.starts_with(inside)))
        .unwrap_or_else(|| panic!("{config} is on no mounted directory: {volumes:?}"));
    let on_host =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(host).join(&config[inside.len() + 1..]);
    assert!(on_host.ends_with("config/docker.yaml") && on_host.exists(), "{}", on_host.display());
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docker-compose.yml");
    let compose: serde_yaml::Value = serde_yaml::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    for service in ["redis", "echo", "tollgate"] {
        assert_eq!(compose["services"][service]["restart"].as_str(), Some("unless-stopped"), "{service}");
    }
}

/// The admin API manages tokens: the shipped compose file publishes it to the host's loopback
/// only (a published port skips the host's firewall), the proxy to every interface.
#[test]
fn the_shipped_compose_file_keeps_the_admin_api_off_the_network() {
    let ports = compose_list("tollgate", "ports");
    assert!(ports.iter().any(|p| p == "8080:8080"), "{ports:?}");
    let admin: Vec<&String> = ports.iter().filter(|p| p.ends_with(":8081")).collect();
    assert_eq!(admin, ["127.0.0.1:8081:8081"], "{ports:?}");
}

/// `keygen` prints the line that adds its key to the config: pasted as it is (with a kid), the
/// config loads, whatever case the algorithm was asked for in.
#[test]
fn the_line_keygen_prints_loads_as_it_is() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("k.pem");
    let out = Command::new(tollgate_bin())
        .args(["keygen", "--algorithm", "es256", "--out"])
        .arg(&key)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let printed = String::from_utf8(out.stdout).unwrap();
    let line = printed.lines().find(|l| l.trim_start().starts_with("- { kid:")).expect(&printed);
    assert!(line.contains("algorithm: ES256"), "{line}");
    let yaml = format!("jwt:\n  signing_key: NEW-KID\n  keys:\n  {}\n", line.trim_end());
    let (ok, text) = check_config(&yaml);
    assert!(ok, "{yaml}\n{text}");

    // With --json: what it wrote, as data.
    let second = dir.path().join("k2.pem");
    let out = Command::new(tollgate_bin()).args(["keygen", "--json", "--out"]).arg(&second).output().unwrap();
    assert!(out.status.success(), "{out:?}");
    let wrote: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(wrote["algorithm"], "EdDSA", "{wrote}");
    assert_eq!(wrote["key_file"], second.to_str().unwrap(), "{wrote}");
    assert!(std::fs::read_to_string(&second).unwrap().contains("PRIVATE KEY"));
}

#[test]
fn check_config_names_the_yaml_path_of_every_error() {
    let yaml = r#"
listen: 127.0.0.1:8080
cache: { capacity: 10, colour: blue }
orgs: { acme: { projects: { shop: { environments: [production] } } } }
routes:
  - { path: /a, upstream: "no-such-host.invalid:80", org: acme, project: shop, environment: production }
  - { path: /b, upstream: "127.0.0.1:1", org: acme, project: shop, environment: production, retries: 3 }
"#;
    let (ok, text) = check_config(yaml);
    assert!(!ok);
    assert!(text.contains("cache.colour: unknown field"), "{text}");
    assert!(text.contains("routes[1].retries: unknown field"), "{text}");
    assert!(text.contains("routes[0].upstream:"), "{text}");
    assert!(!text.contains("panicked"), "{text}");

    // With --json, for a script: each problem with its path on stdout, and a failing exit code.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.yaml");
    std::fs::write(&path, yaml).unwrap();
    let check = |path: &std::path::Path| {
        let out =
            Command::new(tollgate_bin()).args(["check-config", "--json", "--config"]).arg(path).output();
        let out = out.unwrap();
        let answer: serde_json::Value = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)));
        (out.status.success(), answer)
    };
    let (ok, answer) = check(&path);
    assert!(!ok);
    assert_eq!(answer["ok"], false, "{answer}");
    let errors = answer["errors"].as_array().expect("errors");
    assert_eq!(errors.len(), 3, "{answer}");
    let one = dir.path().join("one.yaml");
    std::fs::write(&one, "cache: { colour: blue }\n").unwrap();
    let out = Command::new(tollgate_bin()).args(["check-config", "--json", "--config"]).arg(&one).output();
    let out = out.unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("(1 problem)"), "{out:?}");
    let colour = errors.iter().find(|e| e["path"] == "cache.colour").expect("cache.colour");
    assert!(colour["message"].as_str().unwrap().contains("unknown field"), "{answer}");
    let example = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config/tollgate.yaml");
    let (ok, answer) = check(&example);
    assert!(ok, "{answer}");
    assert_eq!(answer["ok"], true);
    assert!(answer["routes"].as_u64().unwrap() > 0, "{answer}");
}

#[test]
fn check_config_reports_a_missing_file_readably() {
    let out = Command::new(tollgate_bin())
        .args(["check-config", "--config", "/nonexistent/tollgate.yaml"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot read /nonexistent/tollgate.yaml"));
}

#[tokio::test]
async fn bootstrap_prints_a_working_admin_token_once() {
    let redis = Redis::start();
    let upstream = Upstream::start().await;
    let port = free_port();
    let config = gateway_config(port, &redis.url(), upstream.port);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.yaml");
    std::fs::write(&path, &config).unwrap();
    let bootstrap = || {
        Command::new(tollgate_bin())
            .arg("bootstrap")
            .arg("--config")
            .arg(&path)
            .args(["--org", "acme", "--email", "root@example.com"])
            .output()
            .unwrap()
    };
    let out = bootstrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let token =
        stdout.lines().find_map(|l| l.strip_prefix("Access token: ")).expect("token line").to_string();
    remember_secret(&token);

    let gateway = Gateway::start_with(port, &config);
    let resp =
        reqwest::Client::new().delete(gateway.url("/shop/x")).bearer_auth(&token).send().await.unwrap();
    let echo = echoed(resp).await;
    assert_eq!(echo["headers"]["x-auth-role"][0], "admin");

    // Within the config's token limits (`max_ttl: 30d`), and audited like any other issue.
    let admin = Cli::new(&gateway, &token);
    let id = &token[..10];
    let details = admin.json(&["token", "get", id]);
    let expires = humantime::parse_rfc3339(details["expires_at"].as_str().expect("an expiry")).unwrap();
    let lifetime = expires.duration_since(std::time::SystemTime::now()).unwrap();
    let month = std::time::Duration::from_secs(30 * 24 * 3600);
    assert!(lifetime > month - std::time::Duration::from_secs(120) && lifetime <= month, "{lifetime:?}");
    // That expiry, which no one asked for, is printed with the token.
    let printed = stdout.lines().find_map(|l| l.strip_prefix("Expires:")).expect("an Expires line");
    assert_eq!(printed.trim(), details["expires_at"], "{stdout}");
    let audit = admin.json(&["audit", "--token-id", id]);
    assert_eq!(audit.as_array().unwrap().len(), 1, "{audit}");
    assert_eq!(audit[0]["action"], "token.issue");
    assert_eq!(audit[0]["actor"], "bootstrap");

    // With --json, as `user add --issue-token` answers.
    let out = Command::new(tollgate_bin())
        .args(["bootstrap", "--json", "--config"])
        .arg(&path)
        .args(["--org", "acme", "--email", "ops@example.com"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let added: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    let second = added["token"].as_str().expect("the token").to_string();
    remember_secret(&second);
    assert_eq!(added["email"], "ops@example.com", "{added}");
    assert_eq!(added["org_role"], "admin", "{added}");
    assert_eq!(added["token_id"], &second[..10], "as service create gives it: {added}");
    let second_details = admin.as_token(&second).json(&["token", "get", &second[..10]]);
    assert_eq!(second_details["display_name"], "bootstrap");
    assert_eq!(added["token_expires_at"], second_details["expires_at"], "{added}");

    // The same email cannot be bootstrapped twice.
    let again = bootstrap();
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("already exists"));

    // Nor an org the config does not have, nor something that is not an email.
    for (org, email, why) in
        [("nosuch", "a@example.com", "not in the config's `orgs`"), ("acme", "notanemail", "not an email")]
    {
        let out = Command::new(tollgate_bin())
            .args(["bootstrap", "--config"])
            .arg(&path)
            .args(["--org", org, "--email", email])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && stderr.contains(why), "{org} {email}: {stderr}");
    }
}

#[tokio::test]
async fn serve_stops_with_the_reason_when_it_cannot_listen() {
    // Pingora binds in a task of its own; a port in use must stop `serve`, not leave the admin
    // API (and `/readyz`) running in front of no gateway.
    let redis = Redis::start();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.yaml");
    std::fs::write(&path, gateway_config(port, &redis.url(), free_port())).unwrap();
    let mut child = Command::new(tollgate_bin())
        .args(["serve", "--config"])
        .arg(&path)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut status = None;
    for _ in 0..1500 {
        status = child.try_wait().unwrap();
        if status.is_some() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let Some(status) = status else {
        let _ = child.kill();
        panic!("serve kept running with its listen address taken");
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    assert!(!status.success(), "{stderr}");
    assert!(stderr.contains(&format!("cannot listen on listen 127.0.0.1:{port}")), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

/// A TLS terminator on a free port in front of `backend`, with a certificate for `localhost`
/// signed by a CA of its own (both made by the `openssl` command); returns its port and the CA's
/// certificate file.
async fn tls_terminator(backend: String, dir: &std::path::Path) -> (u16, std::path::PathBuf) {
    use tokio_rustls::rustls::pki_types::pem::PemObject;
    use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let file = |name: &str| dir.join(name);
    let openssl = |args: &[&str]| {
        let out = Command::new("openssl").args(args).current_dir(dir).output().expect("the openssl command");
        assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    };
    let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"];
    openssl(
        &[
            &["req", "-x509"][..],
            &ec,
            &["-days", "1", "-subj", "/CN=test CA", "-keyout", "ca.key", "-out", "ca.pem"],
        ]
        .concat(),
    );
    openssl(
        &[&["req"][..], &ec, &["-subj", "/CN=localhost", "-keyout", "key.pem", "-out", "req.pem"]].concat(),
    );
    std::fs::write(file("ext.cnf"), "subjectAltName=DNS:localhost,IP:127.0.0.1\n").unwrap();
    openssl(&[
        "x509",
        "-req",
        "-in",
        "req.pem",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "1",
        "-extfile",
        "ext.cnf",
        "-out",
        "cert.pem",
    ]);
    let (cert, key) = (file("cert.pem"), file("key.pem"));
    let chain = vec![CertificateDer::from_pem_file(&cert).unwrap()];
    let config = tokio_rustls::rustls::ServerConfig::builder_with_provider(std::sync::Arc::new(
        tokio_rustls::rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(chain, PrivateKeyDer::from_pem_file(&key).unwrap())
    .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let (acceptor, backend) = (acceptor.clone(), backend.clone());
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(stream).await else { return };
                let Ok(mut plain) = tokio::net::TcpStream::connect(backend).await else { return };
                let _ = tokio::io::copy_bidirectional(&mut tls, &mut plain).await;
            });
        }
    });
    (port, file("ca.pem"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_reaches_an_admin_api_behind_tls() {
    let w = World::start().await;
    let admin = w.bootstrap_admin("acme").await;
    let dir = tempfile::tempdir().unwrap();
    let backend = w.gateway.admin_url().trim_start_matches("http://").to_string();
    let (port, cert) = tls_terminator(backend, dir.path()).await;
    let run = |trusted: bool| {
        let mut cli = Command::new(tollgate_bin());
        cli.args(["token", "list"])
            .env("TOLLGATE_SERVER", format!("https://localhost:{port}"))
            .env("TOLLGATE_TOKEN", &admin.token);
        if trusted {
            // rustls-native-certs reads the trusted certificates from here, as OpenSSL does.
            cli.env("SSL_CERT_FILE", &cert);
        }
        cli.output().unwrap()
    };
    let out = run(true);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains(&admin.token[..10]));
    // A certificate nobody trusts is refused, and says so.
    let out = run(false);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("cannot reach the admin API"), "{stderr}");
    assert!(stderr.contains("certificate"), "refused for its certificate: {stderr}");
}

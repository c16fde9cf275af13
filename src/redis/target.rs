//! Where and how to connect to Redis: `queue.redis_url` and the settings that go with it (TLS
//! verification, a password kept in a file). Read afresh for each new connection, so that a
//! reload or a renewed password file takes effect on the next one.

use super::conn::{redact, scrub};
use super::tls::Verify;
use crate::settings::{self, RedisMode};
use redis::{ConnectionAddr, IntoConnectionInfo};

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    /// `redis://` or `rediss://` (TLS), `[user[:password]@]host[:port][/db]`; in cluster mode,
    /// comma-separated seed URLs.
    pub url: String,
    pub mode: RedisMode,
    /// PEM file of the certificates that may sign the server's ("": the system's store).
    pub tls_ca_file: String,
    /// No verification of the server's certificate at all: self-signed test setups only.
    pub tls_insecure_skip_verify: bool,
    /// A file holding the password ("": none, or the URL's).
    pub password_file: String,
}

/// A target taken apart, ready to connect.
#[derive(Debug)]
pub struct Endpoint {
    pub host: String,
    pub port: u16,
    /// Some: TLS, verified so.
    pub tls: Option<Verify>,
    pub username: Option<String>,
    pub password: Option<String>,
    pub db: i64,
}

impl Target {
    pub fn from_settings() -> Target {
        Target {
            url: settings::redis_url(),
            mode: settings::redis_mode(),
            tls_ca_file: settings::redis_tls_ca_file(),
            tls_insecure_skip_verify: settings::redis_tls_insecure_skip_verify(),
            password_file: settings::redis_password_file(),
        }
    }

    /// A target with only a URL (the other settings at their defaults), for unit tests.
    #[cfg(test)]
    pub fn url(url: &str) -> Target {
        Target {
            url: url.to_owned(),
            mode: RedisMode::Standalone,
            tls_ca_file: String::new(),
            tls_insecure_skip_verify: false,
            password_file: String::new(),
        }
    }

    /// The URL as it may be shown: without its password.
    pub fn redacted(&self) -> String {
        self.urls().map(redact).collect::<Vec<_>>().join(",")
    }

    /// `message` without the URL's password.
    pub fn scrub(&self, message: &str) -> String {
        self.urls()
            .fold(message.to_owned(), |m, url| scrub(&m, url))
    }

    fn urls(&self) -> impl Iterator<Item = &str> {
        self.url.split(',').map(str::trim).filter(|u| !u.is_empty())
    }

    /// A cluster's seeds: one target per URL, with the same TLS and password settings.
    pub fn seeds(&self) -> Vec<Target> {
        self.urls()
            .map(|url| Target {
                url: url.to_owned(),
                ..self.clone()
            })
            .collect()
    }

    /// The node at `host:port` of the cluster this (seed) target belongs to: the same scheme,
    /// user, password and database, another address.
    pub fn at(&self, host: &str, port: u16) -> Target {
        let url = self.urls().next().unwrap_or_default();
        let (scheme, rest) = url.split_once("://").unwrap_or(("redis", url));
        let (authority, path) = rest.split_once('/').map_or((rest, ""), |(a, p)| (a, p));
        let userinfo = authority.rfind('@').map_or("", |at| &authority[..=at]);
        let host = if host.contains(':') {
            format!("[{host}]")
        } else {
            host.to_owned()
        };
        let path = if path.is_empty() {
            String::new()
        } else {
            format!("/{path}")
        };
        Target {
            url: format!("{scheme}://{userinfo}{host}:{port}{path}"),
            ..self.clone()
        }
    }

    /// Parses the URL and reads the password file. Errors never contain a secret.
    pub fn endpoint(&self) -> Result<Endpoint, String> {
        if self.url.contains('#') {
            return Err(format!(
                "queue.redis_url {} has a #fragment; for a server whose certificate cannot be \
                 verified, set queue.redis_tls_insecure_skip_verify instead",
                redact(self.url.split('#').next().unwrap_or_default())
            ));
        }
        let info = self.url.as_str().into_connection_info().map_err(|e| {
            format!(
                "queue.redis_url {}: {}",
                self.redacted(),
                self.scrub(&e.to_string())
            )
        })?;
        let (host, port, tls) = match info.addr() {
            ConnectionAddr::Tcp(host, port) => (host.clone(), *port, None),
            ConnectionAddr::TcpTls { host, port, .. } => (host.clone(), *port, Some(self.verify())),
            _ => {
                return Err(format!(
                    "queue.redis_url {}: only redis:// and rediss:// are supported",
                    self.redacted()
                ))
            }
        };
        let settings = info.redis_settings();
        let mut password = settings.password().map(str::to_owned);
        if !self.password_file.is_empty() {
            if password.is_some() {
                return Err(
                    "both queue.redis_url and queue.redis_password_file give a password; keep one"
                        .into(),
                );
            }
            password = Some(read_password(&self.password_file)?);
        }
        Ok(Endpoint {
            host,
            port,
            tls,
            username: settings.username().map(str::to_owned),
            password,
            db: settings.db(),
        })
    }

    fn verify(&self) -> Verify {
        if self.tls_insecure_skip_verify {
            Verify::InsecureSkip
        } else if self.tls_ca_file.is_empty() {
            Verify::System
        } else {
            Verify::CaFile(self.tls_ca_file.clone())
        }
    }
}

/// The file's first line (a trailing newline is not part of the password).
fn read_password(path: &str) -> Result<String, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("queue.redis_password_file {path}: {e}"))?;
    let password = text.lines().next().unwrap_or_default();
    if password.is_empty() {
        return Err(format!(
            "queue.redis_password_file {path}: the file is empty"
        ));
    }
    Ok(password.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_and_tls_urls_with_acl_users() {
        let e = Target::url("redis://127.0.0.1:6390/2").endpoint().unwrap();
        assert_eq!((e.host.as_str(), e.port, e.db), ("127.0.0.1", 6390, 2));
        assert!(e.tls.is_none() && e.username.is_none() && e.password.is_none());

        let mut t = Target::url("rediss://queue:s3cret@redis.internal:6380");
        t.tls_ca_file = "/etc/ca.pem".into();
        let e = t.endpoint().unwrap();
        assert_eq!(e.tls, Some(Verify::CaFile("/etc/ca.pem".into())));
        assert_eq!(e.username.as_deref(), Some("queue"));
        assert_eq!(e.password.as_deref(), Some("s3cret"));

        t.tls_insecure_skip_verify = true;
        assert_eq!(t.endpoint().unwrap().tls, Some(Verify::InsecureSkip));
        t.tls_ca_file.clear();
        t.tls_insecure_skip_verify = false;
        assert_eq!(t.endpoint().unwrap().tls, Some(Verify::System));
    }

    #[test]
    fn the_password_may_come_from_a_file_but_not_from_both() {
        let path = std::env::temp_dir().join(format!("queue_pg_pw_{}", std::process::id()));
        std::fs::write(&path, "from-file\n").unwrap();
        let mut t = Target::url("rediss://queue@127.0.0.1:6380");
        t.password_file = path.display().to_string();
        let e = t.endpoint().unwrap();
        assert_eq!(e.password.as_deref(), Some("from-file"));
        assert_eq!(e.username.as_deref(), Some("queue"));

        t.url = "rediss://queue:in-url@127.0.0.1:6380".into();
        let err = t.endpoint().unwrap_err();
        assert!(err.contains("keep one") && !err.contains("in-url"), "{err}");

        std::fs::write(&path, "").unwrap();
        t.url = "rediss://queue@127.0.0.1:6380".into();
        assert!(t.endpoint().unwrap_err().contains("empty"));
        std::fs::remove_file(&path).unwrap();
        assert!(t
            .endpoint()
            .unwrap_err()
            .contains("queue.redis_password_file"));
    }

    #[test]
    fn cluster_seeds_and_nodes_keep_scheme_user_and_password() {
        let mut t = Target::url("rediss://u:pw@10.0.0.1:7000, rediss://u:pw@10.0.0.2:7000");
        t.mode = RedisMode::Cluster;
        let seeds = t.seeds();
        assert_eq!(seeds.len(), 2);
        assert_eq!(seeds[1].url, "rediss://u:pw@10.0.0.2:7000");
        assert_eq!(seeds[1].mode, RedisMode::Cluster);
        assert_eq!(t.at("10.0.0.3", 7001).url, "rediss://u:pw@10.0.0.3:7001");
        assert_eq!(
            Target::url("redis://h:1/0").at("::1", 7).url,
            "redis://[::1]:7/0"
        );
        assert_eq!(
            t.redacted(),
            "rediss://u:***@10.0.0.1:7000,rediss://u:***@10.0.0.2:7000"
        );
        assert!(!t.scrub("at rediss://u:pw@10.0.0.2:7000: pw").contains("pw"));
    }

    #[test]
    fn url_fragments_and_other_schemes_are_refused_without_the_password() {
        let err = Target::url("rediss://u:pw1@h:1/#insecure")
            .endpoint()
            .unwrap_err();
        assert!(
            err.contains("queue.redis_tls_insecure_skip_verify"),
            "{err}"
        );
        assert!(!err.contains("pw1"), "{err}");
        let err = Target::url("unix:///tmp/redis.sock")
            .endpoint()
            .unwrap_err();
        assert!(err.contains("only redis:// and rediss://"), "{err}");
        let err = Target::url("redis://u:pw2@h:notaport")
            .endpoint()
            .unwrap_err();
        assert!(!err.contains("pw2"), "{err}");
    }
}

//! Redis connections. Every connection gets `queue.redis_timeout` for connecting, reading and
//! writing, so no caller ever waits on Redis longer than that.

use std::time::Duration;

/// Opens a connection with the timeout applied to connect, AUTH, and every later read and write.
pub fn connect(url: &str, timeout: Duration) -> Result<redis::Connection, String> {
    use redis::IntoConnectionInfo;
    let info = url
        .into_connection_info()
        .map_err(|e| redact_error(&e, url))?;
    // No CLIENT SETINFO in the handshake: each of its replies would get the whole timeout again.
    let handshake = info.redis_settings().clone().set_skip_set_lib_name();
    let client = redis::Client::open(info.set_redis_settings(handshake))
        .map_err(|e| redact_error(&e, url))?;
    let con = client
        .get_connection_with_timeout(timeout)
        .map_err(|e| redact_error(&e, url))?;
    con.set_read_timeout(Some(timeout))
        .and_then(|_| con.set_write_timeout(Some(timeout)))
        .map_err(|e| redact_error(&e, url))?;
    Ok(con)
}

/// The URL as it may be shown: `redis://user:***@host:port/db`.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme_end), Some(at)) if at > scheme_end => {
            let userinfo = &url[scheme_end + 3..at];
            let user = userinfo.split(':').next().unwrap_or("");
            format!("{}{}:***{}", &url[..scheme_end + 3], user, &url[at..])
        }
        _ => url.to_owned(),
    }
}

/// An error message that is safe to show: never contains the URL's password.
pub fn redact_error(e: &redis::RedisError, url: &str) -> String {
    scrub(&e.to_string(), url)
}

/// Removes the URL's password from `message`, wherever it appears.
pub fn scrub(message: &str, url: &str) -> String {
    let mut out = message.replace(url, &redact(url));
    if let Some(password) = password_of(url) {
        if !password.is_empty() {
            out = out.replace(password, "***");
        }
    }
    out
}

fn password_of(url: &str) -> Option<&str> {
    let scheme_end = url.find("://")?;
    let at = url.rfind('@')?;
    if at <= scheme_end {
        return None;
    }
    url[scheme_end + 3..at].split_once(':').map(|(_, p)| p)
}

/// Runs `f` with every signal blocked, then delivers what arrived meanwhile. Redis sockets have
/// read and write timeouts (SO_RCVTIMEO), and a signal during such a call fails it with EINTR
/// instead of restarting it, leaving a half-read reply: Postgres sends its backends signals at
/// any time (sinval catch-up, latches, reloads). `f` is bounded by `queue.redis_timeout`.
pub fn without_signals<R>(f: impl FnOnce() -> R) -> R {
    unsafe {
        let mut all: libc::sigset_t = std::mem::zeroed();
        let mut old: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut all);
        libc::pthread_sigmask(libc::SIG_BLOCK, &all, &mut old);
        let result = f();
        libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut());
        result
    }
}
